"""The website-build benchmark: what each run measures, which catalogue MkDocs builds, and the table."""

import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import failing_child, load_script

site_build = load_script("site_build")


def test_generation_loads_checks_and_renders_the_catalogue_asked_in_a_fresh_process(tmp_path):
    catalog = site_build.synthetic_catalogue(tmp_path / "syn", 20)
    figures = site_build.generate(catalog)
    assert set(figures) == {"total", "total_cpu", "render", "render_cpu", "pages_mb", "papers"}
    assert figures["papers"] == 20 and 0 < figures["render"] < figures["total"] and figures["pages_mb"] > 0
    papers = catalog / "papers.yaml"
    papers.write_text(papers.read_text(encoding="utf-8").replace("venue: ", "venue: nowhere-", 1), encoding="utf-8")
    with pytest.raises(SystemExit, match="paper-0"):
        site_build.generate(catalog)


def fake_mkdocs(monkeypatch, returncode=0):
    """subprocess.run replaced: records the call, writes 1.5 MB of pages into the -d folder."""
    calls = []

    def run(command, capture_output, text, cwd, env):
        calls.append(SimpleNamespace(command=command, cwd=cwd, env=env))
        site = Path(command[command.index("-d") + 1])
        (site / "papers").mkdir(parents=True)
        (site / "index.html").write_bytes(b"x" * 1_000_000)
        (site / "papers" / "index.html").write_bytes(b"x" * 500_000)
        return subprocess.CompletedProcess(command, returncode, "", "ERROR - a broken link\n")
    monkeypatch.setattr(site_build.subprocess, "run", run)
    return calls


def test_the_build_is_a_strict_mkdocs_build_of_the_catalogue_asked(monkeypatch, tmp_path):
    calls = fake_mkdocs(monkeypatch)
    figures = site_build.build(tmp_path / "catalog", tmp_path / "site")
    call, = calls
    assert call.command == [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]
    assert call.cwd == site_build.ROOT
    assert call.env["SITE_GEN_CATALOG"] == str(tmp_path / "catalog") and call.env["NO_MKDOCS_2_WARNING"] == "1"
    assert figures["site_mb"] == 1.5 and figures["build"] > 0 and set(figures) == {"build", "build_cpu", "site_mb"}


def test_a_failing_build_stops_the_benchmark_with_mkdocs_message(monkeypatch, tmp_path):
    fake_mkdocs(monkeypatch, returncode=1)
    with pytest.raises(SystemExit, match="a broken link"):
        site_build.build(tmp_path / "catalog", tmp_path / "site")


def test_measure_takes_the_median_of_each_figure_over_the_repeats(monkeypatch, tmp_path):
    generations = iter([{"total": t, "papers": 7} for t in (3.0, 1.0, 2.0)])
    builds = iter([{"build": b} for b in (10.0, 30.0, 20.0)])
    sites = []
    monkeypatch.setattr(site_build, "generate", lambda catalog: next(generations))
    monkeypatch.setattr(site_build, "build", lambda catalog, site: sites.append(site) or next(builds))
    row = site_build.measure("label", tmp_path / "catalog", 3, tmp_path)
    assert row == {"label": "label", "total": 2.0, "papers": 7, "build": 20.0}
    assert sites == [tmp_path / "site-label"] * 3


ROW = {"label": "synthetic 10,000", "papers": 10000.0, "total": 1.5, "total_cpu": 1.25, "render": 0.9,
       "render_cpu": 0.5, "build": 30.0, "build_cpu": 25.0, "site_mb": 42.0}


def test_the_table_gives_generation_as_a_share_of_the_build():
    lines = site_build.table([ROW], 3).splitlines()
    assert lines[2] == ("| synthetic 10,000 | 10000 | 1.50 s (1.25 s CPU) | 0.90 s (0.50 s CPU) "
                        "| 30.00 s (25.00 s CPU) | 5 % (5 % CPU) | 3 % (2 % CPU) | 42.0 MB |")
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 9
    assert lines[-1] == "Medians of 3 runs, each in a fresh process; wall time with CPU time in brackets."


def test_main_measures_the_real_catalogue_first_then_each_synthetic_size(monkeypatch, capsys):
    measured = []
    monkeypatch.setattr(site_build, "synthetic_catalogue", lambda folder, n: folder)
    monkeypatch.setattr(site_build, "measure", lambda label, catalog, repeats, tmp: measured.append(
        (label, catalog.name if label != "real (catalog/)" else catalog, repeats)) or {**ROW, "label": label})
    monkeypatch.setattr(sys, "argv", ["site_build.py", "--sizes", "500", "2000", "--repeats", "2"])
    site_build.main()
    assert measured == [("real (catalog/)", site_build.ROOT / "catalog", 2), ("synthetic 500", "syn-500", 2),
                        ("synthetic 2,000", "syn-2000", 2)]
    out, err = capsys.readouterr()
    assert [line.split(" | ")[0] for line in out.splitlines()[2:5]] == [
        "| real (catalog/)", "| synthetic 500", "| synthetic 2,000"]
    assert out.endswith("Medians of 2 runs, each in a fresh process; wall time with CPU time in brackets.\n")
    assert err.count("measured ") == 3
    measured.clear()
    monkeypatch.setattr(sys, "argv", ["site_build.py"])
    site_build.main()
    assert [(label, repeats) for label, _, repeats in measured] == [("real (catalog/)", 3), ("synthetic 10,000", 3)]


