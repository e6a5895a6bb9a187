"""The gradient-method timing benchmark: how it times, what its tables compare, and what it does
without the optional TorchJD and cvxpy (neither is a dependency of this project)."""

import gc
import itertools
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from reference_impls.weighting.base import GramianWeighting

from .conftest import load_script

speed = load_script("aggregation_speed")
CPU = torch.device("cpu")


def test_a_timed_call_runs_with_the_garbage_collector_paused_and_restores_it(monkeypatch):
    seen = []
    readings = iter([5.0, 5.25, 7.0])
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    assert speed.timed(lambda: seen.append(gc.isenabled()), CPU) == 0.25
    assert seen == [False] and gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        speed.timed(lambda: 1 / 0, CPU)
    assert gc.isenabled()


def test_contenders_alternate_and_fast_ones_get_an_untimed_call_before_each_timed_one(monkeypatch):
    """A call under 50 ms is repeated untimed first, so caches are warm for it, not for its rival."""
    calls = []
    durations = {"fast": itertools.cycle([0.01, 0.03, 0.02]), "slow": itertools.cycle([0.3, 0.1, 0.2])}

    def contender(name):
        return lambda: calls.append(name) or next(durations[name])
    monkeypatch.setattr(speed, "timed", lambda function, device: function())
    medians = speed.median_seconds(contender("fast"), contender("slow"), repeats=4, device=CPU)
    assert calls == ["fast", "slow"] + ["fast", "fast", "slow"] * 4
    # fast: warm-up 0.01, then (untimed, timed) pairs 0.03/0.02, 0.01/0.03, 0.02/0.01, 0.03/0.02
    assert medians == [pytest.approx(0.02), pytest.approx(0.15)]  # slow: 0.1, 0.2, 0.3, 0.1 timed


@pytest.mark.parametrize("seconds, shown", [(None, "n/a"), (2.5e-4, "250 µs"), (1e-3, "1.00 ms"),
                                            (0.0123, "12.30 ms"), (1.5, "1500.00 ms")])
def test_times_are_shown_in_microseconds_below_one_millisecond(seconds, shown):
    assert speed.fmt(seconds) == shown


class FakeAggregator:
    """Stands in for a TorchJD aggregator: records its settings, sums the rows."""

    def __init__(self, **settings):
        self.settings = settings

    def __call__(self, matrix):
        return matrix.sum(dim=0)

    def gramian_weighting(self, gramian):
        return torch.ones(len(gramian))


class BrokenAggregator(FakeAggregator):
    def __call__(self, matrix):
        raise RuntimeError("solver missing")


def rows(text, cells):
    return [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line.count("|") == cells + 1
            and not line.startswith(("| K ", "|---"))]


def test_without_torchjd_the_aggregation_table_times_ours_alone(monkeypatch, capsys):
    monkeypatch.setattr(speed, "torchjd_aggregators", dict)
    speed.aggregation_table([2, 3], [16], repeats=1, large_repeats=1, device=CPU)
    table = rows(capsys.readouterr().out, 6)
    assert [(k, d, name) for k, d, name, *_ in table] == [
        (f"| {k}", "2e+01", name) for k in (2, 3) for name in sorted(speed.OURS)]
    assert all(jd == "n/a" and ratio == "n/a |" for *_, jd, ratio in table)
    assert all(re.fullmatch(r"\d+ µs|\d+\.\d\d ms", ours) for _, _, _, ours, _, _ in table)


def test_with_torchjd_both_are_timed_on_the_same_matrix_and_a_failing_aggregator_is_reported(monkeypatch, capsys):
    theirs = {"mgda": FakeAggregator, "cagrad": FakeAggregator, "pcgrad": BrokenAggregator,
              "dualproj (TorchJD only)": FakeAggregator}
    monkeypatch.setattr(speed, "torchjd_aggregators", lambda: theirs)
    timings = []

    def median_seconds(*contenders, repeats, device):
        timings.append((len(contenders), repeats))
        return [0.002, 0.001][:len(contenders)] if len(contenders) == 2 else [0.004]
    monkeypatch.setattr(speed, "median_seconds", median_seconds)
    speed.aggregation_table([2], [8], repeats=3, large_repeats=1, device=CPU)
    out = capsys.readouterr().out
    table = {row[2]: row[3:] for row in rows(out, 6)}
    assert table["mgda"] == table["cagrad"] == ["2.00 ms", "1.00 ms", "2.00 |"]
    assert table["dualproj (TorchJD only)"] == ["n/a", "4.00 ms", "n/a |"]
    assert table["pcgrad"] == ["4.00 ms", "n/a", "n/a |"]  # ours alone
    assert "<!-- TorchJD pcgrad failed: RuntimeError: solver missing -->" in out
    assert len(timings) == len(speed.OURS) + 1 and {repeats for _, repeats in timings} == {3}


