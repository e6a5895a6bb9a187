import pytest
import torch

from reference_impls.weighting.ol_aux import OLAux


def test_first_step_is_equal_weighting_then_weights_follow_the_inner_products(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=0)
    method = OLAux(weight_lr=0.1)
    first = method(grads)
    assert torch.equal(first.weights, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(first.update, grads.sum(0))
    second = method(grads)
    expected = torch.cat([torch.ones(1, dtype=torch.float64), 1 + 0.1 * grads[1:] @ grads[0]])
    assert torch.allclose(second.weights, expected, rtol=1e-12)
    assert torch.allclose(second.update, expected @ grads, rtol=1e-12)


def test_weight_gradient_matches_autograd_through_one_sgd_step():
    # ∂L_0(θ − α Σ_k w_k ∇L_k(θ)) / ∂w_k = −α ∇L_0(θ')ᵀ ∇L_k(θ) ≈ −α ∇L_0ᵀ ∇L_k for small α.
    generator = torch.Generator().manual_seed(3)
    a = [torch.randn(4, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    hessians = [m @ m.T + torch.eye(4, dtype=torch.float64) for m in a]
    centres = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    theta = torch.randn(4, generator=generator, dtype=torch.float64)

    def task_losses(t):
        return torch.stack([0.5 * (t - c) @ h @ (t - c) for h, c in zip(hessians, centres)])

    t = theta.clone().requires_grad_()
    grads = torch.stack([torch.autograd.grad(loss, t, retain_graph=True)[0] for loss in task_losses(t)])
    alpha = 1e-5
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    task_losses(theta - alpha * (w @ grads))[0].backward()
    method = OLAux(weight_lr=1.0)
    method(grads)
    learned_step = method.aux_weights - 1  # weight_lr · ∇L_0ᵀ ∇L_k with weight_lr = 1
    assert torch.allclose(learned_step, -w.grad[1:] / alpha, rtol=1e-3)


def test_zero_weight_lr_is_equal_weighting(grad_checks):
    method = OLAux(weight_lr=0.0)
    for seed in range(5):
        grads = grad_checks.gradient_matrix(4, 6, seed=seed)
        assert torch.allclose(method(grads).update, grads.sum(0))


def test_aligned_auxiliary_gains_weight_and_conflicting_one_loses_it(grad_checks):
    g, h = grad_checks.gradient_matrix(2, 6, seed=7)
    grads = torch.stack([g, g + 0.1 * h, -g + 0.1 * h])
    method = OLAux(weight_lr=0.05)
    for _ in range(10):
        weights = method(grads).weights
    assert weights[0] == 1 and weights[1] > 1 > weights[2]
    clamped = OLAux(weight_lr=10.0, nonnegative=True)
    clamped(grads)
    assert clamped.aux_weights[1] == 0


def test_horizon_sums_the_inner_products_of_n_steps(grad_checks):
    schedule = [grad_checks.gradient_matrix(3, 4, seed=20 + s) for s in range(3)]
    method = OLAux(weight_lr=0.1, horizon=3)
    seen = [method(grads).weights for grads in schedule]
    assert all(torch.equal(w, torch.ones(3, dtype=torch.float64)) for w in seen)  # fixed within the horizon
    total = sum(grads[1:] @ grads[0] for grads in schedule)
    assert torch.allclose(method.aux_weights, 1 + 0.1 * total, rtol=1e-12)
    later = [grad_checks.gradient_matrix(3, 4, seed=40 + s) for s in range(3)]
    assert all(torch.allclose(method(grads).weights[1:], 1 + 0.1 * total) for grads in later)
    second = sum(grads[1:] @ grads[0] for grads in later)  # the next horizon starts from zero
    assert torch.allclose(method.aux_weights, 1 + 0.1 * (total + second), rtol=1e-12)


def test_auxiliary_tasks_permute_with_their_weights(grad_checks):
    schedule = [grad_checks.gradient_matrix(4, 5, seed=30 + s) for s in range(4)]
    order = torch.tensor([0, 3, 1, 2])  # the main task stays first
    plain, permuted = OLAux(weight_lr=0.1), OLAux(weight_lr=0.1)
    for grads in schedule:
        a, b = plain(grads), permuted(grads[order])
    assert torch.allclose(a.weights[order], b.weights) and torch.allclose(a.update, b.update)


def test_single_task_and_changed_task_count(grad_checks):
    grads = grad_checks.gradient_matrix(1, 4, seed=1)
    method = OLAux()
    assert torch.allclose(method(grads).update, grads[0])
    with pytest.raises(ValueError, match="tasks"):
        method(grad_checks.gradient_matrix(2, 4, seed=1))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(OLAux)
    grad_checks.check_permutation_equivariance(OLAux)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(OLAux(), lr=0.01)
    assert final < 0.5 * initial


def test_defaults_step_size_one_thousandth_and_weights_may_turn_negative():
    """weight_lr = 1e-3 by default, and without ``nonnegative`` a conflicting task's weight goes below 0."""
    grads = torch.tensor([[10.0, 0.0], [30.0, 1.0], [-50.0, 2.0]], dtype=torch.float64)
    method = OLAux()
    method(grads)
    # w_k = 1 + 1e-3 ∇L_0ᵀ ∇L_k: 1 + 0.3 and 1 - 0.5; twice more gives 1 - 1.5 < 0
    assert torch.allclose(method(grads).weights, torch.tensor([1.0, 1.3, 0.5], dtype=torch.float64), rtol=1e-12)
    method(grads)
    assert torch.allclose(method(grads).weights[2], torch.tensor(-0.5, dtype=torch.float64), rtol=1e-12)


def test_weights_accumulate_in_higher_precision_than_float32_gradients():
    """Each step adds 1e-8, below float32's resolution at 1: the weights still grow by their sum."""
    grads = torch.tensor([[1e-4, 0.0], [1e-4, 0.0]], dtype=torch.float32)
    method = OLAux(weight_lr=1.0)
    for _ in range(500):
        weights = method(grads).weights
    assert weights.dtype == torch.float32 and weights[1] > 1  # 499 updates of 1e-8 are visible
    assert abs(method.aux_weights[0].item() - (1 + 500e-8)) < 1e-12


def test_state_and_weights_keep_no_autograd_graph_of_the_gradients(grad_checks):
    """Gradients that carry a graph: the stored weights and the returned weights stay detached."""
    method = OLAux(weight_lr=0.1)
    for seed in range(3):
        grads = grad_checks.gradient_matrix(3, 5, seed=seed).requires_grad_()
        result = method(grads)
        assert not result.weights.requires_grad
        assert not method.aux_weights.requires_grad and not method.alignment.requires_grad
