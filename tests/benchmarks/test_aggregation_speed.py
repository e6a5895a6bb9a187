"""The gradient-method timing benchmark: how it times, what its tables compare, and what it does
without the optional TorchJD and cvxpy (neither is a dependency of this project)."""

import gc
import itertools
import re
import sys
from types import ModuleType, SimpleNamespace

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


def run_main(monkeypatch, *options, threads=None):
    """main() with every table stubbed out: the arguments (device last) it hands each table, in order;
    the thread counts it sets go to ``threads`` when given."""
    called = []
    for table in ("aggregation_table", "weighting_table", "nash_table", "full_step_table"):
        monkeypatch.setattr(speed, table, lambda *args, table=table: called.append((table, args)))
    monkeypatch.setattr(speed.torch, "set_num_threads", (threads if threads is not None else []).append)
    monkeypatch.setattr(sys, "argv", ["aggregation_speed.py", *options])
    speed.main()
    return called


def test_main_picks_sizes_tables_and_threads_from_its_options(monkeypatch, capsys):
    threads = []
    called = [(table, args[:-1]) for table, args in run_main(monkeypatch, threads=threads)]
    assert called == [("aggregation_table", ([2, 5, 10, 40], [10_000, 1_000_000, 10_000_000], 7, 5)),
                      ("weighting_table", ([2, 5, 10, 40], 10_000, 7)),
                      ("nash_table", ([2, 5, 10, 40], 7)),
                      ("full_step_table", ([2, 5, 10, 40], 1024, ["ew_grad", "mgda", "pcgrad", "upgrad", "cagrad",
                                                                   "nash_mtl"], 5))]
    assert threads == [1] and capsys.readouterr().out.startswith(f"device=cpu torch={torch.__version__} threads=")
    called = [(table, args[:-1]) for table, args in run_main(
        monkeypatch, "--quick", "--tables", "step", "aggregation", "--tasks", "3", "--threads", "2",
        "--repeats", "4", "--step-repeats", "2", threads=threads)]
    assert [c[0] for c in called] == ["aggregation_table", "full_step_table"]  # in the script's order
    assert called[0][1] == ([3], [10_000, 100_000], 4, 5) and called[1][1][1:2] == (256,)
    assert called[1][1][-1] == 2 and threads == [1, 2]
    called = [(table, args[:-1]) for table, args in run_main(monkeypatch, "--quick", "--dims", "64",
                                                             "--tables", "weighting")]
    assert called == [("weighting_table", ([2, 5, 10, 40], 64, 7))]


def test_on_cuda_the_clock_waits_for_the_queued_gpu_work_before_and_after_the_call(monkeypatch):
    """CUDA calls return before the GPU finishes: without a synchronize on both sides the clock
    would time the launch, not the work. On the CPU there is nothing to wait for."""
    events = []
    monkeypatch.setattr(speed.torch.cuda, "synchronize", lambda: events.append("sync"))
    readings = iter([1.0, 3.0, 5.0, 6.0])
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or next(readings)))
    assert speed.timed(lambda: events.append("call"), torch.device("cuda")) == 2.0
    assert events == ["sync", "clock", "call", "sync", "clock"]
    events.clear()
    assert speed.timed(lambda: events.append("call"), CPU) == 1.0
    assert events == ["clock", "call", "clock"]


def test_a_call_of_exactly_50_ms_gets_no_untimed_call_first(monkeypatch):
    """The docstring's threshold: only calls *under* 50 ms are repeated untimed before timing."""
    calls = []
    monkeypatch.setattr(speed, "timed", lambda function, device: function())
    fifty, under = (lambda: calls.append("50 ms") or 0.05), (lambda: calls.append("49 ms") or 0.049)
    speed.median_seconds(fifty, under, repeats=2, device=CPU)
    assert calls == ["50 ms", "49 ms"] + ["50 ms", "49 ms", "49 ms"] * 2


@pytest.mark.parametrize("name, settings", [("cagrad", {"c": 0.5}), ("fairgrad", {"alpha": 1.0}),
                                            ("gradvac", {"beta": 0.01}), ("nash_mtl", {"n_tasks": 3}),
                                            ("mgda", {})])
def test_torchjd_aggregators_get_the_same_hyper_parameters_as_ours(name, settings):
    """The docs: CAGrad c = 0.5, FairGrad alpha = 1, GradVac beta = 0.01 on both sides; Nash-MTL needs K."""
    assert speed.make_torchjd({name: FakeAggregator}, name, 3).settings == settings


def recorded_draws(monkeypatch):
    """Every tensor torch.randn draws from now on, in order (the draws themselves unchanged)."""
    real_randn, draws = torch.randn, []
    monkeypatch.setattr(speed.torch, "randn", lambda *shape, **kw: draws.append(real_randn(*shape, **kw)) or draws[-1])
    return draws


