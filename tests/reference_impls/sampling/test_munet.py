"""µ2Net (Gesmundo & Dean 2022): reuse-or-clone mutation, parameter accounting, selection, no forgetting."""

import pytest
import torch
from torch import nn

from reference_impls.sampling.munet import PRETRAINED, Component, MuNetSystem, Path, incremental_mutation


def root_path() -> Path:
    torch.manual_seed(0)
    layers = [Component("layer0", nn.Linear(4, 4)), Component("layer1", nn.Linear(4, 4))]
    return Path("root", layers + [Component("head", nn.Linear(4, 2))], mu=0.1)


def system(seed: int = 0, **kwargs) -> MuNetSystem:
    return MuNetSystem(root_path(), reference_params=100, generator=torch.Generator().manual_seed(seed), **kwargs)


def head() -> nn.Module:
    return nn.Linear(4, 3)


def test_mu_zero_shares_frozen_layers_and_mu_one_clones_them():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu = 0.0
    child = sys0.mutate(root, "a", head)
    assert all(c is r for c, r in zip(child.components[:2], root.components[:2]))  # reused by reference
    assert child.components[2] is not root.components[2] and child.components[2].module.out_features == 3
    assert child.trainable_parameters() == list(child.components[2].module.parameters())  # only the new head
    sys1 = system(mu_grid=(1.0,))
    root1 = sys1.paths["root"][0]
    root1.mu = 1.0
    cloned = sys1.mutate(root1, "a", head)
    for c, r in zip(cloned.components[:2], root1.components[:2]):
        assert c is not r and c.trainable and torch.equal(c.module.weight, r.module.weight)


def test_trainable_components_of_the_same_task_are_always_cloned():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu = 0.0
    first = sys0.mutate(root, "a", head)
    second = sys0.mutate(first, "a", head)
    assert second.components[2] is not first.components[2]  # the head: a trainable copy
    assert torch.equal(second.components[2].module.weight, first.components[2].module.weight)
    assert second.components[0] is root.components[0]  # frozen root layer still shared


def test_parameter_accounting_and_score_by_hand():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu = 0.0
    child = sys0.mutate(root, "a", head)
    # layers 0 and 1 (20 params each) are used by "a" and the pretrained root, which is not a
    # task: "a" pays for them in full, as does the official accounting; the head (15) too
    assert child.accounted_params() == pytest.approx(20 + 20 + 15)
    child.quality = 0.8
    assert sys0.score(child) == pytest.approx(0.8 * 0.95 ** (55 / 100))
    assert sys0.score(Path("b", [])) == float("-inf")  # not evaluated yet
    sys0.report(child, 0.8)
    sys0.end_task("a")  # "a" now locks the two shared layers
    other = sys0.mutate(child, "b", head)
    # a task sharing them with "a" pays half; its new head (15) in full
    assert other.accounted_params() == pytest.approx(20 / 2 + 20 / 2 + 15)


def test_a_component_locked_only_by_its_own_task_counts_in_full():
    """The root's layers are frozen by the pretrained lock alone: it pays for all 50 of its
    parameters, not half of them as if another task shared them."""
    root = system().paths["root"][0]
    assert all(c.locks == {PRETRAINED} and not c.trainable for c in root.components)
    assert root.accounted_params() == 20 + 20 + 10


def test_selection_keeps_children_that_beat_the_parent_then_freezes_the_best():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu = 0.0
    first = sys0.mutate(root, "a", head)
    assert sys0.report(first, 0.5)  # parent of another task: always joins
    worse = sys0.mutate(first, "a", head)
    assert not sys0.report(worse, 0.4)
    better = sys0.mutate(first, "a", head)
    assert sys0.report(better, 0.7)
    assert sys0.paths["a"] == [first, better]
    best = sys0.end_task("a")
    assert best is better and sys0.paths["a"] == [better]
    assert all("a" in c.locks for c in better.components) and better.trainable_parameters() == []


