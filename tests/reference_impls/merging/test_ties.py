"""TIES-Merging: each step on hand examples, the mean as a limit, trimmed entries, invariances."""

import pytest
import torch

from reference_impls.merging.task_arithmetic import TaskArithmetic
from reference_impls.merging.ties import TiesMerging, disjoint_mean, elect_sign, sign_resolved_rows, trim


def test_trim_keeps_the_top_k_magnitudes_of_each_task_vector():
    tau = torch.tensor([[0.1, -3.0, 0.5, 2.0], [4.0, -0.2, 0.3, -1.0]])
    expected = torch.tensor([[0.0, -3.0, 0.0, 2.0], [4.0, 0.0, 0.0, -1.0]])
    torch.testing.assert_close(trim(tau, 0.5), expected)
    torch.testing.assert_close(trim(tau, 1.0), tau)
    with pytest.raises(ValueError, match=r"density \(k\) must be in \(0, 1\], got 0.0"):
        trim(tau, 0.0)  # would keep nothing: every task vector trimmed to zero


def test_elected_sign_is_the_sign_of_the_summed_trimmed_values():
    trimmed = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-3.0, 1.0, 0.0, -3.0], [1.0, 0.0, 0.0, 0.0]])
    # sums: -1 (two positives lose to one large negative), -1, 0, 0
    torch.testing.assert_close(elect_sign(trimmed), torch.tensor([-1.0, -1.0, 0.0, 0.0]))


def test_disjoint_mean_averages_only_kept_entries_that_agree():
    trimmed = torch.tensor([[1.0, -2.0, 4.0, 0.0], [-3.0, -1.0, 2.0, 5.0], [2.0, 0.0, 0.0, 0.0]])
    sign = elect_sign(trimmed)  # [0, -1, 1, 1]
    # column 1: -2 and -1 agree -> -1.5; column 2: (4 + 2) / 2; column 3: one task, not divided by 3
    torch.testing.assert_close(disjoint_mean(trimmed, sign), torch.tensor([0.0, -1.5, 3.0, 5.0]))


def test_full_merge_on_a_hand_example():
    pre = torch.tensor([10.0, 10.0, 10.0, 10.0])
    taus = [torch.tensor([0.1, -3.0, 0.5, 2.0]), torch.tensor([4.0, -0.2, 0.3, -1.0]),
            torch.tensor([-1.0, -2.0, 0.05, 0.0])]
    # trimmed (k = 50%): [0,-3,0,2], [4,0,0,-1], [-1,-2,0,0]; signs [+,-,0,+]
    # disjoint mean: [4, -2.5, 0, 2]; times lambda = 0.5
    merged = TiesMerging(density=0.5, scale=0.5)(pre, taus)
    torch.testing.assert_close(merged, pre + torch.tensor([2.0, -1.25, 0.0, 1.0]))


def test_sign_resolved_rows_drop_the_entries_that_disagree_with_the_elected_sign():
    """AdaMerging++'s task vectors: trimmed, then zero where the sign disagrees (the hand example above)."""
    tau = torch.stack([torch.tensor([0.1, -3.0, 0.5, 2.0]), torch.tensor([4.0, -0.2, 0.3, -1.0]),
                       torch.tensor([-1.0, -2.0, 0.05, 0.0])])
    rows = sign_resolved_rows(tau, 0.5)
    expected = torch.tensor([[0.0, -3.0, 0.0, 2.0], [4.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]])
    torch.testing.assert_close(rows, expected)  # [4,0,0,-1] loses -1, [-1,-2,0,0] loses -1
    kept = (rows != 0).sum(0).clamp(min=1)
    torch.testing.assert_close(rows.sum(0) / kept, TiesMerging(density=0.5).merge_rows(tau))


def test_full_density_without_sign_conflict_is_the_mean_of_the_task_vectors():
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (30,), generator=g) * 2.0 - 1.0
    taus = [sign * (torch.rand(30, generator=g) + 0.1) for _ in range(4)]
    pre = torch.randn(30, generator=g)
    merged = TiesMerging(density=1.0, scale=1.0)(pre, taus)
    torch.testing.assert_close(merged, pre + torch.stack(taus).mean(0))
    # ... and task arithmetic at lambda = 1/K gives the same point
    torch.testing.assert_close(merged, TaskArithmetic(scale=0.25)(pre, taus))


