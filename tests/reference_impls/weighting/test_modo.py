import pytest
import torch

from reference_impls.weighting.mgda import MGDA
from reference_impls.weighting.modo import MoDo


def simplex_projection_by_bisection(v):
    """Independent projection: find τ with Σ max(v − τ, 0) = 1 by bisection."""
    low, high = float(v.min()) - 1, float(v.max())
    for _ in range(200):
        tau = (low + high) / 2
        low, high = (tau, high) if float((v - tau).clamp_min(0).sum()) > 1 else (low, tau)
    return (v - (low + high) / 2).clamp_min(0)


def test_weight_update_by_hand():
    g1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    g2 = torch.tensor([[2.0, 1.0, 0.0], [1.0, -1.0, 1.0]], dtype=torch.float64)
    g3 = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    method = MoDo(gamma=0.2, rho=0.1)
    result = method(g1, g2, g3)
    # G₁G₂ᵀ = [[2, 3], [1, -2]]; with λ = (½, ½): G₁G₂ᵀλ = (2.5, −0.5), + ρλ = (2.55, −0.45).
    step = torch.tensor([0.5 - 0.2 * 2.55, 0.5 + 0.2 * 0.45], dtype=torch.float64)  # (−0.01, 0.59)
    expected = simplex_projection_by_bisection(step)  # both shift by 0.21: (0.2, 0.8)
    assert torch.allclose(expected, torch.tensor([0.2, 0.8], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(result.weights, expected, atol=1e-12)
    assert torch.allclose(result.update, expected @ g3, atol=1e-12)  # the third sample moves θ


def test_rho_term_by_hand_once_lambda_is_not_uniform():
    # At λ = (½, ½) the term ρλ shifts every entry equally and the projection removes it, so
    # the first step cannot show ρ; the second step starts from a non-uniform λ and does.
    g1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    g2 = torch.tensor([[2.0, 1.0, 0.0], [1.0, -1.0, 1.0]], dtype=torch.float64)
    method = MoDo(gamma=0.1, rho=0.5)
    # G₁G₂ᵀ = [[2, 3], [1, -2]]; step (0.5 − 0.1·2.75, 0.5 + 0.1·0.25) = (0.225, 0.525), + 0.125 each
    assert torch.allclose(method(g1, g2).weights, torch.tensor([0.35, 0.65], dtype=torch.float64), atol=1e-12)
    # G₁G₂ᵀλ = (2.65, −0.95), ρλ = (0.175, 0.325): step (0.0675, 0.7125), + 0.11 each
    step = torch.tensor([0.35 - 0.1 * (2.65 + 0.175), 0.65 - 0.1 * (-0.95 + 0.325)], dtype=torch.float64)
    expected = simplex_projection_by_bisection(step)
    assert torch.allclose(expected, torch.tensor([0.1775, 0.8225], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(method(g1, g2).weights, expected, atol=1e-12)


def test_defaults_are_gamma_one_tenth_and_no_rho(grad_checks):
    g1, g2 = grad_checks.gradient_matrix(3, 5, seed=7), grad_checks.gradient_matrix(3, 5, seed=8)
    default, explicit = MoDo(), MoDo(gamma=0.1, rho=0.0)
    for _ in range(3):
        assert torch.equal(default(g1, g2).weights, explicit(g1, g2).weights)
    assert not torch.allclose(MoDo(gamma=0.2)(g1, g2).weights, MoDo()(g1, g2).weights)


def test_update_defaults_to_the_mean_of_the_two_samples(grad_checks):
    g1, g2 = grad_checks.gradient_matrix(3, 5, seed=1), grad_checks.gradient_matrix(3, 5, seed=2)
    result = MoDo()(g1, g2)
    assert torch.allclose(result.update, result.weights @ (g1 + g2) / 2, atol=1e-12)


def test_identical_samples_give_a_projected_gradient_step_of_mgda(grad_checks):
    for seed in range(10):
        grads = grad_checks.gradient_matrix(4, 7, seed)
        method = MoDo(gamma=0.05)
        lambd = torch.full((4,), 0.25, dtype=torch.float64)
        result = method(grads)  # one sample: G₂ = G₁
        gradient_of_mgda_objective = grads @ (grads.T @ lambd)  # ∇_λ ½||Gᵀλ||²
        expected = simplex_projection_by_bisection(lambd - 0.05 * gradient_of_mgda_objective)
        assert torch.allclose(result.weights, expected, atol=1e-10)
        assert torch.allclose(MoDo(gamma=0.05)(grads, grads.clone()).weights, expected, atol=1e-10)


def test_repeated_steps_on_one_sample_converge_to_mgda(grad_checks):
    grads = grad_checks.gradient_matrix(3, 6, seed=3)
    lipschitz = float(torch.linalg.eigvalsh(grads @ grads.T).max())
    method = MoDo(gamma=1.0 / lipschitz)
    for _ in range(3000):
        result = method(grads)
    mgda = MGDA()(grads)
    assert torch.allclose(result.weights, mgda.weights, atol=1e-6)


def test_double_sampling_removes_the_noise_bias():
    # True gradients (1, 0, 0, 0) and (0, 3, 0, 0): MGDA weights (0.9, 0.1). Unit noise on every
    # entry adds d·I = 4·I to E[G₁G₁ᵀ] (pulling λ toward ½) but nothing to E[G₁G₂ᵀ].
    true = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    noise = torch.randn(3000, 2, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    averages = {}
    for double in (True, False):
        method, average = MoDo(gamma=0.01), torch.zeros(2, dtype=torch.float64)
        for step in range(3000):
            first, second = true + noise[step, 0], true + noise[step, 1]
            weights = method(first, second if double else first).weights
            average += weights / 2000 if step >= 1000 else 0.0
        averages[double] = average
    assert abs(float(averages[True][0]) - 0.9) < 0.03
    assert float(averages[False][0]) < 0.8  # one sample: biased toward equal weights


def test_observe_feeds_the_second_sample_once(grad_checks):
    g1, g2 = grad_checks.gradient_matrix(2, 4, seed=4), grad_checks.gradient_matrix(2, 4, seed=5)
    method, reference = MoDo(), MoDo()
    method.observe_second_sample(g2)
    assert torch.allclose(method(g1).weights, reference(g1, g2).weights)
    assert method.pending_second is None


def test_invalid_arguments_are_rejected(grad_checks):
    with pytest.raises(ValueError):
        MoDo(gamma=0.0)
    with pytest.raises(ValueError):
        MoDo(rho=-1.0)
    with pytest.raises(ValueError):
        MoDo()(torch.ones(2, 3), torch.ones(3, 3))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(MoDo)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(MoDo)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(3, 9, seed=6).to(device)
    result = MoDo()(grads, grads * 0.5)
    assert result.update.device == grads.device and result.weights.device == grads.device


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(MoDo(gamma=0.1), lr=0.05)
    assert final < 0.5 * initial


def test_weight_step_is_computed_in_float64_for_float32_gradients():
    """G₁ = [[1e8, 1], [1e8, 0]], G₂ = 2I, λ = (½, ½): G₁G₂ᵀλ = (1e8 + 1, 1e8). The common 1e8
    is removed by the projection and the 1 leaves λ = (½ − γ/2, ½ + γ/2) = (0.45, 0.55); in
    float32 1e8 + 1 rounds to 1e8 and λ would stay (½, ½)."""
    g1 = torch.tensor([[1e8, 1.0], [1e8, 0.0]], dtype=torch.float32)
    g2 = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float32)
    method = MoDo(gamma=0.1)
    weights = method(g1, g2).weights
    assert weights.dtype == torch.float32 and method.lambd.dtype == torch.float64
    assert torch.allclose(weights, torch.tensor([0.45, 0.55]), atol=1e-6)


def test_an_overflowing_step_keeps_the_previous_weights(grad_checks):
    """Rows of size 1e160 overflow G₁G₂ᵀλ even in float64: λ stays where it was (1/K at first)."""
    grads = grad_checks.gradient_matrix(3, 4, seed=1)
    method = MoDo()
    result = method(1e160 * grads)
    assert torch.equal(result.weights, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.isfinite(result.update).all()
    before = method(grads).weights.clone()
    assert torch.equal(method(1e160 * grads).weights, before)
