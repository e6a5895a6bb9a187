"""benchmarks/ is a folder of scripts, not a package: tests load a script as a module."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# As the scripts' main() and tests/reference_impls/conftest.py do: the models here are tiny, and
# intra-op threads only add hand-off costs (many times over on a loaded 2-core machine).
torch.set_num_threads(1)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# mmoe_correlation's run settings at toy size: Runs and checkpoints read only these
TINY = dict(dim=12, bias=True, device="cpu", sines="fixed", num_sines=10, n_train=0, n_eval=64,
            noise_std=0.1, batch_size=16, steps=7, eval_every=3)


def load_script(name: str):
    """The script ``benchmarks/<name>.py`` as the module ``benchmarks.<name>``: the name its path
    gives, which is the one mutmut looks for when it runs these tests against a mutated script."""
    qualified = f"benchmarks.{name}"
    spec = importlib.util.spec_from_file_location(qualified, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def drawn(mmoe_script, monkeypatch, draw, *arguments):
    """The matplotlib figure that ``draw`` hands to write_figure, kept instead of written."""
    figures = []
    monkeypatch.setattr(mmoe_script, "write_figure", lambda fig, figure: figures.append(fig))
    draw(*arguments)
    return figures[0]


def failing_child(monkeypatch, script, launch):
    """Run ``launch()``, a step of ``script`` whose Python child process fails, with the script's
    subprocess.run recording the folder each child starts in; returns (those folders, the last
    line of the message the step stops with, which must be text)."""
    real_run, folders = subprocess.run, []
    monkeypatch.setattr(script.subprocess, "run",
                        lambda command, **options: folders.append(options.get("cwd")) or real_run(command, **options))
    with pytest.raises(SystemExit) as stop:
        launch()
    return folders, stop.value.code.splitlines()[-1]


@pytest.fixture(scope="module")
def mmoe_script():
    return load_script("mmoe_correlation")


@pytest.fixture(scope="module")
def harness_script():
    return load_script("harness_methods")
