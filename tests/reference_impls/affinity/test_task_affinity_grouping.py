"""TAG (Fifty et al. 2021): the group score onto a task, the exact overlapping selection."""

import itertools

import pytest
import torch
from torch import Tensor, nn

from reference_impls.affinity.task_affinity_grouping import (
    AffinityAverage,
    candidate_groups,
    group_scores,
    select_groups,
)
from reference_impls.affinity.transference import lookahead_transference, model_losses
from reference_impls.architectures.base import MultiTaskModel


def brute_force(z: Tensor, num_groups: int) -> float:
    """Independent optimum: every family of at most n groups (bitmasks), scored with plain loops."""
    k = z.shape[0]
    groups = [[t for t in range(k) if mask >> t & 1] for mask in range(1, 2**k)]

    def onto(group, a):
        if len(group) < 2:
            return float("-inf")  # a task alone has no affinity onto it
        return sum(z[b, a].item() for b in group if b != a) / (len(group) - 1)

    best = float("-inf")
    for n in range(1, num_groups + 1):
        for family in itertools.combinations(groups, n):
            per_task = [max((onto(g, a) for g in family if a in g), default=float("-inf")) for a in range(k)]
            if all(v > float("-inf") for v in per_task):
                best = max(best, sum(per_task) / k)
    return best


def test_the_score_onto_a_task_is_the_mean_of_what_the_other_members_give_it():
    z = torch.arange(16, dtype=torch.float64).reshape(4, 4)  # Z[i, j]: step on i, measured on j
    s = group_scores(z, (0, 2, 3))
    torch.testing.assert_close(s[0], (z[2, 0] + z[3, 0]) / 2)  # onto 0: column 0, rows 2 and 3
    torch.testing.assert_close(s[2], (z[0, 2] + z[3, 2]) / 2)
    torch.testing.assert_close(s[3], (z[0, 3] + z[2, 3]) / 2)
    assert s[1] == float("-inf")  # not a member
    assert len(candidate_groups(4)) == 2**4 - 4 - 1


def test_two_clear_clusters_are_found_and_one_network_means_everything_together():
    z = -torch.ones(4, 4, dtype=torch.float64)
    z[0, 1] = z[1, 0] = z[2, 3] = z[3, 2] = 2.0  # 0 and 1 help each other, so do 2 and 3
    grouping = select_groups(z, num_groups=2)
    assert grouping.groups == ((0, 1), (2, 3))
    assert grouping.served_by == (0, 0, 1, 1)
    assert grouping.score == pytest.approx(2.0)
    together = select_groups(z, num_groups=1)
    assert together.groups == ((0, 1, 2, 3),)
    assert together.score == pytest.approx((2 - 1 - 1) / 3)  # each task: one helper, two that hurt


def test_the_direction_matters_everyone_wants_the_helper_that_nobody_helps():
    """A step on task 0 lowers every other loss, no step lowers 0's: each network should hold 0."""
    z = -torch.ones(4, 4, dtype=torch.float64)
    z[0, 1:] = 3.0  # row 0: stepping on 0 helps 1, 2 and 3
    grouping = select_groups(z, num_groups=2)
    # 0 gets -1 wherever it is; 1 gets 3 alone with 0, 2 and 3 get (3 - 1) / 2 when they share it
    assert grouping.groups == ((0, 1), (0, 2, 3))
    assert grouping.score == pytest.approx((-1 + 3 + 1 + 1) / 4)
    assert grouping.served_by[1:] == (0, 1, 1)
    # read the other way round (0 helped by all), nothing beats one network for all four
    assert select_groups(z.T.contiguous(), num_groups=2).groups == ((0, 1, 2, 3),)


