"""Lookahead transference (Fifty et al. 2020): closed form, no side effects, IT-MTL's choice."""

import copy

import pytest
import torch
from torch import Tensor, nn

from reference_impls.affinity.transference import (
    default_candidates,
    lookahead_transference,
    model_losses,
    select_update,
    shared_gradients,
    shared_names,
)
from reference_impls.architectures.base import MultiTaskModel

TASKS = ("a", "b", "c")


class SharedLinear(MultiTaskModel):
    """Every task predicts x · w with the same w: a linear regression with K targets."""

    def __init__(self, dim: int):
        super().__init__(TASKS)
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: x @ self.w for t in self.tasks}

    def task_specific_parameters(self, task: str):
        return iter(())


class TrunkAndHeads(MultiTaskModel):
    def __init__(self):
        super().__init__(TASKS)
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {t: self.heads[t](z).squeeze(-1) for t in self.tasks}

    def task_specific_parameters(self, task: str):
        return self.heads[task].parameters()


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).mean()


def regression_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    directions = torch.randn(3, 5, generator=g, dtype=torch.float64)
    targets = {t: x @ v for t, v in zip(TASKS, directions)}
    model = SharedLinear(5)
    with torch.no_grad():
        model.w.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return model, x, targets


def test_transference_matches_the_closed_form_of_linear_regression():
    model, x, targets = regression_problem()
    lr = 0.05
    z = lookahead_transference(model, model_losses(model, x, targets, {t: mse for t in TASKS}), lr)
    w, n = model.w.detach(), len(x)
    ys = torch.stack([targets[t] for t in TASKS])
    loss = lambda v, y: ((x @ v - y) ** 2).mean()  # noqa: E731
    expected = torch.empty(3, 3, dtype=torch.float64)
    for i in range(3):
        w_i = w - lr * (2 / n) * x.T @ (x @ w - ys[i])  # ∇_w mean((Xw − y_i)²) = (2/n) Xᵀ(Xw − y_i)
        for j in range(3):
            expected[i, j] = 1 - loss(w_i, ys[j]) / loss(w, ys[j])
    torch.testing.assert_close(z, expected)


