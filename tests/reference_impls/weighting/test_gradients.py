"""The plumbing of gradients.py that several methods share: scaling, the step helpers, the simplex.

The K x K solvers have their own file (``test_solvers.py``); this one checks the contracts
the docstrings state that no single method's test pins down: how a step writes ``.grad``
(overwrite at parameter level, accumulate at representation level), what
``normalized_gramian`` divides by, and that ``project_onto_simplex`` is the projection.
"""

import pytest
import torch

import reference_impls.weighting.gradients as gradients
from reference_impls.toy.regression import make_problem
from reference_impls.weighting.base import Aggregation, GradientMethod, GramianWeighting
from reference_impls.weighting.gradients import (
    gradient_step, gramian_to_invert, normalized_gramian, per_task_gradients, project_onto_simplex,
    representation_step, rounding_cutoff, rows_rounding_cutoff, write_gradients,
)


class FixedWeights(GradientMethod):
    """Σ_k w_k g_k with given weights: any other combination would show in the gradients."""

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights

    def __call__(self, grads: torch.Tensor) -> Aggregation:
        weights = torch.tensor(self.weights, dtype=grads.dtype, device=grads.device)
        return Aggregation(update=weights @ grads, weights=weights)


def test_normalized_gramian_divides_by_the_largest_diagonal_entry():
    gramian = torch.tensor([[4.0, 1.0, 0.5], [1.2, 9.0, -2.0], [0.5, -2.0, 1.0]])
    matrix, scale = normalized_gramian(gramian)
    assert scale == 9.0 and matrix.dtype == torch.float64
    symmetric = (gramian.double() + gramian.double().T) / 2  # rounding makes G Gᵀ a little asymmetric
    assert torch.allclose(matrix, symmetric / 9.0, rtol=1e-15, atol=0)
    for empty in (torch.zeros(2, 2), torch.full((2, 2), float("inf"))):
        matrix, scale = normalized_gramian(empty)
        assert scale == 0.0 and torch.equal(matrix, torch.zeros(2, 2, dtype=torch.float64))
    matrix, scale = normalized_gramian(torch.zeros(0, 0))  # K = 0: no row is non-zero either
    assert scale == 0.0 and matrix.shape == (0, 0)


def losses_and_parameters(seed: int):
    problem = make_problem(seed=seed)
    model = problem.model
    z = model(problem.inputs)
    losses = torch.stack([((p - problem.targets[:, k]) ** 2).mean() for k, p in enumerate(model.predict(z))])
    return losses, z, problem.shared_parameters(), list(model.heads.parameters())


def test_gradient_step_overwrites_and_weights_only_the_shared_parameters():
    losses, _, shared, heads = losses_and_parameters(seed=5)
    expected_shared = torch.autograd.grad(0.3 * losses[0] + 2.0 * losses[1], shared, retain_graph=True)
    expected_heads = torch.autograd.grad(losses.sum(), heads, retain_graph=True)
    for p in shared + heads:
        p.grad = torch.full_like(p, 7.0)  # stale values must be replaced, not added to
    gradient_step(FixedWeights([0.3, 2.0]), losses, shared, task_params=heads)
    for p, g in zip(shared + heads, expected_shared + expected_heads):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_representation_step_accumulates_like_backward():
    losses, z, shared, heads = losses_and_parameters(seed=6)
    expected_shared = torch.autograd.grad(0.3 * losses[0] + 2.0 * losses[1], shared, retain_graph=True)
    expected_heads = torch.autograd.grad(losses.sum(), heads, retain_graph=True)
    for p in shared + heads:
        p.grad = torch.full_like(p, 7.0)  # representation_step adds, as backward() does
    representation_step(FixedWeights([0.3, 2.0]), losses, z, task_params=heads)
    for p, g in zip(shared + heads, expected_shared + expected_heads):
        assert torch.allclose(p.grad, g + 7.0, atol=1e-6)


def test_write_gradients_refuses_a_vector_of_the_wrong_size():
    params = [torch.zeros(2, 3, requires_grad=True), torch.zeros(4, requires_grad=True)]
    write_gradients(torch.arange(10.0), params)
    assert torch.equal(params[1].grad, torch.arange(6.0, 10.0))
    with pytest.raises(ValueError):
        write_gradients(torch.arange(11.0), params)
    # A model mixing dtypes gets a promoted update; each .grad must still have its parameter's dtype.
    mixed = [torch.zeros(2, requires_grad=True), torch.zeros(1, dtype=torch.float64, requires_grad=True)]
    write_gradients(torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64), mixed)
    assert mixed[0].grad.dtype == torch.float32 and torch.equal(mixed[0].grad, torch.tensor([0.5, 1.5]))


