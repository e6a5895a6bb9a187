"""The toy benchmark's method list: decided for every registered method, and each one runs.

A method added to the registry used to join the full run silently; two of them (continuous
Pareto, FS-MTL) then crashed it at the end of a 12-minute run, losing every table."""

import itertools
import math
import re
import sys
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reference_impls.toy import lockstep, two_objective
from reference_impls.weighting import registry
from reference_impls.weighting.db_mtl import DBMTL

from .conftest import load_script

toy = load_script("toy_trajectories")


def test_every_registered_method_is_runnable_or_skipped_with_a_reason():
    runnable = set(toy.method_names())
    for name in registry.methods():
        assert (name in runnable) != (name in toy.SKIPPED), f"{name}: run and skipped, or neither"
    assert all(reason for reason in toy.SKIPPED.values())
    assert set(toy.MEASURED) <= runnable


@pytest.mark.parametrize("name", toy.method_names())
def test_each_runnable_method_takes_steps_on_the_toy(name):
    results = toy.run_group([name], "cagrad", 30, 1e-3, 0.1)
    assert len(results) == len(toy.SETTINGS["cagrad"].starts)
    assert all(r["diverged_at"] is None for r in results), name


def test_a_skipped_or_unknown_method_is_refused_before_any_run():
    with pytest.raises(SystemExit, match="fs_mtl: not run on the toy: needs each task's gradient"):
        toy.chosen_methods(["pcgrad", "fs_mtl"])
    with pytest.raises(SystemExit, match="nope: unknown"):
        toy.chosen_methods(["nope"])
    assert toy.chosen_methods(None) == list(toy.MEASURED)
    assert toy.chosen_methods(["all"]) == toy.method_names()


# --- how the script feeds each method, and what a run's result row holds ---

def test_loss_weightings_see_the_bound_famos_toy_script_uses():
    """L* = (-21 x first-loss scale, -21) in float64; FAMO with gamma 0, STCH's reference is L*."""
    bounds = toy.lower_bounds(toy.SETTINGS["nash_famo"])
    assert bounds.dtype == torch.float64 and bounds.tolist() == [-21.0 * 0.1, -21.0]
    famo = toy.build("famo", bounds)
    assert famo.gamma == 0.0 and famo.logit_optimizer == "sgd"
    assert torch.equal(famo.loss_lower_bounds, bounds.float())
    assert toy.build("famo_adam", bounds).logit_optimizer == "adam"
    assert torch.equal(toy.build("stch", bounds).reference, bounds)


def test_random_methods_draw_from_their_own_generator_seeded_with_0():
    """RLW's runs repeat bit for bit, whatever the global random state."""
    bounds, losses = toy.lower_bounds(toy.SETTINGS["cagrad"]), torch.tensor([1.0, 2.0], dtype=torch.float64)
    draws = []
    for _ in range(2):
        torch.manual_seed(len(draws))  # a different global state each time
        draws.append(toy.build("rlw", bounds).weights(losses))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], toy.build("rlw", bounds, seed=0).weights(losses))


def test_db_mtl_combines_the_gradients_of_log_of_the_shifted_losses():
    """d log(L_k - L_k*) = dL_k / (L_k - L_k*): DB-MTL gets each gradient row divided by its shifted loss."""
    bounds = toy.lower_bounds(toy.SETTINGS["cagrad"])
    values = torch.tensor([-3.0, 5.0], dtype=torch.float64)
    jacobian = torch.tensor([[1.0, 2.0], [-0.5, 4.0]], dtype=torch.float64)
    direction = toy.direction_for(toy.build("db_mtl", bounds), bounds)
    log_gradients = jacobian / torch.tensor([[-3.0 + 21.0], [5.0 + 21.0]], dtype=torch.float64)
    assert torch.allclose(direction(values, jacobian, 0), DBMTL()(log_gradients).update)


