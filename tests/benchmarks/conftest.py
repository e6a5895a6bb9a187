"""benchmarks/ is a folder of scripts, not a package: tests load a script as a module."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mmoe_script():
    return load_script("mmoe_correlation")


@pytest.fixture(scope="module")
def harness_script():
    return load_script("harness_methods")
