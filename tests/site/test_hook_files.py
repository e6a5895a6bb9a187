"""The MkDocs hook's events called on site_gen.mkdocs_hook itself, over a project folder of our own.

tests/site/test_hook.py runs the hook the way `mkdocs build` loads it: from the file named under
``hooks:``, as a module of its own. These tests register the package module as the hook instead, so
what they check is the code `python -m site_gen` imports (and the code mutation testing mutates).
The project is the small catalogue with its own mkdocs.yml, docs/, CONTRIBUTING.md and CITATION.cff.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from mkdocs.config import load_config
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import get_files

from site_gen import mkdocs_hook

from .test_hook import _edit_papers

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tests" / "site_gen" / "fixtures" / "small"
LOGGER = "mkdocs.hooks.site_gen"
BASE = "https://github.com/o/r/blob/abc"
AUTHORS = {"authors": {"boost": 100}}
NAV = [{"Home": "index.md"}, {"Papers": ["papers/*.md"]}, {"Browse": "browse.md"},
       {"Gone": "benchmarks-none.md"}, {"More": ["..."]}]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The small catalogue at project/catalog, a docs/ folder with a home page; no SITE_GEN_CATALOG,
    and the working directory elsewhere, so the hook has to find catalog/ next to mkdocs.yml."""
    root = tmp_path / "project"
    shutil.copytree(SMALL, root, ignore=shutil.ignore_patterns("README.golden.md"))
    (root / "docs").mkdir()
    (root / "docs" / "index.md").write_text("A <!-- catalogue:counts --> B <!--catalogue:nope--> C\n", encoding="utf-8")
    monkeypatch.delenv("SITE_GEN_CATALOG", raising=False)
    monkeypatch.chdir(tmp_path)
    return root


