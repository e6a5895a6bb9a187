import pytest
import torch

from reference_impls.weighting.mgda import MGDA
from reference_impls.weighting.sdmgrad import SDMGrad


def regularised_norm_sq(grads, w, lam):
    """2 x the inner objective: ||g_w + λ g_0||² with g_0 the mean gradient."""
    return float(((w @ grads) + lam * grads.mean(0)).square().sum())


def test_lambda_zero_is_mgda(grad_checks):
    for k, d, rank, scale, seed in grad_checks.random_cases(40, max_tasks=6, max_dim=15):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        ours, mgda = SDMGrad(lam=0.0)(grads), MGDA()(grads)
        assert torch.allclose(ours.weights, mgda.weights, atol=1e-9)
        assert torch.allclose(ours.update, mgda.update, atol=1e-9 * float(grads.norm(dim=1).max()))


def test_large_lambda_tends_to_the_mean_gradient(grad_checks):
    grads = grad_checks.gradient_matrix(4, 10, seed=1)
    mean = grads.mean(0)
    distances = [float((SDMGrad(lam=lam)(grads).update - mean).norm()) for lam in (0.1, 1.0, 10.0, 1e6)]
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < 1e-5 * float(mean.norm())


def test_optimality_of_the_shifted_min_norm_point(grad_checks):
    # KKT of min_{w∈Δ} ||Σ w_k h_k||², h_k = g_k + λ g_0: h_k · d' >= ||d'||², equality where w_k > 0.
    for k, d, _, _, seed in grad_checks.random_cases(40, max_tasks=6, max_dim=12, seed=2):
        grads = grad_checks.gradient_matrix(k, d, seed)
        method = SDMGrad(lam=0.7)
        method(grads)
        w = method.simplex_weights
        shifted = grads + 0.7 * grads.mean(0)
        direction = w @ shifted  # d' = g_w + λ g_0
        inner, norm_sq = shifted @ direction, float(direction @ direction)
        tol = 1e-9 * float(shifted.norm(dim=1).max() ** 2)
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
        assert (inner >= norm_sq - tol).all()
        assert torch.allclose(inner[w > 1e-9], torch.full_like(inner[w > 1e-9], norm_sq), atol=tol, rtol=0)


def test_the_update_is_mgdas_min_norm_point_over_weights_floored_at_lam_over_k_one_plus_lam(grad_checks):
    # The shifted hull is (1 + λ) x the hull of v = (w + λ/K) / (1 + λ): the update is the
    # min-norm point Σ v_k g_k over Σ v = 1, v >= λ / (K (1 + λ)). KKT: (G d)_k = c where v_k is
    # above the floor, >= c where it is at it; and MGDA's own answer wherever its weights clear it.
    equal_to_mgda = 0
    for k, d, rank, scale, seed in grad_checks.random_cases(60, max_tasks=6, max_dim=12, seed=5):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        for lam in (0.3, 2.0):
            floor = lam / (k * (1 + lam))
            v = SDMGrad(lam=lam)(grads).weights
            progress = grads @ (v @ grads)
            tol = 1e-9 * float(grads.norm(dim=1).max() ** 2)
            free = v > floor + 1e-9
            assert float(v.min()) >= floor - 1e-12 and bool(free.any())
            level = progress[free].max()
            assert float(level - progress[free].min()) < tol and bool((progress[~free] >= level - tol).all())
            mgda = MGDA()(grads)
            if float(mgda.weights.min()) > floor + 1e-6:
                equal_to_mgda += 1
                assert torch.allclose(v, mgda.weights, atol=1e-8)
    assert equal_to_mgda >= 5  # the cases include some where the floor is not binding


def test_update_weights_mix_the_simplex_weights_with_the_mean(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=3)
    method = SDMGrad(lam=0.5)
    result = method(grads)
    assert torch.allclose(result.weights, (method.simplex_weights + 0.5 / 3) / 1.5, atol=1e-15)
    assert abs(float(result.weights.sum()) - 1) < 1e-12
    expected = (method.simplex_weights @ grads + 0.5 * grads.mean(0)) / 1.5  # (g_w + λ g_0) / (1 + λ)
    assert torch.allclose(result.update, expected, atol=1e-14)


