"""SMT (Cho et al. 2024): the pool rules on a hand-worked schedule, hard tasks first, budgets, stage 2."""

import pytest
import torch

from reference_impls.sampling.smt import SMTScheduler


def make(**kw) -> SMTScheduler:
    args = dict(num_tasks=4, solved=10.0, unsolvable=0.0, b1=100, b2=20, pool_size=2, kappa=0.1)
    args.update(kw)
    return SMTScheduler(generator=torch.Generator().manual_seed(0), **args)


def test_hand_worked_schedule():
    s = make()
    p0, p1 = s.training_pool()
    q, r = sorted(s.main)
    assert s.budget == pytest.approx([12.0] * 4)  # κ · B_total
    # Round 1: p0 reaches its target, p1 is under budget and stays.
    s.report(p0, 5, 12.0)
    s.report(p1, 5, 3.0)
    s.end_round()
    assert s.solved_pool == [p0] and s.training_pool() == [p1, q]  # untried tasks: lowest index first
    assert s.budget[q] == pytest.approx(0.1 * (120 - 10))  # κ · remaining budget
    # Round 2: p1 spends its budget with some progress -> main pool; q spends it hopelessly.
    s.report(p1, 10, 2.0)
    s.report(q, 11, -5.0)
    assert s.main == [r, p1] and s.unsolvable_pool == [q]
    s.end_round()
    assert s.training_pool() == [r, p1]  # r untried (−∞) is harder than p1 (return 2)
    # Round 3: p1 is solved on its second visit; nothing is left to refill with.
    s.report(r, 5, 1.0)
    s.report(p1, 5, 11.0)
    s.end_round()
    assert s.solved_pool == [p0, p1] and s.training_pool() == [r]
    # Stage 2 after B_1 steps: only the unsolvable tasks are trained.
    s.report(r, 60, 1.0)
    assert s.stage == 2 and s.training_pool() == [q]
    s.report(q, 18, -1.0)  # 119 of B_total = 120
    assert not s.finished()
    s.report(q, 1, -1.0)
    assert s.finished()


def test_refill_takes_the_task_farthest_below_target():
    s = make(num_tasks=5, pool_size=1)
    (first,) = s.training_pool()
    others = sorted(s.main)
    for t, ret in zip(others, (5.0, -3.0, 8.0, 1.0)):
        s.returns[t] = ret
    s.report(first, 1, 50.0)  # solved: frees the only slot
    s.end_round()
    assert s.training_pool() == [others[1]]  # return −3: the hardest


def test_per_task_targets_and_no_move_while_under_budget():
    s = make(solved=torch.tensor([10.0, 100.0, 10.0, 10.0]), kappa=0.5)
    pool = s.training_pool()
    for t in pool:
        s.report(t, 1, 20.0)  # return 20 solves tasks with target 10 but not task 1
    s.end_round()
    assert (1 in pool) == (1 in s.training_pool())
    assert all(t in s.solved_pool for t in pool if t != 1)


def test_seeded_initial_pool_and_stage2_falls_back_to_main_pool():
    a, b = make(), make()
    assert a.training_pool() == b.training_pool()
    s = make(kappa=0.01)
    for t in s.training_pool():
        s.report(t, 50, 5.0)  # budget 1.2 spent, some progress: back to main
    assert s.stage == 2 and s.unsolvable_pool == []
    assert s.training_pool() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        make(pool_size=5)


def test_defaults_and_no_pool_moves_in_stage_2():
    """κ = 0.8 and K = 3 by default; once B_1 is spent, returns no longer move tasks between pools."""
    s = SMTScheduler(num_tasks=4, solved=10.0, unsolvable=0.0, b1=100, b2=20,
                     generator=torch.Generator().manual_seed(0))
    assert len(s.training_pool()) == 3 and s.budget == pytest.approx([0.8 * 120] * 4)
    first = s.training_pool()[0]
    s.report(first, 100, 1.0)  # B_1 spent: stage 2 from now on
    assert s.stage == 2
    pools = (list(s.pool), list(s.main), list(s.unsolvable_pool))
    for task in range(4):
        s.report(task, 1, 50.0)  # would be "solved" in stage 1
    assert s.solved_pool == [] and (s.pool, s.main, s.unsolvable_pool) == pools