def test_famo_moves_its_logits_from_the_losses_after_the_first_step():
    """FAMO's script updates the logits with the losses after every step, the first one included."""
    bounds = toy.lower_bounds(toy.SETTINGS["nash_famo"])
    famo = toy.build("famo", bounds)
    direction = toy.direction_for(famo, bounds)
    jacobian = torch.eye(2, dtype=torch.float64)
    direction(torch.tensor([1.0, 1.0], dtype=torch.float64), jacobian, 0)
    assert torch.equal(famo.logits, torch.zeros(2))  # nothing observed yet
    direction(torch.tensor([0.5, 0.9], dtype=torch.float64), jacobian, 1)
    assert not torch.equal(famo.logits, torch.zeros(2))


def test_a_repeated_gradient_matrix_reuses_the_previous_answer():
    """The solver runs again only when the matrix changes, and then gets the losses and step it was given."""
    calls = []

    def direction(values, jacobian, step):
        calls.append((values, jacobian.clone(), step))
        return jacobian.sum(dim=0) * (step + 1)

    reused = toy.reuse_repeated(direction)
    values, first, second = torch.tensor([1.0, 2.0]), torch.eye(2), 2 * torch.eye(2)
    assert torch.equal(reused(values, first, 0), torch.tensor([1.0, 1.0]))
    assert torch.equal(reused(values + 1, first, 1), torch.tensor([1.0, 1.0]))  # the same matrix: step 0's answer
    assert torch.equal(reused(values, second, 2), torch.tensor([6.0, 6.0]))
    assert [(v.tolist(), j.tolist(), s) for v, j, s in calls] == [
        ([1.0, 2.0], first.tolist(), 0), ([1.0, 2.0], second.tolist(), 2)]


@pytest.mark.parametrize("distances, expected", [
    ([0.05, 0.01, 0.0, 0.02, 0.03, 0.04], 0),  # always within
    ([0.5, 0.05, 0.05, 0.05, 0.05, 0.05], 100),  # one record outside, the first
    ([0.5, 0.05, 0.5, 0.5, 0.05, 0.05], 400),  # the last time outside decides
    ([0.05, 0.05, 0.05, 0.05, 0.05, 0.5], None),  # outside at the end: never reached
    ([0.05, 0.05, 0.05, 0.05, 0.05, 0.1], None),  # exactly at the tolerance is not within it
])
def test_steps_to_front_is_the_first_record_from_which_the_run_stays_within(distances, expected):
    steps = torch.arange(6) * 100
    assert toy.steps_to_front(steps, torch.tensor(distances), 0.1) == expected


def fake_simulation(monkeypatch, points, diverged_at):
    """Replace lockstep.simulate by one returning ``points`` (T x R x 2, in the dtype asked); record its call."""
    seen = {}

    def simulate(directions, starts, steps, lr, first_scale, plain_sgd, record_every, dtype):
        seen.update(directions=directions, starts=starts, plain_sgd=plain_sgd, dtype=dtype)
        return lockstep.Trajectories(torch.arange(len(points)) * record_every, points.to(dtype), diverged_at)
    monkeypatch.setattr(toy.lockstep, "simulate", simulate)
    return seen


