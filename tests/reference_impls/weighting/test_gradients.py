"""The plumbing of gradients.py that several methods share: scaling, the step helpers, the simplex.

The K x K solvers have their own file (``test_solvers.py``); this one checks the contracts
the docstrings state that no single method's test pins down: how a step writes ``.grad``
(overwrite at parameter level, accumulate at representation level), what
``normalized_gramian`` divides by, and that ``project_onto_simplex`` is the projection.
"""

import pytest
import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.base import Aggregation, GradientMethod
from reference_impls.weighting.gradients import (
    gradient_step, gramian_to_invert, normalized_gramian, project_onto_simplex, representation_step,
    rounding_cutoff, write_gradients,
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