def test_simplex_projection_meets_its_optimality_conditions():
    # x = max(v − τ, 0) with Σx = 1 is the projection: v_i − x_i = τ where x_i > 0, v_i <= τ elsewhere.
    generator = torch.Generator().manual_seed(0)
    for size in (1, 2, 5, 12):
        for scale in (1e-3, 1.0, 1e3):
            v = scale * torch.randn(size, generator=generator, dtype=torch.float64) + 3.0
            x = project_onto_simplex(v)
            assert (x >= 0).all() and abs(float(x.sum()) - 1) < 1e-12
            support = x > 0
            tau = (v - x)[support]
            assert torch.allclose(tau, tau[0].expand_as(tau), rtol=0, atol=1e-12 * (1 + scale))
            assert (v[~support] <= tau[0] + 1e-12 * (1 + scale)).all()
    assert torch.allclose(project_onto_simplex(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)),
                          torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), rtol=0, atol=1e-15)


def test_gramian_to_invert_widens_only_an_ill_conditioned_low_precision_gramian():
    """Well-conditioned float32 rows keep their float32 Gramian and cut-off (no extra cost);
    nearly dependent ones get the float64 Gramian of the rows, built in column blocks, with the
    rows' (much lower) cut-off; float64 rows are used as they are."""
    generator = torch.Generator().manual_seed(0)
    a, b, n = torch.randn(3, 50, generator=generator, dtype=torch.float64)
    independent = torch.stack([a, b, n]).float()
    gram, cutoff = gramian_to_invert(independent, floor=1e-10)
    assert gram.dtype == torch.float32 and cutoff == rounding_cutoff(torch.float32, 1e-10)
    nearly = torch.stack([a, b, a + 0.5 * b + 0.01 * n]).float()
    gram, cutoff = gramian_to_invert(nearly, floor=1e-10, block=7)  # 50 columns in blocks of 7
    rows = nearly.double()
    assert gram.dtype == torch.float64 and cutoff < 1e-7
    torch.testing.assert_close(gram, rows @ rows.T, rtol=1e-14, atol=0)
    gram, cutoff = gramian_to_invert(rows, floor=1e-10)
    assert gram.dtype == torch.float64 and cutoff == 1e-10


def test_losses_may_be_a_sequence_a_vector_or_a_single_scalar():
    """The K losses come as a list of scalars or as a tensor; a 0-d tensor is K = 1."""
    losses, _, shared, _ = losses_and_parameters(seed=7)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses]
    for batched in (False, True):
        assert torch.allclose(per_task_gradients(list(losses), shared, batched=batched), torch.stack(rows))
        assert torch.allclose(per_task_gradients(losses[1], shared, batched=batched), rows[1][None])
    for form in (list, lambda losses: losses[0]):
        losses, _, shared, heads = losses_and_parameters(seed=7)
        weights = [0.3, 2.0] if form is list else [1.5]
        expected = torch.autograd.grad(sum(w * l for w, l in zip(weights, losses)), shared, retain_graph=True)
        gradient_step(FixedWeights(weights), form(losses), shared, task_params=heads)
        assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(shared, expected))
        losses, z, shared, heads = losses_and_parameters(seed=7)
        representation_step(FixedWeights(weights), form(losses), z, task_params=heads)
        assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(shared, expected))


@pytest.mark.parametrize("batched", [False, True])
def test_unused_parameters_get_zero_columns_in_the_parameters_dtype(batched):
    # L_1 = Σ a², L_2 = Σ c·a: rows (2a, c), exact in float16; ``unused`` (6 entries) gets zeros.
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16, requires_grad=True)
    unused = torch.zeros(2, 3, dtype=torch.float16, requires_grad=True)
    c = torch.tensor([3.0, 0.25, -1.0], dtype=torch.float16)
    losses = torch.stack([(a * a).sum(), (c * a).sum()])
    matrix = per_task_gradients(losses, [unused, a], batched=batched)
    expected = torch.cat([torch.zeros(2, 6, dtype=torch.float16), torch.stack([2 * a.detach(), c])], dim=1)
    assert matrix.dtype == torch.float16 and torch.equal(matrix, expected)


def test_steps_accept_parameters_that_no_loss_uses():
    """Parameter level: an unused parameter's .grad is overwritten with zeros, like the others.
    Representation level (backward semantics): a head no loss uses keeps its .grad untouched."""
    losses, _, shared, heads = losses_and_parameters(seed=8)
    spare_shared, spare_head = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    spare_head.grad = torch.full((2,), 7.0)
    gradient_step(FixedWeights([1.0, 1.0]), losses, shared + [spare_shared], task_params=heads + [spare_head])
    assert torch.equal(spare_shared.grad, torch.zeros(3)) and torch.equal(spare_head.grad, torch.zeros(2))
    losses, z, shared, heads = losses_and_parameters(seed=8)
    spare_head = torch.ones(2, requires_grad=True)
    representation_step(FixedWeights([1.0, 1.0]), losses, z, task_params=heads + [spare_head])
    assert spare_head.grad is None and all(p.grad is not None for p in shared + heads)


