import pytest
import torch

from reference_impls.architectures.fafs import (
    FullyAdaptiveFeatureSharing, agglomerative_groupings, best_grouping, branch_affinity, grouping_loss,
    hard_examples, task_affinity,
)
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 1, "c": 2})


def test_affinity_by_hand():
    hard = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)
    aff = task_affinity(hard)
    # a, b agree on examples 0, 1, 2 -> 3/4; a, c on 1 and 3 -> 2/4; b, c on 1 only -> 1/4
    expected = torch.tensor([[1.0, 0.75, 0.5], [0.75, 1.0, 0.25], [0.5, 0.25, 1.0]])
    torch.testing.assert_close(aff, expected)


def test_hard_examples_are_above_the_task_mean():
    losses = torch.tensor([[1.0, 10.0], [3.0, 0.0], [2.0, 5.0]])
    assert hard_examples(losses).tolist() == [[False, True], [True, False], [False, False]]
    skewed = torch.tensor([[0.0], [1.0], [2.0], [9.0]])  # mean 3, median 1.5: only the outlier is hard
    assert hard_examples(skewed).flatten().tolist() == [False, False, False, True]


# Both matrices must give {0, 1} then {2, 3}: complete linkage merges groups on their least affine pair.
# In the first, 1 and 2 are close; in the second, 2 is so close to 1 (0.95) and so far from 0 that
# average linkage (0.525 > 0.5) and single linkage (0.95) would join 2 with {0, 1} instead.
COMPLETE_LINKAGE_CASES = {
    "close_pair_across_groups": [[1.0, 0.9, 0.1, 0.05], [0.9, 1.0, 0.8, 0.05],
                                 [0.1, 0.8, 1.0, 0.7], [0.05, 0.05, 0.7, 1.0]],
    "mean_or_max_would_differ": [[1.0, 0.99, 0.1, 0.05], [0.99, 1.0, 0.95, 0.05],
                                 [0.1, 0.95, 1.0, 0.5], [0.05, 0.05, 0.5, 1.0]],
}


@pytest.mark.parametrize("case", COMPLETE_LINKAGE_CASES)
def test_candidate_groupings_merge_by_complete_linkage(case):
    candidates = [sorted(map(sorted, g)) for g in agglomerative_groupings(torch.tensor(COMPLETE_LINKAGE_CASES[case]))]
    assert candidates == [[[0], [1], [2], [3]], [[0, 1], [2], [3]], [[0, 1], [2, 3]], [[0, 1, 2, 3]]]


def test_branch_affinity_by_hand():
    aff = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.0, 0.4], [0.2, 0.4, 1.0]])
    b = branch_affinity(aff, [[0, 1], [2]])
    # {a, b} -> {c}: mean(min 0.2, min 0.4) = 0.3; {c} -> {a, b}: min(0.2, 0.4) = 0.2; sym 0.25
    torch.testing.assert_close(b[0, 1], torch.tensor(0.25))
    torch.testing.assert_close(b[0, 0], torch.tensor(0.8))


def test_grouping_trades_complexity_against_separation():
    aff = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    # one group: least affine other member a 0.1, b 0.2, c 0.1 -> separation 1 - 0.4 / 3
    # {a, b}{c}: one extra branch, separation mean(1 - 0.9, 0) = 0.05
    assert abs(grouping_loss(aff, [[0, 1, 2]], lam=10.0) - 10.0 * (1 - 0.4 / 3)) < 1e-5
    assert abs(grouping_loss(aff, [[0, 1], [2]], lam=10.0) - (1.0 + 0.5)) < 1e-6
    assert sorted(map(sorted, best_grouping(aff, lam=10.0))) == [[0, 1], [2]]
    assert len(best_grouping(aff, lam=0.0)) == 1  # no separation cost: keep one branch
    assert len(best_grouping(aff, lam=1000.0)) == 3  # separation dominates: every task alone
    assert len(best_grouping(aff, lam=10.0, pools_above=5)) == 1  # branches too costly up here


def test_widening_copies_weights_so_outputs_do_not_change(device):
    torch.manual_seed(0)
    model = build("fafs", VEC, width=8).to(device)
    assert model.tree == ((VEC.tasks,), (VEC.tasks,)) and model.active_layer() == 1
    x = torch.randn(5, 6, device=device)
    before = model(x)
    model.widen(1, [[0, 1], [2]])  # branches above the top layer are the tasks
    after = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(after[t], before[t])
    assert model.tree[1] == (("a", "b"), ("c",)) and model.active_layer() == 0
    new_ab, new_c = model.branches["1:a+b"], model.branches["1:c"]
    assert new_ab[0].weight.data_ptr() != new_c[0].weight.data_ptr()
    torch.testing.assert_close(new_ab[0].weight, new_c[0].weight)
    model.widen(0, [[0], [1]])
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], before[t])


def test_widened_branches_train_apart(device, params_with_grad):
    torch.manual_seed(0)
    model = build("fafs", VEC, width=8).to(device)
    model.widen(1, [[0, 1], [2]])
    touched = params_with_grad(model, model(torch.randn(4, 6, device=device))["c"].sum())
    assert any(n.startswith("branches.1:c.") for n in touched)
    assert not any(n.startswith("branches.1:a+b.") for n in touched)
    assert set(model.branches["1:c"].parameters()) <= set(model.task_specific_parameters("c"))


