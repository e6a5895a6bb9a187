"""12-in-1 dynamic stop-and-go (Lu et al. 2020): the switch on a hand-built history, the Δ-gap schedule."""

import pytest

from reference_impls.sampling.dynamic_stop_and_go import DynamicStopAndGo


def test_state_machine_on_a_hand_built_history():
    dsg = DynamicStopAndGo(["vqa", "nlvr"])
    history = [  # (score, stopped afterwards, why)
        (0.500, False, "first score becomes the best"),
        (0.5004, False, "+0.08% < 0.1%: one non-improving evaluation"),
        (0.5003, True, "second non-improving evaluation: stop"),
        (0.499, True, "cool-down evaluation; −0.2% is not yet a 0.5% drop"),
        (0.497, False, "−0.6% below the best 0.5: back to go"),
        (0.498, False, "cool-down after the switch"),
        (0.510, False, "a real improvement"),
    ]
    for score, stopped, why in history:
        dsg.report("vqa", score)
        assert dsg.stopped("vqa") == stopped, why
    assert dsg.states["vqa"].best == 0.510
    assert not dsg.stopped("nlvr")  # tasks switch independently


def test_stopped_tasks_train_every_gap_th_iteration_only():
    dsg = DynamicStopAndGo(["a", "b"], gap=4)
    for score in (0.8, 0.8, 0.8):
        dsg.report("a", score)
    assert dsg.stopped("a")
    schedule = [dsg.tasks_to_train(i) for i in range(9)]
    assert [i for i, ts in enumerate(schedule) if "a" in ts] == [0, 4, 8]
    assert all("b" in ts for ts in schedule)


def test_steadily_improving_task_never_stops_and_cooldown_delays_a_second_stop():
    dsg = DynamicStopAndGo(["a"])
    for k in range(20):
        dsg.report("a", 0.5 * 1.01**k)  # +1% each time
        assert not dsg.stopped("a")
    plain = DynamicStopAndGo(["a"], cooldown=0)
    for score in (0.6, 0.6, 0.6):  # stop after two non-improving evaluations
        plain.report("a", score)
    assert plain.stopped("a")
    plain.report("a", 0.59)  # −1.7%: resume at once, no cool-down
    assert not plain.stopped("a")
    plain.report("a", 0.6)
    plain.report("a", 0.6)  # without cool-down the plateau counter restarts immediately
    assert plain.stopped("a")


def test_patience_and_thresholds_are_parameters():
    dsg = DynamicStopAndGo(["a"], patience=0, improve=0.0)
    dsg.report("a", 1.0)
    dsg.report("a", 1.0)  # equal is not better; patience 0 stops at once
    assert dsg.stopped("a")
    with pytest.raises(ValueError):
        DynamicStopAndGo(["a"], gap=0)


def test_defaults_improvement_is_relative_and_the_gap_is_four():
    """At 2.0, +0.0015 is +0.075%: no improvement relative to the best (an absolute 0.001 would say yes)."""
    dsg = DynamicStopAndGo(["a"])
    for score in (2.0, 2.0015):
        dsg.report("a", score)
    assert dsg.states["a"].best == 2.0 and dsg.states["a"].bad_evaluations == 1
    dsg.report("a", 2.0025)  # +0.125%: a real improvement
    assert dsg.states["a"].best == 2.0025 and dsg.states["a"].bad_evaluations == 0
    for score in (2.0025, 2.0025):
        dsg.report("a", score)
    assert dsg.stopped("a")
    assert [i for i in range(9) if dsg.should_train("a", i)] == [0, 4, 8]


