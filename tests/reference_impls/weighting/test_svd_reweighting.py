import pytest
import torch

from reference_impls.weighting.svd_reweighting import SVDTaskReweighting, svd_task_weights


def shared_signal_tasks(seed=0, m=60, d=6):
    """Three tasks y = Xθ* + small noise and one task of pure noise, all on the same X."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=generator, dtype=torch.float64)
    theta = torch.randn(d, generator=generator, dtype=torch.float64)
    clean = [x @ theta + 0.05 * torch.randn(m, generator=generator, dtype=torch.float64) for _ in range(3)]
    noise = (x @ theta).std() * torch.randn(m, generator=generator, dtype=torch.float64)
    return x, torch.stack(clean + [noise], dim=1), theta


def test_weights_by_hand():
    # X = I, so θ_i = y_i. [θ_1 θ_2 θ_3] = [[1, 2, 0], [0, 0, 1], [0, 0, 0]]: σ₁ = √5 along e₁, σ₂ = 1 along e₂.
    x = torch.eye(3, dtype=torch.float64)
    y = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(svd_task_weights(x, y, rank=1), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    assert torch.allclose(svd_task_weights(x, y, rank=2), torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))


def test_full_rank_gives_the_norms_of_the_correlations():
    x, y, _ = shared_signal_tasks()
    thetas = x.T @ y
    assert torch.allclose(svd_task_weights(x, y, rank=4), thetas.norm(dim=0), rtol=1e-12)


def test_rank_r_weight_is_the_projection_onto_the_top_eigenvectors():
    # Independent route: eigenvectors of θθᵀ (the d x d "covariance" of the θ's) instead of an SVD.
    x, y, _ = shared_signal_tasks(seed=1)
    thetas = x.T @ y
    _, vectors = torch.linalg.eigh(thetas @ thetas.T)
    for r in (1, 2, 3):
        top = vectors[:, -r:]
        assert torch.allclose(svd_task_weights(x, y, rank=r), (top.T @ thetas).norm(dim=0), rtol=1e-9)


def test_invariant_to_rotating_the_input_features():
    x, y, _ = shared_signal_tasks(seed=2)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert torch.allclose(svd_task_weights(x @ rotation, y, 2), svd_task_weights(x, y, 2), rtol=1e-10)


def test_the_noisy_task_loses_weight():
    x, y, _ = shared_signal_tasks(seed=4)
    ratio = svd_task_weights(x, y, rank=1) / (x.T @ y).norm(dim=0)  # share kept in the top direction
    assert (ratio[:3] > 0.95).all()
    assert ratio[3] < 0.5


def best_rank_one_shared_module(weights, x, y):
    """argmin_b min_a Σ_i w_i ||X b a_i − y_i||²: Xb is the top eigenvector of P(Σ w_i y_i y_iᵀ)P.

    With the heads a_i at their optimum the loss is Σ w_i ||y_i||² − Σ w_i (uᵀy_i)² for the unit
    vector u = Xb / ||Xb|| in the column span of X (projector P); b = X⁺u.
    """
    basis, _ = torch.linalg.qr(x)
    projected = basis.T @ y  # coordinates of P y_i
    _, vectors = torch.linalg.eigh((projected * weights) @ projected.T)
    return torch.linalg.pinv(x) @ (basis @ vectors[:, -1])


def test_reweighting_points_the_shared_module_at_the_shared_signal():
    # The paper's motivating example: down-weighting the noisy task brings B closer to θ*.
    for seed in range(3):
        x, y, theta = shared_signal_tasks(seed=seed)
        weighting = SVDTaskReweighting(x, y, rank=1, normalize=True)
        error = lambda b: 1 - abs(float(b @ theta / (b.norm() * theta.norm())))  # noqa: E731
        reweighted = best_rank_one_shared_module(weighting.weights(torch.ones(4)).double(), x, y)
        unweighted = best_rank_one_shared_module(torch.ones(4, dtype=torch.float64), x, y)
        assert error(reweighted) < 0.5 * error(unweighted)


def test_weights_are_fixed_and_normalised_on_request():
    x, y, _ = shared_signal_tasks(seed=7)
    raw, scaled = SVDTaskReweighting(x, y, rank=2), SVDTaskReweighting(x, y, rank=2, normalize=True)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(raw.weights(losses), raw.weights(2 * losses, step=5, epoch=3))
    assert abs(float(scaled.weights(losses).sum()) - 4) < 1e-5
    assert torch.allclose(scaled.weights(losses) / raw.weights(losses), torch.full((4,), float(4 / raw.alpha.sum())))
    assert raw.combine(losses).ndim == 0


def test_degenerate_and_invalid_inputs():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(8))
    zero = SVDTaskReweighting(x, torch.zeros(5, 2), rank=1, normalize=True)
    assert torch.equal(zero.weights(torch.ones(2)), torch.zeros(2))
    single = svd_task_weights(x, torch.ones(5, 1), rank=1)
    assert torch.isfinite(single).all() and single.shape == (1,)
    with pytest.raises(ValueError):
        svd_task_weights(x, torch.ones(5, 2), rank=3)
    with pytest.raises(ValueError):
        svd_task_weights(x, torch.ones(4, 2), rank=1)
    with pytest.raises(ValueError):
        zero.weights(torch.ones(3))


def test_device(device):
    x, y, _ = shared_signal_tasks(seed=9)
    weighting = SVDTaskReweighting(x, y).to(device)
    weights = weighting.weights(torch.ones(4, device=device))
    assert weights.device.type == device.type


def test_weights_are_raw_by_default():
    # The paper does not normalise: by default α_i is ||U_rᵀ θ_i|| itself (rank 2 here, given explicitly).
    x = torch.eye(3, dtype=torch.float64)
    y = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    weights = SVDTaskReweighting(x, y, rank=2).weights(torch.ones(3, dtype=torch.float64))
    assert torch.allclose(weights, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))


def test_default_rank_is_one_and_small_weights_are_normalised_too():
    # Same hand example as above (X = I): rank 1 keeps e₁ only, so α = (1, 2, 0); scaled by 1e-3
    # the raw weights sum to 3e-3 < 1 and normalize=True must still rescale them to sum to K = 3.
    x = torch.eye(3, dtype=torch.float64)
    y = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(SVDTaskReweighting(x, y).alpha, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    small = SVDTaskReweighting(x, 1e-3 * y, normalize=True).alpha
    torch.testing.assert_close(small, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))


def test_inputs_that_are_not_matrices_are_refused():
    with pytest.raises(ValueError):
        svd_task_weights(torch.ones(5), torch.ones(5, 2), rank=1)
    with pytest.raises(ValueError):
        svd_task_weights(torch.ones(5, 3), torch.ones(5), rank=1)