def test_a_result_row_reports_the_end_its_losses_distance_late_move_and_steps_to_front(monkeypatch):
    """Eleven records of one nash_famo run: the end is the last, 'late' the 10th (90% of the steps)."""
    starts = toy.SETTINGS["nash_famo"].starts
    path = torch.tensor([[-8.0 + k, 2.0 - k] for k in range(11)], dtype=torch.float64)  # ends at (2, -8)
    points = path[:, None, :].expand(11, len(starts), 2).clone()
    points[-1, 1] = math.nan  # the second start diverges
    fake_simulation(monkeypatch, points, [None, 950] + [None] * (len(starts) - 2))
    end_distance = float(two_objective.distances_to_pareto_set(torch.tensor([2.0, -8.0], dtype=torch.float64),
                                                               two_objective.pareto_set(1001)))
    tolerance = end_distance  # a distance equal to the tolerance is not within it
    results = toy.run_group(["ew_grad"], "nash_famo", 1000, 1e-3, tolerance)
    first, diverged = results[0], results[1]
    assert set(first) == {"name", "setting", "start", "end", "late_move", "losses", "distance", "reached",
                          "steps_to_front", "diverged_at", "path"}
    assert (first["name"], first["setting"], first["start"]) == ("ew_grad", "nash_famo", starts[0])
    assert first["end"] == [2.0, -8.0]
    assert first["losses"] == two_objective.losses(torch.tensor([2.0, -8.0], dtype=torch.float64), 0.1).tolist()
    assert first["distance"] == end_distance and first["reached"] is False and first["steps_to_front"] is None
    assert first["late_move"] == pytest.approx(math.sqrt(2))  # from (1, -7) to (2, -8)
    assert torch.equal(first["path"], path) and first["diverged_at"] is None
    assert diverged["distance"] == math.inf and diverged["late_move"] == math.inf
    assert diverged["reached"] is False and diverged["diverged_at"] == 950
    reached = toy.run_group(["ew_grad"], "nash_famo", 1000, 1e-3, 2 * end_distance)[0]
    assert reached["reached"] is True and reached["steps_to_front"] == 1000


@pytest.mark.parametrize("records, every", [(600, 1), (801, 2)])
def test_a_result_keeps_about_400_points_of_the_path_for_the_figure(monkeypatch, records, every):
    points = torch.randn(records, 3, 2, dtype=torch.float64)
    fake_simulation(monkeypatch, points, [None] * 3)
    result = toy.run_group(["ew_grad"], "cagrad", records * 100, 1e-3, 0.1)[0]
    assert torch.equal(result["path"], points[::every, 0])


def test_mtadam_alone_steps_with_plain_sgd_and_the_dtype_asked_reaches_the_simulation(monkeypatch):
    seen = fake_simulation(monkeypatch, torch.zeros(2, 6, 2), [None] * 6)
    results = toy.run_group(["mtadam", "ew_grad"], "cagrad", 100, 1e-3, 0.1, torch.float32)
    assert seen["plain_sgd"] == [True] * 3 + [False] * 3
    assert seen["dtype"] is torch.float32 and results[0]["path"].dtype == torch.float32


def test_only_the_deterministic_solvers_skip_repeated_gradient_matrices(monkeypatch):
    """Nash-MTL's, FairGrad's and CAGrad's answer is reused for an unchanged matrix; RLW draws afresh every step."""
    calls = []

    def counting_direction(method, bounds):
        return lambda values, jacobian, step: calls.append(type(method).__name__) or jacobian.sum(dim=0)
    monkeypatch.setattr(toy, "direction_for", counting_direction)
    seen = fake_simulation(monkeypatch, torch.zeros(2, 9, 2), [None] * 9)
    toy.run_group(["nash_mtl", "rlw", "cagrad"], "cagrad", 100, 1e-3, 0.1)
    values, jacobian = torch.ones(2), torch.eye(2)
    for direction in seen["directions"]:
        for step in range(3):
            direction(values, jacobian, step)
    assert sorted(set(calls)) == ["CAGrad", "NashMTL", "RLW"]
    assert {name: calls.count(name) for name in set(calls)} == {"NashMTL": 3, "CAGrad": 3, "RLW": 9}


def test_a_group_reports_its_progress_on_stderr_not_in_the_tables(monkeypatch, capsys):
    """stdout is the Markdown the docs quote; the 'done in' line goes to stderr."""
    fake_simulation(monkeypatch, torch.zeros(2, 6, 2), [None] * 6)
    clock = itertools.count(100.0, 3.0)  # 3 s between readings
    monkeypatch.setattr(toy.time, "perf_counter", lambda: next(clock))
    toy.run_group(["ew_grad", "mgda"], "cagrad", 100, 1e-3, 0.1)
    out, err = capsys.readouterr()
    assert out == "" and err == "  cagrad: ew_grad, mgda done in 3 s\n"


