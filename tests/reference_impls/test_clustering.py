import pytest
import torch

from reference_impls import clustering
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


def column(*values):
    return torch.tensor(values).unsqueeze(1)


def seeded_by(monkeypatch, *seed_sets):
    """Make kmeans start each restart from the next of ``seed_sets``; returns the list of calls made."""
    calls = []

    def fixed_seeds(points, k, generator=None):
        calls.append(k)
        return column(*seed_sets[len(calls) - 1])

    monkeypatch.setattr(clustering, "kmeans_plus_plus", fixed_seeds)
    return calls


def test_seed_draws_weigh_each_point_by_its_squared_distance_to_the_nearest_seed(monkeypatch):
    # First seed forced to the point 0; each later draw takes the heaviest point, so the
    # weights offered to every draw are known: (distance to the nearest seed so far)².
    offered = []

    def heaviest(weights, num_samples, generator=None):
        offered.append(weights.tolist())
        return weights.argmax().reshape(1)

    monkeypatch.setattr(torch, "randint", lambda high, size, generator=None: torch.zeros(size, dtype=torch.long))
    monkeypatch.setattr(torch, "multinomial", heaviest)
    seeds = kmeans_plus_plus(column(0.0, 1.0, 3.0, 10.0), 3)
    assert offered == [[0.0, 1.0, 9.0, 100.0], [0.0, 1.0, 9.0, 0.0]]
    assert seeds.flatten().tolist() == [0.0, 10.0, 3.0]


def test_first_seed_is_drawn_from_every_point():
    points = column(0.0, 1.0, 2.0, 3.0)
    firsts = {kmeans_plus_plus(points, 1, torch.Generator().manual_seed(s)).item() for s in range(40)}
    assert firsts == {0.0, 1.0, 2.0, 3.0}


def test_seeds_are_a_copy_not_a_view_of_the_points():
    points = column(4.0, 5.0)
    kmeans_plus_plus(points, 1, torch.Generator().manual_seed(0)).fill_(-1.0)
    assert points.flatten().tolist() == [4.0, 5.0]


def test_as_many_clusters_as_points_gives_each_point_its_own():
    points = column(0.0, 5.0, 9.0)
    centres, labels = kmeans(points, 3, torch.Generator().manual_seed(0))
    assert torch.equal(centres[labels], points)


def test_lloyd_iterates_until_no_assignment_changes(monkeypatch):
    # From seeds 0 and 2: {0} {2, 3, 10} -> means 0, 5 -> {0, 2} {3, 10} -> means 1, 6.5
    # -> {0, 2, 3} {10} -> means 5/3, 10, where no point moves any more.
    seeded_by(monkeypatch, (0.0, 2.0))
    centres, labels = kmeans(column(0.0, 2.0, 3.0, 10.0), 2)
    assert labels.tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(centres, column(5 / 3, 10.0))


def test_a_cluster_left_empty_keeps_its_centre(monkeypatch):
    seeded_by(monkeypatch, (0.0, 10.0, 100.0))  # no point is nearest to 100
    centres, labels = kmeans(column(-1.0, 1.0, 9.0, 11.0), 3)
    assert labels.tolist() == [0, 0, 1, 1]
    assert centres.flatten().tolist() == [0.0, 10.0, 100.0]


def test_restarts_compare_summed_squared_distances(monkeypatch):
    # Two Lloyd fixed points of 1, 8, 12, 15, 16: {1} {8, 12, 15, 16} (squared 38.75, plain
    # distances 11) and {1, 8} {12, 15, 16} (squared 33.17, plain distances 11.67).
    seeded_by(monkeypatch, (1.0, 12.0), (8.0, 15.0))
    centres, labels = kmeans(column(1.0, 8.0, 12.0, 15.0, 16.0), 2, restarts=2)
    assert labels.tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(centres, column(4.5, 43 / 3))


def test_one_restart_by_default(monkeypatch):
    calls = seeded_by(monkeypatch, (0.0, 10.0), (0.0, 10.0))
    kmeans(column(0.0, 10.0), 2)
    assert calls == [2]


def test_more_seeds_than_distinct_points_fall_back_to_uniform_draws():
    """Once every distinct point is a seed all squared gaps are 0: the draw is uniform, not refused."""
    points = column(2.0, 2.0, 2.0)
    seeds = kmeans_plus_plus(points, 3, torch.Generator().manual_seed(0))
    assert seeds.flatten().tolist() == [2.0, 2.0, 2.0]
    centres, labels = kmeans(column(1.0, 1.0, 4.0, 4.0), 3, torch.Generator().manual_seed(1))
    assert torch.equal(centres[labels], column(1.0, 1.0, 4.0, 4.0))


def test_on_equal_inertia_the_earlier_restart_is_kept(monkeypatch):
    # both restarts end at inertia 0 with the labels swapped: the first run's labels are returned
    seeded_by(monkeypatch, (0.0, 10.0), (10.0, 0.0))
    centres, labels = kmeans(column(0.0, 10.0), 2, restarts=2)
    assert labels.tolist() == [0, 1] and centres.flatten().tolist() == [0.0, 10.0]


def test_points_far_from_the_origin_keep_exact_distances_in_float32():
    """30 float32 points around 1e4 in pairs of duplicates: distinct seeds while distinct points remain,
    and two clusters 2 apart come back separated (cdist's default matrix-product distances lose both)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(15, 2, generator=generator, dtype=torch.float64) * 0.01
    base[:8] += torch.tensor([1.0, 0.0], dtype=torch.float64)
    base[8:] -= torch.tensor([1.0, 0.0], dtype=torch.float64)
    points = (torch.cat([base, base]) + 1e4).float()  # every point twice
    for seed in range(20):
        seeds = kmeans_plus_plus(points, 15, torch.Generator().manual_seed(seed))
        assert len(torch.unique(seeds, dim=0)) == 15
    _, labels = kmeans(points, 2, torch.Generator().manual_seed(0))
    left = torch.cat([torch.arange(8), torch.arange(15, 23)])
    right = torch.cat([torch.arange(8, 15), torch.arange(23, 30)])
    assert len(set(labels[left].tolist())) == 1 and len(set(labels[right].tolist())) == 1
    assert labels[left][0] != labels[right][0]
