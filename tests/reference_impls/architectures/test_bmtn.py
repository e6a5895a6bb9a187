import torch

from reference_impls.architectures.bmtn import (
    BranchedMultiTaskNetwork, dissimilarity_score, enumerate_trees, rdm, select_tree, spearman, task_affinity,
)
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

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
