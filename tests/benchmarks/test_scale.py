"""The catalogue-size benchmark: its synthetic catalogues are valid and cover the taxonomy, and
its timings and ratio are the ones it prints (docs/performance figures come from it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from site_gen.pipeline import run

from .conftest import failing_child, load_script

scale = load_script("scale")


def test_a_synthetic_catalogue_passes_every_check_and_uses_every_leaf_topic(tmp_path):
    catalog = scale.synthetic_catalogue(tmp_path / "syn", 300)
    result = run(catalog)
    assert result.problems.errors == []
    cat = result.catalogue
    assert [p.id for p in cat.papers] == [f"paper-{i}" for i in range(300)]
    assert {t for p in cat.papers for t in p.topics} == set(cat.leaf_ids())
    assert all(1 <= len(p.topics) <= 2 and len(p.datasets) == 2 for p in cat.papers)
    rendered = result.outputs[catalog.parent / "README.md"]
    assert all(f"Number {i}" in rendered for i in (0, 150, 299))


def test_it_keeps_the_real_taxonomy_venues_and_datasets_without_their_papers(tmp_path):
    """The synthetic papers do not include the papers that introduced each dataset."""
    catalog = scale.synthetic_catalogue(tmp_path / "syn", 5)
    real = scale.ROOT / "catalog"
    for name in ("taxonomy.yaml", "venues.yaml"):
        assert (catalog / name).read_bytes() == (real / name).read_bytes()
    datasets = yaml.safe_load((catalog / "datasets.yaml").read_text(encoding="utf-8"))
    real_datasets = yaml.safe_load((real / "datasets.yaml").read_text(encoding="utf-8"))
    assert any("paper" in d for d in real_datasets) and not any("paper" in d for d in datasets)
    assert datasets == [{k: v for k, v in d.items() if k != "paper"} for d in real_datasets]
    assert (catalog / "codebases.yaml").read_text(encoding="utf-8") == "[]\n"


def test_the_same_seed_gives_the_same_catalogue_and_another_seed_another(tmp_path):
    texts = [(scale.synthetic_catalogue(tmp_path / name, 40, seed=seed) / "papers.yaml").read_text(encoding="utf-8")
             for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_measure_reports_medians_of_fresh_processes_and_refuses_an_invalid_catalogue(tmp_path):
    catalog = scale.synthetic_catalogue(tmp_path / "syn", 20)
    figures = scale.measure(catalog, repeats=3)
    assert set(figures) == {"median_s", "min_s", "cpu_s", "peak_mib"}
    assert 0 < figures["min_s"] <= figures["median_s"] and figures["cpu_s"] > 0
    assert 10 < figures["peak_mib"] < 4096  # a process's peak resident size in MiB, not in KiB
    papers = catalog / "papers.yaml"
    papers.write_text(papers.read_text(encoding="utf-8").replace("year: ", "year: x", 1), encoding="utf-8")
    with pytest.raises(SystemExit, match="paper-0"):
        scale.measure(catalog, repeats=1)


def test_main_prints_each_size_and_the_ratio_of_the_largest_to_the_smallest(monkeypatch, capsys, tmp_path):
    sizes = []
    monkeypatch.setattr(scale, "synthetic_catalogue", lambda folder, n: sizes.append((folder.name, n)) or folder)
    medians = {"50": 0.5, "200": 1.2, "100": 0.8}
    monkeypatch.setattr(scale, "measure", lambda catalog, repeats: {
        "median_s": medians[catalog.name], "min_s": medians[catalog.name] - 0.25, "cpu_s": 0.25 * repeats,
        "peak_mib": 64.4})
    monkeypatch.setattr(sys, "argv", ["scale.py", "--sizes", "100", "50", "200", "--repeats", "2"])
    scale.main()
    assert sizes == [("100", 100), ("50", 50), ("200", 200)]
    assert capsys.readouterr().out.splitlines() == [
        "   100 papers: median 0.80 s (min 0.55 s), CPU 0.50 s, peak RSS 64 MiB  [check + README + BibTeX, 2 runs]",
        "    50 papers: median 0.50 s (min 0.25 s), CPU 0.50 s, peak RSS 64 MiB  [check + README + BibTeX, 2 runs]",
        "   200 papers: median 1.20 s (min 0.95 s), CPU 0.50 s, peak RSS 64 MiB  [check + README + BibTeX, 2 runs]",
        "time(200)/time(50) = 2.4  (target <= 11; target 200 papers < 5 s)"]
    monkeypatch.setattr(sys, "argv", ["scale.py", "--sizes", "50"])
    scale.main()
    assert "time(" not in capsys.readouterr().out  # one size: no ratio
    medians.update({"1000": 0.5, "10000": 4.0})
    sizes.clear()
    monkeypatch.setattr(sys, "argv", ["scale.py"])
    scale.main()
    out = capsys.readouterr().out
    assert sizes == [("1000", 1000), ("10000", 10000)] and out.count("5 runs]") == 2
    assert out.endswith("time(10000)/time(1000) = 8.0  (target <= 11; target 10000 papers < 5 s)\n")


def test_synthetic_papers_have_six_word_titles_one_to_eight_authors_and_one_or_two_topics(tmp_path):
    """The workload per paper that the published figures were measured on: a title of six capitalised words
    and the paper's number, one to eight authors, one or two topics (each extreme occurs among 120 papers)."""
    catalog = scale.synthetic_catalogue(tmp_path / "syn", 120)
    papers = yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))
    for i, paper in enumerate(papers):
        *words, number, index = paper["title"].split()
        assert len(words) == 6 and all(word.isalpha() and word.istitle() for word in words), paper["title"]
        assert (number, index) == ("Number", str(i))
    assert {len(paper["authors"]) for paper in papers} == set(range(1, 9))
    assert {len(paper["topics"]) for paper in papers} == {1, 2}


ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
MAKE_IN_CHILD = r"""
import importlib.util, locale, sys
from pathlib import Path
print(locale.getpreferredencoding(False))
spec = importlib.util.spec_from_file_location("benchmarks.scale", sys.argv[1])
scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scale)
scale.ROOT = Path(sys.argv[2])  # a project whose catalogue files hold accents and dashes
print(scale.synthetic_catalogue(Path(sys.argv[3]), 20))
"""


