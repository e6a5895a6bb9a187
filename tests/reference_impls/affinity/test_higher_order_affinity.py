"""Higher-order task affinity (Li et al., KDD 2023): subset averages by hand, planted groups recovered."""

import math

import pytest
import torch

from reference_impls.affinity.higher_order_affinity import (
    groups_of,
    higher_order_affinity,
    sample_subsets,
    spectral_clustering,
)
from reference_impls.clustering import kmeans

BLOCKS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])


def planted_losses(masks: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A task's loss falls with each partner from its own block and rises with each other one."""
    same = (BLOCKS[:, None] == BLOCKS[None, :]).double()
    m = masks.double()
    noise = torch.randn(m.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 1 - 0.3 * (m @ same - 1) + 0.2 * (m @ (1 - same)) + 0.05 * noise


def test_unstandardised_scores_are_the_averages_over_subsets_holding_both_tasks():
    masks = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    loss = torch.tensor([[0.5, 0.9, 9.0], [0.3, 0.6, 0.8], [9.0, 0.4, 0.2]], dtype=torch.float64)
    theta = higher_order_affinity(masks, loss, standardise=False)
    expected = torch.tensor([
        [0.0, -(0.5 + 0.3) / 2, -0.3],           # task 0 with 1: subsets 0, 1; with 2: subset 1
        [-(0.9 + 0.6) / 2, 0.0, -(0.6 + 0.4) / 2],
        [-0.8, -(0.8 + 0.2) / 2, 0.0],            # entries outside a subset (9.0) never count
    ], dtype=torch.float64)
    torch.testing.assert_close(theta, expected)
    # a score (higher is better) enters with its sign; the loss is negated
    torch.testing.assert_close(higher_order_affinity(masks, -loss, higher_is_better=True,
                                                     standardise=False), expected)


def test_standardisation_by_hand_uses_the_population_std_plus_eps():
    masks = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    loss = torch.tensor([[1.0, 0.5], [2.0, 1.5], [3.0, 7.0]], dtype=torch.float64)  # 7.0: not a member
    theta = higher_order_affinity(masks, loss)
    # task 0: negated losses −1, −2, −3, centred 1, 0, −1, population std √(2/3); with 1 in S_0, S_1
    expected_01 = (1 + 0) / 2 / (math.sqrt(2 / 3) + 1e-3)
    # task 1: −0.5, −1.5 centred ±0.5 (std 0.5), averaging to 0 over the subsets holding task 0
    expected = torch.tensor([[0.0, expected_01], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(theta, expected)


def test_standardised_scores_ignore_each_tasks_scale_and_offset():
    masks = sample_subsets(9, 200, 3, 5, torch.Generator().manual_seed(0))
    loss = planted_losses(masks)
    scale = torch.linspace(0.5, 4.0, 9, dtype=torch.float64)
    shift = torch.linspace(-2.0, 3.0, 9, dtype=torch.float64)
    # up to the ε added to the standard deviation
    torch.testing.assert_close(higher_order_affinity(masks, loss * scale + shift),
                               higher_order_affinity(masks, loss), atol=0.02, rtol=0)


def test_planted_groups_are_recovered_from_sampled_subsets():
    masks = sample_subsets(9, 400, 3, 5, torch.Generator().manual_seed(0))
    theta = higher_order_affinity(masks, planted_losses(masks))
    same = BLOCKS[:, None] == BLOCKS[None, :]
    off_diagonal = ~torch.eye(9, dtype=torch.bool)
    assert theta[same & off_diagonal].min() > 0.4 and theta[~same].max() < 0
    labels = spectral_clustering(theta, 3, generator=torch.Generator().manual_seed(1))
    assert groups_of(labels) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_spectral_clustering_splits_weakly_linked_blocks_and_checks_arguments():
    weights = torch.full((6, 6), 0.05, dtype=torch.float64)
    weights[:2, :2] = weights[2:, 2:] = 1.0  # blocks of unequal size, 2 and 4
    labels = spectral_clustering(weights, 2, use_exp=False, generator=torch.Generator().manual_seed(0))
    assert groups_of(labels) == [[0, 1], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="k=4 for 3 tasks"):
        spectral_clustering(torch.zeros(3, 3), 4)
    with pytest.raises(ValueError, match="non-negative"):
        spectral_clustering(-weights, 2, use_exp=False)
    with pytest.raises(ValueError, match="n x K"):
        higher_order_affinity(torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 3))


def test_self_weights_on_the_diagonal_are_ignored_as_in_scikit_learns_laplacian():
    """scipy's normalised Laplacian (behind SpectralClustering) zeroes W's diagonal before the degrees.

    With use_exp the diagonal is exp(0) = 1 for every task, so counting it would change the degrees
    and the embedding; a large self-weight on two tasks of one block shows it plainly.
    """
    weights = torch.full((6, 6), 0.05, dtype=torch.float64)
    weights[:3, :3] = weights[3:, 3:] = 1.0
    heavy = weights.clone()
    heavy.diagonal().copy_(torch.tensor([50.0, 50.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    labels = spectral_clustering(heavy, 2, use_exp=False, generator=torch.Generator().manual_seed(0))
    assert groups_of(labels) == [[0, 1, 2], [3, 4, 5]]
    for seed in (2, 4):  # W = exp of the mean of θ and θᵀ: on seed 4 another scale gives other groups
        theta = torch.randn(7, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with_exp = spectral_clustering(theta, 3, use_exp=True, generator=torch.Generator().manual_seed(3))
        exp_weights = ((theta + theta.T) / 2).exp().fill_diagonal_(0)
        by_hand = spectral_clustering(exp_weights, 3, use_exp=False, generator=torch.Generator().manual_seed(3))
        assert torch.equal(with_exp, by_hand)


def spectral_by_hand(weights, k, seed):
    """k-means on the top-k eigenvectors of D^(−1/2) W D^(−1/2) (W without its diagonal), times D^(−1/2)."""
    w = weights.clone().fill_diagonal_(0)
    d = w.sum(1)
    _, vectors = torch.linalg.eigh(w / torch.outer(d.sqrt(), d.sqrt()))
    return kmeans(vectors[:, -k:] / d.sqrt()[:, None], k, torch.Generator().manual_seed(seed), restarts=10)[1]


def test_the_embedding_is_the_normalised_laplacians_eigenvectors_mapped_back_by_d_to_the_minus_half():
    g = torch.Generator().manual_seed(4)
    for _ in range(5):  # uneven degrees, so both the normalisation and the map back matter
        weights = torch.rand(8, 8, generator=g, dtype=torch.float64) ** 4
        weights = weights * torch.logspace(-1, 1, 8, dtype=torch.float64)
        weights = (weights + weights.T) / 2
        labels = spectral_clustering(weights, 3, use_exp=False, generator=torch.Generator().manual_seed(0))
        assert torch.equal(labels, spectral_by_hand(weights, 3, seed=0))


@pytest.mark.parametrize("standardise", [True, False])
def test_results_of_tasks_outside_a_subset_are_ignored_even_when_not_finite(standardise):
    """Only f_i(S_k) with i in S_k is read: NaN or inf elsewhere (a task not trained there) changes nothing."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    performance = torch.rand(4, 3, generator=generator, dtype=torch.float64)
    clean = higher_order_affinity(masks, performance, standardise=standardise)
    dirty = performance.clone()
    dirty[~masks] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    torch.testing.assert_close(higher_order_affinity(masks, dirty, standardise=standardise), clean)


def test_for_a_score_to_maximise_the_affinity_is_minus_that_for_a_loss():
    """z-scores are odd in f: a result where higher is better gives exactly −θ of the same numbers read as losses."""
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    performance = torch.rand(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for standardise in (True, False):
        as_loss = higher_order_affinity(masks, performance, higher_is_better=False, standardise=standardise)
        as_score = higher_order_affinity(masks, performance, higher_is_better=True, standardise=standardise)
        assert as_loss.abs().min() < as_loss.abs().max()  # not all zero
        torch.testing.assert_close(as_score, -as_loss)


def test_a_task_seen_in_one_subset_only_scores_zero_and_masks_may_be_0_1_numbers():
    """With one result the mean is that result, so its z-score is 0; 0/1 float or int masks read as booleans."""
    masks = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 0, 1], [1, 0, 1]], dtype=torch.bool)  # task 1 once
    performance = torch.rand(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    theta = higher_order_affinity(masks, performance)
    torch.testing.assert_close(theta[1], torch.zeros(3, dtype=torch.float64))
    assert theta[0].abs().max() > 0  # the other tasks do score
    for dtype in (torch.float64, torch.int64):
        torch.testing.assert_close(higher_order_affinity(masks.to(dtype), performance), theta)


def test_a_pair_never_sampled_together_scores_zero_even_beside_an_infinite_result():
    """The documented 0 for a pair with no common subset holds whatever the tasks scored elsewhere."""
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)  # tasks 0 and 2 never together
    performance = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, float("inf")], [2.0, 1.0, 0.0]], dtype=torch.float64)
    theta = higher_order_affinity(masks, performance, standardise=False)
    assert theta[0, 2] == 0 and theta[2, 0] == 0
    assert theta[0, 1] == -1.5  # mean of the losses 1 and 2 of task 0, negated


def test_one_cluster_and_one_cluster_per_task_are_both_allowed():
    """k = 1 puts every task together; k = K gives every task its own cluster."""
    theta = torch.randn(5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    one = spectral_clustering(theta, 1, generator=torch.Generator().manual_seed(0))
    assert groups_of(one) == [[0, 1, 2, 3, 4]]
    each = spectral_clustering(theta, 5, generator=torch.Generator().manual_seed(0))
    assert groups_of(each) == [[0], [1], [2], [3], [4]]