@pytest.mark.parametrize("seed, k, n", [(0, 4, 2), (1, 4, 3), (2, 5, 2)])
def test_the_selection_is_the_optimum_of_an_independent_brute_force(seed, k, n):
    z = torch.randn(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grouping = select_groups(z, n)
    assert grouping.score == pytest.approx(brute_force(z, n))
    assert len(grouping.groups) <= n and set(itertools.chain(*grouping.groups)) == set(range(k))
    recomputed = [group_scores(z, grouping.groups[g])[a].item() for a, g in enumerate(grouping.served_by)]
    assert sum(recomputed) / k == pytest.approx(grouping.score)


def test_the_diagonal_and_the_scale_of_the_affinity_do_not_change_the_choice():
    """Self-affinity is never read, and the code's 1/lr factor (or a sum instead of a mean) is harmless."""
    z = torch.randn(5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reference = select_groups(z, 2)
    other_diagonal = z.clone()
    other_diagonal.diagonal().copy_(torch.tensor([100.0, -100.0, 0.0, 50.0, -3.0]))
    assert select_groups(other_diagonal, 2) == reference
    scaled = select_groups(250.0 * z, 2)
    assert scaled.groups == reference.groups and scaled.score == pytest.approx(250.0 * reference.score)


def test_ties_go_to_fewer_groups():
    z = torch.ones(3, 3, dtype=torch.float64)  # every group scores 1 onto every member
    grouping = select_groups(z, num_groups=3)  # {0,1} with {1,2} scores 1 too, with two networks
    assert grouping.groups == ((0, 1, 2),) and grouping.score == pytest.approx(1.0)


class TrunkAndHeads(MultiTaskModel):
    def __init__(self):
        super().__init__(("a", "b", "c"))
        self.trunk = nn.Linear(4, 3)
        self.heads = nn.ModuleDict({t: nn.Linear(3, 1) for t in self.tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.tanh(self.trunk(x))
        return {t: self.heads[t](z).squeeze(-1) for t in self.tasks}

    def task_specific_parameters(self, task: str):
        return self.heads[task].parameters()


def test_the_average_is_the_mean_of_the_lookahead_affinities_measured_during_training():
    torch.manual_seed(0)
    model = TrunkAndHeads()
    mse = lambda p, y: ((p - y) ** 2).mean()  # noqa: E731
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average, measured = AffinityAverage(), []
    for _ in range(3):
        x, targets = torch.randn(8, 4), {t: torch.randn(8) for t in model.tasks}
        loss_fn = model_losses(model, x, targets, {t: mse for t in model.tasks})
        z = average.measure(model, loss_fn, lr=0.1)
        torch.testing.assert_close(z, lookahead_transference(model, loss_fn, 0.1))
        measured.append(z)
        optimizer.zero_grad()
        sum(mse(model(x)[t], targets[t]) for t in model.tasks).backward()
        optimizer.step()
    assert not torch.equal(measured[0], measured[-1])  # the affinity moved with the parameters
    torch.testing.assert_close(average.mean(), torch.stack(measured).mean(0))
    assert select_groups(average.mean(), 2).groups  # and it feeds the selection


@pytest.mark.parametrize("call, message", [
    (lambda: select_groups(torch.zeros(3, 3), 0), "num_groups must be at least 1, got 0"),
    (lambda: select_groups(torch.zeros(1, 1), 1), "K x K matrix with K >= 2"),
    (lambda: select_groups(torch.zeros(3, 2), 1), "K x K matrix with K >= 2"),
    (lambda: select_groups(torch.full((3, 3), float("nan")), 1), "affinity must be finite"),
    (lambda: group_scores(torch.zeros(3, 3), (1,)), "at least two tasks"),
    (lambda: AffinityAverage().mean(), "no affinity measured yet"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()


def test_the_average_keeps_no_autograd_graph_of_what_it_was_given():
    """A measured Z that still requires grad is stored as a value: its mean is a plain tensor."""
    z = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    average = AffinityAverage()
    average.update(z)
    average.update(3 * z)
    assert not average.mean().requires_grad
    torch.testing.assert_close(average.mean(), 2 * z.detach())


def test_the_average_keeps_a_copy_of_the_first_matrix_not_the_callers_tensor():
    """A caller may reuse one tensor for every measurement: the average must not follow it."""
    z = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    average = AffinityAverage()
    average.update(z)
    z.mul_(10)  # the caller's tensor, overwritten in place after the update
    torch.testing.assert_close(average.mean(), torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64))


def test_two_tasks_form_the_one_possible_group():
    """K = 2 is the smallest valid input: the pair, scored by the mean of Z[1, 0] and Z[0, 1]."""
    z = torch.tensor([[5.0, 1.0], [3.0, -7.0]], dtype=torch.float64)
    grouping = select_groups(z, 2)
    assert grouping.groups == ((0, 1),) and grouping.served_by == (0, 0)
    assert grouping.score == pytest.approx((3.0 + 1.0) / 2)


def test_measure_steps_only_the_shared_parameters_it_is_given():
    """``shared`` reaches the lookahead: naming the trunk's weight alone is not the default (weight and bias)."""
    torch.manual_seed(1)
    model = TrunkAndHeads()
    mse = lambda p, y: ((p - y) ** 2).mean()  # noqa: E731
    g = torch.Generator().manual_seed(2)
    x, targets = torch.randn(8, 4, generator=g), {t: torch.randn(8, generator=g) for t in model.tasks}
    loss_fn = model_losses(model, x, targets, {t: mse for t in model.tasks})
    average = AffinityAverage()
    z = average.measure(model, loss_fn, lr=0.5, shared=["trunk.weight"])
    torch.testing.assert_close(z, lookahead_transference(model, loss_fn, 0.5, ["trunk.weight"]))
    assert not torch.allclose(z, lookahead_transference(model, loss_fn, 0.5))
    torch.testing.assert_close(average.mean(), z)