def test_parent_sampling_prefers_the_best_unexploited_path():
    sys0 = system(seed=1, mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    good, bad = Path("a", root.components, quality=0.9), Path("a", root.components, quality=0.2)
    sys0.paths["a"] = [bad, good]
    assert sys0.sample_parent("a") is good  # 0.5^0 = 1: best-scoring path with no children
    good.children["a"] = 50  # exploited: acceptance 0.5^50 ≈ 0
    assert sys0.sample_parent("a") is bad
    bad.children["a"] = 50
    assert sys0.sample_parent("a") is root  # falls back to the other tasks' paths (seeds)
    counts = {}
    for seed in range(40):
        sys0.generator = torch.Generator().manual_seed(seed)
        good.children["a"] = 1  # accepted half of the time
        pick = sys0.sample_parent("a")
        counts[pick is good] = counts.get(pick is good, 0) + 1
    assert 10 < counts[True] < 30


def test_training_a_child_leaves_earlier_tasks_untouched():
    sys0 = system(seed=2, mu_grid=(0.5,))
    root = sys0.paths["root"][0]
    root.mu = 0.5
    child = sys0.mutate(root, "a", head)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    y = torch.randint(3, (16,), generator=torch.Generator().manual_seed(4))
    before = root(x).detach().clone()
    opt = torch.optim.SGD(child.trainable_parameters(), lr=0.5)
    loss_fn = nn.CrossEntropyLoss()
    first = float(loss_fn(child(x), y).detach())
    for _ in range(20):
        opt.zero_grad()
        loss_fn(child(x), y).backward()
        opt.step()
    assert float(loss_fn(child(x), y).detach()) < first  # the child learns its task
    assert torch.equal(root(x), before)  # the frozen root (and any earlier task) is unchanged


def test_mu_mutates_to_a_neighbouring_grid_value():
    grid = [0.1, 0.2, 0.3]
    g = torch.Generator().manual_seed(0)
    seen = {incremental_mutation(0.2, grid, g) for _ in range(20)}
    assert seen == {0.1, 0.3}
    assert {incremental_mutation(0.1, grid, g) for _ in range(20)} == {0.1, 0.2}  # clamped
    with pytest.raises(ValueError):
        MuNetSystem(root_path(), reference_params=0)


def test_trainable_body_components_are_cloned_even_at_mu_zero():
    """Only frozen components may be shared; one made during this task's search is always copied."""
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu = 0.0
    first = sys0.mutate(root, "a", head)
    assert root.children == {"a": 1}  # the parent's child count drives its acceptance later
    first.components[0] = root.components[0].clone()  # as if cloned by an earlier mutation
    second = sys0.mutate(first, "a", head)
    assert second.components[0] is not first.components[0] and second.components[0].trainable
    assert second.components[1] is root.components[1]  # the frozen one is still shared
    assert first.children == {"a": 1}


def test_a_child_that_ties_its_parent_joins_and_wins_the_tie_at_the_end():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu = 0.0
    first = sys0.mutate(root, "a", head)
    sys0.report(first, 0.5)
    tie = sys0.mutate(first, "a", head)  # same layout, same accounted parameters
    assert sys0.score(tie) == float("-inf") and sys0.report(tie, 0.5)  # "at least as well"
    assert sys0.end_task("a") is tie  # equal scores: the most recent path is kept


def test_mu_itself_mutates_with_probability_mu():
    """µ = 1 always steps to a neighbour (here 0, or clamped at 1); µ = 0 never moves."""
    seen = set()
    for seed in range(12):
        sys1 = system(seed=seed, mu_grid=(0.0, 1.0))
        root = sys1.paths["root"][0]
        root.mu = 1.0
        seen.add(sys1.mutate(root, "a", head).mu)
        root.mu = 0.0
        assert sys1.mutate(root, "a", head).mu == 0.0
    assert seen == {0.0, 1.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"reference_params": 0}, "reference_params must be at least 1, got 0"),
    ({"base": 0.0}, r"base must be in \(0, 1\], got 0.0"),
    ({"base": float("nan")}, r"base must be in \(0, 1\], got nan"),
    ({"mu_grid": ()}, r"mu_grid must be a non-empty tuple of probabilities in \[0, 1\], got \(\)"),
    ({"mu_grid": (0.1, 1.5)}, r"mu_grid must be .* got \(0.1, 1.5\)"),
    ({"mu_grid": (-0.5,)}, r"mu_grid must be .* got \(-0.5,\)"),
    ({"mu_grid": (float("nan"),)}, r"mu_grid must be .* got \(nan,\)"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MuNetSystem(root_path(), **{"reference_params": 100, **kwargs})


def test_when_every_candidate_declines_the_parent_is_drawn_from_own_paths_and_seeds():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    own = Path("a", root.components, quality=0.5)
    sys0.paths["a"] = [own]
    own.children["a"] = root.children["a"] = 60  # acceptance 0.5^60: both decline
    picks = set()
    for seed in range(20):
        sys0.generator = torch.Generator().manual_seed(seed)
        picks.add(id(sys0.sample_parent("a")))
    assert picks == {id(own), id(root)}


def test_a_child_of_another_tasks_path_joins_whatever_its_score():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    root.mu, root.quality = 0.0, 0.99  # a high-scoring seed from another task
    child = sys0.mutate(root, "a", head)
    assert sys0.report(child, 0.01) and sys0.paths["a"] == [child]


def test_a_nan_quality_is_refused_rather_than_read_as_a_worse_child():
    """A NaN quality compared False with the parent's score, so the child was dropped silently."""
    sys0 = system(mu_grid=(0.0,))
    child = sys0.mutate(sys0.paths["root"][0], "a", head)
    with pytest.raises(ValueError, match="quality must be finite, got nan"):
        sys0.report(child, float("nan"))
    assert "a" not in sys0.paths
    assert sys0.report(child, 0.5)


def test_a_new_task_starts_from_the_seeds_and_its_root_mu_from_the_grid():
    """A task with no paths yet draws its first parent from the other tasks' paths; the root's µ (0.1, off
    this grid) is replaced by the grid's first value, here 0: every frozen layer is shared."""
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    child = sys0.sample_child("a", head)
    assert child.parent is root and child.mu == 0.0
    assert all(c is r for c, r in zip(child.components[:2], root.components[:2]))


def test_every_mutation_counts_towards_the_parents_children():
    sys0 = system(mu_grid=(0.0,))
    root = sys0.paths["root"][0]
    for expected in (1, 2, 3):
        sys0.mutate(root, "a", head)
        assert root.children == {"a": expected}
    sys0.mutate(root, "b", head)
    assert root.children == {"a": 3, "b": 1}  # counted per task


def test_clones_keep_their_layer_names_and_are_trainable_even_if_the_original_was_not():
    """µ = 1 clones every frozen layer; the copy must learn, even from a module whose gradients were switched off."""
    sys1 = system(mu_grid=(1.0,))
    root = sys1.paths["root"][0]
    for component in root.components:
        component.module.requires_grad_(False)
    child = sys1.mutate(root, "a", head)
    assert [c.name for c in child.components] == ["layer0", "layer1", "head"]
    params = child.trainable_parameters()
    assert len(params) == 6 and all(p.requires_grad for p in params)
    child(torch.randn(5, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_mu_steps_to_an_adjacent_grid_value_inside_a_longer_grid():
    grid = [0.1, 0.2, 0.3, 0.4, 0.5]
    g = torch.Generator().manual_seed(1)
    assert {incremental_mutation(0.3, grid, g) for _ in range(30)} == {0.2, 0.4}


def test_base_one_means_no_size_penalty_and_above_one_is_refused():
    """base = 1 is the notebook's main setting: score = quality whatever the size; a base above 1 would reward size."""
    sys1 = system(base=1.0)
    root = sys1.paths["root"][0]
    root.quality = 0.7
    assert sys1.score(root) == 0.7
    with pytest.raises(ValueError, match=r"base must be in \(0, 1\], got 1.5"):
        system(base=1.5)


def test_the_search_is_reproducible_from_its_generator():
    """Same seed, same evolution, whatever else draws from torch's global RNG in between (here: building layers,
    as training would): the parent acceptance, the fallback draw, µ's mutation and each share-or-clone coin all
    come from the system's generator."""
    def trace(seed: int, disturb: bool) -> list:
        sys0 = system(seed=seed, mu_grid=(0.3, 0.5, 0.7))
        root = sys0.paths["root"][0]
        root.mu = 0.5
        made, out = [root], []
        for step in range(25):
            child = sys0.sample_child("a", head)
            shared = tuple(c is p for c, p in zip(child.components, child.parent.components))
            out.append((made.index(child.parent), child.mu, shared))
            made.append(child)
            sys0.report(child, 0.5 + 0.01 * (step % 3))
            if disturb:
                nn.Linear(4, 4)  # the caller's own use of the global RNG
        for path in made:
            path.children["a"] = 60  # every candidate declines: the uniform fallback draws the parent
        for _ in range(20):
            out.append(made.index(sys0.sample_parent("a")))
            if disturb:
                nn.Linear(4, 4)
        return out

    assert trace(7, disturb=False) == trace(7, disturb=True)
