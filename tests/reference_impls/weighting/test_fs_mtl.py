import pytest
import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.base import GradientMethod
from reference_impls.weighting.fs_mtl import FlatSeekingMTL, perturbed_task_gradients, task_perturbations
from reference_impls.weighting.gradients import per_task_gradients
from reference_impls.weighting.mgda import MGDA
from reference_impls.weighting.upgrad import UPGrad

# Two quadratic tasks L_k = ½ θᵀ A_k θ − b_kᵀ θ: g_k = A_k θ − b_k, so g_k^SAM − g_k = ρ A_k g_k / ||g_k||.
CURVATURES = torch.stack([torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)),
                          torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64)])
OFFSETS = torch.tensor([[1.0, 0.0, 1.0], [0.0, -1.0, 2.0]], dtype=torch.float64)


def quadratic_losses(theta):
    return torch.stack([0.5 * theta @ a @ theta - b @ theta for a, b in zip(CURVATURES, OFFSETS)])


def test_each_task_is_perturbed_along_its_own_gradient_and_the_flat_part_is_by_hand():
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    grads = per_task_gradients(quadratic_losses(theta), [theta])
    perturbed = perturbed_task_gradients(lambda: quadratic_losses(theta), [theta], grads, rho=0.1)
    for k in range(2):
        expected = grads[k] + 0.1 * CURVATURES[k] @ grads[k] / grads[k].norm()
        assert torch.allclose(perturbed[k], expected, atol=1e-12)
    assert torch.equal(theta.detach(), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))  # restored
    assert torch.allclose(task_perturbations(grads, 0.1).norm(dim=1), torch.full((2,), 0.1, dtype=torch.float64))


def test_loss_and_flatness_parts_are_aggregated_separately(grad_checks):
    grads = grad_checks.gradient_matrix(3, 6, seed=1)
    perturbed = grads + 0.3 * grad_checks.gradient_matrix(3, 6, seed=2)
    for aggregator in (MGDA(), UPGrad()):
        result = FlatSeekingMTL(aggregator)(grads, perturbed)
        expected = aggregator(grads).update + aggregator(perturbed - grads).update
        assert torch.allclose(result.update, expected, atol=1e-12)
        # ... which is not the aggregator applied to the SAM gradients themselves (a non-linear Agg).
        assert not torch.allclose(result.update, aggregator(perturbed).update, atol=1e-3)


def test_equal_weighting_reduces_to_the_sum_of_per_task_sam_gradients(grad_checks):
    grads = grad_checks.gradient_matrix(4, 5, seed=3)
    perturbed = grads + grad_checks.gradient_matrix(4, 5, seed=4)
    assert torch.allclose(FlatSeekingMTL()(grads, perturbed).update, perturbed.sum(0), atol=1e-12)


def test_zero_radius_is_the_aggregator_alone():
    problem = make_problem(seed=0)
    shared = problem.shared_parameters()
    grads = per_task_gradients(problem.losses(), shared)
    perturbed = perturbed_task_gradients(problem.losses, shared, grads, rho=0.0)
    assert torch.allclose(perturbed, grads, atol=1e-6)
    result = FlatSeekingMTL(MGDA(), rho=0.0)(grads, perturbed)
    assert torch.allclose(result.update, MGDA()(grads).update, atol=1e-6)


def test_adaptive_perturbation_scales_by_the_parameters():
    grads = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    theta = torch.tensor([2.0, 0.5], dtype=torch.float64)
    eps = task_perturbations(grads, 0.1, theta)
    # ε_k = ρ θ² ⊙ g_k / ||θ ⊙ g_k||: row 0 = 0.1 (4, 0.25) / ||(2, 0.5)||.
    assert torch.allclose(eps[0], 0.1 * torch.tensor([4.0, 0.25], dtype=torch.float64) / (4.25**0.5), atol=1e-12)
    assert torch.allclose((eps / theta.abs()).norm(dim=1), torch.full((2,), 0.1, dtype=torch.float64))


def test_sam_gradients_use_the_objects_radius_and_adaptive_setting():
    # For a quadratic, ∇L_k(θ + ε_k) = g_k + A_k ε_k exactly; ε_k = ρ θ² ⊙ g_k / ||θ ⊙ g_k||.
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    grads = per_task_gradients(quadratic_losses(theta), [theta])
    square = theta.detach() ** 2
    for rho, adaptive in ((0.2, True), (0.3, False)):
        method = FlatSeekingMTL(rho=rho, adaptive=adaptive)
        perturbed = method.sam_gradients(lambda: quadratic_losses(theta), [theta], grads)
        for k in range(2):
            scale = square if adaptive else torch.ones(3, dtype=torch.float64)
            epsilon = rho * scale * grads[k] / (scale.sqrt() * grads[k]).norm()
            assert torch.allclose(perturbed[k], grads[k] + CURVATURES[k] @ epsilon, atol=1e-12)


def test_sharper_task_gets_the_larger_flatness_push():
    # Same gradient, curvatures 10 vs 1 along it: h_k = ρ A_k g/||g|| is 10x larger for the sharp task.
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    sharp, flat = torch.diag(torch.tensor([10.0, 1.0], dtype=torch.float64)), torch.eye(2, dtype=torch.float64)
    losses = lambda: torch.stack([0.5 * theta @ sharp @ theta - 9 * theta[0], 0.5 * theta @ flat @ theta])  # noqa: E731
    grads = per_task_gradients(losses(), [theta])
    assert torch.allclose(grads[0], grads[1])
    h = perturbed_task_gradients(losses, [theta], grads, rho=0.05) - grads
    assert torch.allclose(h[0].norm() / h[1].norm(), torch.tensor(10.0, dtype=torch.float64))


