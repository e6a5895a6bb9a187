"""TCDCN's task-wise early stopping: the criterion's value, who gets stopped, and for how long."""

import io

import pytest
import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.tcdcn import TaskWiseEarlyStopping

LOSSES = torch.tensor([1.0, 2.0, 3.0])


def report(method: TaskWiseEarlyStopping, train_rows, val_rows) -> torch.Tensor:
    """Feed evaluations one by one (rows of K errors); return the last criterion."""
    for train, val in zip(train_rows, val_rows):
        criterion = method.observe_errors(torch.tensor(train, dtype=torch.float64),
                                          torch.tensor(val, dtype=torch.float64))
    return criterion


def test_criterion_matches_hand_computation():
    method = TaskWiseEarlyStopping(importance=0.5, strip=4, threshold=10.0)
    curve = [1.0, 0.8, 0.7, 0.65, 0.6]  # the strip j = t-4 .. t: five values
    criterion = report(method, [[1.0, e] for e in curve], [[1.0, 0.9]] * 5)
    # trend: 4 · med / (Σ − 4 · med) = 2.8 / (3.75 − 2.8);  gap: (0.9 − min E_tr) / (λ · min E_tr) = 0.3 / 0.3
    assert criterion[1].item() == pytest.approx(2.8 / 0.95 * 1.0)
    assert criterion[0].item() == 0.0  # the main task's errors are flat with no gap: measure 0


def test_a_flattened_over_fitting_auxiliary_task_stops_while_a_fast_falling_one_goes_on():
    method = TaskWiseEarlyStopping(importance=1.0, strip=4, threshold=1.0)
    flat = [0.50, 0.50, 0.49, 0.50, 0.49]  # training error has stopped falling ...
    fast = [1.0, 0.5, 0.25, 0.125, 0.0625]  # ... while this one still halves every evaluation
    train = [[1.0, a, b] for a, b in zip(flat, fast)]
    val = [[1.0, 0.5 + 0.1 * j, 1.5 * b] for j, b in enumerate(fast)]  # both validation errors above
    criterion = report(method, train, val)
    assert criterion[1] > 1.0 > criterion[2] > 0  # same kind of gap, very different trends
    torch.testing.assert_close(method.weights(LOSSES), torch.tensor([1.0, 0.0, 1.0]))


def test_a_criterion_equal_to_the_threshold_does_not_stop():
    # flat strip of 0.5: trend = k = 2 exactly; gap = (0.75 - 0.5) / 0.5 = 0.5: criterion exactly 1.0
    method = TaskWiseEarlyStopping(strip=2, threshold=1.0)
    criterion = report(method, [[1.0, 0.5]] * 3, [[1.0, 0.75]] * 3)
    assert criterion[1].item() == 1.0 and not method.stopped.any()  # the rule is "> eps"


def test_defaults_are_a_strip_of_k_5_and_a_threshold_of_1():
    method = TaskWiseEarlyStopping()
    for _ in range(5):
        assert torch.isnan(method.observe_errors(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.65]))).all()
    criterion = method.observe_errors(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.65]))
    assert criterion[1].item() == pytest.approx(5 * 0.3)  # k + 1 = 6 evaluations: trend k = 5, gap 0.3
    assert method.stopped.tolist() == [False, True]
    nearly = TaskWiseEarlyStopping()
    report(nearly, [[1.0, 0.5]] * 6, [[1.0, 0.5 + 0.5 * 0.19]] * 6)  # 5 * 0.19 = 0.95 is not above 1
    assert not nearly.stopped.any()


def test_the_main_task_is_never_stopped():
    method = TaskWiseEarlyStopping(main_task=1, strip=2, threshold=0.1)
    criterion = report(method, [[0.5, 0.5]] * 3, [[5.0, 5.0]] * 3)  # both flat and badly over-fitted
    assert (criterion > 0.1).all()
    assert method.stopped.tolist() == [True, False]
    torch.testing.assert_close(method.weights(torch.ones(2)), torch.tensor([0.0, 1.0]))