def test_an_unknown_method_is_refused_with_the_list_of_every_runnable_one():
    with pytest.raises(SystemExit) as refusal:
        toy.chosen_methods(["nope"])
    listed = str(refusal.value).split("the toy runs ")[1].removesuffix(" (or 'all')")
    assert sorted(listed.split(", ")) == sorted(toy.method_names())


# --- what the script prints and draws: the tables docs/toy-problem.md quotes, the figures ---

def result(name, setting, start, reached, end=(1.0, -2.0), diverged_at=None, steps_to_front=None):
    return {"name": name, "setting": setting, "start": start, "end": list(end), "late_move": 0.0125,
            "losses": [-3.14159, 2.5], "distance": 0.0421 if reached else 1.5, "reached": reached,
            "steps_to_front": steps_to_front, "diverged_at": diverged_at,
            "path": torch.tensor([list(start), [0.0, 0.0], list(end)], dtype=torch.float64)}


def test_a_table_row_shows_each_run_and_how_it_ended(capsys):
    setting = replace(toy.SETTINGS["cagrad"], steps=2500)
    toy.print_tables([result("mgda", "cagrad", (-8.5, 7.5), True, steps_to_front=12300),
                      result("mgda", "cagrad", (0.0, 0.0), False),
                      result("pcgrad", "cagrad", (9.0, 9.0), False, end=(math.nan, 0.0), diverged_at=40)], setting)
    assert capsys.readouterr().out.splitlines() == [
        "", "### cagrad: first loss x1, 2,500 steps", "",
        "| method | start | end point | losses at end | distance | moved in last 10% | steps to front |",
        "|---|---|---|---|---|---|---|",
        "| mgda | (-8.5, 7.5) | (1.00, -2.00) | -3.14, 2.50 | 0.042 | 0.013 | 12,300 |",
        "| mgda | (0.0, 0.0) | (1.00, -2.00) | -3.14, 2.50 | 1.500 | 0.013 | not reached |",
        "| pcgrad | (9.0, 9.0) | (nan, 0.00) | -3.14, 2.50 | 1.500 | 0.013 | diverged at step 40 |"]


def test_the_summary_counts_the_starts_that_reached_the_front_per_setting(capsys):
    settings = [toy.SETTINGS["cagrad"], toy.SETTINGS["nash_famo"]]
    toy.print_summary([result("mgda", "cagrad", (0, 0), True, end=(1.04, 0)),
                       result("mgda", "cagrad", (1, 1), False),
                       result("mgda", "cagrad", (2, 2), True, end=(-2.96, 0)),
                       result("mgda", "nash_famo", (0, 0), False),
                       result("ew", "nash_famo", (0, 0), True, end=(0.25, 0)),
                       result("ew", "cagrad", (0, 0), False)], settings)
    assert capsys.readouterr().out.splitlines() == [
        "", "| method | cagrad: reached | cagrad: x1 at the front | nash_famo: reached | nash_famo: x1 at the front |",
        "|---|---|---|---|---|",
        "| ew | 0/1 | - | 1/1 | 0.2 |",  # 0.25 rounds to even
        "| mgda | 2/3 | 1.0, -3.0 | 0/1 | - |"]


