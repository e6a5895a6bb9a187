"""TreeMTL (Zhang et al. 2022): design-space size, the pairwise estimate, the ranking's limits."""

import itertools

import pytest
import torch

from reference_impls.affinity.tree_recommender import (
    branch_point,
    enumerate_layouts,
    fluctuation_weights,
    layout_cost,
    partitions,
    recommend,
    svd_entropy,
    task_estimates,
)


def brute_force_count(num_tasks: int, num_blocks: int) -> int:
    """Independent count: label every task's group per block, keep the sequences that only split."""
    def canonical(labels):  # restricted growth string -> partition as a set of frozensets
        return frozenset(frozenset(t for t in range(num_tasks) if labels[t] == g) for g in set(labels))

    parts = {canonical(lab) for lab in itertools.product(range(num_tasks), repeat=num_tasks)}
    refines = lambda fine, coarse: all(any(f <= c for c in coarse) for f in fine)  # noqa: E731
    return sum(all(refines(seq[b + 1], seq[b]) for b in range(num_blocks - 1))
               for seq in itertools.product(parts, repeat=num_blocks))


def test_enumeration_matches_a_hand_count_and_a_brute_force_count():
    # 3 tasks, 2 blocks, by hand: block 0 all shared -> block 1 any of the 5 partitions (5);
    # block 0 one of 3 pairs+single -> block 1 the same or all single (3 x 2); all single -> 1.
    assert len(enumerate_layouts(3, 2)) == 12
    assert [len(enumerate_layouts(2, b)) for b in (1, 2, 3, 4)] == [2, 3, 4, 5]  # B + 1 branch points
    assert [len(partitions(tuple(range(k)))) for k in (1, 2, 3, 4, 5)] == [1, 2, 5, 15, 52]  # Bell
    for k, b in ((3, 3), (4, 2)):
        layouts = enumerate_layouts(k, b)
        assert len(layouts) == brute_force_count(k, b)
        assert len(set(layouts)) == len(layouts)


def test_branch_point_and_the_mean_over_partners_on_a_hand_layout():
    layout = (((0, 1, 2),), ((0, 1), (2,)))  # all share block 0; task 2 branches off after it
    assert branch_point(layout, 0, 1) == 2 and branch_point(layout, 0, 2) == 1
    a = torch.arange(27, dtype=torch.float64).reshape(3, 3, 3)  # A[b, i, j]
    expected = torch.tensor([
        (a[2, 0, 1] + a[1, 0, 2]) / 2,
        (a[2, 1, 0] + a[1, 1, 2]) / 2,
        (a[1, 2, 0] + a[1, 2, 1]) / 2,
    ], dtype=torch.float64)
    torch.testing.assert_close(task_estimates(layout, a), expected)


def test_sharing_that_always_helps_ranks_fully_shared_first_and_always_hurts_fully_separate():
    k, blocks = 3, 3
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, k, k, generator=g, dtype=torch.float64)
    gain = torch.rand(blocks + 1, k, k, generator=g, dtype=torch.float64).cumsum(0)  # increasing in b
    shared = tuple(((0, 1, 2),) for _ in range(blocks))
    separate = tuple(((0,), (1,), (2,)) for _ in range(blocks))

    helps = recommend(base + gain, top_k=2)  # perfect affinity: every shared block adds accuracy
    assert helps[0][0] == shared and helps[0][1] > helps[1][1]
    hurts = recommend(base - gain, top_k=2)  # no affinity: every shared block costs accuracy
    assert hurts[0][0] == separate and hurts[0][1] > hurts[1][1]


def test_ranking_is_sorted_and_the_budget_removes_expensive_layouts():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 3, 3, generator=g, dtype=torch.float64)
    ranked = recommend(a, top_k=100)
    assert len(ranked) == 12 and all(x[1] >= y[1] for x, y in zip(ranked, ranked[1:]))
    cheap = recommend(a, top_k=100, block_costs=[2.0, 1.0], budget=4.0)
    assert cheap and all(layout_cost(lay, [2.0, 1.0]) <= 4.0 for lay, _ in cheap)
    assert len(cheap) < 12  # fully separate costs 3 x 2 + 3 x 1 = 9
    with pytest.raises(ValueError):
        recommend(torch.zeros(3, 3, 2))


