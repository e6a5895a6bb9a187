import pytest
import torch

from reference_impls.clustering import kmeans, kmeans_plus_plus


def inertia(points, centres, labels):
    return (points - centres[labels]).square().sum().item()


def test_kmeans_ends_at_a_lloyd_fixed_point_and_splits_separated_blobs():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(20, 2, generator=g), torch.randn(20, 2, generator=g) + 10])
    centres, labels = kmeans(points, 2, torch.Generator().manual_seed(1))
    assert labels[:20].unique().numel() == 1 and labels[20:].unique().numel() == 1 and labels[0] != labels[-1]
    torch.testing.assert_close(centres[labels[0]], points[:20].mean(0))  # each centre is its cluster's mean
    assert torch.equal(torch.cdist(points, centres).argmin(1), labels)  # each point at its nearest centre


def test_restarts_keep_the_run_of_lowest_inertia():
    points = torch.randn(60, 3, generator=torch.Generator().manual_seed(2))
    singles = torch.Generator().manual_seed(3)
    runs = [inertia(points, *kmeans(points, 5, singles)) for _ in range(6)]
    best = inertia(points, *kmeans(points, 5, torch.Generator().manual_seed(3), restarts=6))
    assert best == min(runs) and max(runs) > min(runs)


def test_seeds_are_distinct_points_while_distinct_points_remain():
    points = torch.tensor([[0.0], [0.0], [0.0], [5.0]])
    seeds = kmeans_plus_plus(points, 2, torch.Generator().manual_seed(0))
    assert sorted(seeds.flatten().tolist()) == [0.0, 5.0]


def test_more_clusters_than_points_is_refused():
    with pytest.raises(ValueError, match="k=3 is more than the 2 points"):
        kmeans(torch.zeros(2, 1), 3)
