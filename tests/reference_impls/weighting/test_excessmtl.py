import math

import pytest
import torch

from reference_impls.weighting.excessmtl import ExcessMTL, excess_risk


def test_taylor_estimate_is_exact_on_a_quadratic():
    # L(θ) = ½ Σ_j h_j (θ_j − θ*_j)² + c: with the exact diagonal Hessian, ½ gᵀH⁻¹g = L − min L.
    h = torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64)
    optimum, theta, floor = torch.tensor([1.0, -2.0, 0.3]), torch.tensor([0.2, 0.5, -1.0]), 4.0
    loss = 0.5 * (h * (theta - optimum).double() ** 2).sum() + floor
    grad = (h * (theta - optimum).double())[None]
    assert torch.allclose(excess_risk(grad, h[None]), torch.stack([loss - floor]), rtol=1e-12)


def test_first_call_is_equal_weighting_and_sets_the_baseline():
    grads = torch.tensor([[3.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    method = ExcessMTL()
    result = method(grads)
    assert torch.equal(result.weights, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(result.update, grads.sum(0))
    # first step: h = sqrt(g² + ε), so E = ½ Σ g² / sqrt(g² + ε) ≈ ½ Σ |g|
    assert torch.allclose(method.baseline, torch.tensor([1.5, 0.5], dtype=torch.float64), rtol=1e-6)


def test_second_call_matches_hand_computed_exponentiated_step():
    eps = 1e-7
    g1 = torch.tensor([[3.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    g2 = torch.tensor([[1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    for eta in (0.7, None):  # None: the documented default η = 1
        method = ExcessMTL(eps=eps) if eta is None else ExcessMTL(step_size=eta, eps=eps)
        method(g1)
        weights = method(g2).weights
        curvature = torch.sqrt(g1**2 + g2**2 + eps)
        risk = 0.5 * (g2**2 / curvature).sum(1)
        base = 0.5 * (g1**2 / torch.sqrt(g1**2 + eps)).sum(1)
        alpha = torch.softmax((eta or 1.0) * risk / base, dim=0)  # uniform α times exp(η E/E0), renormalised
        assert torch.allclose(weights, 2 * alpha, rtol=1e-12)
        assert math.isclose(float(weights.sum()), 2.0, rel_tol=1e-12)


def test_a_zero_step_size_is_refused():
    """η = 0 would never move the weights: the constructor asks for η > 0."""
    with pytest.raises(ValueError, match="step_size > 0"):
        ExcessMTL(step_size=0.0)


def test_half_precision_gradients_are_accumulated_in_float64():
    """Squared-gradient sums and log-weights live in float64 (``solver_dtype``); only the weights are rounded back."""
    generator = torch.Generator().manual_seed(0)
    schedule = [torch.randn(3, 5, generator=generator, dtype=torch.float64).to(torch.float16) for _ in range(4)]
    half, wide = ExcessMTL(), ExcessMTL()
    for grads in schedule:
        got, expected = half(grads).weights, wide(grads.double()).weights
        assert got.dtype == torch.float16 and torch.equal(got, expected.to(torch.float16))


def run(method, schedule):
    return [method(g) for g in schedule][-1].weights


def test_scaling_one_task_loss_leaves_weights_unchanged(grad_checks):
    # Scale normalisation: L_k -> c L_k multiplies g_k, h_k and E_k by c, so E_k / E_k(0) is unchanged.
    schedule = [grad_checks.gradient_matrix(3, 8, seed=s) for s in range(6)]
    scale = torch.tensor([[1e3], [1.0], [1e-2]], dtype=torch.float64)
    plain = run(ExcessMTL(eps=0.0), schedule)
    scaled = run(ExcessMTL(eps=0.0), [g * scale for g in schedule])
    assert torch.allclose(plain, scaled, rtol=1e-10)


def test_converged_task_loses_weight_to_an_unconverged_one(grad_checks):
    # Task 0's gradient shrinks (it converges, though its loss may stay high); task 1's does not.
    g = grad_checks.gradient_matrix(2, 5, seed=4)
    schedule = [torch.stack([g[0] * 0.5**t, g[1]]) for t in range(15)]
    weights = run(ExcessMTL(), schedule)
    assert weights[1] > 5 * weights[0]


def test_permuting_tasks_over_several_steps(grad_checks):
    schedule = [grad_checks.gradient_matrix(4, 6, seed=10 + s) for s in range(5)]
    order = torch.tensor([2, 0, 3, 1])
    plain, permuted = run(ExcessMTL(), schedule), run(ExcessMTL(), [g[order] for g in schedule])
    assert torch.allclose(plain[order], permuted, rtol=1e-10)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(ExcessMTL)
    for dtype in (torch.float32, torch.float64):  # repeated calls on each case stay finite too
        for name, grads in grad_checks.degenerate_matrices(dtype).items():
            method = ExcessMTL()
            for _ in range(4):
                grad_checks.assert_finite(method(grads))


def test_changed_dimension_is_rejected(grad_checks):
    method = ExcessMTL()
    method(grad_checks.gradient_matrix(2, 4, seed=0))
    with pytest.raises(ValueError, match="changed shape"):
        method(grad_checks.gradient_matrix(2, 5, seed=0))


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(ExcessMTL(), lr=0.01)
    assert final < 0.5 * initial


def test_baseline_is_the_mean_over_the_warmup_calls():
    eps = 1e-7
    schedule = [
        torch.tensor([[3.0, 0.0], [0.0, -1.0]], dtype=torch.float64),
        torch.tensor([[1.0, 2.0], [0.5, 0.0]], dtype=torch.float64),
        torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.float64),
    ]
    method = ExcessMTL(warmup_steps=3, eps=eps)
    squared, risks = torch.zeros(2, 2, dtype=torch.float64), []
    for g in schedule:
        squared = squared + g**2
        risks.append(0.5 * (g**2 / torch.sqrt(squared + eps)).sum(1))
        # weights stay uniform (K·α = 1 each) until the baseline exists
        assert torch.equal(method(g).weights, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(method.baseline, sum(risks) / 3, rtol=1e-12)


def test_task_with_zero_baseline_gets_ratio_zero():
    # Task 1 has a zero gradient on the baseline call, so E_1(0) = 0: no scale, ratio 0 (not 1, not inf).
    # Task 0: E(0) = ½·9/3 = 1.5 and E = ½ (1/√10 + 1/1), so its ratio is (1 + 1/√10) / 3.
    method = ExcessMTL(step_size=0.8, eps=1e-30)  # ε too small to move the hand numbers
    method(torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    weights = method(torch.tensor([[1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)).weights
    ratio = torch.tensor([(1 + 10**-0.5) / 3, 0.0], dtype=torch.float64)
    assert torch.allclose(weights, 2 * torch.softmax(0.8 * ratio, dim=0), rtol=1e-12)