def test_trimmed_entries_never_contribute():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(3, 40, generator=g)
    merge = TiesMerging(density=0.3, scale=1.0)
    before = merge.merged_task_vector(list(tau))
    kept = trim(tau, 0.3) != 0
    threshold = torch.where(kept, tau.abs(), torch.inf).min(dim=1, keepdim=True).values
    noise = (torch.rand(3, 40, generator=g) * 2 - 1) * threshold * 0.99  # any sign, below the cut
    changed = torch.where(kept, tau, noise)
    assert not torch.equal(changed, tau)
    torch.testing.assert_close(merge.merged_task_vector(list(changed)), before, rtol=0, atol=0)


def test_merge_is_invariant_to_the_order_of_tasks():
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(25, generator=g) for _ in range(4)]
    merge = TiesMerging(density=0.4, scale=0.8)
    ref = merge.merged_task_vector(taus)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        torch.testing.assert_close(merge.merged_task_vector([taus[i] for i in perm]), ref)


def test_dict_task_vectors_are_trimmed_as_one_vector_per_task():
    g = torch.Generator().manual_seed(3)
    taus = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g) * 5} for _ in range(3)]
    pre = {"w": torch.zeros(4, 3), "b": torch.ones(4)}
    merged = TiesMerging(density=0.25)(pre, taus)
    flat = TiesMerging(density=0.25).merged_task_vector([torch.cat([t["b"], t["w"].reshape(-1)]) for t in taus])
    torch.testing.assert_close(merged["b"], 1 + flat[:4])
    torch.testing.assert_close(merged["w"], flat[4:].reshape(4, 3))


def test_one_task_gives_its_trimmed_vector_times_lambda():
    tau = torch.tensor([0.3, -2.0, 1.0, 0.1])
    merged = TiesMerging(density=0.5, scale=0.7)(torch.zeros(4), [tau])
    torch.testing.assert_close(merged, 0.7 * torch.tensor([0.0, -2.0, 1.0, 0.0]))


def test_degenerate_inputs_stay_finite():
    pre = torch.arange(4.0)
    zero = TiesMerging()(pre, [torch.zeros(4), torch.zeros(4)])
    torch.testing.assert_close(zero, pre)
    cancel = TiesMerging(density=1.0)(pre, [torch.tensor([1.0, -2, 0, 3]), torch.tensor([-1.0, 2, 0, -3])])
    torch.testing.assert_close(cancel, pre)  # no elected sign anywhere
    with pytest.raises(ValueError):
        TiesMerging(density=0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"density": 0.0}, r"density \(k\) must be in \(0, 1\], got 0.0"),
    ({"density": 1.5}, r"density \(k\) must be in \(0, 1\], got 1.5"),
    ({"density": -0.2}, r"density \(k\) must be in \(0, 1\], got -0.2"),
    ({"density": float("nan")}, r"density \(k\) must be in \(0, 1\], got nan"),
    ({"scale": float("nan")}, "scale must be finite, got nan"),
    ({"scale": float("inf")}, "scale must be finite, got inf"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TiesMerging(**kwargs)


def test_trim_keeps_round_k_times_d_entries():
    tau = torch.arange(1.0, 11.0).unsqueeze(0)  # d = 10
    assert int((trim(tau, 0.36) != 0).sum()) == 4  # round(3.6), not int(3.6) = 3
    assert int((trim(tau, 0.34) != 0).sum()) == 3
    with pytest.raises(ValueError, match=r"density \(k\) must be in \(0, 1\], got 1.5"):
        trim(tau, 1.5)


def test_paper_defaults_k_20_percent_and_lambda_one():
    merge = TiesMerging()
    assert (merge.density, merge.scale) == (0.2, 1.0)
    tau = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, -5.0])  # top 20% of d = 10: two entries
    torch.testing.assert_close(merge(torch.zeros(10), [tau]), tau)
