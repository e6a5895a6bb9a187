import pytest
import torch

from reference_impls.weighting.gcs import GCS


def test_unweighted_adds_only_auxiliaries_with_positive_cosine():
    main = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    agrees = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # cos = 1/√2
    conflicts = torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)  # cos < 0
    orthogonal = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)  # cos = 0: not positive
    result = GCS()(torch.stack([main, agrees, conflicts, orthogonal]))
    assert torch.equal(result.weights, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(result.update, main + agrees, atol=1e-15)


def test_weighted_scales_each_auxiliary_by_its_clipped_cosine():
    main = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    agrees = torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64)
    conflicts = torch.tensor([-1.0, 0.5, 0.0], dtype=torch.float64)
    parallel = torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)
    result = GCS(weighted=True)(torch.stack([main, agrees, conflicts, parallel]))
    expected = torch.tensor([1.0, 2**-0.5, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(result.weights, expected, atol=1e-15)
    assert torch.allclose(result.update, main + expected[1] * agrees + parallel, atol=1e-14)


def test_main_loss_never_falls_slower_than_with_its_own_gradient(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(60, max_tasks=6, max_dim=12):
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        for weighted in (False, True):
            result = GCS(weighted=weighted)(grads)
            main_sq = float(grads[0] @ grads[0])
            assert float(grads[0] @ result.update) >= main_sq * (1 - 1e-12)
            assert ((result.weights >= 0) & (result.weights <= 1)).all() and result.weights[0] == 1


def test_limiting_cases_are_the_sum_and_the_main_gradient(grad_checks):
    main = grad_checks.gradient_matrix(1, 8, seed=3)[0]
    helpers = torch.stack([main + 0.3 * grad_checks.gradient_matrix(1, 8, seed=s)[0] for s in (4, 5)])
    aligned = torch.cat([main[None], helpers])
    assert torch.allclose(GCS()(aligned).update, aligned.sum(0), atol=1e-14)  # equal weighting
    opposed = torch.cat([main[None], -helpers])
    assert torch.equal(GCS()(opposed).update, main)  # main task alone
    assert torch.equal(GCS(weighted=True)(opposed).update, main)


def test_main_task_index_relabels_the_tasks(grad_checks):
    grads = grad_checks.gradient_matrix(4, 7, seed=6)
    perm = torch.tensor([2, 0, 1, 3])  # task 2 moves to the front
    for weighted in (False, True):
        moved = GCS(weighted=weighted, main_task=2)(grads)
        front = GCS(weighted=weighted)(grads[perm])
        assert torch.allclose(moved.update, front.update, atol=1e-14)
        assert torch.allclose(moved.weights[perm], front.weights)


def test_cosines_use_the_main_tasks_norm():
    main = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # task 1, norm 1
    agrees = torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64)  # task 0, norm 2√2, cos = 1/√2
    orthogonal = torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)
    result = GCS(weighted=True, main_task=1)(torch.stack([agrees, main, orthogonal]))
    expected = torch.tensor([2**-0.5, 1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(result.weights, expected, atol=1e-15)
    assert torch.allclose(result.update, main + expected[0] * agrees, atol=1e-14)


def test_zero_main_gradient_drops_the_auxiliaries(grad_checks):
    grads = torch.cat([torch.zeros(1, 5, dtype=torch.float64), grad_checks.gradient_matrix(2, 5, seed=7)])
    for weighted in (False, True):
        result = GCS(weighted=weighted)(grads)
        assert torch.equal(result.weights, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
        assert torch.equal(result.update, torch.zeros(5, dtype=torch.float64))


def test_bad_main_task_index_is_rejected(grad_checks):
    with pytest.raises(ValueError, match="main_task"):
        GCS(main_task=3)(grad_checks.gradient_matrix(3, 4, seed=0))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(GCS)
    grad_checks.check_degenerate_inputs(lambda: GCS(weighted=True))


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(3, 9, seed=8).to(device)
    result = GCS(weighted=True)(grads)
    assert result.update.device == grads.device and result.weights.device == grads.device


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(GCS(weighted=True), lr=0.05)
    assert final < 0.5 * initial


def test_rounding_never_gives_a_cosine_above_one():
    """A cosine is at most 1: in float32 the Gramian of parallel gradients can round to a ratio
    just above 1, which must not let an auxiliary gradient count more than in full."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        main = torch.randn(7, generator=generator)
        grads = torch.stack([main, (0.1 + 10 * torch.rand(1, generator=generator)) * main])
        method = GCS(weighted=True)
        assert (method.cosines(grads @ grads.T).abs() <= 1).all()
        assert (method(grads).weights <= 1).all()


def test_small_gradients_are_gated_by_their_true_cosines():
    """Cosines do not depend on the gradients' scale: at norms far below 1 the gates are the
    same, and the weighted variant's weights are the hand cosines."""
    grads = 1e-3 * torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]],
                                dtype=torch.float64)
    cos = torch.tensor([1.0, 2**-0.5, 0.0, -(2**-0.5)], dtype=torch.float64)
    torch.testing.assert_close(GCS(weighted=True)(grads).weights, cos.clamp_min(0))
    torch.testing.assert_close(GCS()(grads).weights, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