def configure(root: Path, theme: str = "material", plugins: list | None = None, **overrides):
    """Write root/mkdocs.yml, load it, and register site_gen.mkdocs_hook as its hook."""
    plugins = [{"search": {"fields": AUTHORS}}] if plugins is None else plugins
    settings = {"site_name": "Test", "theme": {"name": theme}, "plugins": plugins, "nav": NAV}
    (root / "mkdocs.yml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    config = load_config(str(root / "mkdocs.yml"), site_dir=str(root / "site"), **overrides)
    config.plugins["hooks/site_gen"] = mkdocs_hook
    return config


def build_files(config, prepare=None):
    """The config and files events, as `mkdocs build` runs them; ``prepare`` may edit the files first."""
    config = config.plugins.on_config(config)
    files = get_files(config)
    if prepare:
        prepare(files)
    return config.plugins.on_files(files, config=config)


def generated(files) -> dict[str, str]:
    return {f.src_uri: f.content_string for f in files if f.generated_by}


# --- where the catalogue is, what is watched -------------------------------------------------------

def test_without_the_env_variable_the_catalogue_is_the_catalog_folder_beside_mkdocs_yml(project):
    """The documented default: catalog/ next to mkdocs.yml, whatever the working directory."""
    config = configure(project)
    pages = generated(build_files(config))
    assert "Multi-Task Learning for Dense Prediction Tasks" in pages["papers/survey.md"]

    class Server:
        def __init__(self) -> None:
            self.watched: list[str] = []

        def watch(self, path: str) -> None:
            self.watched.append(path)

    server = mkdocs_hook.on_serve(Server(), config, None)
    assert server.watched[0] == str(project / "catalog")


def test_a_missing_default_catalogue_is_reported_not_guessed(project):
    """With catalog/ renamed away, the build stops on the catalogue's missing files."""
    (project / "catalog").rename(project / "elsewhere")
    with pytest.raises(PluginError, match=r"papers\.yaml:1:1: -: -: file not found"):
        build_files(configure(project))


# --- on_config -------------------------------------------------------------------------------------

def test_on_config_adds_the_stylesheet_and_the_script(project):
    """The site's CSS goes to extra_css and its JS to extra_javascript, each where it belongs."""
    config = mkdocs_hook.on_config(configure(project))
    assert list(config.extra_css) == ["assets/mtl/site.css"]
    assert [str(js) for js in config.extra_javascript] == ["assets/mtl/site.js"]


@pytest.mark.parametrize("directory_urls", [True, False])
def test_on_config_notes_only_when_directory_urls_are_off(project, caplog, directory_urls):
    """The info line about use_directory_urls shows up when the setting is off, and only then."""
    config = configure(project, use_directory_urls=directory_urls)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        mkdocs_hook.on_config(config)
    notes = [m for m in caplog.messages if "use_directory_urls" in m]
    assert len(notes) == (0 if directory_urls else 1)



# --- on_files: refusal, generated pages, the home page, the nav, the summary line ------------------

def test_an_invalid_catalogue_stops_the_build_with_the_check_command_and_each_error_on_a_line(project):
    """The message names the command that lists everything, then one indented line per error, as
    `check` formats it: file:line:column: entry: field: problem (hint)."""
    _edit_papers(project, ("venue: NeurIPS", "venue: NeurIPZ"), ("  datasets: [nyuv2]\n", "  datasets: [nyu-v2]\n"))
    with pytest.raises(PluginError) as exc:
        build_files(configure(project))
    first, *errors = str(exc.value).splitlines()
    assert "run `python -m site_gen check`" in first
    assert errors == [
        "  project/catalog/papers.yaml:5:10: pcgrad: venue: unknown venue 'NeurIPZ' (hint: did you mean 'NeurIPS'?)",
        "  project/catalog/papers.yaml:10:14: pcgrad: datasets.0: unknown dataset 'nyu-v2'"
        " (hint: did you mean 'nyuv2'?)"]


def test_every_rendered_page_becomes_a_generated_file_with_its_text(project):
    """Section pages, the other pages, catalog.bib and the assets are all added, under their docs paths."""
    pages = generated(build_files(configure(project)))
    assert {"papers/survey.md", "papers/optimization.md", "papers/benchmarks.md", "browse.md", "datasets.md",
            "codebases.md", "questions.md", "implementations.md", "cite.md", "contributing.md", "catalog.bib",
            "assets/mtl/site.css", "assets/mtl/site.js"} <= set(pages)
    assert "@" in pages["catalog.bib"] and "ruder2017overview" in pages["catalog.bib"]
    assert pages["assets/mtl/site.js"] == (ROOT / "site_gen" / "assets" / "site.js").read_text(encoding="utf-8")


def test_a_docs_copy_of_a_generated_page_is_replaced_with_a_warning_naming_it(project, caplog):
    (project / "docs" / "papers").mkdir()
    (project / "docs" / "papers" / "survey.md").write_text("stale copy\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # MkDocs warns when append() replaces a file
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            files = build_files(configure(project))
    survey = files.get_file_from_path("papers/survey.md")
    assert survey.generated_by and "stale copy" not in survey.content_string
    assert caplog.messages == ["site_gen: docs/papers/survey.md is generated; the file in docs/ is ignored"]


def test_the_home_page_gets_known_markers_filled_and_keeps_unknown_ones(project):
    """A marker with spaces or without them is filled; an unknown name stays for the author to see."""
    home = build_files(configure(project)).get_file_from_path("index.md")
    assert home.generated_by and home.src_uri == "index.md"
    text = home.content_string
    assert text.startswith("A <") and "catalogue:counts" not in text
    assert '<span class="mtl-count-n">4</span> papers' in text  # the fixture has four papers
    assert text.endswith(" B <!--catalogue:nope--> C\n")


def test_a_docs_folder_without_a_home_page_builds(project):
    (project / "docs" / "index.md").unlink()
    files = build_files(configure(project))
    assert files.get_file_from_path("index.md") is None and files.get_file_from_path("browse.md") is not None


def test_a_home_page_another_plugin_generated_is_left_as_it_is(project):
    def mark(files):
        files.get_file_from_path("index.md").generated_by = "another-plugin"

    home = build_files(configure(project), prepare=mark).get_file_from_path("index.md")
    assert home.generated_by == "another-plugin"
    assert home.content_string == "A <!-- catalogue:counts --> B <!--catalogue:nope--> C\n"


def test_the_nav_expands_globs_in_catalogue_order_drops_missing_pages_and_places_the_rest(project):
    (project / "docs" / "notes.md").write_text("# Notes\n", encoding="utf-8")
    config = configure(project)
    build_files(config)
    assert config.nav[:3] == [{"Home": "index.md"},
                              {"Papers": ["papers/survey.md", "papers/optimization.md", "papers/benchmarks.md"]},
                              {"Browse": "browse.md"}]
    more = config.nav[3]["More"]  # benchmarks-none.md exists nowhere: its entry is gone
    assert len(config.nav) == 4 and "notes.md" in more and "cite.md" in more and "browse.md" not in more


def test_the_summary_line_counts_papers_and_generated_files_and_times_the_build(project, caplog):
    config = configure(project)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        start = time.perf_counter()
        files = build_files(config)
        elapsed = time.perf_counter() - start
    (record,) = [r for r in caplog.records if "generated files" in r.getMessage()]
    papers, count, seconds = record.args
    assert (papers, count) == (4, len(generated(files)) - 1)  # index.md is rewritten, not generated
    assert 0 <= seconds <= elapsed
    assert f"4 papers -> {count} generated files in {seconds:.3f} s" in record.getMessage()


# --- site_options: CONTRIBUTING.md, CITATION.cff, source_url, use_directory_urls of *this* project -----

CONTRIBUTING = ("# How to help\n\nThanks to René. Read [the guide](docs/guide.md)"
                " or [the FAQ](https://example.org/faq).\n")
CITATION = "title: Café Catalogue\nauthors:\n  - name: Our Team\nversion: 2.0.0\ndate-released: 2025-03-01\n"


def _own_texts(project: Path) -> None:
    (project / "CONTRIBUTING.md").write_text(CONTRIBUTING, encoding="utf-8")
    (project / "CITATION.cff").write_text(CITATION, encoding="utf-8")


def test_pages_use_the_projects_contributing_citation_and_source_url(project):
    """CONTRIBUTING.md becomes the contributing page (its relative links pointed at source_url),
    CITATION.cff the catalogue's BibTeX on the cite page, source_url the implementation links."""
    _own_texts(project)
    pages = generated(build_files(configure(project, extra={"source_url": BASE})))
    assert "Thanks to René." in pages["contributing.md"]
    assert f"[the guide]({BASE}/docs/guide.md)" in pages["contributing.md"]
    assert "title = {Café Catalogue}" in pages["cite.md"] and "author = {{Our Team}}" in pages["cite.md"]
    assert "year = {2025}" in pages["cite.md"]
    assert f"{BASE}/reference_impls/weighting/pcgrad.py" in pages["implementations.md"]


def test_without_contributing_or_citation_files_the_pages_say_where_to_look(project):
    """No CONTRIBUTING.md, no CITATION.cff beside mkdocs.yml (the repository's own are not used)."""
    pages = generated(build_files(configure(project)))
    assert "Contributions are welcome" in pages["contributing.md"]
    assert "Please cite the repository's `CITATION.cff`." in pages["cite.md"]
    assert "reference_impls/weighting/pcgrad.py" in pages["implementations.md"]
    assert BASE not in pages["implementations.md"]


@pytest.mark.parametrize(("directory_urls", "link"), [(True, '"../../datasets/#dataset-nyuv2"'),
                                                      (False, '"../datasets.html#dataset-nyuv2"')])
def test_generated_links_follow_use_directory_urls(project, directory_urls, link):
    pages = generated(build_files(configure(project, use_directory_urls=directory_urls)))
    assert link in pages["papers/optimization.md"]


def test_contributing_and_citation_are_read_as_utf8_under_any_locale(project):
    """Under a non-UTF-8 locale (here C with Python's UTF-8 mode off: ASCII), the accented names
    still come through: the files are UTF-8 whatever the machine's default encoding."""
    _own_texts(project)
    configure(project)
    code = ("import sys; from mkdocs.config import load_config; from site_gen.mkdocs_hook import site_options; "
            "o = site_options(load_config(sys.argv[1])); print(ascii([o.contributing, o.citation['title']]))")
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(project / "mkdocs.yml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ascii([CONTRIBUTING, "Café Catalogue"])


# --- on_post_build: the authors field of the search index --------------------------------------------

SURVEY = "papers/survey/"
ENTRIES = [{"location": f"{SURVEY}#vandenhende2021multi", "title": "t", "text": ""},
           {"location": f"{SURVEY}#ruder2017overview", "title": "t", "text": ""},
           {"location": SURVEY, "title": "Survey", "text": ""},                # the page itself: no anchor
           {"location": f"{SURVEY}#survey", "title": "t", "text": ""},          # a heading, not a paper
           {"location": "browse/#pcgrad", "title": "t", "text": ""}]            # a paper id outside papers/
VANDENHENDE = "Simon Vandenhende Stamatios Georgoulis Wouter Van Gansbeke Marc Proesmans Dengxin Dai Luc Van Gool"


def _post_build(config, docs: list[dict] | None) -> Path:
    """Write a compact search index like the search plugins do (unless ``docs`` is None), run on_post_build."""
    path = Path(config.site_dir) / "search" / "search_index.json"
    if docs is not None:
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"config": {"lang": ["en"]}, "docs": docs}, separators=(",", ":")),
                        encoding="utf-8")
    mkdocs_hook.on_post_build(config)  # alone: the search plugins' own on_post_build would write their index
    return path


