"""What the MMoE sweep reports: the learning rate it keeps, the tables and the test-loss figure, by hand."""

import argparse
import json

import pytest
import torch

from .conftest import drawn

# median validation MSE per lr: at p = 1, 0.1 has the lower median (the higher mean); at p = 0.5, 0.2 has
VALID = {(0.1, 1.0): [0.0, 0.0, 9.0], (0.2, 1.0): [1.0, 1.0, 1.0],
         (0.1, 0.5): [2.0, 2.0, 2.0], (0.2, 0.5): [1.0, 1.0, 9.0]}


class ScriptedRuns:
    """Stands in for Runs: validation losses from VALID, test loss 100 x lr + run index."""

    def __init__(self, kind, correlations, seeds, args):
        self.settings = [(p, s) for p in correlations for s in seeds]

    def train(self, lr, seed):
        valid = torch.tensor([VALID[lr, p][s] for p, s in self.settings])
        test = 100 * lr + torch.arange(len(self.settings), dtype=torch.float)
        return valid, test, torch.ones_like(valid), torch.stack([valid, test])


def test_sweep_keeps_the_lr_with_the_lowest_median_validation_loss_per_correlation(mmoe_script, monkeypatch):
    monkeypatch.setattr(mmoe_script, "Runs", ScriptedRuns)
    args = argparse.Namespace(correlations=[1.0, 0.5], seeds=3, first_seed=0, lrs=[0.1, 0.2])
    tests, lrs, curves = mmoe_script.sweep("mmoe", args)
    assert lrs == {1.0: 0.1, 0.5: 0.2}
    assert tests == {1.0: [10.0, 11.0, 12.0], 0.5: [23.0, 24.0, 25.0]}  # that lr's runs, in seed order
    assert curves[0.5] == [[1.0, 23.0], [1.0, 24.0], [9.0, 25.0]]  # per seed, a value per checkpoint


# per seed: shared-bottom - MMoE = 0.5, 0 (a tie), 3, -0.5, 8
SB, MMOE = [1.0, 2.0, 4.0, 3.0, 10.0], [0.5, 2.0, 1.0, 3.5, 2.0]


def test_table_row_is_paired_per_seed(mmoe_script):
    tests = {"shared_bottom": {1.0: SB}, "mmoe": {1.0: MMOE}}
    lines = mmoe_script.table(tests, {"shared_bottom": {1.0: 0.01}, "mmoe": {1.0: 0.001}}, [1.0], 5).splitlines()
    assert lines[0].startswith("| p | shared-bottom | MMoE | paired gap SB − MMoE | relative gap |")
    # medians 3 and 2; median gap 0.5 (not 3 - 2); median of gap / shared-bottom 0.5; MMoE strictly
    # better in 3 of 5 seeds, two-sided sign test 2 x (10 + 5 + 1) / 32 = 1
    assert lines[2] == "| 1 | 3.000 | 2.000 | +0.500 | +50.0 % | 3/5 (1) | 0.01 / 0.001 |"


def test_spread_table_is_interquartile_range_and_maximum(mmoe_script):
    tests = {"mmoe": {0.5: [7.0, 1.0, 5.0, 3.0, 2.0, 6.0, 4.0]}}  # quartiles 2 and 6
    assert mmoe_script.spread_table(tests, [0.5]).splitlines()[2] == "| 0.5 | 4.000 / 7.000 |"


def test_test_loss_figure_plots_medians_and_the_median_paired_gap_by_falling_p(mmoe_script, monkeypatch):
    tests = {"shared_bottom": {0.5: SB, 1.0: [1.0] * 5}, "mmoe": {0.5: MMOE, 1.0: [1.0, 1.0, 1.0, 1.0, 2.0]}}
    left, right = drawn(mmoe_script, monkeypatch, mmoe_script.plot, tests, [0.5, 1.0], "t", "f").axes
    assert [label.get_text() for label in right.get_xticklabels()] == ["1", "0.5"]
    shared_bottom, mmoe = left.get_lines()
    assert list(shared_bottom.get_ydata()) == [1.0, 3.0] and list(mmoe.get_ydata()) == [1.0, 2.0]
    assert list(right.get_lines()[0].get_ydata()) == [0.0, 0.5]  # medians of the per-seed gaps


def test_one_seed_is_refused_and_saved_runs_survive_a_failing_report(mmoe_script, monkeypatch, tmp_path, capsys):
    """--seeds 1 used to train, print the tables, then fail in the spread table before --save."""
    tiny = ["--steps", "4", "--eval-every", "2", "--n-eval", "32", "--dim", "8", "--batch-size", "8", "--no-plot"]
    monkeypatch.setattr("sys.argv", ["mmoe_correlation.py", "--seeds", "1", *tiny])
    with pytest.raises(SystemExit):
        mmoe_script.main()
    assert "--seeds: must be >= 2, got 1" in capsys.readouterr().err
    saved = tmp_path / "runs.json"
    monkeypatch.setattr("sys.argv", ["mmoe_correlation.py", "--seeds", "2", *tiny, "--models", "shared_bottom", "mmoe",
                                     "--save", str(saved)])

    def failing_report(*args):
        raise RuntimeError("report failed")
    monkeypatch.setattr(mmoe_script, "report", failing_report)
    with pytest.raises(RuntimeError, match="report failed"):
        mmoe_script.main()
    assert set(json.loads(saved.read_text())["test_mse"]) == {"shared_bottom", "mmoe"}
