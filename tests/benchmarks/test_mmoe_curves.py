"""The validation curves behind the Fig. 4-style figure, and the mean interval of the trend line."""

import argparse
import random
import statistics

import pytest

from .conftest import TINY, drawn


def test_checkpoints_are_every_eval_and_the_last_step(mmoe_script):
    assert mmoe_script.checkpoints(argparse.Namespace(**TINY)) == [3, 6, 7]
    assert mmoe_script.checkpoints(argparse.Namespace(**{**TINY, "steps": 6})) == [3, 6]


def test_best_checkpoint_is_the_minimum_of_the_curve(mmoe_script):
    args = argparse.Namespace(**TINY)
    runs = mmoe_script.Runs("mmoe", [1.0, 0.5], [0, 1], args)
    best_valid, _, best_step, curve = runs.train(0.05, seed=0)
    steps = mmoe_script.checkpoints(args)
    assert curve.shape == (len(steps), 4)  # checkpoints x runs
    assert best_valid.tolist() == curve.min(dim=0).values.tolist()
    assert best_step.tolist() == [float(steps[i]) for i in curve.argmin(dim=0).tolist()]
    assert len(set(curve[-1].tolist())) == 4  # four different runs, not one copied


def test_reported_test_loss_is_the_test_set_loss_at_the_best_checkpoint(mmoe_script, monkeypatch):
    runs = mmoe_script.Runs("mmoe", [1.0, 0.5], [0, 1], argparse.Namespace(**{**TINY, "steps": 8, "eval_every": 1}))
    on_test, loss = [], runs.loss

    def recording(x, y):  # every evaluation of the test set, in checkpoint order
        value = loss(x, y)
        if x is runs.test[0]:
            on_test.append(value.tolist())
        return value
    monkeypatch.setattr(runs, "loss", recording)
    _, test_at_best, _, curve = runs.train(0.3, seed=0)  # a large step: the best checkpoints are early
    best = curve.argmin(dim=0).tolist()
    assert min(best) < len(on_test) - 1  # some run's best checkpoint is not the last one
    assert test_at_best.tolist() == [on_test[i][r] for r, i in enumerate(best)]


def test_mean_curve_is_the_mean_and_standard_error_per_checkpoint(mmoe_script):
    means, errors = mmoe_script.mean_curve([[1.0, 2.0], [3.0, 6.0]])  # two seeds, two checkpoints
    assert means == [2.0, 4.0]
    assert errors == pytest.approx([1.0, 2.0])  # stdev / sqrt(2): sqrt(2) / sqrt(2), sqrt(8) / sqrt(2)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_mean_interval_covers_the_mean_at_its_level(mmoe_script, level):
    rng, hits, trials = random.Random(1), 0, 2000
    for _ in range(trials):
        low, high = mmoe_script.mean_interval([rng.gauss(3.0, 2.0) for _ in range(40)], level)
        hits += low <= 3.0 <= high
    assert abs(hits / trials - level) < 0.025  # t vs z at n = 40 costs about half a point


def test_mean_interval_needs_many_seeds(mmoe_script):
    assert mmoe_script.mean_interval([1.0, 2.0] * 14) is None  # 28 values
    low, high = mmoe_script.mean_interval([1.0, 2.0] * 15)
    assert low < statistics.fmean([1.0, 2.0]) < high


def test_mean_interval_is_the_mean_plus_minus_z_sample_standard_errors(mmoe_script):
    values = [1.0, 2.0] * 15  # mean 1.5; sample variance 30 x 0.25 / 29
    half = statistics.NormalDist().inv_cdf(0.975) * (7.5 / 29) ** 0.5 / 30**0.5
    assert mmoe_script.mean_interval(values) == pytest.approx((1.5 - half, 1.5 + half), rel=1e-12)


def test_curve_figure_has_a_panel_per_correlation_and_a_line_per_model(mmoe_script, tmp_path, monkeypatch):
    monkeypatch.setattr(mmoe_script, "IMG", tmp_path)
    curves = {kind: {p: [[1.0, 0.5], [1.2, 0.4]] for p in (1.0, 0.9, 0.5)} for kind in ("shared_bottom", "mmoe")}
    mmoe_script.plot_curves(curves, [250, 500], [1.0, 0.9, 0.5], "a title", "figure_curves")
    svg = (tmp_path / "figure_curves.svg").read_text()
    assert (tmp_path / "figure_curves.png").stat().st_size > 0
    for text in ("correlation 1", "correlation 0.9", "correlation 0.5", "shared-bottom", "MMoE", "a title"):
        assert f"<!-- {text} -->" in svg, text  # matplotlib labels each text element with a comment
    assert "OMoE" not in svg  # only the models given


def test_curve_panels_plot_the_seed_mean_with_two_standard_errors(mmoe_script, monkeypatch):
    curves = {"mmoe": {p: [[1.0, 0.5], [1.2, 0.4]] for p in (0.5, 1.0)}}  # means 1.1, 0.45; s.e. 0.1, 0.05
    fig = drawn(mmoe_script, monkeypatch, mmoe_script.plot_curves, curves, [250, 500], [0.5, 1.0], "t", "f")
    assert [axis.get_title() for axis in fig.axes] == ["correlation 1", "correlation 0.5"]  # p falling
    line, = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [0.25, 0.5]  # steps in thousands
    assert list(line.get_ydata()) == pytest.approx([1.1, 0.45])
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert (band.min(), band.max()) == pytest.approx((0.45 - 2 * 0.05, 1.1 + 2 * 0.1))


def test_redrawn_figures_are_identical_files(mmoe_script, tmp_path, monkeypatch):
    curves = {kind: {p: [[1.0, 0.5], [1.2, 0.4]] for p in (1.0, 0.5)} for kind in ("shared_bottom", "mmoe")}
    for run in ("first", "second"):
        monkeypatch.setattr(mmoe_script, "IMG", tmp_path / run)
        mmoe_script.plot_curves(curves, [250, 500], [1.0, 0.5], "a title", "figure")
    assert (tmp_path / "first/figure.svg").read_bytes() == (tmp_path / "second/figure.svg").read_bytes()
