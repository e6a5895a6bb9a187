import pytest
import torch

from reference_impls.weighting.bayesagg_mtl import BayesAggMTL, posterior, regression_moments


def sample_setting(seed=0, d=3, n=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    mean = torch.randn(d + 1, generator=g, dtype=torch.float64)
    root = 0.5 * torch.randn(d + 1, d + 1, generator=g, dtype=torch.float64)
    return h, y, mean, root @ root.T + 0.1 * torch.eye(d + 1, dtype=torch.float64)


def test_closed_form_moments_match_monte_carlo():
    h, y, mean, cov = sample_setting()
    expected, variance = regression_moments(h, y, mean, cov)
    g = torch.Generator().manual_seed(1)
    w = mean + torch.randn(400_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    u = (w[:, :3] @ h.T + w[:, 3:]) - y                                          # S x B
    grads = 2 * u[:, :, None] * w[:, None, :3]                                   # S x B x d
    torch.testing.assert_close(expected, grads.mean(0), atol=0.03, rtol=0.02)
    torch.testing.assert_close(variance, grads.var(0), atol=0.1, rtol=0.03)


def test_point_posterior_gives_the_ordinary_gradient():
    h, y, mean, _ = sample_setting(seed=2)
    expected, variance = regression_moments(h, y, mean, torch.zeros(4, 4, dtype=torch.float64))
    h_ = h.clone().requires_grad_()
    ((h_ @ mean[:3] + mean[3] - y) ** 2).sum().backward()
    torch.testing.assert_close(expected, h_.grad)
    assert torch.equal(variance, torch.zeros_like(variance))


def test_aggregation_is_the_precision_weighted_mean():
    means = torch.tensor([[1.0, 4.0], [3.0, -2.0]], dtype=torch.float64)
    variances = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    result = BayesAggMTL().aggregate(means, variances)
    # coordinate 0: (1/1 + 3/3) / (1 + 1/3) = 1.5; coordinate 1: (4/2 - 2/1) / (1/2 + 1) = 0
    torch.testing.assert_close(result.update, torch.tensor([1.5, 0.0], dtype=torch.float64))
    # a nearly certain task dominates its coordinates
    sure = BayesAggMTL().aggregate(means, torch.tensor([[1e-6, 1e-6], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(sure.update, means[0], atol=1e-5, rtol=0)


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_weights_are_the_task_shares_averaged_over_coordinates_and_samples():
    # shares: coordinate 0 precisions (1, 1/3) -> (3/4, 1/4); coordinate 1 (1/2, 1) -> (1/3, 2/3)
    result = BayesAggMTL().aggregate(f64([[1.0, 4.0], [3.0, -2.0]]), f64([[1.0, 2.0], [3.0, 1.0]]))
    torch.testing.assert_close(result.weights, f64([13 / 24, 11 / 24]))
    # two samples, one coordinate: shares (1/2, 1/2) and (3/4, 1/4), averaged over the batch
    batch = BayesAggMTL().aggregate(f64([[[2.0], [4.0]], [[2.0], [4.0]]]), f64([[[1.0], [1.0]], [[1.0], [3.0]]]))
    torch.testing.assert_close(batch.weights, f64([5 / 8, 3 / 8]))
    torch.testing.assert_close(batch.update, f64([(3.0 + 2.5) / 2]))


def test_zero_variances_are_clamped_not_divided_by():
    """A task sure at a coordinate (variance 0) takes it over; all tasks sure there: the plain mean."""
    means = f64([[1.0, 4.0], [3.0, -2.0]])
    result = BayesAggMTL().aggregate(means, f64([[0.0, 0.0], [1.0, 0.0]]))
    assert torch.isfinite(result.update).all() and torch.isfinite(result.weights).all()
    torch.testing.assert_close(result.update, f64([1.0, 1.0]), atol=1e-7, rtol=0)


def test_input_that_is_not_a_float_matrix_is_refused():
    with pytest.raises(ValueError, match="K x d"):
        BayesAggMTL()(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        BayesAggMTL()(torch.ones(2, 3, dtype=torch.int64))


def test_default_prior_variance_is_one():
    """Design [[1, 1], [-1, 1]] (feature, bias): XᵀX + I/γ = 3 I at γ = 1, so cov = I/3, mean = Xᵀy/3."""
    mean, cov = posterior(f64([[1.0], [-1.0]]), f64([3.0, 0.0]))
    torch.testing.assert_close(mean, f64([1.0, 1.0]))
    torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64) / 3)


def test_equal_variances_reduce_to_the_mean_and_batches_are_averaged(grad_checks):
    grads = grad_checks.gradient_matrix(4, 7, seed=3)
    result = BayesAggMTL()(grads)
    torch.testing.assert_close(result.update, grads.mean(0))
    torch.testing.assert_close(result.weights, torch.full((4,), 0.25, dtype=torch.float64))
    batch = torch.stack([grads, 2 * grads])
    torch.testing.assert_close(BayesAggMTL().aggregate(batch, torch.ones_like(batch)).update, 1.5 * grads.mean(0))


def test_posterior_is_the_conjugate_one():
    h, y, _, _ = sample_setting(seed=4, n=200)
    mean, cov = posterior(h, 2.0 * h[:, 0] - 1.0 + y * 0.01, prior_variance=100.0)
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0, 0.0, -1.0], dtype=torch.float64), atol=0.02, rtol=0)
    assert torch.all(torch.linalg.eigvalsh(cov) > 0) and cov.diagonal().max() < 0.02


def test_degenerate_inputs_and_permutation(grad_checks):
    grad_checks.check_degenerate_inputs(BayesAggMTL)
    grad_checks.check_permutation_equivariance(BayesAggMTL)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(BayesAggMTL(), lr=0.02, steps=200)
    assert final < 0.5 * initial
