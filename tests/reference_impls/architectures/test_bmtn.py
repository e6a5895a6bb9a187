import pytest
import torch

from reference_impls.architectures.bmtn import (
    BranchedMultiTaskNetwork, dissimilarity_score, enumerate_trees, rdm, select_tree, spearman, task_affinity,
    tree_cost,
)
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def test_rdm_and_spearman_by_hand():
    f = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    # Pearson correlations: r(0,1) = -1, r(0,2) = 0.5, r(1,2) = -0.5
    expected = torch.tensor([[0.0, 2.0, 0.5], [2.0, 0.0, 1.5], [0.5, 1.5, 0.0]])
    torch.testing.assert_close(rdm(f), expected)
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])
    # ranks 0,1,2,3 vs 0,2,1,3: rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    torch.testing.assert_close(spearman(a, b), torch.tensor(0.8))
    torch.testing.assert_close(spearman(a, a.exp()), torch.tensor(1.0))  # rank-only
    # ties share their mean rank: ranks 0, 1.5, 1.5, 3 against 0, 1, 2, 3 give 4.5 / sqrt(4.5 * 5)
    tied = torch.tensor([1.0, 2.0, 2.0, 3.0])
    torch.testing.assert_close(spearman(tied, a), torch.tensor(4.5 / (4.5 * 5) ** 0.5))


def test_affinity_is_one_for_features_that_order_images_alike():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 5, generator=g)
    other = torch.randn(8, 5, generator=g)
    aff = task_affinity([base, 3 * base + 1, other])
    torch.testing.assert_close(aff[0, 1], torch.tensor(1.0))  # RDM unchanged by scaling / shift
    assert aff[0, 2] < 0.9 and torch.equal(aff, aff.T)


def test_affinity_is_the_rank_correlation_of_the_rdms():
    # Three images; tasks 0 and 1 differ only in the third image. RDMs above the diagonal:
    # task 0: (0,1), (0,2), (1,2) = 2, 0.5, 1.5 (see test_rdm_and_spearman_by_hand);
    # task 1: the third image [1, 2, 4] correlates 9 / sqrt(84) ~ 0.98 with the first, giving
    # 2, 0.018, 1.982: the same order as task 0 but not a linear map of it (Pearson ~ 0.95);
    # task 2: the images of task 1 in the order 0, 2, 1, giving 0.018, 2, 1.982: the reverse order.
    first = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]]
    second = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 2.0, 4.0]]
    third = [second[0], second[2], second[1]]
    aff = task_affinity([torch.tensor(f, dtype=torch.float64) for f in (first, second, third)])
    expected = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(aff, expected)


def test_tree_cost_counts_each_layers_copies_at_its_own_cost():
    tree = ((("a", "b", "c"),), (("a", "b"), ("c",)), (("a",), ("b",), ("c",)))
    assert tree_cost(tree, [1.0, 10.0, 100.0]) == 1 * 1 + 2 * 10 + 3 * 100
    # a dear first layer (3) and a cheap last one (1), budget 7: splitting c off in the first
    # layer (2 * 3 + 2 * 1 = 8) does not fit, so the first layer is shared (dissimilarity 0.8)
    # and the last splits all three apart (3 + 3 * 1 = 6; score 0.8 + 0, below 0.8 + 0.05 for a+b)
    aff = torch.tensor([[1.0, 0.9, 0.2], [0.9, 1.0, 0.2], [0.2, 0.2, 1.0]])
    assert select_tree(("a", "b", "c"), [aff, aff], [3.0, 1.0], budget=7.0) == (
        (("a", "b", "c"),), (("a",), ("b",), ("c",)))


def test_equal_scores_go_to_the_cheaper_tree():
    # a and b are perfectly related, so sharing scores 0, and so does splitting (singletons)
    aff = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert select_tree(("a", "b"), [aff, aff], [1.0, 1.0], budget=100.0) == ((("a", "b"),), (("a", "b"),))


def test_score_prefers_sharing_between_similar_tasks():
    aff = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    tasks = ("a", "b", "c")
    good = ((("a", "b", "c"),), (("a", "b"), ("c",)))
    bad = ((("a", "b", "c"),), (("a", "c"), ("b",)))
    # layer 0: max dissimilarity 0.9; layer 1: mean(max(0.1), 0) = 0.05 vs mean(0.9, 0) = 0.45
    assert abs(dissimilarity_score(good, [aff, aff], tasks) - 0.95) < 1e-6
    assert abs(dissimilarity_score(bad, [aff, aff], tasks) - 1.35) < 1e-6
    # budget: layer 0 shared plus two branches at layer 1 -> the similar pair stays together
    assert select_tree(tasks, [aff, aff], [1.0, 1.0], budget=3.0) == good
    # budget 4: splitting c off at layer 0 (0.05 + 0.05) beats sharing then splitting all (0.9)
    early = ((("a", "b"), ("c",)), (("a", "b"), ("c",)))
    assert select_tree(tasks, [aff, aff], [1.0, 1.0], budget=4.0) == early


