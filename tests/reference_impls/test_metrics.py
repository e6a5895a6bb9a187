import math

import pytest
import torch

from reference_impls.metrics import (
    Accuracy, MeanAbsoluteError, MeanAngularError, MeanIoU, MeanSquaredError, delta_m,
)


def test_delta_m_by_hand():
    # segmentation mIoU 0.40 -> 0.44 (+10 %, higher better); depth error 0.50 -> 0.55
    # (+10 % error, lower better -> -10 %); normals 20 -> 19 degrees (-5 % error -> +5 %)
    st = {"seg": 0.40, "depth": 0.50, "normal": 20.0}
    mt = {"seg": 0.44, "depth": 0.55, "normal": 19.0}
    lower = {"seg": False, "depth": True, "normal": True}
    assert delta_m(mt, st, lower) == pytest.approx((10 - 10 + 5) / 3)


def test_delta_m_zero_when_equal_and_sign_follows_direction():
    st = {"a": 2.0, "b": 3.0}
    assert delta_m(st, st, {"a": True, "b": False}) == 0.0
    assert delta_m({"a": 1.0}, {"a": 2.0}, {"a": True}) == pytest.approx(50.0)
    assert delta_m({"a": 1.0}, {"a": 2.0}, {"a": False}) == pytest.approx(-50.0)


def test_delta_m_rejects_missing_and_zero_baselines():
    with pytest.raises(KeyError, match=r"without a multi-task value, direction or task: \['a'\]"):
        delta_m({}, {"a": 1.0}, {"a": True})  # refused by name, not by a bare KeyError('a') later
    with pytest.raises(KeyError):
        delta_m({"a": 1.0}, {"a": 1.0}, {})
    with pytest.raises(KeyError):
        delta_m({"a": 1.0}, {"a": 1.0}, {"a": True}, tasks={})
    with pytest.raises(ZeroDivisionError):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})
    with pytest.raises(ValueError, match=r"^Δm needs at least one metric$"):
        delta_m({}, {}, {})


def test_delta_m_refuses_baselines_that_give_no_relative_change():
    # A negative baseline would flip the sign of an improvement; inf or NaN give no number.
    for baseline in (-2.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            delta_m({"a": 1.0}, {"a": baseline}, {"a": False})
    # A diverged multi-task run is reported, not refused.
    assert math.isnan(delta_m({"a": math.nan}, {"a": 2.0}, {"a": True}))


def test_delta_m_averages_each_task_before_the_tasks():
    # Depth has two metrics, both 10 % worse (-10 each); segmentation is 20 % better (+20).
    st = {"seg/miou": 0.5, "depth/abs": 0.4, "depth/rel": 0.2}
    mt = {"seg/miou": 0.6, "depth/abs": 0.44, "depth/rel": 0.22}
    lower = {"seg/miou": False, "depth/abs": True, "depth/rel": True}
    tasks = {"seg/miou": "seg", "depth/abs": "depth", "depth/rel": "depth"}
    assert delta_m(mt, st, lower, tasks) == pytest.approx((20 + (-10 - 10) / 2) / 2)  # 5
    assert delta_m(mt, st, lower) == pytest.approx((20 - 10 - 10) / 3)  # 0: one entry per metric
    one_metric_each = {k: k for k in st}
    assert delta_m(mt, st, lower, one_metric_each) == pytest.approx(delta_m(mt, st, lower))


def test_delta_m_reads_only_the_baseline_keys():
    # Extra multi-task metrics (e.g. a loss logged alongside) do not enter the mean.
    assert delta_m({"a": 1.0, "b": 100.0}, {"a": 2.0}, {"a": True, "b": True}) == pytest.approx(50.0)


def test_streaming_errors_match_whole_set_values():
    torch.manual_seed(0)
    p, t = torch.randn(10, 1), torch.randn(10)
    mse, mae = MeanSquaredError(), MeanAbsoluteError()
    for chunk in (slice(0, 3), slice(3, 10)):  # unequal batches
        mse.update(p[chunk], t[chunk])
        mae.update(p[chunk], t[chunk])
    assert mse.compute() == pytest.approx(((p.squeeze() - t) ** 2).mean().item())
    assert mae.compute() == pytest.approx((p.squeeze() - t).abs().mean().item())


def test_errors_on_dense_maps_average_over_pixels():
    prediction = torch.arange(12.0).reshape(2, 1, 2, 3)
    target = torch.zeros(2, 1, 2, 3)
    mse, mae = MeanSquaredError(), MeanAbsoluteError()
    mse.update(prediction, target)
    mae.update(prediction, target)
    assert mse.compute() == pytest.approx(sum(i * i for i in range(12)) / 12)
    assert mae.compute() == pytest.approx(sum(range(12)) / 12)


def test_depth_error_skips_missing_pixels():
    mae = MeanAbsoluteError(ignore_zero=True)
    mae.update(torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[2.0, 0.0, 2.5]]))
    assert mae.compute() == pytest.approx((1.0 + 0.5) / 2)


