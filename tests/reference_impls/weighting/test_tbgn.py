"""Task-Balanced Gradient Normalization (Uni-Perceiver v2)."""

from __future__ import annotations

import pytest
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


def test_adamw_second_step_decays_both_moments_by_one_minus_beta():
    """Step 2 by hand, in the display's convention: m_2 = (1 − β1) m_1 + (β1 / s_k) g_2 and
    n_2 = (1 − β2) n_1 + (β2 / s_k) g_2², θ_2 = θ_1 − α m_2 / (√n_2 + ε); ε = 0.5 so that
    where it enters shows. Sampling ratios (1, 3) are normalised to s = (¼, ¾)."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = TaskBalancedAdamW([theta], sampling_ratios=[1.0, 3.0], balance=[2.0, 1.0], lr=0.1,
                            betas=(0.1, 0.01), eps=0.5)
    theta.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)  # task 0: ĝ = (0.6, 0.8), ω = 2
    opt.step(task=0)
    g1 = torch.tensor([1.2, 1.6], dtype=torch.float64)
    m1, n1 = 0.4 * g1, 0.04 * g1.square()  # β / s_0 = 0.1 / 0.25 and 0.01 / 0.25
    theta1 = torch.tensor([1.0, -2.0], dtype=torch.float64) - 0.1 * m1 / (n1.sqrt() + 0.5)
    torch.testing.assert_close(theta.detach(), theta1)
    theta.grad = torch.tensor([0.0, -10.0], dtype=torch.float64)  # task 1: ĝ = (0, −1), ω = 1
    opt.step(task=1)
    g2 = torch.tensor([0.0, -1.0], dtype=torch.float64)
    m2 = 0.9 * m1 + (0.1 / 0.75) * g2
    n2 = 0.99 * n1 + (0.01 / 0.75) * g2.square()
    torch.testing.assert_close(opt.state[theta]["m"], m2)
    torch.testing.assert_close(opt.state[theta]["n"], n2)
    torch.testing.assert_close(theta.detach(), theta1 - 0.1 * m2 / (n2.sqrt() + 0.5))


def test_unmixed_sampling_ratios_are_normalised(grad_checks):
    """s_k are ratios (Σ s_k = 1): (6, 3, 1) draws and compensates exactly as (0.6, 0.3, 0.1)."""
    grads = grad_checks.gradient_matrix(3, 5, seed=7)
    draws = {}
    for ratios in ([6.0, 3.0, 1.0], [0.6, 0.3, 0.1]):
        method = TaskBalancedGradientNormalization(sampling_ratios=ratios, unmixed=True,
                                                   generator=torch.Generator().manual_seed(3))
        draws[ratios[0]] = torch.stack([method(grads).weights for _ in range(20)])
    torch.testing.assert_close(draws[6.0], draws[0.6])
    picked = draws[0.6].nonzero()
    expected = 1.0 / grads.norm(dim=1)[picked[:, 1]] / torch.tensor([0.6, 0.3, 0.1], dtype=grads.dtype)[picked[:, 1]]
    torch.testing.assert_close(draws[0.6][picked[:, 0], picked[:, 1]], expected)


def test_a_zero_gradient_gets_weight_zero(grad_checks):
    """Zero rows stay zero and their factor is 0, not 1/0 nor a placeholder 1."""
    grads = grad_checks.gradient_matrix(3, 4, seed=2)
    grads[1] = 0.0
    out = TaskBalancedGradientNormalization(balance=[1.0, 2.0, 3.0])(grads)
    assert out.weights[1] == 0.0
    torch.testing.assert_close(out.update, grads[0] / grads[0].norm() + 3.0 * grads[2] / grads[2].norm())


def test_default_betas_are_our_documented_values():
    # betas = (0.1, 0.001) in the display's convention (weight of the *new* gradient), i.e. AdamW's
    # customary (0.9, 0.999); pinned so a silent change of default shows. From zero moments, with
    # u = ∇L/||∇L|| = (0.6, 0.8) and 1/s_0 = 4:
    #   m = β1·4·u,  n = β2·4·u²,  m/√n = β1·4/√(β2·4) = 2·β1/√β2 = 0.2/√0.001 = 6.324555 (each coordinate)
    #   θ = 0 − lr · 6.324555 = −0.6324555   (the standard-convention (0.9, 0.999) would give −0.18009)
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = TaskBalancedAdamW([theta], sampling_ratios=[0.25, 0.75], lr=0.1)
    theta.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step(0)
    step = 0.1 * 2 * 0.1 / 0.001 ** 0.5
    torch.testing.assert_close(theta.detach(), torch.full((2,), -step, dtype=torch.float64), atol=1e-6, rtol=0)


def test_unit_rows_scales_every_nonzero_row_to_norm_one():
    from reference_impls.weighting.tbgn import unit_rows

    grads = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -0.5]], dtype=torch.float64)
    unit, inverse = unit_rows(grads)
    torch.testing.assert_close(unit, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(inverse, torch.tensor([0.2, 0.0, 2.0], dtype=torch.float64))


def test_zero_sampling_ratio_is_refused():
    """s_k must be positive: a task never drawn could not be compensated by 1/s_k."""
    with pytest.raises(ValueError):
        TaskBalancedGradientNormalization(sampling_ratios=[0.5, 0.0], unmixed=True)


def test_draws_follow_the_given_generator_and_the_default_is_reproducible(grad_checks):
    grads = grad_checks.gradient_matrix(4, 3, seed=5)

    def picks(method):
        return [int(method(grads).weights.nonzero()) for _ in range(30)]

    seeded = [picks(TaskBalancedGradientNormalization(unmixed=True, generator=torch.Generator().manual_seed(s)))
              for s in (11, 12)]
    assert seeded[0] != seeded[1]  # another seed, another sequence: the generator is used
    with torch.random.fork_rng():  # the global RNG in two states: the default must not depend on it
        torch.manual_seed(0)
        first = picks(TaskBalancedGradientNormalization(unmixed=True))
        torch.manual_seed(1)
        assert picks(TaskBalancedGradientNormalization(unmixed=True)) == first


def test_per_task_values_keep_full_precision_and_follow_the_gradient_dtype(grad_checks):
    # ω and s given as Python floats act at float64 precision on float64 gradients, and are
    # cast to float32 on float32 gradients (the weights and update keep the gradients' dtype).
    grads = grad_checks.gradient_matrix(2, 3, seed=6)
    balance, ratios = [0.1, 1.0 / 3.0], [0.2, 0.7]
    mixed = TaskBalancedGradientNormalization(balance=balance)(grads)
    norms = grads.norm(dim=1)
    torch.testing.assert_close(mixed.weights, torch.tensor(balance, dtype=torch.float64) / norms, rtol=1e-15, atol=0)
    drawn = TaskBalancedGradientNormalization(balance=balance, sampling_ratios=ratios, unmixed=True)(grads)
    k = int(drawn.weights.nonzero())
    expected = balance[k] / float(norms[k]) / (ratios[k] / (ratios[0] + ratios[1]))
    assert abs(float(drawn.weights[k]) - expected) <= 1e-14 * expected
    single = grads.float()
    for method in (TaskBalancedGradientNormalization(balance=balance),
                   TaskBalancedGradientNormalization(balance=balance, sampling_ratios=ratios, unmixed=True)):
        out = method(single)
        assert out.update.dtype == out.weights.dtype == torch.float32


def test_adamw_default_lr_and_full_precision_ratios():
    """Default α = 1e-3 (AdamW's); s = (0.2, 0.7)/0.9 enters the moments at float64 precision."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = TaskBalancedAdamW([theta], sampling_ratios=[0.2, 0.7])
    theta.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step(0)
    u, s0 = torch.tensor([0.6, 0.8], dtype=torch.float64), 0.2 / 0.9
    m, n = 0.1 / s0 * u, 0.001 / s0 * u.square()
    torch.testing.assert_close(opt.state[theta]["m"], m, rtol=1e-14, atol=0)
    torch.testing.assert_close(theta.detach(), -1e-3 * m / (n.sqrt() + 1e-8), rtol=1e-12, atol=0)