def test_the_figure_draws_one_panel_per_method_and_stars_each_end_by_outcome(monkeypatch, tmp_path):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda figure, path, dpi: saved.append((figure, path, dpi)))
    names = ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]  # seven methods: two rows of six panels
    results = [result(n, "nash_famo", (0.5, 1.5), reached=k % 2 == 0) for k, n in enumerate(reversed(names))]
    setting = toy.SETTINGS["nash_famo"]
    toy.plot(results, setting, tmp_path / "toy.png")
    (figure, path, dpi), = saved
    assert path == tmp_path / "toy.png" and dpi == 72
    axes = figure.axes
    assert len(axes) == 12 and [a.get_title() for a in axes[:7]] == names  # sorted by name
    assert all(not a.axison for a in axes[7:]) and all(a.axison for a in axes[:7])
    assert figure._suptitle.get_text() == ("nash_famo: first loss x0.1, 50,000 Adam steps (lr 1e-3); "
                                           "green star = within tolerance of the Pareto set")
    for axis, name in zip(axes, names):
        run = next(r for r in results if r["name"] == name)
        lines = axis.get_lines()
        front, trace, start, star = lines
        assert torch.equal(torch.as_tensor(trace.get_xydata(), dtype=torch.float64), run["path"])
        assert start.get_xydata().tolist() == [[0.5, 1.5]] and start.get_marker() == "o"
        assert star.get_xydata().tolist() == [run["end"]] and star.get_marker() == "*"
        assert star.get_color() == ("tab:green" if run["reached"] else "tab:red")
        assert torch.allclose(torch.as_tensor(front.get_xydata()), toy.toy.pareto_set(101), atol=1e-9)
        assert axis.get_xlim() == (-10, 10) and axis.get_ylim() == (-10, 10)



def test_each_panel_draws_the_mean_loss_of_the_setting_over_the_square_of_starts(monkeypatch, tmp_path):
    """Contours of (L1 + L2) / 2 with L1 scaled as in the setting, on a 200 x 200 grid of [-10, 10]^2."""
    import matplotlib.contour
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, path, dpi: saved.append(figure))
    grid = torch.linspace(-10, 10, 200, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1)
    for name in ("cagrad", "nash_famo"):
        setting = toy.SETTINGS[name]
        toy.plot([result("m0", name, (0.5, 1.5), True)], setting, tmp_path / "toy.png")
        axis = saved.pop().axes[0]
        contours, = (c for c in axis.collections if isinstance(c, matplotlib.contour.ContourSet))
        mean_loss = two_objective.losses(points, setting.first_scale).mean(dim=-1)
        assert (contours.zmin, contours.zmax) == (float(mean_loss.min()), float(mean_loss.max()))
        assert tuple(axis.dataLim.bounds) == (-10, -10, 20, 20)


# --- main: the jobs it hands the worker pool, and what it does with their results ---

class InlinePool:
    """ProcessPoolExecutor's interface, running each job at once in this process; records its size."""
    sizes: list[int] = []

    def __init__(self, workers):
        InlinePool.sizes.append(workers)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        return False

    def submit(self, function, *arguments):
        future = Future()
        future.set_result(function(*arguments))
        return future


