import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.gradnorm import GradNorm


def _linear_losses(scales: tuple[float, float], weight: torch.Tensor) -> torch.Tensor:
    # L_k = scale_k * sum(W): ||∇_W L_k|| = scale_k * sqrt(numel)
    return torch.stack([s * weight.sum() for s in scales])


def test_gradient_norms_of_the_shared_layer():
    weight = torch.ones(2, 2, requires_grad=True)
    norms = GradNorm(num_tasks=2).gradient_norms(_linear_losses((1.0, 3.0), weight), weight)
    assert torch.allclose(norms, torch.tensor([2.0, 6.0]))


def test_one_step_matches_hand_computation():
    weight = torch.ones(2, 2, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, alpha=1.0, lr=0.1)
    grad_loss = gradnorm.balance_step(_linear_losses((1.0, 3.0), weight), weight)
    # G = (2, 6), Ḡ = 4, first step so r = (1, 1) and target = (4, 4)
    # L_grad = |2-4| + |6-4| = 4;  ∂/∂w_k = sign(G_k - 4) * ||∇L_k|| = (-2, +6)
    # w = (1, 1) - 0.1 * (-2, 6) = (1.2, 0.4), renormalised to sum 2 -> (1.5, 0.5)
    assert torch.isclose(grad_loss, torch.tensor(4.0))
    assert torch.allclose(gradnorm.task_weights.detach(), torch.tensor([1.5, 0.5]))


def _valued_losses(values, scales, weight):
    # L_k = v_k at the current W, with ∇_W L_k = s_k (every entry): ||∇_W L_k|| = 2 s_k here
    moving = weight.sum() - weight.sum().detach()
    return torch.stack([torch.tensor(v) + s * moving for v, s in zip(values, scales)])


def test_step_with_unequal_rates_holds_the_target_constant():
    weight = torch.ones(2, 2, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, alpha=2.0, lr=0.1)
    gradnorm.balance_step(_valued_losses((2.0, 2.0), (1.0, 1.0), weight), weight)  # L(0); G = Ḡ
    assert torch.equal(gradnorm.task_weights.detach(), torch.ones(2))
    grad_loss = gradnorm.balance_step(_valued_losses((1.0, 2.0), (1.0, 3.0), weight), weight)
    # L̃ = (0.5, 1), r = (2/3, 4/3); G = (2, 6), Ḡ = 4, target 4 r² = (16/9, 64/9)
    # L_grad = 2/9 + 10/9;  ∂/∂w = (+2, −6) with Ḡ constant (a Ḡ that moves with w adds (4/3, 4))
    # w = (1, 1) − 0.1 (2, −6) = (0.8, 1.6), renormalised to sum 2 -> (2/3, 4/3)
    assert torch.isclose(grad_loss, torch.tensor(12 / 9))
    assert torch.allclose(gradnorm.task_weights.detach(), torch.tensor([2 / 3, 4 / 3]))


def test_weights_are_detached_and_clamped_before_renormalising():
    weight = torch.ones(2, 2, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, alpha=1.0, lr=1.0, min_weight=1e-3)
    losses = _linear_losses((1.0, 3.0), weight)
    assert not gradnorm.weights(losses).requires_grad
    gradnorm.balance_step(losses, weight)
    # as the hand computation above with lr = 1: w = (3, −5) -> clamped (3, 0.001) -> sum 2
    assert torch.allclose(gradnorm.task_weights.detach(), torch.tensor([3.0, 1e-3]) * 2 / 3.001)


def test_weights_equalise_weighted_gradient_norms_and_sum_to_k():
    weight = torch.ones(3, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, alpha=1.5, lr=0.001)
    for _ in range(1500):
        gradnorm.balance_step(_linear_losses((1.0, 4.0), weight), weight)
    w = gradnorm.task_weights.detach()
    assert torch.isclose(w.sum(), torch.tensor(2.0))
    # equal training rates (r = 1): the equilibrium has w_1 ||∇L_1|| = w_2 ||∇L_2||
    assert torch.allclose(w, torch.tensor([1.6, 0.4]), atol=0.01)


