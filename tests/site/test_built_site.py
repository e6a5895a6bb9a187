"""The real site, built once with `mkdocs build --strict`: assertions on its actual content."""

from __future__ import annotations

import html
import json
import posixpath
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import bibtexparser
import pytest

from site_gen.bibtex import render_bibtex
from site_gen.checks import wants_impl
from site_gen.models import person
from site_gen.site.impls import impl_infos

from .htmlscan import Page, read


@pytest.fixture(scope="module")
def pages(site_dir: Path) -> dict[str, Page]:
    """Site path ('papers/theory/index.html') -> parsed page, for every HTML file."""
    return {p.relative_to(site_dir).as_posix(): read(p) for p in sorted(site_dir.rglob("*.html"))}


def known_paper(catalogue):
    """PCGrad when the catalogue has it, else the first paper with a nickname."""
    by_id = {p.id: p for p in catalogue.papers}
    return by_id.get("pcgrad") or next(p for p in catalogue.papers if p.short)


def test_every_paper_has_exactly_one_anchor(pages, catalogue):
    anchors = Counter(e.attrs["id"] for path, page in pages.items() if path.startswith("papers/")
                      for e in page.find(cls="mtl-paper__title"))
    assert sum(anchors.values()) == len(catalogue.papers)
    assert set(anchors) == {p.id for p in catalogue.papers}


def test_no_page_repeats_an_id(pages):
    for path, page in pages.items():
        repeated = [i for i, n in Counter(page.ids()).items() if n > 1]
        assert not repeated, f"{path}: duplicate ids {repeated[:5]}"


def test_known_paper_bibtex_block_parses(pages, catalogue):
    paper = known_paper(catalogue)
    page = pages[f"papers/{paper.topics[0].split('/')[0]}/index.html"]
    (code,) = page.find("code", id=f"bib-{paper.id}")
    library = bibtexparser.parse_string(html.unescape(code.content()))
    assert not library.failed_blocks
    (entry,) = library.entries
    assert entry.key == paper.id
    assert entry.fields_dict["year"].value == str(paper.year)
    title = re.sub(r"[{}\\]", "", entry.fields_dict["title"].value)
    assert title == paper.title.replace("\\", "")
    (button,) = [b for b in page.find("button", cls="mtl-copy") if b.attrs["data-copy-target"] == f"bib-{paper.id}"]
    assert button.content() == "Copy BibTeX"


def test_browse_table_has_one_row_per_paper(pages, catalogue):
    rows = pages["browse/index.html"].find("tr")
    ids = [r.attrs["data-id"] for r in rows if "data-id" in r.attrs]
    assert len(ids) == len(catalogue.papers)
    assert set(ids) == {p.id for p in catalogue.papers}
    by_id = {p.id: p for p in catalogue.papers}
    for r in rows:
        if "data-id" in r.attrs:
            p = by_id[r.attrs["data-id"]]
            assert (r.attrs["data-year"], r.attrs["data-code"], r.attrs["data-impl"]) == \
                (str(p.year), "1" if p.code else "0", "1" if p.impl else "0")


def test_chart_has_one_bar_per_year_with_the_right_counts(pages, catalogue):
    bars = pages["index.html"].find("g", cls="mtl-bar")
    years = Counter(p.year for p in catalogue.papers)
    assert [int(b.attrs["data-year"]) for b in bars] == list(range(min(years), max(years) + 1))
    assert {int(b.attrs["data-year"]): int(b.attrs["data-count"]) for b in bars if b.attrs["data-count"] != "0"} \
        == dict(years)
    rects = pages["index.html"].find("rect")
    assert sum(int(r.attrs["data-count"]) for r in rects) == len(catalogue.papers)


def test_home_counts(pages, catalogue):
    numbers = [e.content() for e in pages["index.html"].find("span", cls="mtl-count-n")]
    impls = len({ref for p in catalogue.papers for ref in p.impls})  # also_impl classes count too
    assert numbers == [str(len(catalogue.papers)), str(len(catalogue.datasets)), str(len(catalogue.codebases)),
                       str(impls)]


@lru_cache(maxsize=None)
def _ids(site_dir: Path, path: str) -> frozenset[str]:
    return frozenset(read(site_dir / path).ids())