def test_fluctuation_weights_trust_smooth_tasks_more():
    assert svd_entropy(torch.ones(6, dtype=torch.float64)) < 1e-9  # rank-one windows: no entropy
    b = torch.arange(6, dtype=torch.float64)
    a = torch.zeros(6, 3, 3, dtype=torch.float64)
    a[:, 0, :] = 1 + 0.1 * b[:, None]  # task 0: smooth in the branch point
    a[:, 1, :] = torch.tensor([1.0, 0.2, 0.9, 0.1, 0.8, 0.3])[:, None]  # task 1: zig-zag
    a[:, 2, :] = 1.0
    w = fluctuation_weights(a)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert w[0] > w[1] and w[2] > w[1]


def test_svd_entropy_by_hand_and_weights_ignore_the_separate_networks_column():
    """Windows of 1,0,0,1,0,0 are e1, e3, e2, e1: singular values √2, 1, 1, entropy / log2(3)."""
    s = torch.tensor([2**0.5, 1.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    expected = -(p * p.log2()).sum() / torch.log2(torch.tensor(3.0, dtype=torch.float64))
    seq = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(svd_entropy(seq), expected)
    # the weights read the branch points b >= 1 only, as in the authors' code
    g = torch.Generator().manual_seed(2)
    a = torch.rand(6, 3, 3, generator=g, dtype=torch.float64)
    moved = a.clone()
    moved[0] = torch.rand(3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fluctuation_weights(moved), fluctuation_weights(a))


def test_the_score_uses_the_given_task_weights():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 3, 3, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # only task 0 counts
    best, score = recommend(a, top_k=1, weights=w)[0]
    assert score == max(task_estimates(lay, a)[0].item() for lay in enumerate_layouts(3, 2))
    torch.testing.assert_close(torch.tensor(score, dtype=torch.float64), task_estimates(best, a)[0])


@pytest.mark.parametrize("call, message", [
    (lambda a: recommend(a, top_k=0), "top_k must be at least 1, got 0"),
    (lambda a: recommend(a, top_k=-1), "top_k must be at least 1, got -1"),
    (lambda a: recommend(a, budget=-1.0), "budget must be at least 0, got -1.0"),
    (lambda a: recommend(a, budget=float("nan")), "budget must be at least 0, got nan"),
    (lambda a: recommend(a, block_costs=[-1.0, 1.0], budget=4.0), r"block_costs\[0\] must be at least 0, got -1.0"),
    (lambda a: enumerate_layouts(3, 0), "num_blocks must be at least 1, got 0"),
    (lambda a: enumerate_layouts(0, 2), "num_tasks must be at least 1, got 0"),
    (lambda a: fluctuation_weights(a, order=1), "order must be at least 2, got 1"),
    (lambda a: svd_entropy(torch.rand(5), order=0), "order must be at least 2, got 0"),
    (lambda a: svd_entropy(torch.rand(5), order=6), "order must be at most the sequence length 5, got 6"),
])
def test_bad_arguments_are_refused(call, message):
    affinity = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        call(affinity)


def test_branch_points_on_a_three_block_hand_layout():
    """Block 0 splits 3 off, block 1 splits 2 off, block 2 splits 0 from 1."""
    layout = (((0, 1, 2), (3,)), ((0, 1), (2,), (3,)), ((0,), (1,), (2,), (3,)))
    expected = {(0, 1): 2, (0, 2): 1, (1, 2): 1, (0, 3): 0, (1, 3): 0, (2, 3): 0}
    for (i, j), b in expected.items():
        assert branch_point(layout, i, j) == b and branch_point(layout, j, i) == b
    assert branch_point((((0, 1),),) * 3, 0, 1) == 3  # never separated: all B blocks shared


def test_the_default_score_weighs_every_task_by_one_over_k():
    a = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for layout, score in recommend(a, top_k=3):
        assert score == pytest.approx(task_estimates(layout, a).sum().item() / 3)


def test_a_layout_costing_exactly_the_budget_is_kept():
    a = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    # costs 1 per group per block: fully shared costs 2, anything else at least 3
    kept = recommend(a, top_k=100, block_costs=[1.0, 1.0], budget=2.0)
    assert [lay for lay, _ in kept] == [(((0, 1, 2),), ((0, 1, 2),))]


def test_fluctuation_weights_by_the_formula_from_svd_entropies():
    """w_i ∝ 1 − mean over partners j of the entropy of A[1:, i, j], renormalised to sum 1."""
    a = torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    a[1:, 0, 1] = torch.tensor([1.0, 0, 0, 1, 0], dtype=torch.float64)  # a high-entropy partner
    trust = torch.stack([1 - (svd_entropy(a[1:, i, (i + 1) % 3]) + svd_entropy(a[1:, i, (i + 2) % 3])) / 2
                         for i in range(3)])
    torch.testing.assert_close(fluctuation_weights(a), trust / trust.sum())


def test_layout_cost_counts_each_block_once_per_group_times_its_cost():
    """All share block 0 (cost 2), block 1 split in two groups (cost 3): 1 x 2 + 2 x 3 = 8."""
    layout = (((0, 1, 2),), ((0, 1), (2,)))
    assert layout_cost(layout, [2.0, 3.0]) == 8.0
    assert layout_cost(layout, [0.5, 0.25]) == 1.0  # 1 x 0.5 + 2 x 0.25


def test_a_budget_without_block_costs_counts_one_per_group_per_block():
    """Unit costs: fully shared over 2 blocks costs 2, one extra group costs 3, fully separate 6."""
    a = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert [lay for lay, _ in recommend(a, top_k=100, budget=2.0)] == [(((0, 1, 2),), ((0, 1, 2),))]
    within = recommend(a, top_k=100, budget=3.0)
    expected = [lay for lay in enumerate_layouts(3, 2) if sum(len(p) for p in lay) <= 3]
    assert sorted(lay for lay, _ in within) == sorted(expected) and len(expected) == 4


def test_the_default_ranking_keeps_the_five_best_layouts():
    a = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert recommend(a) == recommend(a, top_k=100)[:5]


def test_the_smallest_design_spaces_are_accepted():
    """One block (B = 1) and two tasks (K = 2) are valid; the layouts are then just partitions / branch points."""
    g = torch.Generator().manual_seed(10)
    one_block = recommend(torch.rand(2, 3, 3, generator=g, dtype=torch.float64), top_k=100)
    assert sorted(lay for lay, _ in one_block) == sorted((p,) for p in partitions((0, 1, 2)))  # Bell(3) = 5
    two_tasks = recommend(torch.rand(4, 2, 2, generator=g, dtype=torch.float64), top_k=100)
    assert len(two_tasks) == 4  # branch after block 0, 1, 2 or 3


@pytest.mark.parametrize("shape", [(1, 3, 3), (3, 1, 1), (3, 2, 3), (3, 3, 2)])
def test_an_affinity_without_a_branch_point_pair_or_square_tasks_is_refused(shape):
    """B >= 1 (at least one shared block to vary) and K >= 2 (a partner for every task)."""
    with pytest.raises(ValueError, match=r"affinity must have shape \(B \+ 1, K, K\)"):
        recommend(torch.zeros(shape, dtype=torch.float64))


def test_an_svd_entropy_order_equal_to_the_length_is_one_window_and_no_entropy():
    """order = len gives a single window, a single singular value: entropy 0 (order <= len is allowed)."""
    assert svd_entropy(torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)) == 0
    a = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)  # B = 3
    torch.testing.assert_close(fluctuation_weights(a), torch.full((3,), 1 / 3, dtype=torch.float64))
