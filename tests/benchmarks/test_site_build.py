"""The website-build benchmark: what each run measures, which catalogue MkDocs builds, and the table."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import load_script

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