def test_internal_links_resolve(site_dir, pages):
    broken = []
    for path, page in pages.items():
        for el in page.elements:
            for attr in ("href", "src"):
                url = el.attrs.get(attr)
                if not url or url.startswith(("http://", "https://", "mailto:", "data:")):
                    continue
                parts = urlsplit(url)
                base = "" if parts.path.startswith("/") else posixpath.dirname(path)  # 404.html links from the root
                target = posixpath.normpath(posixpath.join(base, unquote(parts.path).lstrip("/"))) \
                    if parts.path else path
                file = site_dir / target
                if file.is_dir():
                    file = file / "index.html"
                if not file.is_file():
                    broken.append(f"{path}: {url}")
                elif parts.fragment and file.suffix == ".html" and \
                        parts.fragment not in _ids(site_dir, file.relative_to(site_dir).as_posix()):
                    broken.append(f"{path}: {url} (no such anchor)")
    assert not broken, broken[:20]


def test_nothing_is_loaded_from_the_network(pages):
    for path, page in pages.items():
        for el in page.find("script") + page.find("img") + page.find("iframe"):
            assert not el.attrs.get("src", "").startswith(("http:", "https:", "//")), (path, el.attrs)
        for el in page.find("link"):
            if el.attrs.get("rel") in ("stylesheet", "preconnect", "preload", "modulepreload", "icon"):
                assert not el.attrs.get("href", "").startswith(("http:", "https:", "//")), (path, el.attrs)


def test_every_page_has_a_title_and_description(pages):
    for path, page in pages.items():
        if path == "404.html":
            continue
        title = page.find("title")[0]  # the <head> title comes first (SVGs have their own)
        assert title.content().strip(), path
        descriptions = page.find("meta", name="description")
        assert descriptions and len(descriptions[0].attrs["content"]) > 20, path


def test_no_two_pages_share_a_title(pages):
    """The nav, the browser tab and search name a page by its title: two alike cannot be told apart."""
    titles = Counter(page.find("title")[0].content().strip() for path, page in pages.items() if path != "404.html")
    assert not [t for t, n in titles.items() if n > 1]


def test_a_section_named_like_a_list_points_to_it(pages, catalogue):
    """The Codebases section of papers is titled apart from the list of codebases, and links to it."""
    section = next((s for s, _ in catalogue.walk_sections() if s.id == "codebases"), None)
    if section is None:
        pytest.skip("the catalogue has no codebases section")
    page = pages["papers/codebases/index.html"]
    assert page.find("h1")[0].content().strip().startswith(f"{section.title} (papers)")
    assert any(a.attrs.get("href") == "../../codebases/" for a in page.find("a"))


def test_catalog_bib_is_published(site_dir, catalogue):
    assert (site_dir / "catalog.bib").read_text(encoding="utf-8") == render_bibtex(catalogue)


def test_dataset_back_references(pages, catalogue):
    page = pages["datasets/index.html"]
    users = Counter(d for p in catalogue.papers for d in set(p.datasets))
    for d in catalogue.datasets:
        (row,) = page.find("tr", id=f"dataset-{d.id}")
        text = " ".join(row.content().split())
        n = users.get(d.id, 0)
        assert (f"{n} paper" in text) if n else ("none yet" in text), (d.id, text[:200])


def test_questions_page_has_every_question(pages, catalogue):
    listed = [" ".join(li.content().split()) for li in pages["questions/index.html"].find("li", cls="mtl-question")]
    expected = [" ".join(q.split()) for p in catalogue.papers for q in p.questions]
    assert Counter(listed) == Counter(expected)


def test_implementations_page(pages, catalogue):
    page = pages["implementations/index.html"]
    with_impl = [p for p in catalogue.papers if p.impl]
    assert {e.attrs["id"] for e in page.find(cls=None) if e.attrs.get("id", "").startswith("impl-")} == \
        {f"impl-{p.id}" for p in with_impl} | {f"impl-{p.id}--{ref.symbol}" for p in with_impl
                                               for ref in p.impl_refs[1:]}
    wanted = [p for p in catalogue.papers if wants_impl(p)]
    lists = page.find("ul", cls="mtl-wanted")
    assert (len(lists[0].content().strip().splitlines()) if lists else 0) == len(wanted)


def test_search_index_finds_papers_by_nickname_title_and_author(site_dir, catalogue):
    index = json.loads((site_dir / "search" / "search_index.json").read_text(encoding="utf-8"))
    paper = known_paper(catalogue)
    (entry,) = [d for d in index["docs"] if d["location"].endswith(f"#{paper.id}")]
    assert paper.short[0] in entry["title"] and paper.title.split()[0] in entry["title"]
    assert paper.authors[-1].split(",")[0].split()[-1] in entry["text"]
    assert not any(d["location"].startswith("browse/") for d in index["docs"])  # the table is not indexed twice
    assert "authors" in index["config"]["fields"]
    assert entry["authors"] == " ".join(map(person, paper.authors))
    with_authors = [d["location"].partition("#")[2] for d in index["docs"] if "authors" in d]
    assert sorted(with_authors) == sorted(p.id for p in catalogue.papers)


