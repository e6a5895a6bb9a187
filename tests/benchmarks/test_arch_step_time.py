"""The per-architecture step timer: what it times, on which clock, and what a refusal prints."""

import itertools
import sys
import time

import pytest
import torch

from .conftest import load_script


@pytest.fixture(scope="module")
def step_script():
    return load_script("arch_step_time")


def test_cpu_steps_are_timed_in_process_cpu_time(step_script):
    assert step_script.clock(torch.device("cpu")) is time.process_time


def test_a_gpu_clock_waits_for_the_queued_kernels_before_each_reading(step_script, monkeypatch):
    """Without synchronising, a step would time only the launching of its kernels."""
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: synchronised.append(time.perf_counter()))
    now = step_script.clock(torch.device("cuda"))
    first, second = now(), now()
    assert len(synchronised) == 2 and synchronised[0] <= first <= synchronised[1] <= second


def test_a_step_returns_its_seconds_and_a_refusal_gives_its_reason(step_script):
    problem, batch = step_script.PROBLEMS["vector (64 x 100)"]
    step, reason = step_script.build("shared_bottom", problem, batch, torch.device("cpu"))
    assert reason is None and step() > 0
    step, reason = step_script.build("afa", problem, batch, torch.device("cpu"))
    assert step is None and reason.startswith("n/a (ValueError: AFA")


class OneWeight(torch.nn.Module):
    """Every task's output is the weight w (start -1); records the input shapes it is given."""

    def __init__(self, tasks):
        super().__init__()
        self.tasks, self.weight, self.input_shapes = tasks, torch.nn.Parameter(torch.tensor(-1.0)), []

    def forward(self, x):
        self.input_shapes.append(tuple(x.shape))
        return {t: self.weight.expand(2) for t in self.tasks}


def test_a_step_is_one_adam_step_at_lr_1e3_on_the_squared_outputs_of_a_full_batch(step_script):
    """Adam's first step moves w by lr against the gradient's sign: d(w^2)/dw < 0 at w = -1, so w rises."""
    problem, batch = step_script.PROBLEMS["vector (64 x 100)"]
    model = OneWeight(problem.tasks)
    step = step_script.step_for(model, problem, batch, torch.device("cpu"))
    step()
    assert model.input_shapes == [(64, 100)]
    assert float(model.weight.detach()) == pytest.approx(-1 + 1e-3, abs=1e-7)


def test_a_step_returns_the_seconds_between_its_two_clock_readings(step_script, monkeypatch):
    readings = iter([10.0, 10.25])
    monkeypatch.setattr(step_script, "clock", lambda device: lambda: next(readings))
    problem, batch = step_script.PROBLEMS["vector (64 x 100)"]
    assert step_script.step_for(OneWeight(problem.tasks), problem, batch, torch.device("cpu"))() == 0.25


def test_a_refusal_prints_the_first_60_characters_of_the_first_line_of_the_error(step_script, monkeypatch):
    """The table's n/a cells (docs/benchmarks-architectures.md) stay one short line."""
    def refuse(name, problem):
        raise ValueError("x" * 59 + "yz" + "\nsecond line")
    monkeypatch.setattr(step_script.registry, "build", refuse)
    problem, batch = step_script.PROBLEMS["vector (64 x 100)"]
    assert step_script.build("any", problem, batch, torch.device("cpu")) == (None, f"n/a (ValueError: {'x' * 59}y)")


# --- main: rounds over every model, medians after warm-up, the printed table ---

def fake_cells(monkeypatch, script, names, refused, rounds=None):
    """Replace build: a cell's first two steps take 9 s, the next ones 0.3, 0.1, 0.2, 0.3, ... s times
    its cell number (``rounds`` steps in all, if given); ``refused`` cells give a reason. Returns the
    log of steps in the order they ran."""
    ran = []
    cells = [(name, p) for name in names for p in script.PROBLEMS]

    def build(name, problem, batch, device):
        label = next(p for p, (q, _) in script.PROBLEMS.items() if q is problem)
        if (name, label) in refused:
            return None, refused[name, label]
        number = cells.index((name, label)) + 1
        timed = itertools.cycle([number * k / 10 for k in (3, 1, 2)])
        durations = itertools.chain([9.0, 9.0], itertools.islice(timed, rounds - 2) if rounds else timed)
        return (lambda: ran.append((name, label)) or next(durations)), None

    monkeypatch.setattr(script.registry, "available", lambda: list(names))
    monkeypatch.setattr(script, "build", build)
    return ran