def test_slow_task_gets_a_proportionally_larger_gradient_share():
    weight = torch.ones(3, requires_grad=True)

    def losses(values: tuple[float, float]) -> torch.Tensor:
        # value v_k and the same gradient (norm sqrt 3) for both tasks
        moving = weight.sum() - weight.sum().detach()
        return torch.stack([torch.tensor(v) + moving for v in values])

    gradnorm = GradNorm(num_tasks=2, alpha=1.0, lr=0.001)
    gradnorm.balance_step(losses((2.0, 2.0)), weight)  # records L(0)
    for _ in range(1500):  # task 1 halved its loss, task 2 did not move: r = (2/3, 4/3)
        gradnorm.balance_step(losses((1.0, 2.0)), weight)
    w = gradnorm.task_weights.detach()
    # target G_k ∝ r_k^α with α = 1 and equal raw norms, so w_2 / w_1 = 2
    assert torch.allclose(w, torch.tensor([2 / 3, 4 / 3]), atol=0.01)


def test_training_reduces_total_loss():
    problem = make_problem(0)
    gradnorm = GradNorm(num_tasks=2, alpha=1.5, lr=0.01)
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.02)
    initial = problem.losses().sum().item()
    for _ in range(200):
        losses = problem.losses()
        weights = gradnorm.weights(losses)
        gradnorm.balance_step(losses, problem.model.shared.weight)
        optimizer.zero_grad()
        (weights * losses).sum().backward()
        optimizer.step()
    assert problem.losses().sum().item() < 0.3 * initial


def test_weights_taken_before_balance_step_stay_those_of_step_t():
    # the documented loop reads w(t), then balance_step moves the weights in place: w must not follow
    weight = torch.ones(2, 2, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, alpha=1.0, lr=0.1)
    losses = _linear_losses((1.0, 3.0), weight)
    w = gradnorm.weights(losses)
    gradnorm.balance_step(losses, weight)
    assert torch.equal(w, torch.ones(2))
    assert torch.allclose(gradnorm.task_weights.detach(), torch.tensor([1.5, 0.5]))


def test_default_alpha_is_the_common_one_point_five():
    weight = torch.ones(2, 2, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, lr=0.1)
    gradnorm.balance_step(_valued_losses((2.0, 2.0), (1.0, 1.0), weight), weight)  # L(0)
    grad_loss = gradnorm.balance_step(_valued_losses((1.0, 2.0), (1.0, 3.0), weight), weight)
    # r = (2/3, 4/3), G = (2, 6), Ḡ = 4: with α = 1.5 the targets 4 r^1.5 ≈ (2.18, 6.16) both
    # exceed G (with α = 1 or 2 one falls below), so ∂/∂w = (−2, −6): w = (1.2, 1.6) -> (6/7, 8/7)
    targets = [4 * (2 / 3) ** 1.5, 4 * (4 / 3) ** 1.5]
    assert torch.isclose(grad_loss, torch.tensor(targets[0] - 2 + targets[1] - 6))
    assert torch.allclose(gradnorm.task_weights.detach(), torch.tensor([6 / 7, 8 / 7]))


def test_default_lr_is_the_papers_0_025():
    # The hand case above with lr 0.025: w = (1, 1) − 0.025 · (−2, 6) = (1.05, 0.85), times 2 / 1.9.
    weight = torch.ones(2, 2, requires_grad=True)
    gradnorm = GradNorm(num_tasks=2, alpha=1.0)
    gradnorm.balance_step(_linear_losses((1.0, 3.0), weight), weight)
    assert torch.allclose(gradnorm.task_weights.detach(), torch.tensor([1.05, 0.85]) * 2 / 1.9)
