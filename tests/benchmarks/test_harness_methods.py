"""The harness cost table: one row per trained method, EW the reference, refusals with reasons."""

import argparse
import re
import sys
from types import SimpleNamespace

import pytest

from reference_impls.hooks import ConfigurationError


def test_table_has_equal_weighting_at_one_and_lists_refused_methods(harness_script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["harness_methods.py", "--methods", "gradnorm", "mt_sgd", "epo",
                                      "--repeats", "1", "--epochs", "1", "--n-train", "64", "--batch-size", "16"])
    harness_script.main()
    out = capsys.readouterr().out
    rows = {m.group(1): (m.group(2), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^\| (\w+) \| (\w*) \| ([0-9.]+) \| ([0-9.]+) \|$", out, re.M)}
    assert set(rows) == {"ew", "gradnorm", "epo"}  # epo trains with the script's preference option
    assert rows["ew"][2] == 1.0 and rows["gradnorm"][0] == "balance_step"
    assert abs(rows["gradnorm"][2] - rows["gradnorm"][1] / rows["ew"][1]) < 0.1  # the printed times' ratio
    assert "- mt_sgd: method 'mt_sgd' needs its MTSGD.particle_updates()" in out


def test_time_per_step_counts_the_batches_the_method_trains_on(harness_script):
    """The bilevel methods train on 90 % of the set, so their time is divided by fewer batches."""
    assert harness_script.batches_trained("ew", 160, 16, epochs=2) == 20
    assert harness_script.batches_trained("autol", 160, 16, epochs=2) == 18  # 144 examples after 16 held out
    assert harness_script.batches_trained("moml", 161, 16, epochs=1) == 10  # 145 left: the last batch is short


# seconds per step of each timed round; the first call of a method is its warm-up (1 s, never reported)
ROUNDS = {"ew": [0.002, 0.004, 0.003], "gradnorm": [0.006, 0.004, 0.012], "epo": [0.001, 0.002, 0.0015]}


def test_table_reports_medians_of_rounds_after_the_warm_up(harness_script, monkeypatch, capsys):
    calls = []

    def scripted(method, bench, args):
        if method == "mt_sgd":
            raise ConfigurationError("mt_sgd needs particles; see the docs")
        calls.append(method)
        return ROUNDS[method][calls.count(method) - 2] if calls.count(method) > 1 else 1.0
    monkeypatch.setattr(harness_script, "seconds_per_step", scripted)
    monkeypatch.setattr(sys, "argv", ["harness_methods.py", "--methods", "gradnorm", "mt_sgd", "epo", "--repeats", "3",
                                      "--n-train", "64"])
    harness_script.main()
    assert calls == ["ew", "gradnorm", "epo"] * 4  # warm-up, then rounds of every method in turn, EW first
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "method" not in line]
    # ms per step: the median round; x EW: the median of the per-round ratios (gradnorm: 3, 1, 4), sorted by it
    assert rows == ["| epo | observe | 1.50 | 0.5 |", "| ew |  | 3.00 | 1.0 |", "| gradnorm | balance_step | 6.00 | 3.0 |"]


def test_time_per_step_is_the_fit_time_over_the_batches_trained(harness_script, monkeypatch):
    clock = iter([10.0, 13.6])
    monkeypatch.setattr(harness_script, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(harness_script, "build", lambda *arguments: None)
    monkeypatch.setattr(harness_script, "fit", lambda *arguments, **options: None)
    bench = SimpleNamespace(problem=None, train=range(160))
    args = argparse.Namespace(epochs=2, batch_size=16, device="cpu")
    assert harness_script.seconds_per_step("autol", bench, args) == pytest.approx(3.6 / 18)