def test_miou_by_hand():
    # 4 pixels, 2 classes, one ignored: target [0, 0, 1, -1], prediction [0, 1, 1, 0]
    logits = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.0, 9.0], [9.0, 0.0]]).T.reshape(1, 2, 2, 2)
    target = torch.tensor([0, 0, 1, -1]).reshape(1, 2, 2)
    # class 0: I=1, U=2 ; class 1: I=1, U=2 ; class 2 never occurs -> mean 0.5
    logits3 = torch.cat([logits, torch.full((1, 1, 2, 2), -9.0)], 1)
    miou = MeanIoU(num_classes=3)
    miou.update(logits3, target)
    assert miou.compute() == pytest.approx(0.5)


def test_mean_angle_by_hand():
    target = torch.zeros(1, 3, 1, 3)
    target[0, 2, 0, 0] = 1.0  # +z
    target[0, 0, 0, 1] = 1.0  # +x ; pixel 2 has no label
    prediction = torch.zeros(1, 3, 1, 3)
    prediction[0, 2, 0, 0] = 2.0  # same direction: 0 degrees
    prediction[0, 1, 0, 1] = 1.0  # +y against +x: 90 degrees
    prediction[0, 0, 0, 2] = 1.0
    angle = MeanAngularError()
    angle.update(prediction, target)
    assert angle.compute() == pytest.approx(45.0, abs=1e-4)


def test_accuracy_multiclass_and_binary():
    acc = Accuracy()
    acc.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    assert acc.compute() == pytest.approx(2 / 3)
    binary = Accuracy()
    binary.update(torch.tensor([[2.0], [-1.0], [0.5], [-3.0]]), torch.tensor([1, 0, 0, 0]))
    assert binary.compute() == pytest.approx(0.75)
    assert not math.isnan(binary.compute())


def test_miou_counts_the_whole_set_and_classes_only_predicted():
    # Batch 1: target [0, 0], prediction [0, 1]; batch 2: target [1, 1], prediction [1, 1].
    # Whole set: class 0 I=1 U=2, class 1 I=2 U=3 -> (1/2 + 2/3) / 2. The mean of per-batch
    # mIoUs would be ((1/2 + 0) / 2 + 1) / 2 = 5/8; class 1 counts in batch 1 although
    # only predicted there (IoU 0).
    def logits(labels):
        return torch.nn.functional.one_hot(torch.tensor(labels), 2).float().T.reshape(1, 2, 1, len(labels))

    miou = MeanIoU(num_classes=2)
    miou.update(logits([0, 1]), torch.tensor([[[0, 0]]]))
    first = miou.compute()
    miou.update(logits([1, 1]), torch.tensor([[[1, 1]]]))
    assert first == pytest.approx((1 / 2 + 0) / 2)
    assert miou.compute() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_mean_angle_normalises_both_vectors():
    # 3·(1, 1, 0) against 2·(1, 0, 0): 45 degrees whatever the lengths.
    prediction = torch.tensor([3.0, 3.0, 0.0]).reshape(1, 3, 1, 1)
    target = torch.tensor([2.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    angle = MeanAngularError()
    angle.update(prediction, target)
    assert angle.compute() == pytest.approx(45.0, abs=1e-4)


def test_accuracy_on_dense_maps_counts_pixels():
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]]])  # 1 x 2 x 2 x 2
    target = torch.tensor([[[0, 1], [0, 0]]])  # predicted [[0, 1], [1, 0]]: 3 of 4 right
    acc = Accuracy()
    acc.update(logits, target)
    assert acc.compute() == pytest.approx(0.75)


