"""Interval clustering (Go et al. 2023): the DP equals brute force; the three costs by hand."""

import itertools

import pytest
import torch

from reference_impls.affinity.interval_clustering import (
    affinity_distance,
    centre,
    cluster_ids,
    interval_clustering,
    interval_costs,
    snr_distance,
    timestep_distance,
)


def brute_force(distance: torch.Tensor, k: int) -> float:
    """Every way to cut positions 0..T-1 into k intervals, each scored from scratch."""
    n = distance.shape[0]
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        total = 0.0
        for left, stop in zip(bounds[:-1], bounds[1:]):
            c = (left + stop) // 2  # upper middle of [left, stop - 1]
            total += sum(distance[c, t].item() for t in range(left, stop))
        best = min(best, total)
    return best


def assert_partition(intervals, n, k):
    assert len(intervals) == k and intervals[0][0] == 0 and intervals[-1][1] == n - 1
    assert all(l <= r for l, r in intervals)
    assert all(b[0] == a[1] + 1 for a, b in zip(intervals[:-1], intervals[1:]))


def test_dynamic_programme_matches_brute_force_on_random_costs():
    g = torch.Generator().manual_seed(0)
    for n, k in [(5, 2), (6, 3), (7, 4), (8, 3), (8, 5), (6, 6)]:
        distance = torch.randn(n, n, generator=g, dtype=torch.float64)  # any sign, asymmetric
        intervals, total = interval_clustering(interval_costs(distance), k)
        assert_partition(intervals, n, k)
        assert total.item() == pytest.approx(brute_force(distance, k))
        recomputed = sum(interval_costs(distance)[l, r].item() for l, r in intervals)
        assert recomputed == pytest.approx(total.item())


def test_interval_cost_is_the_sum_of_distances_to_the_centre():
    snr = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    costs = interval_costs(snr_distance(snr))
    # [0, 3]: centre 2 (SNR 2) -> |9-2| + |4-2| + 0 + |1-2| = 10; [1, 2]: centre 2 -> |4-2| = 2.
    assert costs[0, 3].item() == 10.0 and costs[1, 2].item() == 2.0
    assert centre(0, 3) == 2 and centre(1, 3) == 2 and centre(4, 4) == 4
    assert torch.isinf(costs[3, 1]) and (costs.diagonal() == 0).all()


def test_timestep_cost_gives_equal_halves_and_limits():
    costs = interval_costs(timestep_distance(6))
    assert interval_clustering(costs, 2)[0] == [(0, 2), (3, 5)]
    # an interval of s timesteps costs floor(s^2 / 4), so equal thirds are the unique optimum
    assert interval_clustering(interval_costs(timestep_distance(9)), 3)[0] == [(0, 2), (3, 5), (6, 8)]
    singles, total = interval_clustering(costs, 6)
    assert singles == [(i, i) for i in range(6)] and total.item() == 0.0
    assert interval_clustering(costs, 1) == ([(0, 5)], costs[0, 5])
    with pytest.raises(ValueError):
        interval_clustering(costs, 7)


def test_timestep_distance_is_the_absolute_difference_and_s_steps_cost_floor_s2_over_4():
    distance = timestep_distance(4)
    torch.testing.assert_close(distance, torch.tensor([[0.0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]],
                                                      dtype=torch.float64))
    costs = interval_costs(timestep_distance(7))
    assert [costs[0, s - 1].item() for s in range(1, 8)] == [s * s // 4 for s in range(1, 8)]


def test_gradient_cost_reads_the_affinity_of_the_centre_to_each_member():
    """d(c, t) = −TAS(c, t): the centre's row of an asymmetric TAS matrix, not its column."""
    tas = torch.tensor([[1.0, 0.2, 0.3], [0.4, 1.0, 0.6], [0.7, 0.8, 1.0]], dtype=torch.float64)
    costs = interval_costs(affinity_distance(tas))
    assert costs[0, 2].item() == pytest.approx(-(0.4 + 1.0 + 0.6))  # centre 1
    assert costs[0, 1].item() == pytest.approx(-(0.4 + 1.0))  # upper middle: centre 1


def test_snr_cost_cuts_at_the_jump_in_noise_level():
    snr = torch.tensor([50.0, 49.0, 48.0, 47.0, 1.0, 0.9, 0.8], dtype=torch.float64)
    intervals, _ = interval_clustering(interval_costs(snr_distance(snr)), 2)
    assert intervals == [(0, 3), (4, 6)]


def test_gradient_affinity_cost_recovers_blocks_of_mutually_helpful_timesteps():
    blocks = [3, 2, 4]
    tas = torch.block_diag(*[torch.ones(b, b) for b in blocks]).double() * 0.9 - 0.3
    tas.fill_diagonal_(1.0)
    intervals, _ = interval_clustering(interval_costs(affinity_distance(tas)), 3)
    assert intervals == [(0, 2), (3, 4), (5, 8)]
    assert cluster_ids(intervals).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_follows_the_input_dtype():
    costs = interval_costs(timestep_distance(5, dtype=torch.float32))
    assert costs.dtype == torch.float32
    assert interval_clustering(costs, 2)[1].dtype == torch.float32


@pytest.mark.parametrize("num_steps", [0, -1])
def test_timestep_distance_needs_at_least_one_step(num_steps):
    with pytest.raises(ValueError, match=f"num_steps must be at least 1, got {num_steps}"):
        timestep_distance(num_steps)


def test_only_the_upper_triangle_of_the_costs_is_read():
    """An interval (l, r) needs l <= r: entries below the diagonal, even very negative ones, change nothing."""
    generator = torch.Generator().manual_seed(3)
    costs = torch.rand(6, 6, generator=generator, dtype=torch.float64).triu()
    expected = interval_clustering(costs.masked_fill(torch.ones(6, 6).tril(-1).bool(), float("inf")), 3)
    costs = costs + torch.full((6, 6), -100.0, dtype=torch.float64).tril(-1)
    intervals, total = interval_clustering(costs, 3)
    assert intervals == expected[0] and all(left <= right for left, right in intervals)
    torch.testing.assert_close(total, expected[1])
    with pytest.raises(ValueError, match=r"square T x T matrix, got shape \(6, 5\)"):
        interval_clustering(costs[:, :5], 2)