def test_the_catalogue_files_are_read_and_written_as_utf8_whatever_the_locale(tmp_path):
    """Under an ASCII locale (LC_ALL=C, no UTF-8 mode), a taxonomy, venues and datasets with non-ASCII text
    (a venue key among them) still give a synthetic catalogue that keeps that text."""
    real = tmp_path / "project" / "catalog"
    real.mkdir(parents=True)
    taxonomy = [{"id": "survey", "title": "Surveys — overviews"},
                {"id": "optimization", "title": "Optimisation", "children": [
                    {"id": "optimization/loss-balancing", "title": "Pondération des pertes"}]}]
    venues = {"arXiv": {"name": "arXiv", "kind": "preprint"},
              "ÉGC": {"name": "Extraction et Gestion des Connaissances", "kind": "conference"}}
    datasets = [{"id": "nyuv2", "name": "NYUv2", "resolution": "480 × 640", "paper": "silberman2012indoor"},
                {"id": "cityscapes", "name": "Cityscapes", "description": "Street scenes, Zürich among them"}]
    for name, data in (("taxonomy", taxonomy), ("venues", venues), ("datasets", datasets)):
        (real / f"{name}.yaml").write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    env = {**os.environ, **ASCII_LOCALE}
    if env.get("MUTANT_UNDER_TEST") == "stats":  # mutmut's first pass: the child need not record hits
        env["MUTANT_UNDER_TEST"] = ""
    done = subprocess.run([sys.executable, "-c", MAKE_IN_CHILD, scale.__file__, str(real.parent),
                           str(tmp_path / "syn")], env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", cwd=tmp_path)
    if "utf" in done.stdout.partition("\n")[0].lower():
        pytest.skip("this platform has no non-UTF-8 locale to test with")
    assert done.returncode == 0, done.stderr[-2000:]
    catalog = Path(done.stdout.splitlines()[-1])
    papers = yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))
    assert {paper["venue"] for paper in papers} == {"arXiv", "ÉGC"}
    assert (catalog / "taxonomy.yaml").read_bytes() == (real / "taxonomy.yaml").read_bytes()
    assert yaml.safe_load((catalog / "datasets.yaml").read_text(encoding="utf-8")) == [
        {k: v for k, v in d.items() if k != "paper"} for d in datasets]


def test_measure_runs_the_pipeline_in_the_repository_root_and_reports_a_failure_as_text(monkeypatch, tmp_path):
    """The child starts in the repository root, so `python -c` imports this checkout's site_gen (the docs time a
    git worktree against the main checkout with one venv); a catalogue that fails stops the benchmark at once
    with the child's error as text, not as bytes."""
    folders, last = failing_child(monkeypatch, scale, lambda: scale.measure(tmp_path / "no-catalogue", repeats=2))
    assert folders == [scale.ROOT]
    assert last.startswith("AssertionError") and "papers.yaml" in last and "file not found" in last
