import pytest
import torch

from reference_impls.weighting.fairgrad import FairGrad
from reference_impls.weighting.nash_mtl import NashMTL


def test_fairness_equations_hold(grad_checks):
    for alpha in (0.5, 1.0, 2.0, 5.0):
        for k, d, _, scale, seed in grad_checks.random_cases(25, max_tasks=6, max_dim=20, seed=3):
            if k > d:
                continue
            grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
            method = FairGrad(alpha=alpha)
            w = method(grads).weights
            lhs = (grads @ grads.T @ w) * w ** (1 / alpha)  # (Mw)_k · w_k^(1/α) = 1
            assert (w > 0).all() and torch.allclose(lhs, torch.ones(k, dtype=torch.float64), atol=1e-9, rtol=0)
            assert method.last_solution.residual < 1e-9


def test_alpha_one_is_nash_mtl(grad_checks):
    grads = grad_checks.gradient_matrix(4, 9, seed=4)
    assert torch.allclose(FairGrad(alpha=1.0)(grads).weights, NashMTL()(grads).weights, rtol=1e-10)


def test_orthogonal_gradients_closed_form():
    norms = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    for alpha in (0.5, 2.0):
        w = FairGrad(alpha=alpha)(torch.diag(norms)).weights
        # n_k² w_k = w_k^(−1/α)  =>  w_k = n_k^(−2α/(α+1))
        assert torch.allclose(w, norms ** (-2 * alpha / (alpha + 1)), rtol=1e-10)


def test_degenerate_inputs(grad_checks):
    for alpha in (0.5, 2.0):
        grad_checks.check_degenerate_inputs(lambda: FairGrad(alpha=alpha))


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(lambda: FairGrad(alpha=2.0))


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(FairGrad(alpha=2.0), lr=0.05)
    assert final < 0.5 * initial


def test_every_call_solves_its_own_gramian(grad_checks):
    method = FairGrad(alpha=2.0)
    method(grad_checks.gradient_matrix(3, 6, seed=5))
    grads = grad_checks.gradient_matrix(3, 6, seed=6)
    w = method(grads).weights
    assert torch.allclose((grads @ grads.T @ w) * w**0.5, torch.ones(3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_no_solution_gives_zero_weights_and_update():
    # g and -g: 0 is in the convex hull, no direction decreases every loss.
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    grads = torch.stack([g, -g, torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)])
    for alpha in (0.5, 2.0):
        method = FairGrad(alpha=alpha)
        result = method(grads)
        assert not method.last_solution.exact
        assert torch.equal(result.weights, torch.zeros(3, dtype=torch.float64))
        assert torch.equal(result.update, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=alpha)