def test_projected_gradient_steps_descend_and_reach_the_exact_solution(grad_checks):
    grads = grad_checks.gradient_matrix(3, 10, seed=4)
    exact = SDMGrad(lam=0.3)
    exact(grads)
    iterative = SDMGrad(lam=0.3, iterations=1)
    values = []
    for _ in range(3000):  # one step per call, warm-started from the previous call
        iterative(grads)
        values.append(regularised_norm_sq(grads, iterative.simplex_weights, 0.3))
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert torch.allclose(iterative.simplex_weights, exact.simplex_weights, atol=1e-6)


def test_negative_lambda_is_rejected():
    with pytest.raises(ValueError):
        SDMGrad(lam=-0.1)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(SDMGrad)
    grad_checks.check_degenerate_inputs(lambda: SDMGrad(iterations=5))


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(SDMGrad)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(3, 9, seed=5).to(device)
    for method in (SDMGrad(), SDMGrad(iterations=3)):
        result = method(grads)
        assert result.update.device == grads.device and result.weights.device == grads.device


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(SDMGrad(), lr=0.05)
    assert final < 0.5 * initial


def orthogonal_pair():
    """g_1 = (1, 0), g_2 = (0, 3): Gramian diag(1, 9), so M / λ_max(M) = diag(1/9, 1)."""
    return torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)


def test_default_lambda_on_a_hand_case():
    # h_k = g_k + λ g_0 = (1 + λ/2) g_k + (λ/2) g_other. On the segment h_2 + w (h_1 − h_2) the
    # min-norm w is ((1 + λ/2)·9 − λ/2) / 10 = 1.02 > 1 for λ = 0.3, so w* = (1, 0) and the update
    # weights are ((1 + λ/2) / (1 + λ), (λ/2) / (1 + λ)) = (23/26, 3/26); λ = 0.5 would give (5/6, 1/6).
    result = SDMGrad()(orthogonal_pair())
    assert torch.allclose(result.weights, torch.tensor([23 / 26, 3 / 26], dtype=torch.float64), atol=1e-14)


def test_one_projected_step_from_uniform_with_step_one_over_lambda_max():
    # First call: w = (1/2, 1/2), gradient M'(w + λ/K) = (0.65/9, 0.65) with M' = diag(1/9, 1) and
    # η = 1/λ_max(M') = 1: w − η·grad = (77, −27)/180, whose simplex projection adds 65/180 to
    # each entry: (71/90, 19/90). η = 2 would land on (1, 0); a start at (1, 0) would stay there.
    method = SDMGrad(lam=0.3, iterations=1)
    result = method(orthogonal_pair())
    w = torch.tensor([71 / 90, 19 / 90], dtype=torch.float64)
    assert torch.allclose(method.simplex_weights, w, atol=1e-14)
    assert torch.allclose(result.weights, (w + 0.15) / 1.3, atol=1e-14)


def test_one_projected_step_uses_one_over_the_largest_eigenvalue():
    """Rows (1, 0), (1/2, 1/2): M = [[1, 1/2], [1/2, 1/2]] (already unit-scaled), λ_max = (3/2 + √(5/4)) / 2.
    From w = (1/2, 1/2) the gradient is M (w + λ/K) = (0.975, 0.65); on two tasks the simplex projection
    of (a, b) is ((1 + a − b) / 2, (1 − a + b) / 2), so w_1 = (1 − η · 0.325) / 2 with η = 1/λ_max."""
    grads = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    lam_max = (1.5 + 1.25**0.5) / 2
    method = SDMGrad(lam=0.3, iterations=1)
    method(grads)
    first = (1 - 0.325 / lam_max) / 2
    assert torch.allclose(method.simplex_weights, torch.tensor([first, 1 - first], dtype=torch.float64), atol=1e-14)
