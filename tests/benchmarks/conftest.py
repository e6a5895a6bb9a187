"""benchmarks/ is a folder of scripts, not a package: tests load a script as a module."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def mmoe_script():
    spec = importlib.util.spec_from_file_location("mmoe_correlation", BENCHMARKS / "mmoe_correlation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