def quiet_tables(monkeypatch, theirs=None):
    """Tables run with stand-ins for TorchJD (``theirs``, or none) and cvxpy, and without real timing."""
    monkeypatch.setattr(speed, "torchjd_aggregators", lambda: dict(theirs or {}))
    monkeypatch.setitem(sys.modules, "cvxpy", ModuleType("cvxpy"))
    monkeypatch.setattr(speed, "nash_cvxpy", lambda gramian: 1e-5)
    monkeypatch.setattr(speed, "median_seconds", lambda *contenders, repeats, device: [0.001] * len(contenders))


TABLES = {
    "aggregation": lambda: speed.aggregation_table([2], [16], repeats=1, large_repeats=1, device=CPU),
    "weighting": lambda: speed.weighting_table([2], 10_000, repeats=1, device=CPU),
    "nash": lambda: speed.nash_table([2], repeats=1, device=CPU),
    "step": lambda: speed.full_step_table([2], 8, ["ew_grad"], repeats=1, device=CPU),
}
HEADERS = {
    "aggregation": ("### Aggregation time per step (median)", "| K | d | method | ours | TorchJD | ours / TorchJD |"),
    "weighting": ("### Weights from the K x K Gramian only (Gramian of a K x 1e+04 float32 matrix; median)",
                  "| K | method | ours | TorchJD | ours / TorchJD |"),
    "nash": ("### Nash-MTL solve on the K x K Gramian: Newton (ours) vs cvxpy (median)",
             "| K | ours | ours residual | cvxpy | cvxpy residual | cvxpy / ours |"),
    "step": ("### Full step: K backward passes + aggregation vs one backward of Σ L_k (median)",
             "| K | d (shared) | method | gradient_step (ours) | TorchJD step | ours / TorchJD | sum-loss backward "
             "| ours / sum-loss |"),
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_each_table_is_a_markdown_table_under_its_heading_with_the_columns_the_docs_quote(table, monkeypatch, capsys):
    quiet_tables(monkeypatch, {"mgda": FakeAggregator})
    TABLES[table]()
    heading, columns = HEADERS[table]
    lines = capsys.readouterr().out.split("\n")
    cells = columns.count("|") - 1
    assert lines[:5] == ["", heading, "", columns, "|---" * cells + "|"]
    assert lines[5:-1] and all(line.startswith("| ") and line.count("|") == cells + 1 for line in lines[5:-1])


@pytest.mark.parametrize("table", sorted(TABLES))
def test_each_table_draws_its_inputs_from_its_own_seeded_generator(table, monkeypatch):
    """A rerun times the same matrices whatever the global random state (solvers' time depends on them)."""
    quiet_tables(monkeypatch, {"mgda": FakeAggregator})
    draws = recorded_draws(monkeypatch)
    runs = []
    with torch.random.fork_rng():
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            draws.clear()
            TABLES[table]()
            runs.append(list(draws))
    assert runs[0] and len(runs[0]) == len(runs[1])
    assert all(torch.equal(first, second) for first, second in zip(*runs))


class Recorder(FakeAggregator):
    """Stands in for ours or TorchJD's method: every instance is kept, every call returns what it was given."""

    made = []

    def __init__(self, **settings):
        super().__init__(**settings)
        Recorder.made.append(self)

    def __call__(self, matrix):
        return self, matrix


def test_ours_and_torchjd_are_each_timed_on_the_cells_matrix(monkeypatch, capsys):
    """Both contenders of a cell run on the same K x d matrix; TorchJD's Nash-MTL is built for K tasks."""
    monkeypatch.setattr(Recorder, "made", [])
    monkeypatch.setattr(speed, "OURS", {"mgda": Recorder, "nash_mtl": Recorder})
    quiet_tables(monkeypatch, {"mgda": Recorder, "nash_mtl": Recorder})
    results = []
    monkeypatch.setattr(speed, "median_seconds", lambda *contenders, repeats, device:
                        results.append([contender() for contender in contenders]) or [0.002, 0.001])
    speed.aggregation_table([2, 3], [16], repeats=1, large_repeats=1, device=CPU)
    assert len(results) == 4
    for (ours, ours_matrix), (jd, jd_matrix) in results:
        assert ours in Recorder.made and jd in Recorder.made and ours is not jd
        assert jd_matrix is ours_matrix and ours_matrix.shape[1] == 16
    assert [jd.settings for (_, _), (jd, _) in results] == [{}, {"n_tasks": 2}, {}, {"n_tasks": 3}]
    assert [ours_matrix.shape[0] for (_, ours_matrix), _ in results] == [2, 2, 3, 3]


class WithoutGramianWeighting:
    """A TorchJD aggregator that does not expose its weighting alone."""

    def __init__(self, **settings):
        pass

    def __call__(self, matrix):
        return matrix.sum(dim=0)


def test_the_weighting_table_skips_what_either_side_lacks_and_passes_repeats_and_device(monkeypatch, capsys):
    """Rows only for methods both libraries have as a Gramian weighting; TorchJD-only ones (DualProj) are skipped."""
    monkeypatch.setattr(Recorder, "made", [])
    theirs = {"aligned_mtl": WithoutGramianWeighting, "mgda": Recorder, "nash_mtl": Recorder,
              "dualproj (TorchJD only)": FakeAggregator}
    quiet_tables(monkeypatch, theirs)
    timed_with = []
    monkeypatch.setattr(speed, "median_seconds", lambda ours, jd, repeats, device:
                        timed_with.append((repeats, device)) or [0.003, 0.002])
    speed.weighting_table([4], 16, repeats=6, device=CPU)
    assert [row[1] for row in rows(capsys.readouterr().out, 5)] == ["mgda", "nash_mtl"]
    assert [made.settings for made in Recorder.made] == [{}, {"n_tasks": 4}]
    assert timed_with == [(6, CPU)] * 2


def test_the_nash_table_times_our_newton_solve_against_cvxpy_on_the_same_gramian(monkeypatch, capsys):
    """Per K: the Gramian of a K x 4K draw (as the docs say), our solve of (Mα)_k = 1/α_k (power 1) and
    cvxpy's on that same Gramian, both residuals, and the ratio cvxpy / ours."""
    quiet_tables(monkeypatch)
    draws = recorded_draws(monkeypatch)
    real_solve, solved, cvxpy_given = speed.solve_power_system, [], []
    monkeypatch.setattr(speed, "solve_power_system", lambda gramian, power:
                        solved.append((gramian, power)) or real_solve(gramian, power))
    monkeypatch.setattr(speed, "nash_cvxpy", lambda gramian: cvxpy_given.append(gramian) or 3e-5)
    results, timed_with = [], []

    def median_seconds(*contenders, repeats, device):
        results.append([contender() for contender in contenders])
        timed_with.append((repeats, device))
        return [0.002, 0.04]
    monkeypatch.setattr(speed, "median_seconds", median_seconds)
    speed.nash_table([2, 5], repeats=3, device=CPU)
    table = rows(capsys.readouterr().out, 6)
    assert [row[0] for row in table] == ["| 2", "| 5"]
    assert all(row[1] == "2.00 ms" and row[3:] == ["40.00 ms", "3.0e-05", "20.0 |"] for row in table)
    assert all(float(row[2]) < 1e-9 for row in table)  # our residual, at float64's precision
    assert [tuple(draw.shape) for draw in draws] == [(2, 8), (5, 20)]
    assert len(solved) == len(cvxpy_given) == 4 and {power for _, power in solved} == {1.0}
    for index, draw in enumerate(draws):  # ours timed, ours for the residual; cvxpy likewise
        gramians = [solved[2 * index][0], solved[2 * index + 1][0], cvxpy_given[2 * index], cvxpy_given[2 * index + 1]]
        assert all(torch.equal(gramian, draw @ draw.T) for gramian in gramians)
    assert all(ours.exact and theirs == 3e-5 for ours, theirs in results)
    assert timed_with == [(3, CPU)] * 2


def test_the_full_step_feeds_both_libraries_the_k_squared_error_losses_of_one_batch(monkeypatch, capsys):
    """The docs' workload: a shared two-layer (tanh) trunk, K linear heads, a batch of 64, each task's loss the
    squared error of its head on its own target column; gradient_step and TorchJD's step get the same losses and
    parameters, the summed-loss baseline really runs backward, and the TorchJD columns compare with ours."""
    hidden, k = 8, 3
    monkeypatch.setattr(Recorder, "made", [])
    quiet_tables(monkeypatch, {"mgda": Recorder, "nash_mtl": Recorder})
    draws = recorded_draws(monkeypatch)
    ours_steps, jd_steps, timed_with = [], [], []
    monkeypatch.setattr(speed, "gradient_step", lambda method, losses, shared_params, task_params:
                        ours_steps.append((method, losses, shared_params, task_params)))
    monkeypatch.setattr(speed, "torchjd_step", lambda aggregator, losses, features, shared_params:
                        jd_steps.append((aggregator, losses, features, shared_params)))

    def median_seconds(*contenders, repeats, device):
        timed_with.append((repeats, device))
        for contender in contenders:
            contender()
        return [0.001, 0.003, 0.002][:len(contenders)]
    monkeypatch.setattr(speed, "median_seconds", median_seconds)
    speed.full_step_table([k], hidden, ["mgda", "pcgrad", "nash_mtl"], repeats=4, device=CPU)
    table = {row[2]: row[3:] for row in rows(capsys.readouterr().out, 8)}
    assert table == {"mgda": ["3.00 ms", "2.00 ms", "1.50", "1.00 ms", "3.0 |"],
                     "pcgrad": ["3.00 ms", "n/a", "n/a", "1.00 ms", "3.0 |"],
                     "nash_mtl": ["3.00 ms", "2.00 ms", "1.50", "1.00 ms", "3.0 |"]}
    assert timed_with == [(4, CPU)] * 3
    assert [type(method).__name__ for method, *_ in ours_steps] == ["MGDA", "PCGrad", "NashMTL"]
    assert [aggregator.settings for aggregator, *_ in jd_steps] == [{}, {"n_tasks": k}]
    assert all(aggregator in Recorder.made for aggregator, *_ in jd_steps)
    inputs, targets = draws
    w1, b1, w2, b2 = shared_params = ours_steps[0][2]
    head_params = ours_steps[0][3]
    assert inputs.shape == (64, hidden) and len(head_params) == 2 * k
    features = torch.tanh(torch.tanh(inputs @ w1.T + b1) @ w2.T + b2)
    expected = [((features @ head_params[2 * i].T + head_params[2 * i + 1]).squeeze(-1) - targets[:, i]).pow(2).mean()
                for i in range(k)]
    for _, losses, shared, heads in ours_steps:
        assert shared is shared_params and heads is head_params
        assert len(losses) == k and all(torch.allclose(loss, want) for loss, want in zip(losses, expected))
    for _, losses, jd_features, shared in jd_steps:
        assert shared is shared_params and torch.allclose(jd_features, features)
        assert all(torch.allclose(loss, want) for loss, want in zip(losses, expected))
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in shared_params + head_params)


