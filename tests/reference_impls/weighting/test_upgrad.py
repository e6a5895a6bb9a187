import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_impls.weighting.upgrad import UPGrad, dual_cone_projection_weights


def brute_force_projection(grads, vector):
    """Projection onto {x : G x >= 0}: best feasible projection onto {x : G_S x = 0} over all S."""
    best, best_dist = None, float("inf")
    k = len(grads)
    for size in range(0, k + 1):
        for active in itertools.combinations(range(k), size):
            if size:
                rows = grads[list(active)]
                candidate = vector - rows.T @ (torch.linalg.pinv(rows @ rows.T) @ (rows @ vector))
            else:
                candidate = vector
            if (grads @ candidate >= -1e-10).all():
                dist = float((candidate - vector).norm())
                if dist < best_dist:
                    best, best_dist = candidate, dist
    return best


def test_result_never_conflicts_with_any_task(grad_checks):
    for k, d, rank, scale, seed in grad_checks.random_cases(80):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank, scale=scale)
        update = UPGrad()(grads).update
        assert (grads @ update >= -1e-10 * float((grads @ grads.T).diagonal().max())).all()


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 10), d=st.integers(1, 20), seed=st.integers(0, 10**6))
def test_projection_kkt_hypothesis(k, d, seed):
    grads = torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    gram = grads @ grads.T
    for i in range(k):
        u = torch.eye(k, dtype=torch.float64)[i]
        v = dual_cone_projection_weights(gram, u)
        inner = gram @ v
        tol = 1e-9 * float(gram.diagonal().max())
        assert (v >= u - 1e-12).all() and (inner >= -tol).all()
        assert ((v - u) * inner).abs().max() <= tol * float(v.abs().max())  # complementarity


def test_projections_match_brute_force(grad_checks):
    for k, d, rank, _, seed in grad_checks.random_cases(30, max_tasks=4, max_dim=5, seed=1):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank)
        expected = torch.stack([brute_force_projection(grads, grads[i]) for i in range(k)]).mean(0)
        assert torch.allclose(UPGrad()(grads).update, expected, atol=1e-9)


def test_no_conflict_gives_the_mean(grad_checks):
    grads = grad_checks.gradient_matrix(5, 8, seed=2).abs()
    result = UPGrad()(grads)
    assert torch.equal(result.weights, torch.full((5,), 0.2, dtype=torch.float64))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(UPGrad)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(UPGrad)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(UPGrad(), lr=0.02)
    assert final < 0.5 * initial


def test_many_tasks_projections_meet_kkt(grad_checks):
    # K = 40 (the batched solver's regime), full rank and K > d (Lawson–Hanson fallback).
    for k, d, seed in ((40, 100, 0), (40, 20, 1), (25, 10_000, 2)):
        grads = grad_checks.gradient_matrix(k, d, seed) + 0.5 * grad_checks.gradient_matrix(1, d, seed + 100)
        gram = grads @ grads.T
        identity = torch.eye(k, dtype=torch.float64)
        v = dual_cone_projection_weights(gram, identity)  # row i: projection of g_i
        assert torch.allclose(v, torch.stack([dual_cone_projection_weights(gram, identity[i]) for i in range(k)]))
        inner = v @ gram
        tol = 1e-9 * float(gram.diagonal().max())
        assert (v >= identity - 1e-12).all() and (inner >= -tol).all()
        assert ((v - identity) * inner).abs().max() <= tol * float(v.abs().max())
        update = UPGrad()(grads).update
        assert (grads @ update >= -tol).all()


def test_two_task_closed_form_matches_the_qp(grad_checks):
    for seed in range(40):
        grads = grad_checks.gradient_matrix(2, 1 + seed % 6, seed, scale=10.0 ** (seed % 9 - 4))
        if seed % 5 == 0:
            grads[seed % 2] = 0  # a zero row: nothing to project
        gram = grads @ grads.T
        qp = dual_cone_projection_weights(gram, torch.eye(2, dtype=torch.float64)).mean(0)
        assert torch.allclose(UPGrad().weights_from_gramian(gram), qp, atol=1e-12, rtol=1e-12)


def test_weights_do_not_depend_on_the_scale_of_the_rows(grad_checks):
    # Exact solve: no absolute threshold below which small gradients are averaged unprojected.
    for k in (2, 4):
        grads = grad_checks.gradient_matrix(k, 6, seed=7)
        grads[1] = -grads[0] + 0.3 * grads[1]  # rows 0 and 1 conflict
        gram = grads @ grads.T
        weights = UPGrad().weights_from_gramian(gram)
        assert not torch.allclose(weights, torch.full((k,), 1 / k, dtype=torch.float64))
        for factor in (1e-300, 1e-6, 1e6, 1e300):
            assert torch.allclose(UPGrad().weights_from_gramian(factor * gram), weights, rtol=1e-12, atol=0)


def test_all_zero_rows_get_the_mean_weights():
    """Zero rows conflict with nothing: the weights stay 1/K (and the update is 0)."""
    for k in (2, 3, 4):
        result = UPGrad()(torch.zeros(k, 5, dtype=torch.float64))
        assert torch.equal(result.weights, torch.full((k,), 1 / k, dtype=torch.float64))
        assert torch.equal(result.update, torch.zeros(5, dtype=torch.float64))