def test_contributing_page_renders_the_guide(pages):
    guide = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"
    text = " ".join(pages["contributing/index.html"].find("article")[0].content().split())
    if guide.is_file():
        first = next(line.lstrip("# ").strip() for line in guide.read_text(encoding="utf-8").splitlines()
                     if line.startswith("#"))
        assert first in text
    else:
        assert "CONTRIBUTING.md" in text


def test_the_implementation_count_is_the_same_on_every_page(site_dir, catalogue):
    """The home page and README said 271 (distinct implementations), the implementations page
    275 (its entries, one per paper and class): one number, defined once, everywhere."""
    distinct = len({ref for p in catalogue.papers for ref in p.impls})
    text = (site_dir / "implementations" / "index.html").read_text(encoding="utf-8")
    assert re.search(rf"\b{distinct} small PyTorch implementations in", text)
    assert f'content="The {distinct} tested PyTorch reference implementations' in text
    assert f"{distinct} tested PyTorch reference implementations" in (catalogue.root / "README.md").read_text()


def test_a_name_the_title_already_starts_with_is_not_repeated(site_dir, catalogue):
    """Lists wrote 'DSelect-k: DSelect-k: Differentiable Selection ...'."""
    named = [p for p in catalogue.papers if p.short and p.title.lower().startswith(p.short[0].lower())]
    assert named  # DSelect-k, SNR, MultiBalance...
    text = "\n".join(html.unescape(f.read_text(encoding="utf-8")) for f in site_dir.rglob("*.html"))
    repeated = [p.id for p in named if f"{p.short[0]}: {p.title}" in text]
    assert not repeated, repeated


def test_implementation_summaries_show_code_not_docstring_markup(pages, catalogue):
    """74 summaries showed ``num_experts`` as the docstring writes it, and some :func:`ahp_priorities`."""
    page = pages["implementations/index.html"]
    summaries = [" ".join(p.content().split()) for p in page.find("p")]
    summaries = [t for t in summaries if t.startswith("Implements ")]
    assert summaries
    raw = [t for t in summaries if "``" in t or re.search(r":[a-z]+:`", t)]
    assert not raw, raw[:3]
    literals = {" ".join(m.split()) for i in impl_infos(catalogue) for m in re.findall(r"``(.+?)``", i.summary)}
    codes = {" ".join(c.content().split()) for c in page.find("code")}
    assert literals and literals <= codes, sorted(literals - codes)[:5]


def _search_words(index: dict, location: str) -> list[str]:
    """The words Material's search makes of a page's text: split at its separator and at every tag."""
    (text,) = [d["text"] for d in index["docs"] if d["location"] == location]
    return [w for w in re.split(rf"<[^>]*>|{index['config']['separator']}", text.lower()) if w]


def _first_and_last_words(index: dict, text: str) -> tuple[str, str]:
    words = [w for w in re.split(index["config"]["separator"], text.lower()) if w]
    return words[0], words[-1]


def _follows(words: list[str], first: str, then: str) -> bool:
    return any(a == first and b == then for a, b in zip(words, words[1:]))


def test_table_cells_and_lines_are_separate_words_in_the_search_index(site_dir, catalogue):
    """The index ran cells and <br>-separated lines together ('QM9DFT-computed', 'NYUv2Kinect',
    'DatasetDomainTasksSizeUsed by'), so searching 'Kinect' or 'DFT' did not find the Datasets page."""
    index = json.loads((site_dir / "search" / "search_index.json").read_text(encoding="utf-8"))
    datasets, codebases = _search_words(index, "datasets/"), _search_words(index, "codebases/")
    assert " ".join(datasets).count("dataset domain tasks size used by") == 1
    assert " ".join(codebases).count("codebase framework methods datasets papers") == 1
    glued = []
    for words, rows in ((datasets, catalogue.datasets), (codebases, catalogue.codebases)):
        for row in rows:
            name, desc = _first_and_last_words(index, row.name), _first_and_last_words(index, row.description)
            pairs = [(name[1], desc[0])]
            if words is codebases and row.license:
                pairs.append((desc[1], "license:"))
            if words is datasets and row.samples and row.resolution:
                pairs.append((_first_and_last_words(index, row.samples)[1],
                               _first_and_last_words(index, row.resolution)[0]))
            glued += [(row.id, pair) for pair in pairs if not _follows(words, *pair)]
    assert not glued, glued[:5]
    home = _search_words(index, "#papers-per-year")
    assert " ".join(home).count("year papers by area") == 1
    per_year = Counter(p.year for p in catalogue.papers)
    assert all(_follows(home, str(year), str(n)) for year, n in per_year.items())