def test_measuring_leaves_the_model_and_its_gradients_unchanged():
    torch.manual_seed(0)
    model = TrunkAndHeads()
    before = copy.deepcopy(model.state_dict())
    x, targets = torch.randn(8, 4), {t: torch.randn(8) for t in TASKS}
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    lookahead_transference(model, loss_fn, lr=0.5)
    select_update(model, loss_fn, lr=0.5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


class NormalisedTrunk(TrunkAndHeads):
    """A trunk with batch norm: a forward pass in training mode updates its running statistics."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_measuring_leaves_batch_norm_statistics_unchanged_in_training_mode():
    torch.manual_seed(2)
    model = NormalisedTrunk().train()
    before = copy.deepcopy(model.state_dict())
    x, targets = torch.randn(8, 4), {t: torch.randn(8) for t in TASKS}
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    z = lookahead_transference(model, loss_fn, lr=0.5)
    select_update(model, loss_fn, lr=0.5)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.isfinite(z).all()


def test_self_transference_is_positive_for_a_small_step_and_opposite_tasks_hurt_each_other():
    model, x, targets = regression_problem(1)
    targets["b"] = -targets["a"]  # b wants exactly the opposite prediction of a
    with torch.no_grad():
        model.w.zero_()  # L_a = L_b at w = 0, and every step towards a moves away from b
    z = lookahead_transference(model, model_losses(model, x, targets, {t: mse for t in TASKS}), lr=1e-3)
    assert (z.diagonal() > 0).all()
    assert z[0, 1] < 0 and z[1, 0] < 0


def test_only_the_shared_parameters_take_the_lookahead_step():
    torch.manual_seed(1)
    model = TrunkAndHeads()
    assert set(shared_names(model)) == {"trunk.weight", "trunk.bias"}
    x, targets = torch.randn(8, 4), {t: torch.randn(8) for t in TASKS}
    lr = 0.3
    z = lookahead_transference(model, model_losses(model, x, targets, {t: mse for t in TASKS}), lr)
    before = torch.stack([mse(model(x)[t], targets[t]) for t in TASKS]).detach()
    for i, task in enumerate(TASKS):  # independent check: an SGD step on the trunk of a copy
        stepped = copy.deepcopy(model)
        mse(stepped(x)[task], targets[task]).backward()
        torch.optim.SGD(stepped.trunk.parameters(), lr=lr).step()
        after = torch.stack([mse(stepped(x)[t], targets[t]) for t in TASKS]).detach()
        torch.testing.assert_close(z[i], 1 - after / before)


def test_it_mtl_takes_the_candidate_with_the_lowest_lookahead_total_loss():
    model, x, targets = regression_problem(2)
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    flip = lambda g: {"ascent": -g.sum(0), "descent": g.sum(0)}  # noqa: E731
    name, update, totals = select_update(model, loss_fn, lr=0.01, candidates=flip)
    assert name == "descent" and totals["descent"] < totals["ascent"]

    name, update, totals = select_update(model, loss_fn, lr=0.05)
    assert set(totals) == {"total", "pcgrad"}
    for candidate, total in totals.items():  # recompute each lookahead loss by hand
        w = model.w.detach() - 0.05 * default_candidates(_grads(model, x, targets))[candidate]
        torch.testing.assert_close(total, sum(((x @ w - targets[t]) ** 2).mean() for t in TASKS))
    assert name == min(totals, key=lambda k: totals[k].item())
    assert torch.equal(update, default_candidates(_grads(model, x, targets))[name])


def _grads(model: SharedLinear, x: Tensor, targets: dict[str, Tensor]) -> Tensor:
    w = model.w.detach()
    return torch.stack([(2 / len(x)) * x.T @ (x @ w - targets[t]) for t in TASKS])


def test_default_candidates_are_the_summed_gradient_and_its_pcgrad_projection_by_hand():
    """g_1 = (1, 0), g_2 = (−1, 1) conflict: each loses its component along the other, then they add."""
    candidates = default_candidates(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    torch.testing.assert_close(candidates["total"], torch.tensor([0.0, 1.0]))  # Σ_j g_j, not the mean
    # g_1 + g_2/2 = (0.5, 0.5) and g_2 + g_1 = (0, 1): their sum
    torch.testing.assert_close(candidates["pcgrad"], torch.tensor([0.5, 1.5]))


def test_a_task_whose_loss_is_zero_and_stays_zero_gets_no_transference():
    """0 → 0 is no change (Z = 0), not a loss removed entirely (Z = 1)."""
    model, x, targets = regression_problem(3)
    zero = lambda pred, target: (0.0 * pred).sum()  # noqa: E731  a task already solved exactly
    z = lookahead_transference(model, model_losses(model, x, targets, {"a": zero, "b": mse, "c": mse}), lr=0.05)
    torch.testing.assert_close(z[:, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(z).all() and (z[1:, 1:].diagonal() > 0).all()


@pytest.mark.parametrize("lr", [0.0, -0.05, float("nan")])
def test_learning_rate_must_be_above_zero(lr):
    model, x, targets = regression_problem()
    losses = model_losses(model, x, targets, {t: mse for t in TASKS})
    with pytest.raises(ValueError, match=f"lr must be above 0, got {lr}"):
        lookahead_transference(model, losses, lr)
    with pytest.raises(ValueError, match=f"lr must be above 0, got {lr}"):
        select_update(model, losses, lr)


def test_a_shared_parameter_no_loss_reaches_gets_a_zero_gradient_row_slice():
    """∂L_i/∂θ is 0 for a θ no loss uses: its slice of every gradient row is 0, so no step moves it."""
    params = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True),
              "unused": torch.ones(3, dtype=torch.float64, requires_grad=True)}
    losses = torch.stack([params["w"].pow(2).sum(), 3 * params["w"][0]])  # ∇: (2, 4) and (3, 0)
    grads = shared_gradients(losses, params, ["unused", "w"])
    expected = torch.tensor([[0, 0, 0, 2.0, 4.0], [0, 0, 0, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grads, expected)


def test_a_step_that_solves_the_measured_task_exactly_gives_transference_one():
    """L_j > 0 before and exactly 0 after: the whole loss is removed, Z = 1 − 0 / L_j = 1 (not 'unchanged')."""
    model = SharedLinear(1)  # w = 0; one example x = 1, so task t predicts w and its loss is (w − y_t)²
    x = torch.ones(1, 1, dtype=torch.float64)
    targets = {"a": torch.tensor([2.0], dtype=torch.float64), "b": torch.tensor([-1.0], dtype=torch.float64),
               "c": torch.tensor([0.5], dtype=torch.float64)}
    z = lookahead_transference(model, model_losses(model, x, targets, {t: mse for t in TASKS}), lr=0.5)
    # a step of lr · 2 (w − y_i) from w = 0 lands on w = y_i exactly
    y = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    expected = 1 - (y[:, None] - y[None, :]) ** 2 / y[None, :] ** 2
    assert z.diagonal().tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-12)


class DropoutTrunk(TrunkAndHeads):
    """A trunk that samples in training mode: dropout on its input, plus noise from a generator
    the model keeps itself (as Gumbel routers and sampled widths do)."""

    def __init__(self):
        super().__init__()
        self.double()
        self.drop = nn.Dropout(0.5)
        self.generator = torch.Generator().manual_seed(7)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        noise = torch.rand(x.shape, generator=self.generator, dtype=x.dtype)
        return super().forward(self.drop(x) + noise)


def test_every_evaluation_draws_the_same_noise_so_a_tiny_step_gives_first_order_transference():
    """Z_ij → lr ⟨g_i, g_j⟩ / L_j as lr → 0; with a new draw per evaluation Z would be the noise."""
    torch.manual_seed(3)
    model = DropoutTrunk().train()
    x, targets = torch.randn(16, 4, dtype=torch.float64), {t: torch.randn(16, dtype=torch.float64) for t in TASKS}
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    assert torch.equal(loss_fn(params), loss_fn(params))
    losses = loss_fn(params)
    grads = shared_gradients(losses, params, shared_names(model))
    lr = 1e-8
    first_order = lr * (grads @ grads.T) / losses.detach()[None, :]
    z = lookahead_transference(model, loss_fn, lr)
    torch.testing.assert_close(z, first_order, rtol=1e-4, atol=0)
    assert torch.equal(z, lookahead_transference(model, loss_fn, lr))


def test_measuring_leaves_the_models_generators_and_the_callers_random_stream_where_they_were():
    torch.manual_seed(4)
    model = DropoutTrunk().train()
    twin = copy.deepcopy(model)
    x, targets = torch.randn(8, 4, dtype=torch.float64), {t: torch.randn(8, dtype=torch.float64) for t in TASKS}
    caller = torch.get_rng_state()
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    lookahead_transference(model, loss_fn, lr=0.1)
    select_update(model, loss_fn, lr=0.1)
    assert torch.equal(torch.get_rng_state(), caller)
    assert torch.equal(model.generator.get_state(), twin.generator.get_state())
    torch.manual_seed(5)
    after_measuring = model(x)
    torch.manual_seed(5)
    for task, output in twin(x).items():  # the next training draw is the one it would have been
        assert torch.equal(after_measuring[task], output), task


def test_the_seed_decides_the_draw_and_defaults_to_the_callers_stream():
    torch.manual_seed(6)
    model = DropoutTrunk().train()
    x, targets = torch.randn(8, 4, dtype=torch.float64), {t: torch.randn(8, dtype=torch.float64) for t in TASKS}
    params = {n: p.detach() for n, p in model.named_parameters()}
    losses = lambda **kw: model_losses(model, x, targets, {t: mse for t in TASKS}, **kw)(params)  # noqa: E731
    assert torch.equal(losses(seed=1), losses(seed=1))
    assert not torch.equal(losses(seed=1), losses(seed=2))
    torch.manual_seed(8)
    first = losses()
    torch.manual_seed(8)
    assert torch.equal(first, losses())


class FrozenTrunk(TrunkAndHeads):
    def __init__(self, freeze_heads: bool = False):
        super().__init__()
        self.trunk.requires_grad_(False)
        if freeze_heads:
            self.heads.requires_grad_(False)


def test_frozen_shared_weights_take_no_lookahead_step_and_none_at_all_is_refused():
    torch.manual_seed(7)
    model = FrozenTrunk()
    x, targets = torch.randn(8, 4), {t: torch.randn(8) for t in TASKS}
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    with pytest.raises(ValueError, match="FrozenTrunk has no trainable shared parameters.*shared="):
        lookahead_transference(model, loss_fn, lr=0.1)
    with pytest.raises(ValueError, match="no trainable shared parameters"):
        select_update(model, loss_fn, lr=0.1)
    # the model is usable with the names given explicitly:
    z = lookahead_transference(model, loss_fn, lr=0.1, shared=["trunk.weight"])
    assert z.shape == (3, 3) and torch.isfinite(z).all()
    unfrozen = TrunkAndHeads()
    assert shared_names(unfrozen) == ["trunk.weight", "trunk.bias"]
    plain = nn.Linear(2, 1)  # no shared_parameters(): every trainable parameter is moved
    plain.bias.requires_grad_(False)
    assert shared_names(plain) == ["weight"]


def test_shared_names_that_are_not_parameters_are_refused_with_the_names():
    model = TrunkAndHeads()
    with pytest.raises(ValueError, match=r"does not have: \['trunk.wieght'\]"):
        shared_names(model, ["trunk.weight", "trunk.wieght"])
    assert shared_names(model, ["heads.a.bias"]) == ["heads.a.bias"]


def test_it_mtl_steps_only_the_parameters_named_in_shared():
    """``shared=[...]`` chooses what the candidates move: the update has that parameter's size, and each
    lookahead total is the loss after an SGD step of that parameter alone (checked on a copy)."""
    torch.manual_seed(3)
    model = TrunkAndHeads()
    x, targets = torch.randn(8, 4), {t: torch.randn(8) for t in TASKS}
    loss_fn = model_losses(model, x, targets, {t: mse for t in TASKS})
    name, update, totals = select_update(model, loss_fn, lr=0.2, shared=["heads.a.bias"])
    assert update.shape == (1,)
    stepped = copy.deepcopy(model)
    sum(mse(stepped(x)[t], targets[t]) for t in TASKS).backward()  # the "total" candidate: Σ_j g_j
    if name == "total":
        torch.testing.assert_close(update, stepped.heads.a.bias.grad)
    torch.optim.SGD([stepped.heads.a.bias], lr=0.2).step()
    torch.testing.assert_close(totals["total"], sum(mse(stepped(x)[t], targets[t]) for t in TASKS).detach())


def _pcgrad_in_index_order(grads: Tensor) -> Tensor:
    """PCGrad written out: each g_i, in turn against g_j for j = 0, 1, ... (j != i), loses its component
    along g_j when they conflict; the projected gradients are summed."""
    total = torch.zeros_like(grads[0])
    for i in range(len(grads)):
        g = grads[i].clone()
        for j in range(len(grads)):
            if j != i and g @ grads[j] < 0:
                g = g - (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
        total = total + g
    return total


def test_the_pcgrad_candidate_visits_the_other_tasks_in_index_order():
    """With three tasks the order of the projections matters; the candidate is the fixed index order,
    so IT-MTL's choice does not depend on a shuffle."""
    grads = torch.tensor([[1.0, 0.0, 0.2], [-0.8, 1.0, 0.0], [-0.3, -0.9, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(default_candidates(grads)["pcgrad"], _pcgrad_in_index_order(grads))