@pytest.mark.parametrize("kwargs, message", [
    ({"b1": -1}, "b1 must be at least 0, got -1"),
    ({"b2": -5}, "b2 must be at least 0, got -5"),
    ({"kappa": 0.0}, r"kappa must be in \(0, 1\], got 0.0"),
    ({"kappa": 1.5}, r"kappa must be in \(0, 1\], got 1.5"),
    ({"kappa": float("nan")}, r"kappa must be in \(0, 1\], got nan"),
    ({"pool_size": 0}, "got pool_size=0, num_tasks=4"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_a_return_exactly_at_a_threshold_counts_as_reaching_it():
    """G_t ≥ M_t is solved; with the budget spent, G_t ≤ m_t is unsolvable (both thresholds inclusive)."""
    s = make()
    p0, p1 = s.training_pool()
    s.report(p0, 1, 10.0)  # exactly the target M = 10
    s.report(p1, 12, 0.0)  # budget 12 used up, exactly the floor m = 0
    assert s.solved_pool == [p0] and s.unsolvable_pool == [p1]


@pytest.mark.parametrize("task, steps, ret, message", [
    (4, 10, 1.0, "task must be an index from 0 to 3, got 4"),
    (-1, 10, 1.0, "task must be an index from 0 to 3, got -1"),
    (0, -5, 1.0, "steps must be at least 0, got -5"),
    (0, 10, float("nan"), "ret must be finite, got nan"),
])
def test_a_report_it_cannot_account_for_is_refused_and_changes_nothing(task, steps, ret, message):
    """task -1 used to charge the last task's budget; a NaN return never counted as solved."""
    s = make()
    with pytest.raises(ValueError, match=message):
        s.report(task, steps, ret)
    assert s.spent_total == 0 and s.spent == [0, 0, 0, 0]


def test_stage_2_starts_early_when_stage_1_has_nothing_left_to_train():
    """Every task solved or set aside before B_1 is spent: the unsolvable tasks get the rest of the
    budget (stage 2), as rl-blox does, instead of the run ending with most of it unused."""
    smt = SMTScheduler(2, solved=1.0, unsolvable=0.0, b1=1000, b2=200, pool_size=2, kappa=0.05,
                       generator=torch.Generator().manual_seed(0))
    smt.report(0, 10, 2.0)  # solved
    smt.report(1, 60, -1.0)  # budget 0.05 * 1200 = 60 spent, return at the floor: unsolvable
    smt.end_round()
    assert smt.solved_pool == [0] and smt.unsolvable_pool == [1] and smt.spent_total == 70
    assert smt.stage == 2 and smt.training_pool() == [1] and not smt.finished()
    smt.report(1, 1130, -1.0)
    assert smt.finished()


def test_thresholds_compare_at_the_precision_of_the_returns():
    """Returns are Python floats (float64). Just below the target is not solved, and just above the floor is not
    hopeless, even when the gap (1e-5 at returns near 1000) is below float32's resolution there (6e-5)."""
    s = make(solved=1000.0, unsolvable=500.0)
    p0, p1 = s.training_pool()
    s.report(p0, 12, 1000.0 - 1e-5)  # budget 12 spent, between the floor and the target: back to the main pool
    s.report(p1, 12, 500.0 + 1e-5)  # likewise, just above the floor
    assert s.solved_pool == [] and s.unsolvable_pool == []
    assert p0 in s.main and p1 in s.main


def test_kappa_one_gives_a_new_task_the_whole_remaining_budget():
    """κ = 1 is allowed ((0, 1]): a task admitted later may spend everything that is left."""
    s = make(kappa=1.0)
    assert s.budget == pytest.approx([120.0] * 4)
    p0, _ = s.training_pool()
    s.report(p0, 5, 12.0)  # solved
    s.end_round()
    assert s.budget[s.training_pool()[1]] == pytest.approx(120 - 5)