def test_a_stopped_task_stays_stopped():
    method = TaskWiseEarlyStopping(strip=2, threshold=1.0)
    report(method, [[1.0, 0.5]] * 3, [[1.0, 2.0]] * 3)
    assert method.stopped.tolist() == [False, True]
    criterion = report(method, [[1.0, 0.5]] * 3, [[1.0, 0.5]] * 3)  # the gap has closed since
    assert criterion[1] == 0.0
    torch.testing.assert_close(method.weights(torch.ones(2)), torch.tensor([1.0, 0.0]))


def test_the_importance_divides_the_gap_so_important_tasks_stop_later():
    rows, val = [[1.0, 0.4, 0.4]] * 4, [[1.0, 0.6, 0.6]] * 4
    method = TaskWiseEarlyStopping(importance=[1.0, 0.25, 4.0], strip=3, threshold=1.0)
    criterion = report(method, rows, val)
    # flat strip: trend = k = 3; gap = 0.2 / (λ · 0.4)
    torch.testing.assert_close(criterion, torch.tensor([0.0, 3 * 0.5 / 0.25, 3 * 0.5 / 4.0], dtype=torch.float64))
    assert method.stopped.tolist() == [False, True, False]
    torch.testing.assert_close(method.weights(LOSSES), torch.tensor([1.0, 0.0, 4.0]))


def test_nothing_is_stopped_before_a_full_strip_of_k_plus_one_evaluations():
    method = TaskWiseEarlyStopping(strip=3, threshold=0.01)
    for _ in range(3):
        criterion = method.observe_errors(torch.tensor([1.0, 0.1]), torch.tensor([1.0, 9.0]))
        assert torch.isnan(criterion).all() and not method.stopped.any()
    method.observe_errors(torch.tensor([1.0, 0.1]), torch.tensor([1.0, 9.0]))
    assert method.stopped.tolist() == [False, True]


def test_the_gap_is_measured_against_the_best_training_error_of_the_whole_run():
    method = TaskWiseEarlyStopping(strip=2, threshold=100.0)
    criterion = report(method, [[1.0, e] for e in (0.2, 0.8, 0.8, 0.8)], [[1.0, 1.0]] * 4)
    # strip (0.8, 0.8, 0.8): trend = 2; min over all evaluations is 0.2, not the strip's 0.8
    assert criterion[1].item() == pytest.approx(2 * (1.0 - 0.2) / 0.2)
    validation = TaskWiseEarlyStopping(strip=2, threshold=100.0, reference="validation")
    criterion = report(validation, [[1.0, 0.5]] * 4, [[1.0, e] for e in (0.9, 0.6, 0.8, 1.2)])
    assert criterion[1].item() == pytest.approx(2 * (1.2 - 0.6) / 0.6)  # Prechelt-style reading


def test_an_even_strip_uses_the_mean_of_the_two_middle_values():
    method = TaskWiseEarlyStopping(strip=3, threshold=100.0)  # four values: 1, 2, 4, 8
    criterion = report(method, [[1.0, e] for e in (8.0, 4.0, 2.0, 1.0)], [[1.0, 2.0]] * 4)
    assert criterion[1].item() == pytest.approx(3 * 3.0 / (15.0 - 9.0) * (2.0 - 1.0) / 1.0)


def test_stopped_tasks_get_no_gradient_and_active_ones_their_importance():
    method = TaskWiseEarlyStopping(importance=0.3, strip=1, threshold=0.5)
    report(method, [[1.0, 0.5, 0.5]] * 2, [[1.0, 0.5, 5.0]] * 2)
    losses = torch.tensor([2.0, 1.0, 3.0], requires_grad=True)
    method.combine(losses).backward()
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.3, 0.0]))