def test_calls_of_a_second_or_more_get_the_large_repeat_count(monkeypatch):
    """K * d >= 1e8 (e.g. K = 40, d = 1e7) takes seconds a call: fewer repeats there."""
    counts = []
    monkeypatch.setattr(speed, "torchjd_aggregators", dict)
    monkeypatch.setattr(speed, "OURS", {"ew_grad": speed.OURS["ew_grad"]})
    monkeypatch.setattr(speed, "median_seconds", lambda *contenders, repeats, device: counts.append(repeats) or [0.5])
    small = torch.randn  # the matrices themselves would take gigabytes: any K x d asked is 2 x 4
    monkeypatch.setattr(speed.torch, "randn", lambda k, d, generator: small(2, 4, generator=generator))
    speed.aggregation_table([10, 40], [10**6, 10**7 // 4, 10**7], repeats=7, large_repeats=2, device=CPU)
    assert counts == [7, 7, 7, 2, 2, 2]  # K x d: 1e7, 4e7, 2.5e7, 1e8, 1e8, 4e8


def test_the_weighting_table_compares_gramian_methods_on_the_same_gramian(monkeypatch, capsys):
    monkeypatch.setattr(speed, "torchjd_aggregators", dict)
    speed.weighting_table([2], 16, repeats=1, device=CPU)
    assert capsys.readouterr().out == "\n(torchjd not importable: the Gramian-only comparison is skipped)\n"
    theirs = {name: FakeAggregator for name in speed.TORCHJD_NAMES}
    monkeypatch.setattr(speed, "torchjd_aggregators", lambda: theirs)
    given = []

    def median_seconds(ours, jd, repeats, device):
        given.append((ours(), jd()))
        return [0.003, 0.002]
    monkeypatch.setattr(speed, "median_seconds", median_seconds)
    speed.weighting_table([3], 16, repeats=1, device=CPU)
    table = rows(capsys.readouterr().out, 5)
    gramian_methods = sorted(n for n in speed.TORCHJD_NAMES if isinstance(speed.OURS[n](), GramianWeighting))
    assert [row[1] for row in table] == gramian_methods and len(gramian_methods) >= 8
    assert all(row[2:] == ["3.00 ms", "2.00 ms", "1.50 |"] for row in table)
    assert all(len(ours) == len(jd) == 3 for ours, jd in given)  # K weights from the K x K Gramian


def test_without_cvxpy_the_nash_comparison_is_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cvxpy", None)  # import fails as if not installed
    speed.nash_table([2], repeats=1, device=CPU)
    assert capsys.readouterr().out == "\n(cvxpy not importable: Nash-MTL solver comparison skipped)\n"


def test_the_full_step_row_counts_the_shared_parameters_and_compares_with_one_backward(monkeypatch, capsys):
    monkeypatch.setattr(speed, "torchjd_aggregators", dict)
    ran = []

    def median_seconds(*contenders, repeats, device):
        ran.extend(type(contender()).__name__ for contender in contenders)
        return [0.001, 0.003]
    monkeypatch.setattr(speed, "median_seconds", median_seconds)
    speed.full_step_table([2, 5], 8, ["ew_grad", "mgda"], repeats=1, device=CPU)
    table = rows(capsys.readouterr().out, 8)
    shared = 2 * (8 * 8 + 8)  # two Linear(8, 8) layers
    assert [row[:3] for row in table] == [[f"| {k}", f"{shared:.1e}", name] for k in (2, 5)
                                          for name in ("ew_grad", "mgda")]
    assert all(row[3:] == ["3.00 ms", "n/a", "n/a", "1.00 ms", "3.0 |"] for row in table)
    assert ran == ["NoneType", "Aggregation"] * 4  # the summed loss's backward, then gradient_step's result


def test_main_picks_sizes_tables_and_threads_from_its_options(monkeypatch, capsys):
    called = []
    for table in ("aggregation_table", "weighting_table", "nash_table", "full_step_table"):
        monkeypatch.setattr(speed, table, lambda *args, table=table: called.append((table, args[:-1])))
    threads = []
    monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sys, "argv", ["aggregation_speed.py"])
    speed.main()
    assert called == [("aggregation_table", ([2, 5, 10, 40], [10_000, 1_000_000, 10_000_000], 7, 5)),
                      ("weighting_table", ([2, 5, 10, 40], 10_000, 7)),
                      ("nash_table", ([2, 5, 10, 40], 7)),
                      ("full_step_table", ([2, 5, 10, 40], 1024, ["ew_grad", "mgda", "pcgrad", "upgrad", "cagrad",
                                                                   "nash_mtl"], 5))]
    assert threads == [1] and capsys.readouterr().out.startswith(f"device=cpu torch={torch.__version__} threads=")
    called.clear()
    monkeypatch.setattr(sys, "argv", ["aggregation_speed.py", "--quick", "--tables", "step", "aggregation",
                                      "--tasks", "3", "--threads", "2", "--repeats", "4", "--step-repeats", "2"])
    speed.main()
    assert [c[0] for c in called] == ["aggregation_table", "full_step_table"]  # in the script's order
    assert called[0][1] == ([3], [10_000, 100_000], 4, 5) and called[1][1][1:2] == (256,)
    assert called[1][1][-1] == 2 and threads == [1, 2]
    called.clear()
    monkeypatch.setattr(sys, "argv", ["aggregation_speed.py", "--quick", "--dims", "64", "--tables", "weighting"])
    speed.main()
    assert called == [("weighting_table", ([2, 5, 10, 40], 64, 7))]
