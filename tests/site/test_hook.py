"""The MkDocs hook on its own: pages from the catalogue, markers, nav, and refusal on errors."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from mkdocs.config import load_config
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import get_files

from site_gen import mkdocs_hook
from site_gen.problems import Location, Problems

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tests" / "site_gen" / "fixtures" / "small"


@pytest.fixture
def small_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(SMALL, root, ignore=shutil.ignore_patterns("README.golden.md"))
    monkeypatch.setenv("SITE_GEN_CATALOG", str(root / "catalog"))
    return root


def hook_files(config):
    """Run the config and files events the way `mkdocs build` does (the hook is a plugin there)."""
    config = config.plugins.on_config(config)
    return config.plugins.on_files(get_files(config), config=config)


def test_hook_adds_generated_pages_and_fills_the_home_page(small_project):
    config = load_config(str(ROOT / "mkdocs.yml"))
    files = hook_files(config)
    uris = {f.src_uri for f in files}
    assert {"papers/survey.md", "papers/optimization.md", "browse.md", "catalog.bib",
            "assets/mtl/site.js"} <= uris
    home = files.get_file_from_path("index.md").content_string
    assert "<!-- catalogue:" not in home
    assert '<span class="mtl-count-n">4</span> papers' in home  # the fixture has four papers
    assert config.nav[0] == {"Home": "index.md"}
    papers = next(item["Papers"] for item in config.nav if "Papers" in item)
    assert papers == ["papers/survey.md", "papers/optimization.md", "papers/benchmarks.md"]  # taxonomy order
    assert "assets/mtl/site.css" in config.extra_css
    assert "assets/mtl/site.js" in config.extra_javascript


def test_hook_refuses_an_invalid_catalogue(small_project):
    papers = small_project / "catalog" / "papers.yaml"
    papers.write_text(papers.read_text(encoding="utf-8").replace("venue: NeurIPS", "venue: NeurIPZ"),
                      encoding="utf-8")
    config = load_config(str(ROOT / "mkdocs.yml"))
    with pytest.raises(PluginError, match=r"papers\.yaml:\d+:\d+: pcgrad: venue: unknown venue 'NeurIPZ'"):
        hook_files(config)


def _edit_papers(project: Path, *pairs: tuple[str, str]) -> None:
    papers = project / "catalog" / "papers.yaml"
    text = papers.read_text(encoding="utf-8")
    for old, new in pairs:
        text = text.replace(old, new)
    papers.write_text(text, encoding="utf-8")


def test_hook_lists_every_error_up_to_twenty(small_project):
    _edit_papers(small_project, ("venue: NeurIPS", "venue: NeurIPZ"), ("  datasets: [nyuv2]\n", "  datasets: [nyu-v2]\n"))
    with pytest.raises(PluginError) as exc:
        hook_files(load_config(str(ROOT / "mkdocs.yml")))
    shown = [line for line in str(exc.value).splitlines() if "papers.yaml:" in line]
    assert len(shown) == 2 and "unknown venue 'NeurIPZ'" in shown[0] and "unknown dataset 'nyu-v2'" in shown[1], shown


def test_hook_caps_the_error_list_at_twenty(small_project, monkeypatch):
    real_run = mkdocs_hook.run

    def many_errors(*args, **kwargs):
        result = real_run(*args, **kwargs)
        result.problems = Problems()
        for line in range(25, 0, -1):  # reported in file order, the first twenty
            result.problems.error(Location("catalog/papers.yaml", line, 1), f"p{line}", "-", "bad")
        return result

    monkeypatch.setattr(mkdocs_hook, "run", many_errors)
    with pytest.raises(PluginError) as exc:
        mkdocs_hook.on_files(None, load_config(str(ROOT / "mkdocs.yml")))
    shown = [line.strip() for line in str(exc.value).splitlines()[1:]]
    assert [line.split(":")[1] for line in shown] == [str(n) for n in range(1, 21)]


def _own_docs(tmp_path: Path, **extra):
    """The project's mkdocs.yml over a docs/ folder of our own: a home page and a stale generated page."""
    docs = tmp_path / "docs"
    (docs / "papers").mkdir(parents=True)
    (docs / "index.md").write_text("A <!-- catalogue:counts --> B <!-- catalogue:nope --> C\n", encoding="utf-8")
    (docs / "papers" / "survey.md").write_text("stale copy\n", encoding="utf-8")
    return load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(docs), **extra)


def test_hook_replaces_docs_copies_of_generated_pages_and_keeps_unknown_markers(small_project, tmp_path, caplog):
    config = _own_docs(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # MkDocs warns when a file is replaced without remove()
        with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.site_gen"):
            files = hook_files(config)
    survey = files.get_file_from_path("papers/survey.md")
    assert survey.generated_by and "stale copy" not in survey.content_string
    assert "site_gen: docs/papers/survey.md is generated; the file in docs/ is ignored" in caplog.messages
    home = files.get_file_from_path("index.md").content_string
    assert home.startswith("A ") and "mtl-count-n" in home
    assert home.endswith(" B <!-- catalogue:nope --> C\n")  # an unknown marker is left for the author to see


def test_hook_follows_source_url_and_use_directory_urls(small_project, tmp_path):
    base = "https://github.com/o/r/blob/main"
    config = _own_docs(tmp_path, use_directory_urls=False, extra={"source_url": base})
    pages = {f.src_uri: f.content_string for f in hook_files(config) if f.generated_by}
    assert f"{base}/reference_impls/weighting/pcgrad.py" in pages["implementations.md"]
    assert '"../datasets.html#dataset-nyuv2"' in pages["papers/optimization.md"]  # not ../../datasets/#...


def test_hook_watches_the_catalogue_templates_and_assets_under_serve(small_project):
    class Server:
        def __init__(self) -> None:
            self.watched: list[str] = []

        def watch(self, path: str) -> None:
            self.watched.append(path)

    server = mkdocs_hook.on_serve(Server(), load_config(str(ROOT / "mkdocs.yml")), None)
    package = ROOT / "site_gen"
    assert sorted(server.watched) == sorted(str(p) for p in (small_project / "catalog", package / "templates" / "site",
                                                             package / "assets"))


def test_the_pages_workflow_links_sources_to_the_commit_it_builds(monkeypatch):
    """mkdocs.yml reads source_url from the environment, which the Pages workflow fills from the
    repository and commit; a local build has none and shows plain paths. (No repo_url: the theme
    would fetch star counts from GitHub's API, and the site loads nothing from other hosts.)"""
    monkeypatch.delenv("SOURCE_URL", raising=False)
    local = load_config(str(ROOT / "mkdocs.yml"))
    assert local.extra.get("source_url") is None and local.repo_url is None
    monkeypatch.setenv("SOURCE_URL", "https://github.com/o/r/blob/abc123")
    assert load_config(str(ROOT / "mkdocs.yml")).extra["source_url"] == "https://github.com/o/r/blob/abc123"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "pages.yml").read_text(encoding="utf-8"))
    (build,) = [s for s in workflow["jobs"]["build"]["steps"] if "mkdocs build" in s.get("run", "")]
    assert build["env"]["SOURCE_URL"] == "${{ github.server_url }}/${{ github.repository }}/blob/${{ github.sha }}"