def run_main(monkeypatch, tmp_path, *argv):
    """main() with an inline pool, a run_group that returns one result per start, plot and the
    tables recorded, and a clock that says 5 s; returns what was recorded."""
    seen = {"jobs": [], "plots": [], "tables": []}
    InlinePool.sizes = []

    def run_group(names, setting_name, steps, lr, tolerance, dtype):
        seen["jobs"].append((names, setting_name, steps, lr, tolerance, dtype))
        starts = toy.SETTINGS[setting_name].starts
        return [result(name, setting_name, start, True) for name in names for start in starts]
    clock = iter([1000.0, 1005.0])
    monkeypatch.setattr(toy, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(toy, "run_group", run_group)
    monkeypatch.setattr(toy, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(toy, "plot", lambda results, setting, path: seen["plots"].append((results, setting, path)))
    monkeypatch.setattr(toy, "print_summary", lambda results, settings: seen.update(summary=(results, settings)))
    monkeypatch.setattr(toy, "print_tables", lambda results, setting: seen["tables"].append((results, setting)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toy_trajectories.py", *argv])
    toy.main()
    return seen


def test_main_splits_the_methods_into_groups_per_setting_and_reports_each_setting_apart(monkeypatch, tmp_path, capsys):
    seen = run_main(monkeypatch, tmp_path, "--methods", "ew_grad", "mgda", "pcgrad", "--group-size", "2",
                    "--workers", "3", "--steps", "400", "--lr", "0.01", "--tolerance", "0.2", "--float32",
                    "--figure-dir", "new/figures")
    assert InlinePool.sizes == [3]
    assert seen["jobs"] == [(group, setting, 400, 0.01, 0.2, torch.float32) for setting in ("cagrad", "nash_famo")
                            for group in (["ew_grad", "mgda"], ["pcgrad"])]
    run_steps = 400 * 3 * (3 + 5)  # three methods from the settings' 3 and 5 starts
    assert capsys.readouterr().out == (f"lr=0.01 tolerance=0.2 workers=3 seconds=5 run-steps={run_steps:,} "
                                       f"run-steps/s={run_steps // 5:,}\n")
    results, settings = seen["summary"]
    assert [(r["name"], r["setting"]) for r in results] == [(name, setting) for setting, starts in (("cagrad", 3), (
        "nash_famo", 5)) for name in ("ew_grad", "mgda", "pcgrad") for _ in range(starts)]  # in job order
    assert settings == [replace(toy.SETTINGS[s], steps=400) for s in ("cagrad", "nash_famo")]
    assert [(setting, {r["setting"] for r in chosen}) for chosen, setting in seen["tables"]] == [
        (settings[0], {"cagrad"}), (settings[1], {"nash_famo"})]
    assert [(path, setting, chosen) for chosen, setting, path in seen["plots"]] == [
        (Path("new/figures/toy_trajectories.png"), settings[0], seen["tables"][0][0]),
        (Path("new/figures/toy_trajectories_nash_famo.png"), settings[1], seen["tables"][1][0])]
    assert (tmp_path / "new" / "figures").is_dir()


def test_main_by_default_runs_the_measured_methods_in_threes_at_the_settings_own_lengths(monkeypatch, tmp_path):
    seen = run_main(monkeypatch, tmp_path)
    groups = [list(toy.MEASURED[i: i + 3]) for i in range(0, 24, 3)]
    assert InlinePool.sizes == [2]
    assert seen["jobs"] == [(group, setting, steps, 1e-3, 0.1, torch.float64)
                            for setting, steps in (("cagrad", 100_000), ("nash_famo", 50_000)) for group in groups]
    assert [path for *_, path in seen["plots"]] == [Path("toy_trajectories.png"),
                                                    Path("toy_trajectories_nash_famo.png")]
    assert seen["summary"][1] == [toy.SETTINGS["cagrad"], toy.SETTINGS["nash_famo"]]


def test_main_refuses_an_unknown_setting_before_any_run(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(monkeypatch, tmp_path, "--settings", "cagrad", "nash")
    assert "--settings: invalid choice: 'nash'" in capsys.readouterr().err


def test_main_runs_one_setting_in_worker_processes_and_writes_its_figure(monkeypatch, tmp_path, capsys):
    """The real pool, simulation and figure: two methods from the five nash_famo starts, 300 steps."""
    monkeypatch.setattr(sys, "argv", ["toy_trajectories.py", "--settings", "nash_famo", "--methods", "ew_grad", "mgda",
                                      "--steps", "300", "--workers", "1", "--figure-dir", str(tmp_path)])
    toy.main()
    out = capsys.readouterr().out
    assert out.startswith("lr=0.001 tolerance=0.1 workers=1 seconds=") and "run-steps=3,000 " in out
    summary = re.findall(r"^\| (\w+) \| (\d)/5 \| ", out, re.M)
    assert [name for name, _ in summary] == ["ew_grad", "mgda"]
    rows = re.findall(r"^\| (ew_grad|mgda) \| \(", out, re.M)
    assert rows == ["ew_grad"] * 5 + ["mgda"] * 5 and "### nash_famo: first loss x0.1, 300 steps" in out
    assert (tmp_path / "toy_trajectories_nash_famo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "toy_trajectories.png").exists()
