"""Shared fixtures for the architecture tests: a device parameter and gradient probes."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from reference_impls.architectures.registry import Problem, build

from ..conftest import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every architecture test runs on the CPU and, when one is present, on CUDA."""
    return torch.device(request.param)


def _params_with_grad(model: nn.Module, loss: Tensor) -> set[str]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        name for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum().item() > 0
    }


@pytest.fixture
def params_with_grad() -> Callable[[nn.Module, Tensor], set[str]]:
    """``(model, loss) -> names of parameters that get a non-zero gradient from loss``."""
    return _params_with_grad


def _split_by_task(model: nn.Module, x: Tensor) -> dict[str, tuple[set[str], set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {t: ({names[id(p)] for p in model.task_specific_parameters(t)},
                _params_with_grad(model, model(x)[t].sum()))
            for t in model.tasks}


@pytest.fixture
def split_by_task() -> Callable[[nn.Module, Tensor], dict[str, tuple[set[str], set[str]]]]:
    """``(model, x) -> {task: (names it claims, names its output's gradient reaches)}``."""
    return _split_by_task


def reached_by_no_other(split: dict[str, tuple[set[str], set[str]]], task: str) -> set[str]:
    """The names ``task``'s output reaches and no other task's output does, from ``split_by_task``."""
    others = set().union(*(reached for t, (_, reached) in split.items() if t != task))
    return split[task][1] - others


def names_under(model: nn.Module, *prefixes: str) -> set[str]:
    """The parameter names of ``model`` that start with one of ``prefixes``."""
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def assert_each_task_owns_exactly(split: dict[str, tuple[set[str], set[str]]], own: Callable[[str], set[str]]) -> None:
    """Each task claims exactly ``own(task)``, and that is exactly what no other task's output reaches."""
    for t, (claimed, _) in split.items():
        assert claimed == reached_by_no_other(split, t) == own(t), t


def layer_norm_by_hand(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the last axis, then ``norm``'s affine map."""
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.square().mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight + norm.bias


def assert_mlps_have_a_gelu(mlps) -> None:
    """Each two-layer MLP computes W2 gelu(W1 t + b1) + b2, written out from its weights: a test
    that calls the block's own ``mlp`` cannot see a GELU left out of it."""
    mlps = list(mlps)
    assert mlps, "no MLP found"
    for mlp in mlps:
        t = torch.randn(3, mlp[0].in_features)
        torch.testing.assert_close(mlp(t), torch.nn.functional.linear(
            torch.nn.functional.gelu(mlp[0](t)), mlp[-1].weight, mlp[-1].bias))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def n_params() -> Callable[[nn.Module], int]:
    return count


def _short_training(name: str, dense: bool, device: torch.device, steps: int) -> tuple[float, float]:
    """Build ``name`` from the registry for a tiny 2-task image problem and fit learnable targets.

    The targets are a fixed linear map of the input (per pixel when ``dense``, of its spatial
    mean otherwise), so any working architecture can lower the loss within a few Adam steps.
    Returns the summed MSE before and after ``steps`` steps.
    """
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=dense)
    torch.manual_seed(0)
    model = registry.build(name, problem, width=8).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 4, 4, generator=g).to(device)
    mixing = {t: torch.randn(d, 2, generator=g).to(device) for t, d in problem.out_dims.items()}
    source = x if dense else x.mean(dim=(2, 3))
    targets = {t: torch.einsum("oc,bc...->bo...", m, source) for t, m in mixing.items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)

    def loss_fn() -> Tensor:
        return sum((o - targets[t]).square().mean() for t, o in model(x).items())

    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return first, loss_fn().item()


@pytest.fixture
def short_training() -> Callable[[str, bool, torch.device, int], tuple[float, float]]:
    """``(registry name, dense, device, steps) -> (loss before, loss after)`` on a tiny problem."""
    return _short_training


def _fit(model: nn.Module, x: Tensor, loss_of: Callable[[dict[str, Tensor]], Tensor],
         steps: int, lr: float) -> list[float]:
    """Adam on the trainable parameters for ``steps`` steps; the loss before each step."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def fit() -> Callable[..., list[float]]:
    """``(model, x, loss_of(outputs), steps, lr) -> losses``, one per step, before it."""
    return _fit


def assert_preferences_reach_opposite_trade_offs(model: nn.Module, training_loss: str, steps: int, lr: float) -> None:
    """Train a preference-conditioned model on two conflicting targets (out_a = x and out_a = -x),
    drawing α each step and minimising ``getattr(model, training_loss)(losses, α)``; then α = e_a and
    α = e_b must end at opposite points neither of which dominates the other."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    target = x[:, :1]

    def losses(out: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"a": (out["a"] - target).square().mean(), "b": (out["a"] + target).square().mean()}

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        alpha = model.sample_preference(g)
        loss = getattr(model, training_loss)(losses(model(x)), alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ends = [torch.stack(list(losses(model(x, a)).values())) for a in torch.eye(2)]
    assert ends[0][0] < ends[1][0] and ends[1][1] < ends[0][1]  # each vertex favours its task
    assert not (ends[0] <= ends[1]).all() and not (ends[1] <= ends[0]).all()


def _registry_output_shapes(name: str, device: torch.device) -> None:
    """Build ``name`` for a 2-task image problem, dense and pooled, and check each output's shape."""
    from reference_impls.architectures import registry

    for dense in (True, False):
        problem = registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=dense)
        model = registry.build(name, problem).to(device)
        out = model(torch.randn(3, 2, 4, 4, device=device))
        assert out["a"].shape == ((3, 2, 4, 4) if dense else (3, 2))
        assert out["b"].shape == ((3, 1, 4, 4) if dense else (3, 1))


@pytest.fixture
def registry_output_shapes() -> Callable[[str, torch.device], None]:
    """``(registry name, device)``: the registry builds it and its outputs have the problem's shapes."""
    return _registry_output_shapes


def built_in_eval(name: str, problems: dict) -> Iterator[tuple[str, nn.Module, Tensor]]:
    """``(kind, model in eval mode, a fixed input)`` for each of ``problems`` (``kind ->
    (Problem, input shape)``) that architecture ``name`` accepts (see :func:`accepted`)."""
    for kind, (problem, shape) in accepted(name, problems).items():
        model = build(name, problem).eval()
        yield kind, model, torch.randn(shape, generator=torch.Generator().manual_seed(0))


def names_the_refusal(error: Exception, argument: str, value: object) -> bool:
    """Whether a refusal says what it refuses: the argument's name, or its value as a number
    of its own (``got 0``, not the 0 inside ``10``)."""
    return argument in str(error) or re.search(rf"(?<![\w.-]){re.escape(str(value))}(?![\w.])", str(error)) is not None


def pooled_one_block_trunk(model: nn.Module, x: Tensor) -> Tensor:
    """The spatial mean of a one-block default conv trunk (3x3 zero-padded conv, ReLU), from its weights."""
    conv = model.trunk[0].blocks[0][0]
    return torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)).mean(dim=(2, 3))


