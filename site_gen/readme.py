"""Render the awesome-list README.md from the Catalogue (jinja2 template)."""

from __future__ import annotations

import jinja2

from .bibtex import line_ranges
from .catalogue import Catalogue
from .markdown import github_anchor, md, md_url
from .models import person

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("site_gen", "templates"),
    autoescape=False,  # Markdown, not HTML: every value goes through the `md` filter instead
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters.update(md=md, url=md_url, anchor=github_anchor, person=person)


class LinkOnce:
    """Markdown links that appear once: a URL already linked is rendered as plain text.

    awesome-lint rejects repeated links, and a paper listed under several topics (or a
    repository shared by several papers) would otherwise repeat its URLs.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, text: str, url: str | None) -> str:
        if not url or url in self.seen:
            return text
        self.seen.add(url)
        return f"[{text}]({md_url(url)})"


def heading_anchors(cat: Catalogue) -> dict[str, str]:
    """Section id -> the anchor GitHub gives its heading (repeated titles get -1, -2, ...)."""
    used: dict[str, int] = {}
    anchors = {}
    for section, _ in cat.walk_sections():
        base = github_anchor(section.title)
        n = used.get(base, 0)
        anchors[section.id] = base if n == 0 else f"{base}-{n}"
        used[base] = n + 1
    return anchors


def render_readme(cat: Catalogue, bib: str) -> str:
    """README text; ``bib`` is the rendered catalog.bib, used for per-entry line links."""
    groups = cat.papers_by_topic()
    first_section: dict[str, str] = {}  # where a paper with several topics is listed in full
    for section, _ in cat.walk_sections():
        for paper in groups.get(section.id, []):
            first_section.setdefault(paper.id, section.id)
    sections = []
    for section, depth in cat.walk_sections():
        if section.children:
            sections.append({"section": section, "depth": depth, "papers": []})
        else:
            sections.append({"section": section, "depth": depth, "papers": groups.get(section.id, [])})
    return _ENV.get_template("README.md.j2").render(
        cat=cat,
        sections=sections,
        link=LinkOnce(),
        first_section=first_section,
        section_titles={sec.id: sec.title for sec, _ in cat.walk_sections()},
        anchors=heading_anchors(cat),
        venues=cat.venues,
        bib_lines=line_ranges(bib),
        counts={"papers": len(cat.papers), "datasets": len(cat.datasets), "codebases": len(cat.codebases),
                "impls": len({ref for p in cat.papers for ref in p.impls})},
        paper_by_id={p.id: p for p in cat.papers},
        # Author strings are formatted once per paper in Python: a paper can sit in several
        # sections, and per-author template filters dominate render time for large catalogues.
        authors={p.id: ", ".join(md(person(a)) for a in p.authors) for p in cat.papers},
    )