def test_delta_m_errors_name_the_metric():
    # The message must say which metric is at fault, not only that one is.
    with pytest.raises(KeyError, match=r"without a multi-task value, direction or task: \['depth'\]"):
        delta_m({"seg": 1.0, "depth": 1.0}, {"seg": 1.0, "depth": 1.0}, {"seg": False, "depth": True},
                tasks={"seg": "seg"})
    with pytest.raises(ZeroDivisionError, match="'depth' is 0"):
        delta_m({"seg": 1.0, "depth": 1.0}, {"seg": 1.0, "depth": 0.0}, {"seg": False, "depth": True})
    with pytest.raises(ValueError, match="'depth' is -2.0"):
        delta_m({"seg": 1.0, "depth": 1.0}, {"seg": 1.0, "depth": -2.0}, {"seg": False, "depth": True})


@pytest.mark.parametrize("metric, lower_is_better, unit_score", [
    (MeanSquaredError(), True, False),
    (MeanAbsoluteError(), True, False),
    (MeanAngularError(), True, False),
    (MeanIoU(num_classes=2), False, True),
    (Accuracy(), False, True),
])
def test_each_metric_states_its_direction_and_whether_it_is_a_unit_score(metric, lower_is_better, unit_score):
    # Δm's sign comes from lower_is_better; DTP accepts only unit scores (in [0, 1], higher better).
    assert metric.lower_is_better is lower_is_better
    assert metric.unit_score is unit_score


def test_mean_angle_of_identical_normals_is_zero_not_nan():
    # normalise((3, 3, 0)) dotted with itself rounds to just above 1 in float32; acos would give NaN.
    normals = torch.tensor([3.0, 3.0, 0.0]).reshape(1, 3, 1, 1)
    angle = MeanAngularError()
    angle.update(normals, normals)
    assert angle.compute() == pytest.approx(0.0, abs=1e-3)


def test_binary_accuracy_reads_the_sign_of_a_single_logit():
    # One output column: positive logits predict 1 (an argmax over one column would say 0 always).
    acc = Accuracy()
    acc.update(torch.tensor([[2.0], [1.0], [-1.0]]), torch.tensor([1, 1, 0]))
    assert acc.compute() == 1.0


def test_seen_counts_scored_entries_so_an_all_ignored_task_is_told_from_a_score_of_0():
    from reference_impls.metrics import Accuracy, MeanAbsoluteError, MeanAngularError, MeanIoU, MeanSquaredError
    ignored = [(Accuracy(ignore_index=-1), torch.zeros(3, 2), torch.full((3,), -1)),
               (MeanIoU(2), torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), -1)),
               (MeanAbsoluteError(ignore_zero=True), torch.ones(4), torch.zeros(4)),
               (MeanAngularError(), torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))]
    for metric, prediction, target in ignored:
        metric.update(prediction, target)
        assert metric.seen == 0 and metric.compute() == 0, type(metric).__name__
    scored = [(Accuracy(ignore_index=-1), torch.zeros(3, 2), torch.tensor([0, -1, 1]), 2),
              (MeanIoU(2), torch.zeros(1, 2, 2, 2), torch.tensor([[[0, -1], [1, 1]]]), 3),
              (MeanAbsoluteError(ignore_zero=True), torch.ones(4), torch.tensor([0.0, 2.0, 0.0, 3.0]), 2),
              (MeanAngularError(), torch.ones(1, 3, 1, 2), torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]], [[0.0, 0.0]]]]), 1),
              (MeanSquaredError(), torch.ones(5), torch.zeros(5), 5)]
    for metric, prediction, target, count in scored:
        metric.update(prediction, target)
        assert metric.seen == count, type(metric).__name__


