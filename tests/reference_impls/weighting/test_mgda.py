import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_impls.weighting.mgda import MGDA


def assert_min_norm_kkt(grads, weights, rel_tol=1e-9):
    """Simplex weights; every row has <g_k, d> >= ||d||², with equality on the support."""
    gram = (grads @ grads.T).double()
    w = weights.double()
    tol = rel_tol * float(gram.diagonal().max().clamp_min(1e-300))
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < (1e-9 if weights.dtype == torch.float64 else 1e-6)
    inner = gram @ w
    norm_sq = float(w @ inner)
    assert (inner >= norm_sq - tol).all(), (inner, norm_sq)
    support = w > 1e-9
    assert torch.allclose(inner[support], torch.full_like(inner[support], norm_sq), atol=tol, rtol=0)


def brute_force_min_norm(gram):
    """Minimum of wᵀMw over the simplex by trying every support's equality-constrained optimum."""
    k, best = len(gram), float("inf")
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            s = list(support)
            system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            system[:size, :size], system[:size, size], system[size, :size] = gram[s][:, s], 1, 1
            rhs = torch.zeros(size + 1, 1, dtype=torch.float64)
            rhs[size] = 1
            sol = torch.linalg.lstsq(system, rhs).solution[:size, 0]
            if (sol >= -1e-12).all() and abs(float(sol.sum()) - 1) < 1e-9:
                w = torch.zeros(k, dtype=torch.float64)
                w[s] = sol
                best = min(best, float(w @ gram @ w))
    return best


def test_kkt_conditions_hold_on_random_matrices(grad_checks):
    for k, d, rank, scale, seed in grad_checks.random_cases(120):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        assert_min_norm_kkt(grads, MGDA()(grads).weights)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 10), d=st.integers(1, 30), seed=st.integers(0, 10**6), exponent=st.integers(-10, 10))
def test_kkt_conditions_hypothesis(k, d, seed, exponent):
    grads = torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10.0**exponent
    assert_min_norm_kkt(grads, MGDA()(grads).weights)


def test_matches_brute_force_for_small_k(grad_checks):
    for k, d, rank, _, seed in grad_checks.random_cases(80, max_tasks=5, max_dim=6, seed=1):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank)
        gram = grads @ grads.T
        update = MGDA()(grads).update
        assert abs(float(update @ update) - brute_force_min_norm(gram)) <= 1e-10 * float(gram.diagonal().max())


def test_two_tasks_match_the_unclipped_closed_form():
    # Interior optimum with a tiny weight: a clipped solver (e.g. to [0.001, 0.999]) gets this wrong.
    g1 = torch.tensor([1.0, 0.0005], dtype=torch.float64)
    g2 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    alpha = float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)))  # weight of g1, closed form
    assert 0 < 1 - alpha < 1e-3
    weights = MGDA()(torch.stack([g1, g2])).weights
    assert torch.allclose(weights, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), atol=1e-14)


def test_result_decreases_every_loss_or_is_zero(grad_checks):
    for k, d, _, _, seed in grad_checks.random_cases(40, max_tasks=4, max_dim=30, seed=2):
        grads = grad_checks.gradient_matrix(k, d, seed)
        update = MGDA()(grads).update
        assert (grads @ update >= (update @ update) * (1 - 1e-9) - 1e-12).all()


def test_zero_in_hull_gives_zero_update():
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    result = MGDA()(torch.stack([g, -2 * g]))
    assert torch.allclose(result.weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert result.update.abs().max() < 1e-14


def test_float32_and_scale_invariant_weights(grad_checks):
    grads = grad_checks.gradient_matrix(5, 50, seed=4)
    reference = MGDA()(grads).weights
    for scale in (1e-10, 1e10):
        for dtype in (torch.float32, torch.float64):
            weights = MGDA()((grads * scale).to(dtype)).weights
            assert weights.dtype == dtype
            assert torch.allclose(weights.double(), reference, atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_large_dimension_kkt(grad_checks):
    grads = grad_checks.gradient_matrix(8, 10_000, seed=5, dtype=torch.float32)
    assert_min_norm_kkt(grads.double(), MGDA()(grads).weights, rel_tol=1e-5)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(MGDA)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(MGDA)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(4, 20, seed=6).to(device)
    result = MGDA()(grads)
    assert result.update.device == grads.device and result.weights.device == grads.device


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(MGDA(), lr=0.05)
    assert final < 0.5 * initial


def test_all_zero_rows_give_uniform_simplex_weights():
    # Every point of the hull is 0: the weights stay on the simplex (uniform), the update is 0.
    for k in (2, 3, 5):
        result = MGDA()(torch.zeros(k, 4, dtype=torch.float64))
        assert torch.equal(result.weights, torch.full((k,), 1.0 / k, dtype=torch.float64))
        assert torch.equal(result.update, torch.zeros(4, dtype=torch.float64))


def test_two_identical_rows_split_the_weight_evenly():
    # Every α gives the same point; only α = ½ treats the two tasks alike.
    g = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    result = MGDA()(torch.stack([g, g]))
    assert torch.equal(result.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(result.update, g, atol=1e-15)