class CheckedDouble(torch.autograd.Function):
    """x -> 2x whose backward checks on the host that the gradient is finite (``.item()``):
    an ordinary backward runs it, the vectorised one (``batched=True``, vmap) cannot."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError("non-finite gradient")
        return 2 * grad


def test_default_steps_work_for_operators_vmap_cannot_batch():
    # batched=False is the default because not every operator supports the vectorised pass.
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)

    def losses():
        y = CheckedDouble.apply(x)
        return torch.stack([y.sum(), (y * y).sum()])  # gradients 2 and 8x

    assert torch.equal(per_task_gradients(losses(), [x]), torch.stack([torch.full((3,), 2.0), 8 * x.detach()]))
    gradient_step(FixedWeights([1.0, 0.5]), losses(), [x])
    assert torch.equal(x.grad, 2 + 4 * x.detach())


class GramianSpy(GramianWeighting):
    """Records the Gramian it is given; weights 1/‖g_k‖² depend on its scale, not only its shape."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def weights_from_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        self.seen.append(gramian)
        return 1 / gramian.diagonal()


def test_distributed_representation_step_uses_the_full_batch_gramian(monkeypatch):
    """Two ranks simulated in one process: rank 0 runs the step on its half of the batch, and
    the all-reduce adds rank 1's Gramian. The method must see the Gramian of the full batch
    (the losses being means, dL/dz of the full batch is that of each half divided by 2)."""
    problem = make_problem(seed=9, num_samples=16)
    model = problem.model

    def losses_on(rows):
        z = model(problem.inputs[rows])
        predictions = torch.stack(model.predict(z), dim=1)
        return ((predictions - problem.targets[rows]) ** 2).mean(0), z

    losses, z = losses_on(slice(0, 16))
    full = per_task_gradients(losses, [z])
    losses, z = losses_on(slice(8, 16))
    other = per_task_gradients(losses, [z])
    monkeypatch.setattr(gradients, "_distributed", lambda: True)
    monkeypatch.setattr(gradients.dist, "all_reduce", lambda tensor: tensor.add_(other @ other.T))
    monkeypatch.setattr(gradients.dist, "get_world_size", lambda: 2)
    spy = GramianSpy()
    losses, z = losses_on(slice(0, 8))
    aggregation = representation_step(spy, losses, z)
    assert torch.allclose(spy.seen[0], full @ full.T, rtol=1e-5, atol=0)
    assert torch.allclose(aggregation.weights, 1 / (full * full).sum(1), rtol=1e-5, atol=0)


def test_gramian_to_invert_decides_on_the_cosines_whatever_the_row_norms():
    """The float32 Gramian is kept when the rows' cosine matrix is well conditioned: condition
    number below 1 / (100 · cut-off), about 84 for float32. Rows of very different norms have
    the same cosines, so they must get the same decision."""
    cutoff = rounding_cutoff(torch.float32, 1e-10)
    generator = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(6, 3, generator=generator, dtype=torch.float64)).Q.T  # orthonormal
    for condition in (40.0, 200.0):
        cos = (condition - 1) / (condition + 1)  # cosine eigenvalues 1 ± cos and 1: ratio = condition
        unit = torch.stack([basis[0], cos * basis[0] + (1 - cos**2) ** 0.5 * basis[1], basis[2]])
        for norms in ([1.0, 1.0, 1.0], [1e-3, 1.0, 1e3], [1e3, 1e-2, 1e-3]):
            grads = (torch.tensor(norms, dtype=torch.float64)[:, None] * unit).float()
            gram, _ = gramian_to_invert(grads, floor=1e-10)
            assert (gram.dtype == torch.float64) == (condition > 1 / (100 * cutoff)), (condition, norms)


def test_cutoffs_follow_their_documented_rules():
    floor = 1e-10
    assert rounding_cutoff(torch.float64, floor) == floor == rows_rounding_cutoff(torch.float64, floor)
    single = rounding_cutoff(torch.float32, floor)
    assert 1e-5 < single < 1e-3  # 1000 eps
    # Rows' rounding is eps in a singular value, so eps² in an eigenvalue: the square of the above.
    assert rows_rounding_cutoff(torch.float32, floor) == pytest.approx(single**2, rel=1e-12)
    for half in (torch.float16, torch.bfloat16):  # 1000 eps is about 1 or more: capped
        assert rounding_cutoff(half, floor) == 1e-2 == rows_rounding_cutoff(half, floor)