@pytest.mark.parametrize("cuda, device", [(False, "cpu"), (True, "cuda")])
def test_main_runs_every_table_on_cuda_when_available_and_else_on_the_cpu(cuda, device, monkeypatch, capsys):
    monkeypatch.setattr(speed.torch.cuda, "is_available", lambda: cuda)
    called = run_main(monkeypatch)
    assert [args[-1] for _, args in called] == [torch.device(device)] * 4
    assert capsys.readouterr().out.startswith(f"device={device} ")


def test_main_parses_the_large_repeat_count_as_a_number(monkeypatch):
    called = run_main(monkeypatch, "--large-repeats", "3", "--tables", "aggregation")
    assert called[0][1][3] == 3


def test_main_runs_the_nash_table_when_asked_and_rejects_an_unknown_table(monkeypatch, capsys):
    called = run_main(monkeypatch, "--tables", "nash", "weighting")
    assert [table for table, _ in called] == ["weighting_table", "nash_table"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, "--tables", "nsah")
    assert exit_info.value.code == 2 and "invalid choice: 'nsah'" in capsys.readouterr().err


def fake_torchjd(monkeypatch, **aggregators):
    """A stand-in ``torchjd`` in sys.modules: its ``aggregation`` holds ``aggregators``, ``autojac`` records calls."""
    package, aggregation, autojac = (ModuleType(name) for name in ("torchjd", "torchjd.aggregation", "torchjd.autojac"))
    for name, value in aggregators.items():
        setattr(aggregation, name, value)
    autojac.calls = []
    autojac.mtl_backward = lambda losses, **kw: autojac.calls.append(("mtl_backward", losses, kw))
    autojac.jac_to_grad = lambda params, aggregator: autojac.calls.append(("jac_to_grad", params, aggregator))
    package.aggregation, package.autojac = aggregation, autojac
    for module in (package, aggregation, autojac):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return autojac


def test_torchjd_aggregators_pairs_our_names_with_theirs_and_adds_dualproj(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd", None)  # not installed: nothing to compare with
    assert speed.torchjd_aggregators() == {}
    kinds = {name: type(name, (), {}) for name in ("Sum", "MGDA", "UPGrad", "DualProj", "Krum")}
    fake_torchjd(monkeypatch, **kinds)
    assert speed.torchjd_aggregators() == {"ew_grad": kinds["Sum"], "mgda": kinds["MGDA"],
                                           "upgrad": kinds["UPGrad"], "dualproj (TorchJD only)": kinds["DualProj"]}


def test_torchjds_step_takes_the_jacobian_of_the_losses_then_aggregates_it_into_the_gradients(monkeypatch):
    autojac = fake_torchjd(monkeypatch)
    losses, features, params, aggregator = [torch.tensor(1.0)], torch.ones(2), [torch.zeros(3)], object()
    speed.torchjd_step(aggregator, losses, features, params)
    assert autojac.calls == [("mtl_backward", losses, {"features": features, "shared_params": params}),
                             ("jac_to_grad", params, aggregator)]
