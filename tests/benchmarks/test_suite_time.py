"""benchmarks/suite_time.py on a tiny suite: both modes run, their counts are read, a failure stops it."""

import pytest

from .conftest import load_script

PASSING = """
import pytest

def test_one():
    assert 1 + 1 == 2

def test_two():
    assert "a".upper() == "A"

@pytest.mark.skip(reason="counted as skipped")
def test_three():
    pass
"""


@pytest.fixture(scope="module")
def suite_time():
    return load_script("suite_time")


def test_both_modes_run_the_same_tests_and_the_table_reports_them(suite_time, tmp_path, capsys):
    (tmp_path / "test_tiny.py").write_text(PASSING)
    suite_time.main([str(tmp_path), "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| one")]
    assert len(rows) == 2
    assert all(row.endswith("| 2 passed, 1 skipped |") for row in rows), rows
    assert "speed-up (median one process / median -n auto):" in out


def test_a_failing_suite_stops_the_benchmark_with_the_command(suite_time, tmp_path):
    (tmp_path / "test_tiny.py").write_text("def test_fails():\n    assert 1 == 2\n")
    with pytest.raises(SystemExit) as stop:
        suite_time.main([str(tmp_path)])
    assert "-n 0" in str(stop.value) and "failed (exit 1)" in str(stop.value)
    assert "assert 1 == 2" in str(stop.value)  # with pytest's report of the failure


def test_repeats_below_one_are_refused(suite_time):
    with pytest.raises(SystemExit):
        suite_time.main(["--repeats", "0"])


def scripted_suite(suite_time, monkeypatch, walls: dict[str, list[float]], summaries: dict[str, str]) -> list[str]:
    """run_suite replaced: each mode's walls in turn and a fixed summary; returns the -n values called."""
    calls = []

    def run_suite(paths, mode_args):
        calls.append(mode_args[1])
        return walls[mode_args[1]][calls.count(mode_args[1]) - 1], summaries[mode_args[1]]
    monkeypatch.setattr(suite_time, "run_suite", run_suite)
    return calls


def test_modes_alternate_and_the_speed_up_is_the_ratio_of_medians(suite_time, monkeypatch, capsys):
    walls = {"0": [10.0, 30.0, 14.0], "auto": [4.0, 8.0, 7.0]}
    calls = scripted_suite(suite_time, monkeypatch, walls, {"0": "3 passed", "auto": "3 passed"})
    suite_time.main(["--repeats", "3"])
    assert calls == ["0", "auto"] * 3
    out = capsys.readouterr().out
    assert "| one process (-n 0) | 10.0, 30.0, 14.0 | 14.0 | 3 passed |" in out
    assert "| one worker per core (-n auto) | 4.0, 8.0, 7.0 | 7.0 | 3 passed |" in out
    assert "speed-up (median one process / median -n auto): 2.00x" in out


def test_modes_that_ran_different_tests_void_the_comparison(suite_time, monkeypatch, capsys):
    scripted_suite(suite_time, monkeypatch, {"0": [1.0], "auto": [1.0]}, {"0": "3 passed", "auto": "2 passed"})
    with pytest.raises(SystemExit, match="the two modes ran different tests"):
        suite_time.main([])
    assert "speed-up" not in capsys.readouterr().out
