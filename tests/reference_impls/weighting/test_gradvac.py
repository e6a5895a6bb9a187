import warnings

import pytest
import torch

from reference_impls.weighting.gradvac import GradVac
from reference_impls.weighting.pcgrad import PCGrad, visiting_order


def test_first_step_equals_pcgrad_for_the_same_order(grad_checks):
    # Conditions: targets start at 0 and both methods visit the tasks in the same order.
    for k, d, rank, scale, seed in grad_checks.random_cases(40, max_tasks=6, max_dim=8):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        fixed_vac, fixed_pc = GradVac(random_order=False)(grads), PCGrad(random_order=False)(grads)
        assert torch.allclose(fixed_vac.weights, fixed_pc.weights, rtol=1e-9, atol=1e-9)
        shuffled_vac = GradVac(generator=torch.Generator().manual_seed(seed))(grads)
        shuffled_pc = PCGrad(generator=torch.Generator().manual_seed(seed))(grads)
        assert torch.allclose(shuffled_vac.weights, shuffled_pc.weights, rtol=1e-9, atol=1e-9)


def test_targets_are_an_ema_of_observed_similarities(grad_checks):
    grads = grad_checks.gradient_matrix(2, 5, seed=1).abs()  # no conflict: nothing is modified
    cosine = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    method = GradVac(beta=0.1, random_order=False)
    method(grads)
    assert torch.allclose(method.targets, torch.tensor([[0, 0.1 * cosine], [0.1 * cosine, 0]], dtype=torch.float64))
    method(grads)  # cos still >= target, so rows unchanged and the EMA moves on
    expected = 0.9 * 0.1 * cosine + 0.1 * cosine
    assert abs(float(method.targets[0, 1]) - expected) < 1e-12


def test_vaccinated_gradient_reaches_the_target_similarity(grad_checks):
    grads = grad_checks.gradient_matrix(2, 6, seed=2)
    cosine = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    method = GradVac(random_order=False)
    method.targets = torch.full((2, 2), min(cosine + 0.3, 0.95), dtype=torch.float64)
    target = float(method.targets[0, 1])
    adjusted = method.coefficients(grads @ grads.T) @ grads  # row i = g_i'
    for i, j in ((0, 1), (1, 0)):
        got = adjusted[i] @ grads[j] / (adjusted[i].norm() * grads[j].norm())
        assert abs(float(got) - target) < 1e-12


def test_stateful_second_step_differs_from_pcgrad(grad_checks):
    grads = grad_checks.gradient_matrix(3, 4, seed=3)
    method = GradVac(beta=0.5, random_order=False)
    method(grads)
    assert not torch.allclose(method(grads).weights, PCGrad(random_order=False)(grads).weights)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(GradVac)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(GradVac(), lr=0.01)
    assert final < 0.5 * initial


def literal_gradvac(grads, orders, targets, beta):
    """The paper's rule on the vectors themselves; updates ``targets`` in place."""
    adjusted = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            norm_i, norm_j = g.norm(), grads[j].norm()
            cosine = (g @ grads[j] / (norm_i * norm_j)).clamp(-1, 1)
            target = targets[i, j].clone()
            if cosine < target:
                root = (1 - target**2).sqrt()
                g = g + norm_i * (target * (1 - cosine**2).sqrt() - cosine * root) / (norm_j * root) * grads[j]
            targets[i, j] = (1 - beta) * target + beta * cosine
        adjusted.append(g)
    return torch.stack(adjusted).sum(0)


def test_many_tasks_several_steps_equal_the_literal_rule(grad_checks):
    # K = 12 tasks visited side by side (vectorised) over 3 stateful steps, random orders.
    k, d, beta = 12, 40, 0.3
    method = GradVac(beta=beta, generator=torch.Generator().manual_seed(7))
    replay, targets = torch.Generator().manual_seed(7), torch.zeros(k, k, dtype=torch.float64)
    for step in range(3):
        grads = grad_checks.gradient_matrix(k, d, seed=step) + 0.5 * grad_checks.gradient_matrix(1, d, seed=99)
        orders = [visiting_order(i, k, replay) for i in range(k)]
        expected = literal_gradvac(grads, orders, targets, beta)
        assert torch.allclose(method(grads).update, expected, atol=1e-10 * float(grads.norm(dim=1).max()) * k)
        assert torch.allclose(method.targets, targets, atol=1e-12)