def test_limits_stay_finite_and_never_stop_on_a_sudden_drop():
    method = TaskWiseEarlyStopping(strip=4, threshold=1.0)
    criterion = report(method, [[1.0, e] for e in (10.0, 10.0, 10.0, 10.0, 0.0)], [[1.0, 3.0]] * 5)
    assert criterion[1] == 0.0 and not method.stopped.any()  # Σ − k·med = 0: still falling
    zero = TaskWiseEarlyStopping(strip=1, threshold=1.0)
    criterion = report(zero, [[0.0, 0.0]] * 2, [[0.0, 0.0]] * 2)
    assert (criterion == 0).all()
    # best training error 0 from before the strip (trend 1): no gap while E_val is 0, infinite once above
    best_zero = TaskWiseEarlyStopping(strip=1, threshold=1.0)
    criterion = report(best_zero, [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0]] * 3)
    assert criterion[1] == 0.0 and not best_zero.stopped.any()
    criterion = report(best_zero, [[1.0, 1.0]], [[1.0, 0.5]])
    assert criterion[1] == float("inf") and best_zero.stopped.tolist() == [False, True]


def test_a_checkpoint_carries_the_strip_and_the_stopped_tasks():
    trained = TaskWiseEarlyStopping(strip=2, threshold=1.0)
    report(trained, [[1.0, 0.5, 0.9], [1.0, 0.5, 0.8]], [[1.0, 2.0, 1.0]] * 2)
    report(trained, [[1.0, 0.5, 0.7]], [[1.0, 2.0, 1.0]])
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = TaskWiseEarlyStopping(strip=2, threshold=1.0)
    restored.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(restored.weights(LOSSES), trained.weights(LOSSES))
    assert restored.stopped.tolist() == [False, True, False]
    nxt = ([[1.0, 0.5, 0.7]], [[1.0, 2.0, 1.4]])
    torch.testing.assert_close(report(restored, *nxt), report(trained, *nxt))


def test_training_reduces_the_total_loss():
    initial, final = train_with_weighting(TaskWiseEarlyStopping())
    assert final < 0.2 * initial


@pytest.mark.parametrize("kwargs, message", [
    ({"strip": 0}, "strip must be at least 1, got 0"),
    ({"main_task": -1}, "main_task must be at least 0, got -1"),
    ({"importance": 0.0}, "importance must be above 0, got 0.0"),
    ({"importance": [1.0, float("nan")]}, r"importance\[1\] must be above 0, got nan"),
    ({"threshold": -1.0}, "threshold must be above 0, got -1.0"),
    ({"threshold": float("inf")}, "threshold must be finite"),
    ({"reference": "test"}, "reference must be"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskWiseEarlyStopping(**kwargs)


def test_a_main_task_or_importance_list_that_does_not_fit_the_losses_is_refused():
    with pytest.raises(ValueError, match="main_task 3 is not one of the 3 tasks"):
        TaskWiseEarlyStopping(main_task=3).weights(LOSSES)
    with pytest.raises(ValueError, match="importance has 2 entries for 3 tasks"):
        TaskWiseEarlyStopping(importance=[1.0, 2.0]).weights(LOSSES)


def test_train_and_val_errors_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match=r"train_errors \(3,\) and val_errors \(2,\) differ"):
        TaskWiseEarlyStopping().observe_errors(torch.ones(3), torch.ones(2))


def test_float64_errors_keep_float64_precision_in_the_criterion():
    # Errors and an importance that float32 cannot hold exactly: the criterion must be the
    # float64 value of the paper's formula, restated here with Python floats.
    method = TaskWiseEarlyStopping(importance=0.3, strip=2, threshold=1e9)
    curve = [0.7, 0.61, 0.6 + 1e-9]
    criterion = report(method, [[1.0, e] for e in curve], [[1.0, 0.9]] * 3)
    k = 2
    median = sorted(curve)[1]
    trend = k * median / (sum(curve) - k * median)
    gap = (0.9 - min(curve)) / (0.3 * min(curve))
    assert criterion.dtype == torch.float64
    assert criterion[1].item() == pytest.approx(trend * gap, rel=1e-13)
