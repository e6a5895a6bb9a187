"""Splitting the MMoE sweep over processes: saved runs merge into exactly the joint run.

The paper's scale (200 runs per cell) is reached by running seed ranges side by side and
merging them, so the merge must neither change a number nor join runs of different
experiments. Also the median interval that the trend line reports.
"""

import argparse
import json
import math
import sys

import pytest

TINY = ["--models", "shared_bottom", "mmoe", "--steps", "3", "--eval-every", "1", "--n-eval", "64",
        "--dim", "12", "--batch-size", "16", "--no-plot"]


def run(mmoe_script, monkeypatch, *flags: str) -> None:
    monkeypatch.setattr(sys, "argv", ["mmoe_correlation.py", *TINY, *flags])
    mmoe_script.main()


def saved(path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("n_train", ["0", "40"])
def test_split_runs_merge_into_the_joint_run(mmoe_script, monkeypatch, tmp_path, n_train):
    run(mmoe_script, monkeypatch, "--n-train", n_train, "--seeds", "5", "--save", str(tmp_path / "joint.json"))
    run(mmoe_script, monkeypatch, "--n-train", n_train, "--seeds", "2", "--first-seed", "3",
        "--save", str(tmp_path / "late.json"))
    run(mmoe_script, monkeypatch, "--n-train", n_train, "--seeds", "3", "--save", str(tmp_path / "early.json"))

    merged = mmoe_script.merge([str(tmp_path / "late.json"), str(tmp_path / "early.json")])

    joint = saved(tmp_path / "joint.json")
    assert merged.title == f"{joint['reading']}; 5 seeds"
    assert merged.correlations == [1.0, 0.9, 0.5]
    assert merged.curve_steps == joint["curve_steps"] == [1, 2, 3]
    for kind in ("shared_bottom", "mmoe"):
        for p in merged.correlations:
            assert merged.tests[kind][p] == joint["test_mse"][kind][str(p)], (kind, p)  # bit for bit, in seed order
            assert merged.curves[kind][p] == joint["curves"][kind][str(p)], (kind, p)
            assert all(len(curve) == 3 for curve in merged.curves[kind][p])  # a value per checkpoint
    assert merged.tests["shared_bottom"][0.5] != merged.tests["mmoe"][0.5]  # two models, not one copied


def record(reading="r", seeds=(0, 1), correlations=(1.0, 0.5), lr=0.01) -> dict:
    mse = {kind: {str(p): [float(s) for s in seeds] for p in correlations} for kind in ("shared_bottom", "mmoe")}
    return {"reading": reading, "seeds": list(seeds), "correlations": list(correlations), "test_mse": mse,
            "lr": {kind: {str(p): lr for p in correlations} for kind in mse}}


def write(tmp_path, name: str, content: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("other, message", [
    (record(seeds=(1, 2)), "seed 1 is also in"),
    (record(reading="another reading", seeds=(2, 3)), "reading 'another reading' differs"),
    (record(seeds=(2, 3), correlations=(1.0, 0.9)), "correlations"),
    (record(seeds=(2, 3), lr=0.001), "lr"),
])
def test_refuses_runs_of_another_experiment(mmoe_script, tmp_path, other, message):
    first, second = write(tmp_path, "a.json", record()), write(tmp_path, "b.json", other)
    with pytest.raises(SystemExit, match=message) as error:
        mmoe_script.merge([first, second])
    assert "b.json" in str(error.value)  # the message names the file at fault


def test_refuses_runs_with_other_checkpoints(mmoe_script, tmp_path):
    first, second = ({**record(seeds=seeds), "curve_steps": steps} for seeds, steps in (((0, 1), [5]), ((2, 3), [4])))
    with pytest.raises(SystemExit, match=r"b.json: curve_steps \[4\] differs from .*a.json's \[5\]"):
        mmoe_script.merge([write(tmp_path, "a.json", first), write(tmp_path, "b.json", second)])


READING = dict(n_train=0, sines="fixed", noise_std=0.1, steps=10, batch_size=16, lrs=[0.01], dim=12, num_sines=10,
               bias=True)


@pytest.mark.parametrize("setting, value", [("n_train", 40), ("sines", "normal"), ("noise_std", 0.2), ("steps", 20),
                                            ("batch_size", 8), ("lrs", [0.1]), ("dim", 6), ("num_sines", 3),
                                            ("bias", False)])
def test_the_reading_tells_apart_every_setting_that_changes_the_runs(mmoe_script, setting, value):
    """merge joins files whose reading lines agree, so each setting must show in the line."""
    reading = mmoe_script.reading
    assert reading(argparse.Namespace(**{**READING, setting: value})) != reading(argparse.Namespace(**READING))


def test_save_writes_its_seeds_lrs_checkpoints_and_curves(mmoe_script, tmp_path):
    args = argparse.Namespace(**READING, first_seed=3, seeds=2, correlations=[1.0, 0.5], eval_every=4)
    tests, lrs = {"mmoe": {1.0: [0.5, 0.25], 0.5: [1.5, 1.25]}}, {"mmoe": {1.0: 0.05, 0.5: 0.001}}
    curves = {"mmoe": {p: [[1 / 3, 2.0, 1.0], [1.0, 1.0, 1.0]] for p in (1.0, 0.5)}}
    mmoe_script.save(str(tmp_path / "runs.json"), args, tests, lrs, curves)
    written = saved(tmp_path / "runs.json")
    assert written["reading"] == mmoe_script.reading(args) and written["seeds"] == [3, 4]
    assert written["lr"] == {"mmoe": {"1.0": 0.05, "0.5": 0.001}}
    assert written["test_mse"] == {"mmoe": {"1.0": [0.5, 0.25], "0.5": [1.5, 1.25]}}
    assert written["curve_steps"] == [4, 8, 10]  # every 4th of 10 steps, and the last
    assert written["curves"]["mmoe"]["0.5"][0] == [0.333333, 2.0, 1.0]  # 6 significant digits


def with_omoe(content: dict) -> dict:
    content = json.loads(json.dumps(content))
    content["test_mse"]["omoe"] = content["test_mse"]["mmoe"]
    content["lr"]["omoe"] = content["lr"]["mmoe"]
    return content


def test_files_with_other_models_need_a_choice_of_common_ones(mmoe_script, tmp_path):
    three, two = write(tmp_path, "three.json", with_omoe(record())), write(tmp_path, "two.json", record(seeds=(2, 3)))
    with pytest.raises(SystemExit, match="two.json: models .* pick the common ones with --models"):
        mmoe_script.merge([three, two])
    pooled = mmoe_script.merge([three, two], models=["shared_bottom", "mmoe"])
    assert set(pooled.tests) == {"shared_bottom", "mmoe"}
    assert pooled.tests["mmoe"][1.0] == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(SystemExit, match="two.json: no runs of OMoE"):
        mmoe_script.merge([three, two], models=["shared_bottom", "omoe", "mmoe"])


def test_files_without_curves_merge_without_curves(mmoe_script, tmp_path):
    curved = record()
    curved["curve_steps"] = [5]
    curved["curves"] = {kind: {p: [[1.0], [2.0]] for p in by_p} for kind, by_p in curved["test_mse"].items()}
    merged = mmoe_script.merge([write(tmp_path, "a.json", curved), write(tmp_path, "b.json", record(seeds=(2, 3)))])
    assert merged.curves is None and merged.curve_steps is None
    assert merged.tests["mmoe"][0.5] == [0.0, 1.0, 2.0, 3.0]  # the tables do not need curves


def test_unreadable_file_is_named(mmoe_script, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"reading": ')
    with pytest.raises(SystemExit, match="broken.json: cannot read saved runs"):
        mmoe_script.merge([write(tmp_path, "a.json", record()), str(broken)])


def test_median_interval_ranks(mmoe_script):
    values = [float(v) for v in range(20, 0, -1)]  # 20 values, unsorted
    assert mmoe_script.median_interval(values) == (6.0, 15.0)  # the textbook ranks for n = 20 at 95 %
    assert mmoe_script.median_interval(values[:5]) is None  # 2 / 2^5 > 0.05: no interval exists
    assert mmoe_script.median_interval(values[:6]) == (15.0, 20.0)  # [min, max], 2 / 2^6 <= 0.05


@pytest.mark.parametrize("n", [6, 10, 41, 200])
def test_median_interval_is_the_widest_rank_within_the_level(mmoe_script, n):
    low, high = mmoe_script.median_interval([float(v) for v in range(1, n + 1)])
    k = int(low)
    assert high == n + 1 - k  # symmetric ranks

    def below(j: int) -> float:  # P(Bin(n, 1/2) < j): the median lies left of x_(j)
        return sum(math.comb(n, i) for i in range(j)) / 2**n
    assert below(k) <= 0.025 < below(k + 1)


def test_degradation_is_per_seed_loss_at_low_minus_high_correlation(mmoe_script):
    tests = {"shared_bottom": {1.0: [1.0, 2.0, 3.0], 0.5: [2.0, 1.0, 3.5]},
             "mmoe": {1.0: [1.0, 1.0, 1.0], 0.5: [0.5, 0.9, 0.8]}}
    line = mmoe_script.degradation(tests, [1.0, 0.5])
    assert "shared-bottom median +0.500, positive in 2/3" in line  # changes +1, -1, +0.5
    assert "MMoE median -0.200, positive in 0/3" in line  # changes -0.5, -0.1, -0.2


@pytest.mark.parametrize("baseline, name", [("shared_bottom", "shared-bottom"), ("omoe", "OMoE")])
def test_trend_is_per_seed_change_of_the_gap_to_mmoe(mmoe_script, baseline, name):
    tests = {baseline: {1.0: [2.0, 2.0, 2.0], 0.5: [3.0, 2.5, 1.0]},
             "mmoe": {1.0: [1.0, 1.0, 1.0], 0.5: [1.0, 1.4, 1.2]}}
    line = mmoe_script.trend(tests, [1.0, 0.5], 3, baseline)  # gaps 1, 1, 1 at p = 1; 2, 1.1, -0.2 at 0.5
    assert line.startswith(f"{name} − MMoE gap at p=0.5 minus at p=1")
    assert "median +0.100" in line and "positive in 2/3 seeds" in line  # changes +1, +0.1, -1.2
    assert "mean -0.033" in line


def test_trend_counts_a_gap_that_did_not_change_as_not_growing(mmoe_script):
    tests = {"shared_bottom": {1.0: [2.0, 2.0], 0.5: [2.0, 3.0]}, "mmoe": {1.0: [1.0, 1.0], 0.5: [1.0, 1.0]}}
    assert "positive in 1/2 seeds" in mmoe_script.trend(tests, [1.0, 0.5], 2)  # changes 0 and +1