def test_perturbed_gradients_come_through_observe_sam_gradients():
    grads = torch.eye(2, dtype=torch.float64)
    method = FlatSeekingMTL()
    method.observe_sam_gradients(2 * grads)
    assert torch.allclose(method(grads).update, torch.tensor([2.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="SAM"):
        method(grads)  # consumed
    with pytest.raises(ValueError):
        FlatSeekingMTL()(grads, torch.ones(3, 2))
    with pytest.raises(ValueError):
        FlatSeekingMTL(rho=-1.0)


class WithPerturbation(GradientMethod):
    """Adapter for the shared degenerate-input check: SAM gradients = 1.5 G, MGDA inside."""

    def __call__(self, grads):
        return FlatSeekingMTL(MGDA())(grads, 1.5 * grads)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(WithPerturbation)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=5).to(device)
    assert FlatSeekingMTL(MGDA())(grads, grads * 1.1).update.device == grads.device


def test_training_decreases_total_loss():
    problem = make_problem(seed=0)
    shared, heads = problem.shared_parameters(), list(problem.model.heads.parameters())
    optimizer = torch.optim.SGD(shared + heads, lr=0.02)
    method = FlatSeekingMTL(MGDA(), rho=0.05, adaptive=True)
    initial = float(problem.losses().detach().sum())
    for _ in range(60):
        optimizer.zero_grad()
        losses = problem.losses()
        grads = per_task_gradients(losses, shared)
        perturbed = method.sam_gradients(problem.losses, shared, grads)
        for p, g in zip(heads, torch.autograd.grad(losses.sum(), heads)):
            p.grad = g
        update = method(grads, perturbed).update
        offset = 0
        for p in shared:
            p.grad = update[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        optimizer.step()
    assert float(problem.losses().detach().sum()) < 0.5 * initial


def test_zero_gradient_rows_get_no_perturbation():
    """A task with no gradient (or, adaptive, none where θ is non-zero) is evaluated at θ itself."""
    grads = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0], [0.0, 5.0, 0.0]], dtype=torch.float64)
    plain = task_perturbations(grads, 0.5)
    assert torch.equal(plain[0], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(plain[1], torch.tensor([0.3, 0.0, 0.4], dtype=torch.float64))
    theta = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)  # θ ⊙ g_2 = 0
    adaptive = task_perturbations(grads, 0.5, theta)
    assert torch.equal(adaptive[0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(adaptive[2], torch.zeros(3, dtype=torch.float64))


def test_plain_sam_perturbation_by_default():
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    grads = per_task_gradients(quadratic_losses(theta), [theta])
    method = FlatSeekingMTL(rho=0.2)
    perturbed = method.sam_gradients(lambda: quadratic_losses(theta), [theta], grads)
    assert torch.allclose(perturbed, perturbed_task_gradients(lambda: quadratic_losses(theta), [theta], grads, 0.2),
                          atol=1e-12)


def test_defaults_are_our_documented_values():
    # ρ = 0.05 with plain SAM is ours (the authors' scripts use ρ = 2 with adaptive SAM); pinned so a
    # silent change of default shows. L(θ) = θ² at θ = 2: g = 2θ = 4.
    #   plain SAM:    ε = ρ·g/|g| = 0.05,          g^SAM = 2·(2 + 0.05) = 4.1
    #   (adaptive:    ε = ρ·θ²·g/|θ·g| = 0.05·4·4/8 = 0.1, g^SAM = 4.2; ρ = 0.5 would give 5.0)
    theta = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    grads = torch.tensor([[4.0]], dtype=torch.float64)
    method = FlatSeekingMTL()
    perturbed = method.sam_gradients(lambda: (theta ** 2).reshape(1), [theta], grads)
    torch.testing.assert_close(perturbed, torch.tensor([[4.1]], dtype=torch.float64))
    assert torch.equal(theta.detach(), torch.tensor([2.0], dtype=torch.float64))  # restored


def test_small_gradients_still_get_a_perturbation_of_radius_rho():
    # ε_k = ρ g_k/||g_k|| has norm ρ whatever ||g_k||; adaptive: ||ε_k / |θ| || = ρ.
    grads = torch.tensor([[3e-3, -4e-3, 0.0], [0.0, 1e-6, 1e-6]], dtype=torch.float64)
    torch.testing.assert_close(task_perturbations(grads, 0.1).norm(dim=1), torch.full((2,), 0.1, dtype=torch.float64))
    theta = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    adaptive = task_perturbations(grads, 0.1, theta)
    torch.testing.assert_close((adaptive / theta.abs()).norm(dim=1), torch.full((2,), 0.1, dtype=torch.float64))


def test_a_shared_parameter_no_loss_uses_gets_a_zero_sam_gradient():
    # ``spare`` is in the shared list but outside every loss's graph: its SAM gradient is 0 (as
    # ``flatten`` does for a missing gradient), and the rows come in the dtype of ``grads``.
    theta = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    spare = torch.tensor([1.5], requires_grad=True)

    def losses():
        return torch.stack([0.5 * (theta * theta).sum(), (theta - 1.0).square().sum()])

    grads = per_task_gradients(losses(), [theta, spare]).double()
    perturbed = perturbed_task_gradients(losses, [theta, spare], grads, rho=0.1)
    assert perturbed.dtype == torch.float64
    shift = 0.1 * grads[0, :3] / grads[0].norm()
    torch.testing.assert_close(perturbed[0, :3], theta.detach().double() + shift, rtol=1e-6, atol=1e-6)
    assert torch.equal(perturbed[:, 3], torch.zeros(2, dtype=torch.float64))


def test_a_call_without_sam_gradients_is_refused():
    with pytest.raises(ValueError, match="SAM"):
        FlatSeekingMTL()(torch.ones(2, 3))
