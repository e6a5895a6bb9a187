import pytest
import torch

from reference_impls.weighting.gradients import min_norm_weights, project_onto_simplex
from reference_impls.weighting.moco import MoCo


def test_first_step_follows_the_algorithm(grad_checks):
    grads = grad_checks.gradient_matrix(3, 6, seed=0)
    method = MoCo(beta=0.5, gamma=0.1, rho=0.2)
    result = method(grads)
    tracked = 0.5 * grads  # Y starts at 0: Y <- Y − β(Y − G)
    lambd = project_onto_simplex(torch.full((3,), 1 / 3, dtype=torch.float64)
                                 - 0.1 * (tracked @ tracked.T + 0.2 * torch.eye(3, dtype=torch.float64)) @ torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(method.tracked, tracked) and torch.allclose(method.lambd, lambd)
    assert torch.allclose(result.update, lambd @ tracked)


def moco_by_hand(sequence: list[torch.Tensor], beta: float, gamma: float, rho: float,
                 beta_decay: float = 0.5, gamma_decay: float = 0.5) -> torch.Tensor:
    """Algorithm 1 written out: track Y, one projected step on λ, update Yᵀλ; the last update."""
    k = len(sequence[0])
    tracked, lambd = torch.zeros_like(sequence[0]), torch.full((k,), 1 / k, dtype=torch.float64)
    for t, grads in enumerate(sequence, start=1):
        tracked = tracked - beta / t**beta_decay * (tracked - grads)
        gram = tracked @ tracked.T + rho * torch.eye(k, dtype=torch.float64)
        lambd = project_onto_simplex(lambd - gamma / t**gamma_decay * gram @ lambd)
    return lambd @ tracked


def test_later_steps_match_the_algorithm_with_defaults_and_with_rho(grad_checks):
    """From step 2 on λ is not uniform, so ρ changes λ (at step 1 it shifts all λ_k alike)."""
    sequence = [grad_checks.gradient_matrix(3, 4, seed=20 + t) for t in range(3)]
    default, damped = MoCo(), MoCo(rho=0.3)
    for grads in sequence:
        plain, with_rho = default(grads).update, damped(grads).update
    assert torch.allclose(plain, moco_by_hand(sequence, beta=0.5, gamma=0.1, rho=0.0))
    assert torch.allclose(with_rho, moco_by_hand(sequence, beta=0.5, gamma=0.1, rho=0.3))
    assert not torch.allclose(plain, with_rho)


def test_each_step_size_decays_with_its_own_exponent(grad_checks):
    # β_t = β / t^σ_β and γ_t = γ / t^σ_γ: distinct exponents, so swapping them changes the result.
    sequence = [grad_checks.gradient_matrix(3, 4, seed=30 + t) for t in range(4)]
    method = MoCo(beta=0.6, beta_decay=0.2, gamma=0.5, gamma_decay=0.9)
    for grads in sequence:
        update = method(grads).update
    expected = moco_by_hand(sequence, beta=0.6, gamma=0.5, rho=0.0, beta_decay=0.2, gamma_decay=0.9)
    swapped = moco_by_hand(sequence, beta=0.6, gamma=0.5, rho=0.0, beta_decay=0.9, gamma_decay=0.2)
    assert torch.allclose(update, expected, atol=1e-12) and not torch.allclose(update, swapped, atol=1e-6)


def test_step_sizes_decay_with_the_step_count(grad_checks):
    grads = grad_checks.gradient_matrix(2, 4, seed=1)
    method = MoCo(beta=0.5, beta_decay=0.5)
    method(grads)
    before = method.tracked.clone()
    method(2 * grads)
    beta_2 = 0.5 / 2**0.5
    assert torch.allclose(method.tracked, before - beta_2 * (before - 2 * grads))


def test_constant_gradients_converge_to_mgda(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=2)
    method = MoCo(gamma=1.0)
    for _ in range(3000):
        result = method(grads)
    assert torch.allclose(method.tracked, grads, atol=1e-6)
    assert torch.allclose(method.lambd, min_norm_weights(grads @ grads.T), atol=2e-3)
    assert abs(float(method.lambd.sum()) - 1) < 1e-12 and (method.lambd >= 0).all()
    assert result.weights is None


def test_shape_change_is_an_error(grad_checks):
    method = MoCo()
    method(grad_checks.gradient_matrix(2, 4, seed=3))
    with pytest.raises(ValueError):
        method(grad_checks.gradient_matrix(3, 4, seed=3))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(MoCo)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(MoCo(), lr=0.05)
    assert final < 0.5 * initial