def assert_same_outputs(model: nn.Module, other: nn.Module, x: Tensor, what: str, **tolerances: float) -> None:
    """``other(x) == model(x)`` task by task, without autograd and with the global random state
    reset before each pass, so models that sample (the diffusion decoders) draw the same noise."""
    with torch.no_grad():
        torch.manual_seed(7)
        want = model(x)
        torch.manual_seed(7)
        got = other(x)
    for task in want:
        torch.testing.assert_close(got[task], want[task], msg=f"{what}: task {task}", **tolerances)


#: For architectures that refuse every problem of a registry-wide test: ESMM and HMoE need
#: exactly two tasks of equal width (CTR and CTCVR; scenarios in one label space).
TWO_EQUAL_TASKS = (Problem(("a", "b"), (12,), {"a": 2, "b": 2}), (4, 12))


def builds(name: str, problem: Problem) -> bool:
    """Whether architecture ``name`` builds for ``problem`` at its defaults (a refusal is a ValueError)."""
    try:
        build(name, problem)
    except ValueError:
        return False
    return True


def accepted(name: str, problems: dict) -> dict:
    """The entries of ``problems`` (kind -> (Problem, input shape)) that architecture ``name``
    builds for, or TWO_EQUAL_TASKS when it builds for none of them, so that no architecture
    passes a registry-wide test untested; refusing that too is an error."""
    kept = {kind: entry for kind, entry in problems.items() if builds(name, entry[0])}
    if kept:
        return kept
    assert builds(name, TWO_EQUAL_TASKS[0]), f"{name} builds for none of the test's problems"
    return {"vector, two tasks of equal width": TWO_EQUAL_TASKS}
