"""The catalogue-size benchmark: its synthetic catalogues are valid and cover the taxonomy, and
its timings and ratio are the ones it prints (docs/performance figures come from it)."""

import sys

import pytest
import yaml

from site_gen.pipeline import run

from .conftest import load_script

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