def related_losses(n: int = 200) -> torch.Tensor:
    """N x 3 losses: tasks a and b are hard on the same examples, c on unrelated ones."""
    g = torch.Generator().manual_seed(3)
    common = torch.rand(n, generator=g)
    return torch.stack([common, common + 0.01, torch.rand(n, generator=g)], dim=1)


def test_widen_by_affinity_groups_tasks_that_are_hard_together(device):
    torch.manual_seed(0)
    model = build("fafs", VEC, width=8).to(device)
    grouping = model.widen_by_affinity(related_losses(), lam=10.0)
    assert sorted(map(sorted, grouping)) == [[0, 1], [2]]
    assert model.tree[1] == (("a", "b"), ("c",)) or model.tree[1] == (("c",), ("a", "b"))


def test_widen_by_affinity_prices_branches_above_pooling_layers(device):
    """The same losses split at lam 10 with no pooling above, but 2^5 per new branch keeps one column."""
    torch.manual_seed(0)
    model = build("fafs", VEC, width=8).to(device)
    assert sorted(map(sorted, model.widen_by_affinity(related_losses(), lam=10.0, pools_above=5))) == [[0, 1, 2]]
    assert [sorted(g) for g in model.tree[1]] == [list(VEC.tasks)] and model.active_layer() == 0


def test_each_junction_is_clustered_on_its_own(device):
    """c is hard with a and b but sits under another junction: it is not grouped with them, and its
    own junction (c, d) splits since d is unrelated to c."""
    problem = Problem(("a", "b", "c", "d"), (6,), {t: 1 for t in "abcd"})
    tree = [(problem.tasks,), (("a", "b"), ("c", "d"))]
    model = FullyAdaptiveFeatureSharing.from_problem(problem, width=8, tree=tree).to(device)
    losses = related_losses()
    losses = torch.cat([losses[:, :2], losses[:, :1] + 0.02, losses[:, 2:]], dim=1)  # a, b, c alike; d not
    assert sorted(map(sorted, model.widen_by_affinity(losses, lam=10.0, layer=1))) == [[0, 1], [2], [3]]
    assert sorted(model.tree[1]) == [("a", "b"), ("c",), ("d",)]


def test_short_training_lowers_the_loss(short_training, device):
    first, last = short_training("fafs", False, device, 15)
    assert last < first


def test_registry_name_builds_the_catalogued_class(registry_output_shapes, device):
    assert type(build("fafs", VEC)) is FullyAdaptiveFeatureSharing
    registry_output_shapes("fafs", device)


def test_complete_linkage_merges_the_most_affine_pair_first_wherever_it_sits():
    """2 and 3 are the closest pair (0.9): they merge first; then 0 joins them (least affinity 0.2 beats
    1's 0.15 and the pair 0, 1 at 0.1), and 1 comes last."""
    aff = torch.tensor([[1.0, 0.1, 0.2, 0.3], [0.1, 1.0, 0.15, 0.3], [0.2, 0.15, 1.0, 0.9], [0.3, 0.3, 0.9, 1.0]])
    candidates = [sorted(map(sorted, g)) for g in agglomerative_groupings(aff)]
    assert candidates == [[[0], [1], [2], [3]], [[0], [1], [2, 3]], [[0, 2, 3], [1]], [[0, 1, 2, 3]]]


def test_grouping_loss_by_hand_with_a_unit_cost_and_pooling_layers():
    """(d - 1) * L0 * 2^p + lambda * mean(1 - within affinity): L0 0.5, p 2, one extra branch."""
    aff = torch.tensor([[1.0, 0.6, 0.1], [0.6, 1.0, 0.2], [0.1, 0.2, 1.0]])
    expected = 1 * 0.5 * 2**2 + 3.0 * ((1 - 0.6) + 0.0) / 2
    assert grouping_loss(aff, [[0, 1], [2]], lam=3.0, pools_above=2, unit_cost=0.5) == pytest.approx(expected)


def test_branches_above_a_layer_are_the_next_layer_s_groups():
    problem = Problem(("a", "b", "c"), (6,), {t: 1 for t in "abc"})
    tree = [(problem.tasks,), (("a", "b"), ("c",)), (("a",), ("b",), ("c",))]
    model = FullyAdaptiveFeatureSharing.from_problem(problem, width=8, depth=3, tree=tree)
    assert [model.branches_above(i) for i in range(3)] == [tree[1], tree[2], (("a",), ("b",), ("c",))]


def test_an_explicit_layer_is_widened_and_the_search_ends_below_the_first_layer():
    """widen_by_affinity(layer=0) on the thin start: the one branch above stays whole (nothing to
    group), the top layer is left alone, and no layer is left to widen afterwards."""
    torch.manual_seed(0)
    model = build("fafs", VEC, width=8)
    assert model.widen_by_affinity(related_losses(), lam=1000.0, layer=0) == [[0]]
    assert model.tree == ((VEC.tasks,), (VEC.tasks,)) and model.active_layer() is None
    with pytest.raises(ValueError):
        model.widen_by_affinity(related_losses(), lam=1000.0)
