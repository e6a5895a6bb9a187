"""The validation curves behind the Fig. 4-style figure, and the mean interval of the trend line."""

import argparse
import random
import statistics

import pytest

TINY = dict(dim=12, bias=True, device="cpu", sines="fixed", num_sines=10, n_train=0, n_eval=64,
            noise_std=0.1, batch_size=16, steps=7, eval_every=3)


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


def test_curve_figure_has_a_panel_per_correlation_and_a_line_per_model(mmoe_script, tmp_path, monkeypatch):
    monkeypatch.setattr(mmoe_script, "IMG", tmp_path)
    curves = {kind: {p: [[1.0, 0.5], [1.2, 0.4]] for p in (1.0, 0.9, 0.5)} for kind in ("shared_bottom", "mmoe")}
    mmoe_script.plot_curves(curves, [250, 500], [1.0, 0.9, 0.5], "a title", "figure_curves")
    svg = (tmp_path / "figure_curves.svg").read_text()
    assert (tmp_path / "figure_curves.png").stat().st_size > 0
    for text in ("correlation 1", "correlation 0.9", "correlation 0.5", "shared-bottom", "MMoE", "a title"):
        assert f"<!-- {text} -->" in svg, text  # matplotlib labels each text element with a comment
    assert "OMoE" not in svg  # only the models given


def test_redrawn_figures_are_identical_files(mmoe_script, tmp_path, monkeypatch):
    curves = {kind: {p: [[1.0, 0.5], [1.2, 0.4]] for p in (1.0, 0.5)} for kind in ("shared_bottom", "mmoe")}
    for run in ("first", "second"):
        monkeypatch.setattr(mmoe_script, "IMG", tmp_path / run)
        mmoe_script.plot_curves(curves, [250, 500], [1.0, 0.5], "a title", "figure")
    assert (tmp_path / "first/figure.svg").read_bytes() == (tmp_path / "second/figure.svg").read_bytes()
