import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.gradients import per_task_gradients
from reference_impls.weighting.imtl import IMTL
from reference_impls.weighting.imtl_g import IMTLG


def test_step_combines_loss_scales_and_imtl_g():
    problem = make_problem(seed=5)
    shared, heads = problem.shared_parameters(), list(problem.model.heads.parameters())
    method = IMTL(num_tasks=2)
    with torch.no_grad():
        method.loss_scales.log_scales.copy_(torch.tensor([0.3, -1.2]))
    losses = problem.losses()
    scales = torch.tensor([0.3, -1.2]).exp()
    rows = per_task_gradients(scales * losses, shared)
    expected_shared = IMTLG()(rows).update
    expected_heads = torch.cat([g.reshape(-1) for g in torch.autograd.grad((scales * losses).sum(), heads, retain_graph=True)])
    method.step(losses, shared, heads)
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in shared]), expected_shared, atol=1e-6)
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in heads]), expected_heads, atol=1e-6)
    # d/ds (e^s L − s) = e^s L − 1
    assert torch.allclose(method.loss_scales.log_scales.grad, scales * losses.detach() - 1, atol=1e-6)


def test_training_decreases_total_loss():
    problem = make_problem(seed=0)
    shared, heads = problem.shared_parameters(), list(problem.model.heads.parameters())
    method = IMTL(num_tasks=2)
    # Adam: e^{s_k} rescales each task's gradient by up to 1/L_k, too uneven for one SGD rate.
    optimizer = torch.optim.Adam(shared + heads + list(method.loss_scales.parameters()), lr=0.02)
    initial = float(problem.losses().detach().sum())
    for _ in range(60):
        optimizer.zero_grad()
        method.step(problem.losses(), shared, heads)
        optimizer.step()
    assert float(problem.losses().detach().sum()) < 0.5 * initial


def test_call_is_imtl_g_with_weights_summing_to_one(grad_checks):
    # By hand: g1 = (2, 0), g2 = (0, 1); d = a g1 + (1 − a) g2 has projections 2a and 1 − a
    # onto the unit gradients, equal at a = 1/3.
    result = IMTL(num_tasks=2)(torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(result.weights, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert torch.allclose(result.update, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))
    # Random rows of unequal norms: equal positive projections onto every u_k, Σ α = 1.
    grads = grad_checks.gradient_matrix(3, 6, seed=7) * torch.tensor([[0.1], [1.0], [10.0]], dtype=torch.float64)
    result = IMTL(num_tasks=3)(grads)
    projections = (grads / grads.norm(dim=1, keepdim=True)) @ result.update
    assert projections.min() > 0 and torch.allclose(projections, projections.mean().expand(3), rtol=1e-10)
    assert torch.allclose(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(result.weights @ grads, result.update)


def test_scaled_losses_use_the_precision_of_the_losses():
    """e^s L − s is evaluated in the losses' dtype: float64 losses get float64's exp of s."""
    method = IMTL(num_tasks=2)
    with torch.no_grad():
        method.loss_scales.log_scales.copy_(torch.tensor([0.3, -1.7]))
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    s = method.loss_scales.log_scales.detach().double()
    expected = torch.exp(s) * losses - s
    got = method.scaled_losses(losses)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach(), expected, rtol=1e-15, atol=0)
