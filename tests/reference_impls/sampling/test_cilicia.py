"""CILICIA (Sarafianos et al., ICCVW 2017): correlation grouping by hand, strong-first schedule, transfer helps."""

import pytest
import torch
from torch import nn

from reference_impls.architectures.registry import Problem, build
from reference_impls.sampling.cilicia import (
    CILICIASchedule,
    correlation_strength,
    label_correlation,
    split_by_correlation,
    transfer_shared,
)


def correlated_labels(n: int = 400, seed: int = 0) -> torch.Tensor:
    """Tasks 0-2: one latent attribute with 10% label flips; tasks 3-4: independent coins."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(n, generator=g) < 0.5).float()
    noisy = [torch.where(torch.rand(n, generator=g) < 0.1, 1 - base, base) for _ in range(3)]
    coins = [(torch.rand(n, generator=g) < 0.5).float() for _ in range(2)]
    return torch.stack(noisy + coins, dim=1)


def test_pearson_and_strength_by_hand():
    labels = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 1], [0, 1, 0]], dtype=torch.float64)
    corr = label_correlation(labels)
    torch.testing.assert_close(corr, torch.corrcoef(labels.T))
    # columns: a = (1,1,0,0), b = (1,0,0,1), c = (0,1,1,0) → ρ_ab = 0, ρ_ac = 0, ρ_bc = −1
    torch.testing.assert_close(corr, torch.tensor([[1.0, 0, 0], [0, 1, -1], [0, -1, 1]], dtype=torch.float64))
    torch.testing.assert_close(correlation_strength(corr), torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))
    assert split_by_correlation(corr, strong_fraction=0.5) == ([1, 2], [0])  # anti-correlation counts


def test_correlated_tasks_form_the_strong_group_under_any_task_order():
    labels = correlated_labels()
    strong, weak = split_by_correlation(label_correlation(labels), strong_fraction=0.6)
    assert sorted(strong) == [0, 1, 2] and sorted(weak) == [3, 4]
    perm = torch.tensor([4, 2, 0, 3, 1])
    strong_p, _ = split_by_correlation(label_correlation(labels[:, perm]), strong_fraction=0.6)
    assert sorted(perm[strong_p].tolist()) == [0, 1, 2]


def test_two_stage_schedule_trains_strong_group_first():
    schedule = CILICIASchedule(correlated_labels(), stage1_epochs=3, strong_fraction=0.6)
    assert [schedule.stage(e) for e in range(5)] == [1, 1, 1, 2, 2]
    assert sorted(schedule.tasks_to_train(0)) == [0, 1, 2]
    assert sorted(schedule.tasks_to_train(3)) == [3, 4]
    torch.testing.assert_close(schedule.task_weights(0), torch.tensor([1.0, 1, 1, 0, 0], dtype=torch.float64))
    like = torch.zeros(1, dtype=torch.float32)
    torch.testing.assert_close(schedule.task_weights(7, like), torch.tensor([0.0, 0, 0, 1, 1]))


def test_degenerate_labels_stay_finite():
    labels = correlated_labels()
    labels[:, 4] = 1.0  # an attribute that never varies
    corr = label_correlation(labels)
    assert torch.isfinite(corr).all() and corr[4, :4].eq(0).all() and corr[4, 4] == 1
    assert 4 in split_by_correlation(corr, 0.6)[1]
    single = CILICIASchedule(torch.ones(10, 1), stage1_epochs=2)
    assert single.tasks_to_train(0) == [0] and single.tasks_to_train(5) == [0]  # no weak group
    assert torch.isfinite(label_correlation(torch.zeros(5, 3))).all()
    with pytest.raises(ValueError):
        CILICIASchedule(torch.ones(4), stage1_epochs=1)


class Net(nn.Module):
    def __init__(self, tasks: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(10, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return torch.cat([head(z) for head in self.heads], dim=1)


def fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.1) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn(net(x), y))


def test_transfer_copies_the_shared_layers_and_speeds_up_the_weak_group():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 10, generator=g)
    z = x[:, :2]  # the features the attributes depend on
    strong_y = torch.stack([z[:, 0] > 0, z[:, 0] + 0.2 * z[:, 1] > 0, z[:, 1] > 0], 1).float()
    weak_y = (z[:, 0] - z[:, 1] > 0).float()[:, None]
    stage1 = Net(3, seed=0)
    fit(stage1, x, strong_y, steps=60)
    stage2 = Net(1, seed=1)
    head_before = stage2.heads[0].weight.clone()
    copied = transfer_shared(stage1, stage2)
    assert copied == ["trunk.0.weight", "trunk.0.bias"]
    assert torch.equal(stage2.trunk[0].weight, stage1.trunk[0].weight)
    assert torch.equal(stage2.heads[0].weight, head_before)  # heads are task-specific
    transferred = fit(stage2, x, weak_y, steps=8)
    scratch = fit(Net(1, seed=1), x, weak_y, steps=8)
    assert transferred < 0.7 * scratch


def test_transfer_leaves_a_modules_extra_state_alone():
    """PathNet keeps its pathways as extra state, a dict in its state_dict: transfer copies the
    grid's weights and leaves the target's own pathways (before, it failed on the dict)."""
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    source, target = (build("pathnet", problem, num_layers=2, num_modules=3, active=2, seed=s) for s in (0, 1))
    target_paths = dict(target.paths)
    copied = transfer_shared(source, target)
    assert copied and all(name.startswith("layers.") or name == "frozen" for name in copied)
    assert torch.equal(target.layers[1][2][0].weight, source.layers[1][2][0].weight)
    assert target.paths == target_paths != source.paths
    source.fix_path("a", ((0,), (1,)))  # frozen travels as a buffer, and the modules follow it
    transfer_shared(source, target)
    assert not target.layers[1][1][0].weight.requires_grad and target.layers[1][2][0].weight.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"stage1_epochs": -1}, "stage1_epochs must be at least 0, got -1"),
    ({"strong_fraction": 0.0}, r"strong_fraction must be in \(0, 1\], got 0.0"),
    ({"strong_fraction": 1.5}, r"strong_fraction must be in \(0, 1\], got 1.5"),
    ({"strong_fraction": float("nan")}, r"strong_fraction must be in \(0, 1\], got nan"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    labels = torch.randint(0, 2, (20, 4), generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match=message):
        CILICIASchedule(labels, **{"stage1_epochs": 2, **kwargs})
    if "strong_fraction" in kwargs:  # before: 1.5 silently made every task strong, NaN a conversion error
        with pytest.raises(ValueError, match=message):
            split_by_correlation(torch.eye(4), kwargs["strong_fraction"])


def test_the_strongest_half_is_the_default_strong_group():
    labels = correlated_labels()[:, :4]  # tasks 0-2 correlated, task 3 a coin: half is 2 of 4 tasks
    strong, weak = split_by_correlation(label_correlation(labels))
    assert len(strong) == 2 and set(strong) < {0, 1, 2} and 3 in weak
    schedule = CILICIASchedule(labels, stage1_epochs=1)
    assert (schedule.strong, schedule.weak) == (strong, weak)


def test_the_default_strong_group_is_ceil_half_of_an_odd_number_of_tasks():
    """T = 5: ⌈0.5 · 5⌉ = 3 strong tasks (a default of 0.4 gives ⌈2.0⌉ = 2; at T = 4 both give 2).

    Strengths by hand (mean |ρ| over the 4 others): 0.45, 0.425, 0.45, 0.1, 0.025.
    """
    corr = torch.tensor([[1.0, 0.9, 0.8, 0.1, 0.0],
                         [0.9, 1.0, 0.7, 0.1, 0.0],
                         [0.8, 0.7, 1.0, 0.2, 0.1],
                         [0.1, 0.1, 0.2, 1.0, 0.0],
                         [0.0, 0.0, 0.1, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(correlation_strength(corr),
                               torch.tensor([0.45, 0.425, 0.45, 0.1, 0.025], dtype=torch.float64))
    strong, weak = split_by_correlation(corr)
    assert sorted(strong) == [0, 1, 2] and weak == [3, 4]
    schedule = CILICIASchedule(correlated_labels(), stage1_epochs=1)  # tasks 0-2 correlated, 3-4 coins
    assert sorted(schedule.strong) == [0, 1, 2] and sorted(schedule.weak) == [3, 4]
    assert sorted(schedule.tasks_to_train(0)) == [0, 1, 2]


def test_correlation_is_pearsons_for_columns_of_any_scale():
    """Pearson's ρ does not depend on the columns' scale: label_correlation must agree with corrcoef
    when the centred columns have norms below, at and above one, and unequal to each other."""
    g = torch.Generator().manual_seed(4)
    labels = (torch.rand(30, 4, generator=g) < 0.5).double()
    for scale in (0.01, 1.0, 7.0):
        torch.testing.assert_close(label_correlation(labels * scale), torch.corrcoef(labels.T))
    mixed = labels * torch.tensor([0.05, 1.0, 3.0, 0.2], dtype=torch.float64)
    torch.testing.assert_close(label_correlation(mixed), torch.corrcoef(labels.T))


def test_strength_of_one_and_two_tasks():
    """One task has no others: strength 0 (in the correlation's dtype). Two tasks: each one's strength is |ρ_01|."""
    single = correlation_strength(torch.eye(1, dtype=torch.float64))
    assert single.dtype == torch.float64
    torch.testing.assert_close(single, torch.zeros(1, dtype=torch.float64))
    pair = torch.tensor([[1.0, -0.4], [-0.4, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(correlation_strength(pair), torch.tensor([0.4, 0.4], dtype=torch.float64))
    assert split_by_correlation(pair) == ([0], [1])  # ⌈0.5 · 2⌉ = 1; a tie goes to the lower index


def test_strong_group_size_is_ceil_of_fraction_times_tasks_at_both_ends():
    """strong_fraction = 1 (allowed) puts every task in stage 1; a small fraction keeps just the strongest task."""
    corr = torch.tensor([[1.0, 0.9, 0.8, 0.1, 0.0],
                         [0.9, 1.0, 0.7, 0.1, 0.0],
                         [0.8, 0.7, 1.0, 0.2, 0.1],
                         [0.1, 0.1, 0.2, 1.0, 0.0],
                         [0.0, 0.0, 0.1, 0.0, 1.0]], dtype=torch.float64)  # strengths 0.45, 0.425, 0.45, 0.1, 0.025
    assert split_by_correlation(corr, strong_fraction=1.0) == ([0, 2, 1, 3, 4], [])
    assert split_by_correlation(corr, strong_fraction=0.2) == ([0], [2, 1, 3, 4])  # ⌈0.2 · 5⌉ = 1


def test_integer_and_boolean_label_matrices_are_accepted():
    """Attribute labels often arrive as 0/1 integers or booleans; the schedule works in float64 whatever they are."""
    labels = correlated_labels()
    reference = CILICIASchedule(labels, stage1_epochs=1)
    for kind in (torch.int64, torch.bool, torch.float32):
        schedule = CILICIASchedule(labels.to(kind), stage1_epochs=1)
        assert schedule.correlation.dtype == torch.float64
        torch.testing.assert_close(schedule.correlation, reference.correlation)
        assert (schedule.strong, schedule.weak) == (reference.strong, reference.weak)
