import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.ew_grad import EqualWeightingGradient
from reference_impls.weighting.gradients import gradient_step, per_task_gradients


def test_update_is_the_sum_of_rows(grad_checks):
    grads = grad_checks.gradient_matrix(4, 7, seed=0)
    result = EqualWeightingGradient()(grads)
    assert torch.allclose(result.update, grads.sum(0)) and torch.equal(result.weights, torch.ones(4, dtype=grads.dtype))


def test_gradient_step_equals_one_backward_of_the_summed_loss():
    problem = make_problem(seed=3)
    model = problem.model
    losses = problem.losses()
    losses.sum().backward(retain_graph=True)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    gradient_step(EqualWeightingGradient(), losses, problem.shared_parameters(), list(model.heads.parameters()))
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6), name


def test_batched_per_task_gradients_match_the_loop():
    problem = make_problem(seed=4)
    losses = problem.losses()
    params = list(problem.model.parameters())
    looped = per_task_gradients(losses, params)
    batched = per_task_gradients(losses, params, batched=True)
    assert looped.shape == (2, sum(p.numel() for p in params))
    assert torch.allclose(looped, batched, atol=1e-6)
    # Row k is the gradient of L_k alone; the head of the other task gets zero.
    head0 = problem.model.heads[0].weight
    (g0,) = torch.autograd.grad(losses[0], [head0], retain_graph=True)
    offset = sum(p.numel() for p in problem.model.shared.parameters())
    assert torch.allclose(looped[0, offset : offset + head0.numel()], g0.reshape(-1))
    assert looped[1, offset : offset + head0.numel()].abs().max() == 0


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(EqualWeightingGradient)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(EqualWeightingGradient(), lr=0.01)
    assert final < 0.5 * initial


def test_gramian_route_gives_all_ones(grad_checks):
    """weights_from_gramian (used on an all-reduced K x K Gramian) is the same rule: every weight 1."""
    grads = grad_checks.gradient_matrix(3, 5, seed=1)
    for gramian in (grads @ grads.T, torch.zeros(3, 3, dtype=torch.float64)):
        assert torch.equal(EqualWeightingGradient().weights_from_gramian(gramian), torch.ones(3, dtype=torch.float64))