def test_enumeration_only_splits_going_deeper():
    trees = enumerate_trees(("a", "b", "c"), 2)
    # p0 = one group: 5 refinements; p0 = a pair + singleton (3 of them): 2 each; all apart: 1
    assert len(trees) == 1 * 5 + 3 * 2 + 1 * 1
    assert all(all(any(set(g) <= set(c) for c in t[0]) for g in t[1]) for t in trees)


def test_built_tree_shares_exactly_its_partition(device, params_with_grad):
    torch.manual_seed(0)
    tree = [(("a", "b", "c"),), (("a", "b"), ("c",))]
    model = build("bmtn", VEC, width=8, tree=tree).to(device)
    assert sorted(model.branches) == ["0:a+b+c", "1:a+b", "1:c"]
    touched = params_with_grad(model, model(torch.randn(4, 6, device=device))["a"].sum())
    assert {n.split(".")[1] for n in touched if n.startswith("branches.")} == {"0:a+b+c", "1:a+b"}
    assert {p for p in model.task_specific_parameters("c")} >= set(model.branches["1:c"].parameters())
    assert not set(map(id, model.task_specific_parameters("a"))) & set(map(id, model.branches["1:a+b"].parameters()))


def test_each_group_reads_its_own_parent(device, split_by_task):
    torch.manual_seed(0)
    tree = [(("a", "b"), ("c",)), (("a",), ("b",), ("c",))]
    model = build("bmtn", VEC, width=8, tree=tree).to(device)
    x = torch.randn(3, 6, device=device)
    out = model(x)
    for t, path in {"a": ["0:a+b", "1:a"], "b": ["0:a+b", "1:b"], "c": ["0:c", "1:c"]}.items():
        h = x
        for key in path:
            h = model.branches[key](h)
        torch.testing.assert_close(out[t], model.heads[t](h))
    own = {"a": ["branches.1:a.", "heads.a."], "b": ["branches.1:b.", "heads.b."],
           "c": ["branches.0:c.", "branches.1:c.", "heads.c."]}
    assert_each_task_owns_exactly(split_by_task(model, x), lambda t: names_under(model, *own[t]))


def test_default_tree_shares_all_but_the_last_layer():
    tasks = VEC.tasks
    assert build("bmtn", VEC, depth=3).tree == ((tasks,), (tasks,), (("a",), ("b",), ("c",)))
    assert build("bmtn", VEC, depth=1).tree == ((("a",), ("b",), ("c",)),)


def test_fully_shared_tree_is_shared_bottom(device):
    torch.manual_seed(0)
    model = build("bmtn", VEC, width=8, tree=[(VEC.tasks,), (VEC.tasks,)]).to(device)
    trunk = torch.nn.Sequential(model.branches["0:a+b+c"], model.branches["1:a+b+c"])
    hard = SharedBottom(VEC.tasks, trunk, model.heads).to(device)
    x = torch.randn(3, 6, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], hard(x)[t])


def test_rejects_a_tree_that_merges_deeper(device):
    try:
        build("bmtn", VEC, tree=[(("a",), ("b", "c")), (("a", "b"), ("c",))])
    except ValueError:
        return
    raise AssertionError("a deeper layer merging split tasks must be rejected")


def test_short_training_lowers_the_loss(short_training, device):
    first, last = short_training("bmtn", True, device, 15)
    assert last < first


def test_registry_name_builds_the_catalogued_class(registry_output_shapes, device):
    assert type(build("bmtn", VEC)) is BranchedMultiTaskNetwork
    registry_output_shapes("bmtn", device)


def test_rdm_is_one_minus_pearson_at_any_feature_scale_and_with_more_channels_than_images():
    """Pearson correlation ignores the scale of the features, tiny activations included, and an RDM is
    K x K over the K images (the first axis), whatever the number of channels per image."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)  # K = 4 images of 3 x 2 features
    flat = f.flatten(1)
    pearson = torch.stack([torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for b in flat]) for a in flat])
    torch.testing.assert_close(rdm(f), 1 - pearson)
    torch.testing.assert_close(rdm(f * 1e-4), 1 - pearson)
    # affinity from the upper triangles of the RDMs, K = 4 images against 6 channels
    feats = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    i, j = torch.triu_indices(4, 4, offset=1)
    aff = task_affinity(feats)
    torch.testing.assert_close(aff[0, 1], spearman(rdm(feats[0])[i, j], rdm(feats[1])[i, j]))
    assert task_affinity(feats[:1]).tolist() == [[1.0]]  # one task: only its self-affinity


def test_a_budget_below_every_tree_is_refused():
    """The fully shared tree is the cheapest; a budget below its cost leaves nothing to choose."""
    aff = torch.eye(2)
    with pytest.raises(ValueError, match="budget"):
        select_tree(("a", "b"), [aff, aff], [1.0, 1.0], budget=1.5)
