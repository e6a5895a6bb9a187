"""The MkDocs hook on its own: pages from the catalogue, markers, nav, and refusal on errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mkdocs.config import load_config
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import get_files

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