def test_main_times_every_model_in_rounds_and_prints_medians_after_the_warm_up(step_script, monkeypatch, capsys):
    vector, dense = step_script.PROBLEMS
    ran = fake_cells(monkeypatch, step_script, ["shared_bottom", "mmoe"], {("mmoe", dense): "n/a (no images)"})
    threads = []
    monkeypatch.setattr(step_script.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sys, "argv", ["arch_step_time.py", "--steps", "3", "--warmup", "2", "--threads", "2"])
    step_script.main()
    one_round = [("shared_bottom", vector), ("shared_bottom", dense), ("mmoe", vector)]
    assert ran == one_round * 5 and threads == [2]
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"| architecture | class | {vector} ms/step | {dense} ms/step |", "|---|---|---|---|"]
    # medians of (0.3, 0.1, 0.2) s times the cell number, in ms; the 9 s warm-ups are left out
    assert lines[2] == "| shared_bottom | reference_impls/architectures/shared_bottom.py:SharedBottom | 200.0 | 400.0 |"
    assert lines[3] == "| mmoe | reference_impls/architectures/mmoe.py:MMoE | 600.0 | n/a (no images) |"
    assert lines[4:] == ["", f"torch {torch.__version__}, 2 thread(s), median of 3 steps after 2 warm-up, "
                             "in rounds over all models, process CPU time"]


def test_main_defaults_to_ten_steps_after_two_warm_ups_on_one_cpu_thread(step_script, monkeypatch, capsys):
    ran = fake_cells(monkeypatch, step_script, ["shared_bottom"], {})
    threads, calls = [], []
    monkeypatch.setattr(step_script.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sys, "argv", ["arch_step_time.py"])
    original = step_script.build
    monkeypatch.setattr(step_script, "build",
                        lambda n, p, b, device: calls.append((b, device)) or original(n, p, b, device))
    step_script.main()
    assert len(ran) == 2 * (2 + 10) and threads == [1]
    assert calls == [(64, torch.device("cpu")), (8, torch.device("cpu"))]  # each problem's batch
    assert capsys.readouterr().out.endswith("1 thread(s), median of 10 steps after 2 warm-up, "
                                            "in rounds over all models, process CPU time\n")


def test_main_can_time_from_the_first_step_but_not_from_a_negative_one(step_script, monkeypatch, capsys):
    ran = fake_cells(monkeypatch, step_script, ["shared_bottom"], {}, rounds=5)
    monkeypatch.setattr(sys, "argv", ["arch_step_time.py", "--warmup", "0", "--steps", "5"])
    step_script.main()
    assert len(ran) == 2 * 5
    # no warm-up left out: the median of (9, 9, 0.3, 0.1, 0.2) s and of twice these
    assert "| 300.0 | 600.0 |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["arch_step_time.py", "--warmup", "-1"])
    with pytest.raises(SystemExit):
        step_script.main()
    assert "--warmup: must be >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("device, said", [("cuda", "wall time between synchronisations of cuda (Fake H200)"),
                                          ("mps", "wall time between synchronisations of mps")])
def test_main_says_which_clock_a_gpu_run_read_and_names_a_cuda_card(step_script, monkeypatch, capsys, device, said):
    fake_cells(monkeypatch, step_script, ["shared_bottom"], {})
    monkeypatch.setattr(step_script, "available_device", torch.device)  # no accelerator needed: steps are faked
    monkeypatch.setattr(step_script.torch.cuda, "get_device_name", lambda d: "Fake H200" if d.type == "cuda" else "")
    monkeypatch.setattr(sys, "argv", ["arch_step_time.py", "--steps", "3", "--device", device])
    step_script.main()
    assert capsys.readouterr().out.endswith(f"in rounds over all models, {said}\n")
