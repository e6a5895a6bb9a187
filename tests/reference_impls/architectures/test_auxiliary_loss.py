"""An auxiliary loss is a regulariser the training step can follow: it carries gradient.

``python -m reference_impls.train`` adds ``model.auxiliary_loss()`` to the objective of every
step (``train.auxiliary_loss``). A loss that comes back detached from the graph (a stray
``.detach()``, a ``.item()`` wrapped back into a tensor, a value cached under ``no_grad``) is
still logged with the right value, so a test of its value alone passes, but it trains
nothing. For every architecture that defines ``auxiliary_loss``, on each problem it accepts,
after one forward pass the loss must have a ``grad_fn`` and its backward must give at least
one parameter a non-zero gradient.

Parameters are perturbed first (as in ``test_every_parameter_trains``): several regularisers
start at a stationary point (an entropy at a uniform distribution), where the gradient is
zero although it is wired. Architectures whose regulariser is opt-in (weight 0 by default,
so the loss is a constant 0) are built with the weight in ``OPT_IN``.
"""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build, get

PROBLEMS = {
    "vector": (Problem(("a", "b"), (12,), {"a": 2, "b": 1}), (4, 12)),
    "dense": (Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), (4, 3, 8, 8)),
}

WITH_AUXILIARY_LOSS = [n for n in available() if callable(getattr(get(n), "auxiliary_loss", None))]

# name -> the weight that switches on a regulariser whose default weight is 0 (opt-in)
OPT_IN: dict[str, dict[str, float]] = {
    "dselect_k": {"entropy_weight": 0.1},
    "ming_moe": {"balance_weight": 0.1},
    "mod_squad": {"mi_weight": 0.1},
    "sluice": {"orthogonality_weight": 0.1},
    "snr": {"l0_weight": 0.1},
}


def _auxiliary_loss_after_a_forward_pass(name: str, problem: Problem, shape: tuple[int, ...], **kw: float):
    torch.manual_seed(0)
    model = build(name, problem, **kw)
    with torch.no_grad():  # off the stationary points of a symmetric initialisation
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.1 * torch.randn_like(p))
    model(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    return model, model.auxiliary_loss()


def test_every_architecture_with_an_auxiliary_loss_is_found():
    """The parametrisation below is not empty, and every opt-in entry names one of them."""
    assert "sluice" in WITH_AUXILIARY_LOSS and "dselect_k" in WITH_AUXILIARY_LOSS
    assert set(OPT_IN) <= set(WITH_AUXILIARY_LOSS)


@pytest.mark.parametrize("name", WITH_AUXILIARY_LOSS)
def test_auxiliary_loss_carries_gradient_to_the_parameters(name):
    """Pins that the harness's auxiliary term trains something: a detached loss would be dead weight."""
    checked = []
    for kind, (problem, shape) in PROBLEMS.items():
        try:
            model, loss = _auxiliary_loss_after_a_forward_pass(name, problem, shape, **OPT_IN.get(name, {}))
        except ValueError:
            continue  # the architecture refuses this kind of problem
        assert torch.is_tensor(loss) and loss.dim() == 0, f"{name} [{kind}]: not a scalar tensor"
        assert loss.grad_fn is not None, f"{name} [{kind}]: the auxiliary loss is detached from the graph"
        model.zero_grad(set_to_none=True)
        loss.backward()
        reached = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, f"{name} [{kind}]: the auxiliary loss {loss.item():.3g} gives no parameter a gradient"
        checked.append(kind)
    assert checked, f"{name}: refuses every problem here"


@pytest.mark.parametrize("name", sorted(OPT_IN))
def test_opt_in_regularisers_are_off_by_default(name):
    """An OPT_IN entry is needed only while the default weight makes the loss a constant 0."""
    for kind, (problem, shape) in PROBLEMS.items():
        try:
            _, loss = _auxiliary_loss_after_a_forward_pass(name, problem, shape)
        except ValueError:
            continue
        assert loss.item() == 0.0, f"{name} [{kind}]: on by default; drop its entry in OPT_IN"