def test_miou_refuses_a_prediction_with_another_number_of_classes():
    """Five channels scored against three classes: argmax 3 or 4 fell into the next row of the
    confusion matrix, and the mIoU came out as a plausible number (0.24 on random logits)."""
    with pytest.raises(ValueError, match="prediction has 5 class channels, the metric 3"):
        MeanIoU(3).update(torch.randn(2, 5, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("metric, prediction, target, message", [
    (MeanIoU(3), torch.randn(2, 3, 2, 2), torch.tensor([[[0, 5], [1, -1]], [[2, 0], [-2, 1]]]),
     r"class ids must be 0 \.\. 2 \(or -1, ignored\), got \[-2, 5\]"),
    (Accuracy(), torch.randn(4, 3), torch.tensor([0, 1, 7, 2]), r"class ids must be 0 \.\. 2, got \[7\]"),
    (Accuracy(ignore_index=-1), torch.randn(4), torch.tensor([0, 1, -1, 3]),
     r"class ids must be 0 \.\. 1 \(or -1, ignored\), got \[3\]"),
])
def test_class_ids_outside_the_classes_are_refused(metric, prediction, target, message):
    """Accuracy counted label 7 of 3 classes as a miss; MeanIoU failed with a shape error."""
    with pytest.raises(ValueError, match=message):
        metric.update(prediction, target)
    assert metric.seen == 0


def test_every_metric_accumulates_over_batches_and_divides_by_what_it_counted():
    """Two updates give the value of the whole set; one scored entry is divided by one."""
    for metric, one, both in [(MeanSquaredError(), 4.0, (4 + 1 + 9) / 3), (MeanAbsoluteError(), 2.0, (2 + 1 + 3) / 3)]:
        metric.update(torch.tensor([2.0]), torch.tensor([0.0]))
        assert metric.compute() == pytest.approx(one), type(metric).__name__
        metric.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))
        assert metric.compute() == pytest.approx(both), type(metric).__name__
    accuracy = Accuracy()
    accuracy.update(torch.tensor([[0.2, 0.8]]), torch.tensor([1]))
    assert accuracy.compute() == 1.0
    accuracy.update(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([1, 1]))
    assert accuracy.compute() == pytest.approx(2 / 3)


def test_mean_angle_accumulates_over_batches():
    x, y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    angle = MeanAngularError()
    angle.update(torch.stack([x, y], 1).reshape(1, 3, 1, 2), torch.stack([y, y], 1).reshape(1, 3, 1, 2))  # 90, 0
    angle.update(x.reshape(1, 3, 1, 1), x.reshape(1, 3, 1, 1))  # 0 degrees
    assert angle.seen == 3 and angle.compute() == pytest.approx(30.0, abs=1e-4)


def test_mean_angle_normalises_each_pixels_target_over_the_channels():
    # Two rows of pixels, targets (2, 2, 0) and (0, 5, 0): the angle is read per pixel, never across rows.
    target = torch.tensor([[[2.0], [0.0]], [[2.0], [5.0]], [[0.0], [0.0]]]).reshape(1, 3, 2, 1)
    prediction = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[0.0], [0.0]]]).reshape(1, 3, 2, 1)
    angle = MeanAngularError()
    angle.update(prediction, target)  # pixel 1: +x against (1, 1, 0), 45; pixel 2: +y against +y, 0
    assert angle.compute() == pytest.approx(22.5, abs=1e-4)


def test_mean_angle_of_opposite_normals_is_180_not_nan():
    # normalise((3, 3, 0)) dotted with its negative rounds to just below -1 in float32.
    normals = torch.tensor([3.0, 3.0, 0.0]).reshape(1, 3, 1, 1)
    angle = MeanAngularError()
    angle.update(-normals, normals)
    assert angle.compute() == pytest.approx(180.0, abs=1e-3)


def test_class_id_equal_to_the_number_of_classes_is_refused_and_at_most_five_are_shown():
    with pytest.raises(ValueError, match=r"got \[3\]$"):
        Accuracy().update(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"got \[3, 4, 5, 6, 7\]$"):  # six bad ids, the five smallest
        MeanIoU(3).update(torch.randn(1, 3, 1, 9), torch.arange(9).reshape(1, 1, 9).flip(-1))


def test_miou_counts_pixels_exactly_past_float32s_two_to_the_24():
    """A float confusion matrix stops counting at 2**24 per cell (NYUv2's 654 test images
    hold 72 million pixels); the matrix counts in integers."""
    n = 2**24 + 1
    miou = MeanIoU(num_classes=1)
    miou.update(torch.zeros(1, 1, n), torch.zeros(1, n, dtype=torch.long))
    assert miou.seen == n