@pytest.mark.parametrize("kwargs, message", [
    ({"gap": 0}, "gap must be at least 1, got 0"),
    ({"gap": float("nan")}, "gap must be at least 1, got nan"),
    ({"patience": -1}, "patience must be at least 0, got -1"),
    ({"cooldown": -1}, "cooldown must be at least 0, got -1"),
    ({"improve": -0.1}, "improve must be at least 0, got -0.1"),
    ({"improve": float("nan")}, "improve must be at least 0, got nan"),
    ({"resume_drop": float("nan")}, "resume_drop must be at least 0, got nan"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicStopAndGo(["a"], **kwargs)


def stopped_at_best_one(**kwargs) -> DynamicStopAndGo:
    """A scheduler whose task "a" has best score 1.0 and has just been stopped (two non-improvements)."""
    dsg = DynamicStopAndGo(["a"], **kwargs)
    for score in (1.0, 1.0, 1.0):
        dsg.report("a", score)
    assert dsg.stopped("a")
    return dsg


def test_default_resume_drop_is_half_a_percent_and_strict():
    def stopped_after(score: float) -> bool:
        dsg = stopped_at_best_one()
        dsg.report("a", 1.0)  # the cool-down evaluation
        dsg.report("a", score)  # one non-improving evaluation: below patience, so only the resume rule acts
        return dsg.stopped("a")

    assert stopped_after(0.996)  # −0.4%
    assert stopped_after(1.0 - 0.005)  # exactly −0.5%: the official rule is strict, below best · (1 − 0.005)
    assert not stopped_after(0.994)  # −0.6%: back to go


def test_default_cooldown_ignores_exactly_one_evaluation_after_resuming():
    dsg = stopped_at_best_one()
    dsg.report("a", 0.99)  # −1%: resume (this evaluation also uses up the stop's cool-down)
    assert not dsg.stopped("a")
    dsg.report("a", 0.99)  # cool-down evaluation after the switch: not counted
    dsg.report("a", 0.99)  # first non-improving evaluation
    assert not dsg.stopped("a")
    dsg.report("a", 0.99)  # second: stop again
    assert dsg.stopped("a")


def test_a_sharp_drop_of_a_go_task_counts_as_a_non_improving_evaluation():
    dsg = DynamicStopAndGo(["a"])
    for score in (1.0, 0.9):  # −10% while in go mode: nothing to resume, one non-improving evaluation
        dsg.report("a", score)
    assert dsg.states["a"].bad_evaluations == 1 and dsg.states["a"].cooldown == 0
    dsg.report("a", 0.9)
    assert dsg.stopped("a")


@pytest.mark.parametrize("task, score, message", [
    ("c", 0.5, r"validation score for unknown task\(s\) \['c'\]; the tasks are \['a', 'b'\]"),
    ("a", float("nan"), r"a: the validation score must be finite and >= 0 .* got nan"),
    ("a", -0.2, r"a: the validation score must be finite and >= 0 .* got -0.2"),
])
def test_a_report_the_relative_thresholds_cannot_judge_is_refused(task, score, message):
    """A NaN score compared False with the best and read as a plateau: two of them stopped a
    task that was still learning; a typo in the task name was a bare KeyError."""
    dsg = DynamicStopAndGo(["a", "b"])
    dsg.report("a", 0.5)
    with pytest.raises(ValueError, match=message):
        dsg.report(task, score)
    assert not dsg.stopped("a") and dsg.states["a"].best == 0.5


def stop_history(dsg: DynamicStopAndGo, scores: list[float]) -> list[bool]:
    out = []
    for score in scores:
        dsg.report("a", score)
        out.append(dsg.stopped("a"))
    return out


def test_a_longer_cooldown_ignores_that_many_evaluations_after_resuming():
    """cooldown = 2: after the resume the next two flat scores are ignored, then patience 1 needs two more."""
    dsg = DynamicStopAndGo(["a"], cooldown=2)
    assert stop_history(dsg, [1.0, 1.0, 1.0]) == [False, False, True]
    # 0.9: ignored (cool-down after the stop) and more than 0.5 % below the best → resume
    assert stop_history(dsg, [0.9, 0.9, 0.9, 0.9, 0.9]) == [False, False, False, False, True]


def test_without_cooldown_a_resumed_task_again_needs_patience_plus_one_flat_scores():
    """The resume clears the count of non-improving evaluations: two more flat scores (patience 1) to stop."""
    dsg = DynamicStopAndGo(["a"], cooldown=0)
    assert stop_history(dsg, [1.0, 1.0, 1.0]) == [False, False, True]
    assert stop_history(dsg, [0.9, 0.9, 0.9]) == [False, False, True]


def test_a_score_of_zero_is_a_valid_validation_score():
    """The documented domain is score >= 0 (an accuracy can be 0 early on); 0 sets the first best."""
    dsg = DynamicStopAndGo(["a"])
    dsg.report("a", 0.0)
    assert dsg.states["a"].best == 0.0 and not dsg.stopped("a")
