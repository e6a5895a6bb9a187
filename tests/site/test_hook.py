"""The MkDocs hook on its own: pages from the catalogue, markers, nav, and refusal on errors."""

from __future__ import annotations

import json
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


# --- on_post_build: the authors field of the search index -----------------------------------------

def _loaded_hook(config):
    """The hook as MkDocs loaded it from mkdocs.yml: a module of its own (with its own state), not site_gen.mkdocs_hook."""
    return config.plugins["site_gen/mkdocs_hook.py"]


def _index_after_post_build(config, docs: list[dict]) -> list[dict]:
    """Write a search index with ``docs`` into the site folder, run on_post_build, read it back."""
    path = Path(config.site_dir) / "search" / "search_index.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": {}, "docs": docs}), encoding="utf-8")
    _loaded_hook(config).on_post_build(config)
    return json.loads(path.read_text(encoding="utf-8"))["docs"]


def test_post_build_gives_each_paper_entry_its_authors_in_display_form(small_project, tmp_path):
    _edit_papers(small_project, ("authors: [Sebastian Ruder]", 'authors: [Sebastian Ruder, "{Gemini Team}"]'))
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    _loaded_hook(config)._authors["ghost"] = "Left Over"  # what an earlier build of `mkdocs serve` could leave behind
    hook_files(config)
    docs = _index_after_post_build(config, [
        {"location": "papers/survey/#vandenhende2021multi", "title": "t", "text": ""},
        {"location": "papers/survey/#ruder2017overview", "title": "t", "text": ""},
        {"location": "papers/survey/", "title": "Survey", "text": ""},
        {"location": "papers/optimization/#optimization--gradient-balancing", "title": "t", "text": ""},
        {"location": "browse/#pcgrad", "title": "t", "text": ""},       # a paper id outside papers/
        {"location": "papers/x/#ghost", "title": "t", "text": ""}])
    assert [d.get("authors") for d in docs] == [
        "Simon Vandenhende Stamatios Georgoulis Wouter Van Gansbeke Marc Proesmans Dengxin Dai Luc Van Gool",
        "Sebastian Ruder Gemini Team", None, None, None, None]


def test_post_build_leaves_the_index_alone_without_an_authors_search_field(small_project, tmp_path):
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    hook_files(config)
    search = config.plugins.get("material/search") or config.plugins.get("search")
    search.config["fields"] = {k: v for k, v in search.config["fields"].items() if k != "authors"}
    docs = [{"location": "papers/optimization/#pcgrad", "title": "t", "text": ""}]
    assert _index_after_post_build(config, docs) == docs


def test_post_build_without_a_search_index_does_nothing(small_project, tmp_path):
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    hook_files(config)
    _loaded_hook(config).on_post_build(config)  # no search/search_index.json was written: no error, no file
    assert not (tmp_path / "site" / "search").exists()


def test_post_build_keeps_the_old_index_whole_when_the_rename_fails(small_project, tmp_path, monkeypatch):
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    hook_files(config)
    path = tmp_path / "site" / "search" / "search_index.json"
    path.parent.mkdir(parents=True)
    before = json.dumps({"config": {}, "docs": [{"location": "papers/optimization/#pcgrad", "title": "t", "text": ""}]})
    path.write_text(before, encoding="utf-8")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        _loaded_hook(config).on_post_build(config)
    assert path.read_text(encoding="utf-8") == before and list(path.parent.iterdir()) == [path]


def test_on_config_adds_the_site_assets_once_even_when_listed_or_run_again(small_project):
    config = load_config(str(ROOT / "mkdocs.yml"), extra_css=["assets/mtl/site.css"])
    mkdocs_hook.on_config(mkdocs_hook.on_config(config))
    assert config.extra_css.count("assets/mtl/site.css") == 1
    assert [str(js) for js in config.extra_javascript].count("assets/mtl/site.js") == 1


def test_a_home_page_generated_by_another_plugin_keeps_its_markers(small_project, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("A <!-- catalogue:counts --> B\n", encoding="utf-8")
    config = load_config(str(ROOT / "mkdocs.yml"), docs_dir=str(tmp_path / "docs"))
    config = config.plugins.on_config(config)
    files = get_files(config)
    files.get_file_from_path("index.md").generated_by = "another-plugin"
    files = config.plugins.on_files(files, config=config)
    assert files.get_file_from_path("index.md").content_string == "A <!-- catalogue:counts --> B\n"