def _with_authors(*names: str | None) -> list[dict]:
    return [dict(entry, authors=name) if name else entry for entry, name in zip(ENTRIES, names)]


@pytest.mark.parametrize("theme", ["material", "mkdocs"])  # material/search, or MkDocs' own search plugin
def test_post_build_gives_paper_entries_their_authors_and_keeps_the_index_compact(project, theme):
    config = configure(project, theme=theme)
    build_files(config)
    path = _post_build(config, ENTRIES)
    docs = _with_authors(VANDENHENDE, "Sebastian Ruder", None, None, None)
    assert path.read_text(encoding="utf-8") == json.dumps({"config": {"lang": ["en"]}, "docs": docs},
                                                          separators=(",", ":"))


@pytest.mark.parametrize("plugins", [[], ["search"], [{"search": {"fields": {"title": {"boost": 10}}}}]],
                         ids=["no-search-plugin", "search-without-fields", "fields-without-authors"])
def test_post_build_leaves_the_index_alone_without_an_authors_field(project, plugins):
    config = configure(project, theme="mkdocs", plugins=plugins)
    build_files(config)
    before = json.dumps({"config": {"lang": ["en"]}, "docs": ENTRIES}, separators=(",", ":"))
    assert _post_build(config, ENTRIES).read_text(encoding="utf-8") == before


def test_post_build_without_a_search_index_writes_nothing(project):
    config = configure(project)
    build_files(config)
    assert not _post_build(config, None).parent.exists()


# --- bugs found while reading the survivors (each test failed before the fix) ----------------------------

def test_a_malformed_citation_file_is_reported_by_name(project):
    (project / "CITATION.cff").write_text("title: Our catalogue\nauthors: [unclosed\n", encoding="utf-8")
    with pytest.raises(PluginError, match=r"^site_gen: CITATION\.cff:3:1: "):
        build_files(configure(project))


def test_a_citation_file_that_is_not_a_mapping_is_reported_by_name(project):
    (project / "CITATION.cff").write_text("- title: Our catalogue\n", encoding="utf-8")
    with pytest.raises(PluginError, match=r"CITATION\.cff"):
        build_files(configure(project))


def test_contributing_links_to_dot_folders_keep_their_dot(project):
    (project / "CONTRIBUTING.md").write_text("See [the workflow](.github/workflows/pages.yml).\n", encoding="utf-8")
    pages = generated(build_files(configure(project, extra={"source_url": BASE})))
    assert f"[the workflow]({BASE}/.github/workflows/pages.yml)" in pages["contributing.md"]
