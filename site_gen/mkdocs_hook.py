"""MkDocs hook: the site's generated pages come from site_gen, straight from catalog/.

Wired in mkdocs.yml (``hooks: [site_gen/mkdocs_hook.py]``). On every build it runs the
site_gen pipeline (load -> validate -> check), renders the pages with ``site_gen.site``
and adds them to MkDocs as virtual files; nothing generated is written to docs/.
The home page (docs/index.md) pulls in live numbers through ``<!-- catalogue:NAME -->``
markers. Under ``mkdocs serve`` the catalogue, templates and assets are watched.

Settings: env ``SITE_GEN_CATALOG`` picks another catalogue folder (benchmarks, tests);
``extra.source_url`` in mkdocs.yml (e.g. https://github.com/OWNER/REPO/blob/main) turns
implementation and test paths into links.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import yaml
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

from site_gen.models import person
from site_gen.output import write_atomic
from site_gen.pipeline import run
from site_gen.site import SiteOptions, expand_nav, render_site
from site_gen.yamlfile import marked_at

log = logging.getLogger("mkdocs.hooks.site_gen")
PACKAGE = Path(__file__).resolve().parent
ASSETS = ("assets/mtl/site.css", "assets/mtl/site.js")
MARKER = re.compile(r"<!--\s*catalogue:([a-z]+)\s*-->")
SEARCH_INDEX = Path("search") / "search_index.json"
AUTHORS_FIELD = "authors"  # a search field of its own, boosted under plugins: search: fields in mkdocs.yml
_authors: dict[str, str] = {}  # paper id -> its authors' names, from the last on_files


def project_dir(config: MkDocsConfig) -> Path:
    return Path(config.config_file_path).resolve().parent


def catalog_dir(config: MkDocsConfig) -> Path:
    return Path(os.environ.get("SITE_GEN_CATALOG") or project_dir(config) / "catalog")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    if not config.use_directory_urls:
        log.info("site_gen: use_directory_urls is off; generated links follow it")
    config.extra_css.extend(a for a in ASSETS if a.endswith(".css") and a not in config.extra_css)
    config.extra_javascript.extend(a for a in ASSETS if a.endswith(".js") and a not in config.extra_javascript)
    return config


def site_options(config: MkDocsConfig) -> SiteOptions:
    root = project_dir(config)
    contributing = root / "CONTRIBUTING.md"
    citation = root / "CITATION.cff"
    return SiteOptions(
        source_url=config.extra.get("source_url"),
        contributing=contributing.read_text(encoding="utf-8") if contributing.is_file() else None,
        citation=_citation(citation) if citation.is_file() else {},
        directory_urls=config.use_directory_urls)


def _citation(path: Path) -> dict:
    """CITATION.cff as a mapping; a file that is not one stops the build with its name and position."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        where = ":".join([path.name, *map(str, marked_at(exc))])
        raise PluginError(f"site_gen: {where}: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PluginError(f"site_gen: {path.name}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PluginError(f"site_gen: {path.name}: the file must be a mapping of CFF keys (title:, authors:, ...), "
                          f"not a {type(data).__name__}")
    return data


def on_files(files: Files, config: MkDocsConfig) -> Files:
    start = time.perf_counter()
    result = run(catalog_dir(config), render=False)
    if result.problems.errors:
        shown = [p.format() for p in result.problems.sorted() if p in result.problems.errors][:20]
        raise PluginError("site_gen: the catalogue has errors; run `python -m site_gen check`:\n  "
                          + "\n  ".join(shown))
    cat = result.catalogue
    _authors.clear()
    _authors.update({p.id: " ".join(map(person, p.authors)) for p in cat.papers})
    pages, home = render_site(cat, site_options(config), bib=result.outputs.get(cat.root / "catalog.bib"))
    for path, text in pages.items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            log.warning("site_gen: docs/%s is generated; the file in docs/ is ignored", path)
            files.remove(existing)
        files.append(File.generated(config, path, content=text))
    index = files.get_file_from_path("index.md")
    if index is not None and not index.generated_by:
        text = MARKER.sub(lambda m: home.get(m.group(1), m.group(0)), index.content_string)
        files.remove(index)
        files.append(File.generated(config, "index.md", content=text))
    config.nav = expand_nav(config.nav, [f.src_uri for f in files.documentation_pages()], list(pages))
    log.info("site_gen: %d papers -> %d generated files in %.3f s", len(result.catalogue.papers), len(pages),
             time.perf_counter() - start)
    return files


def on_post_build(config: MkDocsConfig) -> None:
    """Give each paper's search entry its authors in a field of their own, so that a surname
    finds that person's papers before papers whose notes mention them. The field is indexed,
    not shown: only title, text and tags appear in a search result."""
    search = config.plugins.get("material/search") or config.plugins.get("search")
    path = Path(config.site_dir) / SEARCH_INDEX
    if search is None or AUTHORS_FIELD not in search.config.get("fields", {}) or not path.is_file():
        return
    index = json.loads(path.read_text(encoding="utf-8"))
    for entry in index["docs"]:
        page, _, anchor = entry["location"].partition("#")
        if page.startswith("papers/") and anchor in _authors:
            entry[AUTHORS_FIELD] = _authors[anchor]
    write_atomic(path, json.dumps(index, separators=(",", ":")))


def on_serve(server, config: MkDocsConfig, builder):
    """Rebuild when the catalogue, the site templates or the site assets change."""
    for path in (catalog_dir(config), PACKAGE / "templates" / "site", PACKAGE / "assets"):
        if path.exists():
            server.watch(str(path))
    return server