def test_target_near_one_does_not_flip_the_update_of_nearly_parallel_gradients(grad_checks):
    # Parallel gradients drive φ̂ to 1 − 5.4e-15 (the EMA's rounding fixed point), an angle of
    # 1.04e-7. Rows 0.9e-7 and 1.2e-7 apart lie on either side of it, inputs 3e-8 apart: the update
    # must not jump (it fell to 12% of the sum when only √(1 − φ̂²) was clipped), nor at φ̂ = 1.
    g, v = grad_checks.gradient_matrix(2, 6, seed=3)
    v = (v - (v @ g) / (g @ g) * g) * g.norm() / v.norm()  # orthogonal to g, same length
    for target in (0.9999999999999946, 1.0):
        updates = []
        for angle in (0.9e-7, 1.2e-7):
            method = GradVac(random_order=False)
            method.targets = torch.full((2, 2), target, dtype=torch.float64)
            updates.append(method(torch.stack([g, g + angle * v])).update)
        assert torch.allclose(updates[0], updates[1], rtol=1e-6, atol=0)
        assert torch.allclose(updates[1], 2 * g, rtol=1e-6, atol=0)


def cosine_of(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_default_beta_is_one_hundredth(grad_checks):
    # No conflict, so the rows are untouched and after one step φ̂_ij = 0.99·0 + 0.01·φ_ij.
    grads = grad_checks.gradient_matrix(2, 5, seed=4).abs()
    method = GradVac(random_order=False)
    method(grads)
    assert abs(float(method.targets[0, 1]) - 0.01 * cosine_of(grads[0], grads[1])) < 1e-15


def test_pairs_with_a_zero_gradient_are_skipped(grad_checks):
    # Row 1 is zero: neither (0, 1), (1, 0), (1, 2) nor (2, 1) has a cosine, so their targets stay 0;
    # the pair (0, 2) is still vaccinated and its targets follow the EMA.
    g0, g2 = grad_checks.gradient_matrix(2, 4, seed=5)
    grads = torch.stack([g0, torch.zeros(4, dtype=torch.float64), g2])
    method = GradVac(beta=0.5, random_order=False)
    for _ in range(2):
        method(grads)
    cosine = cosine_of(g0, g2)
    assert torch.isfinite(method.targets).all()
    assert (method.targets[1] == 0).all() and (method.targets[:, 1] == 0).all()
    assert abs(float(method.targets[0, 2]) - 0.75 * cosine) < 1e-12  # 0.5·(0.5·φ) + 0.5·φ, φ unchanged
    assert torch.isfinite(method(grads).update).all()


def test_a_different_number_of_tasks_is_refused(grad_checks):
    method = GradVac()
    method(grad_checks.gradient_matrix(3, 4, seed=6))
    with pytest.raises(ValueError, match="set up for 3 tasks, got 2"):
        method(grad_checks.gradient_matrix(2, 4, seed=6))


def test_the_default_draws_a_new_order_each_call_and_a_fixed_order_ignores_the_generator(grad_checks):
    """With β = 0 the targets stay 0, so every call is PCGrad's step for that call's visiting orders:
    the default draws new orders each call; ``random_order=False`` is index order, generator or not."""
    grads = grad_checks.gradient_matrix(5, 3, seed=1)  # K > d: many conflicts, order matters
    default = GradVac(beta=0.0)
    updates = [default(grads).update for _ in range(6)]
    assert any(not torch.allclose(updates[0], u) for u in updates[1:])
    index_order = PCGrad(random_order=False)(grads).update
    fixed = GradVac(beta=0.0, random_order=False, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        assert torch.allclose(fixed(grads).update, index_order, atol=1e-12)


def test_weights_do_not_depend_on_the_gradient_scale(grad_checks):
    """Cosines are scale-free and each gain is a ratio of norms: small gradients get the same weights."""
    grads = grad_checks.gradient_matrix(4, 3, seed=2)
    methods = {scale: GradVac(beta=0.5, random_order=False) for scale in (1.0, 1e-3, 1e3)}
    for _ in range(3):  # several steps, so the targets take part too
        reference = methods[1.0](grads).weights
        for scale in (1e-3, 1e3):
            assert torch.allclose(methods[scale](scale * grads).weights, reference, rtol=1e-9, atol=0)


def test_a_zero_gradient_raises_no_floating_point_warning(grad_checks):
    """The undefined cosines of a zero row are masked on purpose: no RuntimeWarning reaches the user."""
    g0, g2 = grad_checks.gradient_matrix(2, 4, seed=5)
    grads = torch.stack([g0, torch.zeros(4, dtype=torch.float64), g2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradVac()(grads)


def test_half_precision_gramians_are_handled_in_float64(grad_checks):
    """The K x K steps run in float64 NumPy whatever the input precision (bfloat16 has no NumPy type)."""
    grad_checks.check_half_precision_gramians(lambda: GradVac(random_order=False))