def test_the_build_figures_are_the_wall_and_children_cpu_time_across_the_mkdocs_run(monkeypatch, tmp_path):
    """Wall time is the clock's difference across the run; CPU time is the children's user plus system time
    spent in it (the readings before the run are subtracted, not added)."""
    fake_mkdocs(monkeypatch)
    clock = iter([100.0, 130.5])
    monkeypatch.setattr(site_build, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    usage = {resource.RUSAGE_CHILDREN: iter([SimpleNamespace(ru_utime=2.0, ru_stime=1.0),
                                             SimpleNamespace(ru_utime=20.0, ru_stime=6.5)])}
    monkeypatch.setattr(site_build, "resource", SimpleNamespace(RUSAGE_CHILDREN=resource.RUSAGE_CHILDREN,
                                                                getrusage=lambda who: next(usage[who])))
    figures = site_build.build(tmp_path / "catalog", tmp_path / "site")
    assert figures == {"build": 30.5, "build_cpu": 23.5, "site_mb": 1.5}


STAND_IN_MKDOCS = r"""
import sys
from pathlib import Path
Path(sys.argv[1]).mkdir(parents=True)
sys.stderr.write("INFO    -  Building documentation to directory: site\nWARNING -  a broken link in papers/index.md\n")
sys.exit(1)
"""


def test_a_failing_build_stops_with_the_end_of_mkdocs_log_as_text(monkeypatch, tmp_path):
    """mkdocs' output is captured, and a failed build ends the benchmark with its last lines as text (a real
    child stands in for mkdocs, so capturing and decoding are subprocess.run's own)."""
    real_run = subprocess.run

    def stand_in(command, **options):
        return real_run([sys.executable, "-c", STAND_IN_MKDOCS, command[command.index("-d") + 1]], **options)
    monkeypatch.setattr(site_build.subprocess, "run", stand_in)
    with pytest.raises(SystemExit) as stop:
        site_build.build(tmp_path / "catalog", tmp_path / "site")
    assert stop.value.code.splitlines()[-1] == "WARNING -  a broken link in papers/index.md"


def test_generation_runs_in_the_repository_root_and_reports_a_failure_as_text(monkeypatch, tmp_path):
    """The child starts in the repository root, so `python -c` imports this checkout's site_gen (the docs time a
    git worktree against the main checkout with one venv); a catalogue that fails the checks ends the benchmark
    with the child's error as text, not as bytes."""
    folders, last = failing_child(monkeypatch, site_build, lambda: site_build.generate(tmp_path / "no-catalogue"))
    assert folders == [site_build.ROOT]
    assert last.startswith("AssertionError") and "no-catalogue/papers.yaml" in last and "file not found" in last


def test_measure_times_the_catalogue_it_is_given_and_works_with_a_single_repeat(monkeypatch, tmp_path):
    """Both the generation and the build get the measured catalogue; one repeat gives that run's figures."""
    calls = []
    monkeypatch.setattr(site_build, "generate",
                        lambda catalog: calls.append(("generate", catalog)) or {"total": 1.5, "papers": 7})
    monkeypatch.setattr(site_build, "build",
                        lambda catalog, site: calls.append(("build", catalog)) or {"build": 9.0})
    row = site_build.measure("one", tmp_path / "catalog", 1, tmp_path)
    assert row == {"label": "one", "total": 1.5, "papers": 7, "build": 9.0}
    assert calls == [("generate", tmp_path / "catalog"), ("build", tmp_path / "catalog")]


def test_the_table_heads_the_columns_the_docs_show_and_rounds_each_share_to_a_whole_percent():
    """The header row names the eight columns of docs/benchmarks-site.md, numbers are right-aligned, and each
    share is 100 x part / build (27 of 30 s is 90 %, not 91 %)."""
    row = {**ROW, "total": 27.0, "total_cpu": 20.0, "render": 18.0, "render_cpu": 17.5, "build": 30.0,
           "build_cpu": 25.0}
    header, rule, line = site_build.table([row], 3).splitlines()[:3]
    assert [cell.strip() for cell in header.split("|")] == [
        "", "catalogue", "papers", "generation: hook total (load + check + render)", "of which rendering",
        "`mkdocs build --strict`", "hook / build", "rendering / build", "site size", ""]
    assert rule == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert line.split(" | ")[5:7] == ["90 % (80 % CPU)", "60 % (70 % CPU)"]


def test_main_makes_each_size_in_one_temporary_folder_and_reports_each_row_as_it_is_measured(monkeypatch, capsys):
    """Each synthetic catalogue has the size asked and lies in the temporary folder that measure() builds the
    sites in; each progress line on stderr shows the row just measured."""
    made, folders = [], []
    monkeypatch.setattr(site_build, "synthetic_catalogue",
                        lambda folder, n: made.append((folder.parent, folder.name, n)) or folder)

    def measure(label, catalog, repeats, tmp):
        assert tmp.is_dir()
        folders.append(tmp)
        return {**ROW, "label": label}
    monkeypatch.setattr(site_build, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["site_build.py", "--sizes", "500", "2000", "--repeats", "1"])
    site_build.main()
    tmp, = set(folders)
    assert made == [(tmp, "syn-500", 500), (tmp, "syn-2000", 2000)] and len(folders) == 3
    progress = capsys.readouterr().err.splitlines()
    assert len(progress) == 3
    for line, label in zip(progress, ["real (catalog/)", "synthetic 500", "synthetic 2,000"]):
        assert f"'label': '{label}'" in line, line
