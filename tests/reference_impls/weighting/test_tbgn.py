"""Task-Balanced Gradient Normalization (Uni-Perceiver v2)."""

from __future__ import annotations

import torch

from reference_impls.weighting.tbgn import TaskBalancedAdamW, TaskBalancedGradientNormalization


def test_mixed_update_is_sum_of_balanced_unit_gradients(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=4)
    out = TaskBalancedGradientNormalization(balance=[1.0, 2.0, 0.5])(grads)
    by_hand = sum(w * g / g.norm() for w, g in zip([1.0, 2.0, 0.5], grads))
    torch.testing.assert_close(out.update, by_hand)
    torch.testing.assert_close(out.weights, torch.tensor([1.0, 2.0, 0.5], dtype=grads.dtype) / grads.norm(dim=1))
    # A task's loss scale does not matter: rescaling its gradient by 1e6 leaves the update.
    scaled = grads * torch.tensor([[1e6], [1.0], [1e-4]], dtype=grads.dtype)
    torch.testing.assert_close(TaskBalancedGradientNormalization(balance=[1.0, 2.0, 0.5])(scaled).update, by_hand)


def test_unmixed_draws_one_task_and_is_unbiased(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=7)
    ratios = [0.6, 0.3, 0.1]
    method = TaskBalancedGradientNormalization(sampling_ratios=ratios, unmixed=True,
                                               generator=torch.Generator().manual_seed(1))
    draws = [method(grads) for _ in range(4000)]
    picks = torch.tensor([int(d.weights.nonzero()) for d in draws])
    assert all((d.weights != 0).sum() == 1 for d in draws[:50])
    freq = torch.bincount(picks, minlength=3).double() / len(picks)
    assert torch.allclose(freq, torch.tensor(ratios, dtype=torch.float64), atol=0.03)
    first = draws[0]
    k = int(first.weights.nonzero())
    torch.testing.assert_close(first.update, grads[k] / grads[k].norm() / ratios[k])
    mean = torch.stack([d.update for d in draws]).mean(0)
    mixed = TaskBalancedGradientNormalization()(grads).update
    assert (mean - mixed).norm() < 0.1 * mixed.norm()


def test_adamw_step_by_hand_and_compensated_moments():
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = TaskBalancedAdamW([theta], sampling_ratios=[0.25, 0.75], balance=[2.0, 1.0], lr=0.1, betas=(0.1, 0.01))
    theta.grad = torch.tensor([3.0, 4.0])  # ||∇L|| = 5
    opt.step(task=0)
    g = 2.0 * torch.tensor([0.6, 0.8])
    m, n = 0.1 / 0.25 * g, 0.01 / 0.25 * g.square()
    torch.testing.assert_close(opt.state[theta]["m"], m)
    torch.testing.assert_close(opt.state[theta]["n"], n)
    torch.testing.assert_close(theta.detach(), torch.tensor([1.0, -2.0]) - 0.1 * m / (n.sqrt() + 1e-8))
    # Averaged over the task draw, the first moment moves by β1 Σ_k ω_k ĝ_k, whatever s_k.
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, -10.0])]
    moments = []
    for task, grad in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(2))
        fresh = TaskBalancedAdamW([p], sampling_ratios=[0.25, 0.75], balance=[2.0, 1.0], betas=(0.1, 0.01))
        p.grad = grad
        fresh.step(task)
        moments.append(fresh.state[p]["m"])
    torch.testing.assert_close(0.25 * moments[0] + 0.75 * moments[1], 0.1 * (2.0 * grads[0] / 5 + grads[1] / 10))


def test_adamw_normalises_by_the_norm_over_all_parameters_and_decays_weights():
    """||∇L|| is taken over every parameter together; weight decay is AdamW's decoupled one."""
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([-1.0]))
    opt = TaskBalancedAdamW([a, b], sampling_ratios=[0.5, 0.5], lr=0.1, betas=(0.1, 0.01), weight_decay=0.2)
    a.grad, b.grad = torch.tensor([0.0, 3.0]), torch.tensor([4.0])  # ||∇L|| = 5 over both
    opt.step(task=1)
    for param, start, grad in ((a, torch.tensor([1.0, 2.0]), a.grad), (b, torch.tensor([-1.0]), b.grad)):
        g = grad / 5
        m, n = 0.1 / 0.5 * g, 0.01 / 0.5 * g.square()
        expected = start * (1 - 0.1 * 0.2) - 0.1 * m / (n.sqrt() + 1e-8)
        torch.testing.assert_close(param.detach(), expected)
        torch.testing.assert_close(opt.state[param]["m"], m)  # the step itself is scale-free at t = 1


def test_degenerate_inputs_and_permutation(grad_checks):
    grad_checks.check_degenerate_inputs(TaskBalancedGradientNormalization)
    grad_checks.check_degenerate_inputs(lambda: TaskBalancedGradientNormalization(unmixed=True))
    grad_checks.check_permutation_equivariance(TaskBalancedGradientNormalization)


def test_training_lowers_loss(grad_checks):
    before, after = grad_checks.train_two_task_regression(TaskBalancedGradientNormalization(), steps=60, lr=0.01)
    assert after < before
