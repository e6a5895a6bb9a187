"""Render every generated page of the website from the Catalogue (jinja2, autoescaped).

Pages are Markdown for MkDocs: headings and prose in Markdown (escaped with ``md``), entries
as raw HTML blocks (escaped by jinja2's autoescape). ``render_site`` returns docs-relative
path -> text; the MkDocs hook turns each into a virtual file. Nothing here reads YAML.
"""

from __future__ import annotations

import gc
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace as V
from urllib.parse import quote

import jinja2
from markdown.extensions.toc import slugify
from markupsafe import Markup

from ..bibtex import render_bibtex
from ..catalogue import Catalogue
from ..checks import wants_impl
from ..markdown import md
from ..models import Paper, Section, name_parts, person
from .chart import papers_per_year_chart
from .impls import docstring_html, impl_infos
from .links import paper_links, relative, safe_url, source_relative

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PAPERS_DIR = "papers"
PAGE = {"browse": "browse.md", "datasets": "datasets.md", "codebases": "codebases.md",
        "questions": "questions.md", "impls": "implementations.md", "cite": "cite.md",
        "contributing": "contributing.md", "bib": "catalog.bib"}
LIST_PAGES = ("datasets", "codebases")  # pages that list catalogue entries other than papers


@dataclass(frozen=True)
class SiteOptions:
    source_url: str | None = None  # e.g. https://github.com/o/r/blob/main/ : links to impl and test files
    contributing: str | None = None  # text of CONTRIBUTING.md, if the project has one
    citation: dict = field(default_factory=dict)  # parsed CITATION.cff
    directory_urls: bool = True


def meta_text(text: str) -> str:
    """Text safe in a <meta content="..."> the theme writes without escaping."""
    return re.sub(r"[<>]", "", text.replace('"', "'").replace("&", "and"))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("site_gen", "templates/site"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(
        mdtext=lambda s: Markup(md(s)),  # Markdown context: md() also turns < > into entities
        yaml=lambda s: Markup(json.dumps(meta_text(str(s)), ensure_ascii=False)),
        yaml_title=lambda s: Markup(json.dumps(re.sub(r"[<>]", "", str(s)), ensure_ascii=False)),
        url=safe_url, person=person, docstring=docstring_html)
    return env


ENV = _env()


def section_page(section_id: str) -> str:
    return f"{PAPERS_DIR}/{section_id.split('/')[0]}.md"


def section_anchor(section_id: str) -> str:
    """Anchor of a subsection; '--' never occurs in entry ids, so it cannot clash with a paper."""
    return section_id.replace("/", "--")


def split_bib(bib: str) -> dict[str, str]:
    """Entry key -> its text, cut from the whole file (the same text ``bibtex_entries`` gives, in one pass)."""
    entries: dict[str, str] = {}
    for chunk in ("\n" + bib).split("\n@")[1:]:
        key = chunk.partition("{")[2].partition(",")[0]
        entries[key] = "@" + chunk.rstrip()
    return entries


@lru_cache(maxsize=4096)
def _relative(here: str, there: str, directory_urls: bool) -> str:
    return relative(here, there, "", directory_urls)


class Site:
    """The catalogue plus the lookups every page needs, computed once."""

    def __init__(self, cat: Catalogue, options: SiteOptions, bib: str | None = None):
        self.cat, self.options = cat, options
        self.bib = bib if bib is not None else render_bibtex(cat)
        self.bib_entry = split_bib(self.bib)
        self.titles = {s.id: s.title for s, _ in cat.walk_sections()}
        self.by_id = {p.id: p for p in cat.papers}
        self.home = {p.id: section_page(p.topics[0]) for p in cat.papers}
        self.dataset_names = {d.id: d.name for d in cat.datasets}
        self.by_topic = cat.papers_by_topic()
        self.per_page = Counter(self.home.values())  # papers whose full entry is on each section page

    def rel(self, here: str, there: str, anchor: str = "") -> str:
        return _relative(here, there, self.options.directory_urls) + (f"#{anchor}" if anchor else "")

    def paper_href(self, here: str, pid: str) -> str:
        return self.rel(here, self.home[pid], pid)

    def source_href(self, path: str) -> str | None:
        base = self.options.source_url
        # a path may hold a space, '#' or '?' (test files are found by name): encoded, they stay a path
        return safe_url(base.rstrip("/") + "/" + quote(path, safe="/")) if base else None

    def paper_view(self, p: Paper, here: str) -> V:
        impl_url = self.rel(here, PAGE["impls"], f"impl-{p.id}") if p.impl else None
        venue = self.cat.venues.get(p.venue)
        return V(
            p=p, href=self.paper_href(here, p.id),
            authors=[person(a) for a in p.authors],
            venue_name=venue.name if venue else p.venue,
            links=paper_links(p, impl_url),
            topics=[(self.titles.get(t, t), self.rel(here, section_page(t), section_anchor(t) if "/" in t else ""))
                    for t in p.topics],
            datasets=[(self.dataset_names.get(d, d), self.rel(here, PAGE["datasets"], f"dataset-{d}"))
                      for d in p.datasets],
            related=[(label, self.by_id[o], self.paper_href(here, o))
                     for label, ids in (("Builds on", p.extends), ("Similar to", p.similar_to))
                     for o in ids if o in self.by_id],
            bib=self.bib_entry.get(p.id, ""),
        )

    @staticmethod
    def named(p: Paper) -> str:
        """'PCGrad: Gradient Surgery for ...' in lists; the title alone when it already starts
        with the name ('DSelect-k: Differentiable Selection ...' read 'DSelect-k: DSelect-k: ...')."""
        if not p.short or p.title.lower().startswith(p.short[0].lower()):
            return p.title
        return f"{p.short[0]}: {p.title}"

    def cite_short(self, p: Paper) -> str:
        """'Yu et al., NeurIPS 2020' for compact references, with family names."""
        first = name_parts(p.authors[0])[0]
        more = " et al." if len(p.authors) > 2 else (f" and {name_parts(p.authors[1])[0]}" if len(p.authors) == 2 else "")
        return f"{first}{more}, {p.venue} {p.year}"


def _heading(level: int) -> int:
    """A heading level HTML and Markdown have: a taxonomy deeper than six levels (nothing limits
    it) shares the sixth, rather than getting an <h7> or a '#######' line, which are no headings."""
    return min(level, 6)


def _descendants(section: Section, level: int) -> list[tuple[Section, int]]:
    out = [(section, level)]
    for child in section.children:
        out += _descendants(child, level + 1)
    return out


def render_section(site: Site, top: Section) -> str:
    here = section_page(top.id)
    groups = site.by_topic
    blocks = []
    for section, level in _descendants(top, 1):
        papers = groups.get(section.id, []) if not section.children else []
        own = [site.paper_view(p, here) for p in papers if site.home[p.id] == here and p.topics[0] == section.id]
        elsewhere = [(p, site.paper_href(here, p.id), site.titles.get(p.topics[0], p.topics[0]))
                     for p in papers if not (site.home[p.id] == here and p.topics[0] == section.id)]
        blocks.append(V(section=section, level=_heading(level), anchor=section_anchor(section.id),
                       leaf=not section.children, papers=own, elsewhere=elsewhere,
                       paper_level=_heading(level + 1)))
    count = site.per_page[here]
    # a section named like one of the site's lists (Codebases) would give the nav two items of
    # one name: title it apart and point to the list
    companion = source_relative(here, PAGE[top.id]) if top.id in LIST_PAGES else None  # a Markdown link
    title = f"{top.title} (papers)" if companion else top.title
    return ENV.get_template("section.md.j2").render(top=top, title=title, companion=companion, blocks=blocks,
                                                    count=count, site=site)


def render_browse(site: Site) -> str:
    here = PAGE["browse"]
    rows = []
    for p in sorted(site.cat.papers, key=lambda p: (-p.year, p.title.lower(), p.id)):
        tops = dict.fromkeys(t.split("/")[0] for t in p.topics)
        rows.append(V(p=p, href=site.paper_href(here, p.id),
                     authors=[person(a) for a in p.authors],
                     topics=[site.titles.get(t, t) for t in p.topics],
                     topic_ids=" ".join([*p.topics, *tops]),
                     text=" ".join([*p.short, p.title, *map(person, p.authors), p.venue]).lower(),
                     impl_href=site.rel(here, PAGE["impls"], f"impl-{p.id}") if p.impl else None))
    years = [p.year for p in site.cat.papers] or [0]
    topics = [(s, d) for s, d in site.cat.walk_sections()]
    venues = sorted({p.venue for p in site.cat.papers}, key=str.lower)
    return ENV.get_template("browse.md.j2").render(rows=rows, topics=topics, venues=venues, first=min(years),
                                                   last=max(years), site=site)


def render_datasets(site: Site) -> str:
    here = PAGE["datasets"]
    users: dict[str, list[Paper]] = defaultdict(list)
    for p in site.cat.papers:
        for d in dict.fromkeys(p.datasets):
            users[d].append(p)
    in_codebases: dict[str, list] = defaultdict(list)
    for c in site.cat.codebases:
        for d in c.datasets:
            in_codebases[d].append(c)
    rows = []
    for d in sorted(site.cat.datasets, key=lambda d: (d.domain, d.name.lower())):
        used = sorted(users.get(d.id, []), key=lambda p: (-p.year, p.title.lower()))
        intro = site.by_id.get(d.paper) if d.paper else None
        rows.append(V(d=d, domain=site.titles.get(d.domain, d.domain),
                     intro=(intro, site.paper_href(here, intro.id)) if intro else None,
                     users=[(p, site.paper_href(here, p.id)) for p in used],
                     codebases=[(c, site.rel(here, PAGE["codebases"], f"codebase-{c.id}"))
                                   for c in in_codebases.get(d.id, [])]))
    return ENV.get_template("datasets.md.j2").render(rows=rows, site=site)


def _normal_url(url: str) -> str:
    return url.lower().rstrip("/").removesuffix(".git")


def render_codebases(site: Site) -> str:
    here = PAGE["codebases"]
    rows = []
    for c in sorted(site.cat.codebases, key=lambda c: c.name.lower()):
        listed = [site.by_id[pid] for pid in c.papers if pid in site.by_id]
        by_code = [p for p in site.cat.papers if any(_normal_url(u) == _normal_url(c.url) for u in p.code)]
        papers = list({p.id: p for p in listed + by_code}.values())
        rows.append(V(c=c, papers=[(p, site.paper_href(here, p.id)) for p in papers],
                     datasets=[(site.dataset_names.get(d, d), site.rel(here, PAGE["datasets"], f"dataset-{d}"))
                                  for d in c.datasets]))
    return ENV.get_template("codebases.md.j2").render(rows=rows, site=site)


def render_questions(site: Site) -> str:
    here = PAGE["questions"]
    by_leaf: dict[str, list] = defaultdict(list)
    for p in sorted(site.cat.papers, key=lambda p: (-p.year, p.title.lower())):
        if p.questions:
            by_leaf[p.topics[0]].append((p, site.paper_href(here, p.id)))
    groups = []
    for section, depth in site.cat.walk_sections():
        if section.children:
            if any(k.startswith(section.id + "/") for k in by_leaf):
                groups.append(V(section=section, level=_heading(depth + 2), papers=[],
                               anchor="q--" + section_anchor(section.id)))
        elif by_leaf.get(section.id):
            groups.append(V(section=section, level=_heading(depth + 2), papers=by_leaf[section.id],
                           anchor="q--" + section_anchor(section.id)))
    total = sum(len(p.questions) for p in site.cat.papers)
    return ENV.get_template("questions.md.j2").render(groups=groups, total=total, site=site)


def render_impls(site: Site) -> str:
    here = PAGE["impls"]
    infos = [V(info=i, href=site.paper_href(here, i.paper.id), source=site.source_href(i.path),
              tests=[(t, site.source_href(t.path)) for t in i.tests]) for i in impl_infos(site.cat)]
    wanted = []
    for p in sorted(site.cat.papers, key=lambda p: (p.topics[0], -p.year, p.title.lower())):
        if wants_impl(p):
            wanted.append((p, site.paper_href(here, p.id), site.titles.get(p.topics[0], p.topics[0])))
    studies = [(p, site.paper_href(here, p.id)) for p in sorted(site.cat.papers, key=lambda p: (-p.year, p.title.lower()))
               if p.no_impl]
    distinct = len(site.cat.implementations())  # the README's and home page's count, not the entries
    papers = len({i.info.paper.id for i in infos})
    models = {(i.info.path, i.info.symbol) for i in infos if i.info.is_model}
    unchecked = _per_class(r for r in infos if r.info.is_model and not r.info.equations_checked_in)
    readings = _per_class(r for r in infos if r.info.unverified_reading)
    return ENV.get_template("implementations.md.j2").render(
        infos=infos, wanted=wanted, studies=studies, site=site, distinct=distinct, papers=papers,
        models=len(models), models_checked=len(models) - len(unchecked), unchecked=unchecked, readings=readings,
        contributing=source_relative(here, PAGE["contributing"]) + _anchor_if_present(
            site.options.contributing, "Add a reference implementation"))


def _per_class(entries) -> list[list]:
    """Entries grouped by class, one group per class with an entry per paper it implements, in first-seen
    order: a class serving two papers is listed once, at its first."""
    groups: dict[tuple[str, str], list] = {}
    for r in entries:
        groups.setdefault((r.info.path, r.info.symbol), []).append(r)
    return list(groups.values())


def _anchor_if_present(markdown: str | None, heading: str) -> str:
    """``#slug`` of ``heading`` when ``markdown`` has it (the slug MkDocs' table of contents gives
    it), else nothing: a link to an anchor the page lacks stops ``mkdocs build --strict``."""
    headings = re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", markdown or "", flags=re.M)
    return f"#{slugify(heading, '-')}" if heading in headings else ""


# Code is left as written: a fenced block (``` or ~~~, up to its closing fence or the end of the
# text) or a code span; then the link forms that can point into the repository.
_CODE = r"(?P<code>^[ ]{0,3}(?P<fence>`{3,}|~{3,})[^\n]*\n(?:.*?\n)??[ ]{0,3}(?P=fence)[^\n]*$"
_CODE += r"|^[ ]{0,3}(?:`{3,}|~{3,}).*\Z"  # a fence never closed runs to the end
_CODE += r"|(?P<ticks>`+)[^`](?:(?!\n[ \t]*\n).)*?(?<!`)(?P=ticks)(?!`))"  # a span ends with its paragraph
_INLINE = r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s]+)(?P<title>[ \t]+(?:\"[^\"\n]*\"|'[^'\n]*'))?\)"
_DEFINITION = r"^(?P<indent>[ ]{0,3})\[(?P<label>[^\]\n]+)\]:[ \t]*(?P<dtarget>\S+)(?P<rest>[^\n]*)$"
_REFERENCE = r"(?<![!\]])\[(?P<rtext>[^\]\n]+)\](?:\[(?P<rlabel>[^\]\n]*)\])?(?![(:\[])"


def _is_relative(target: str) -> bool:
    return not re.match(r"^(https?:|mailto:|#)", target)


def rewrite_links(markdown: str, source_url: str | None) -> str:
    """Relative links of a repository Markdown file point to the repository, not the site: inline
    links (with or without a title) and reference definitions, never inside code. Without a
    source URL a link becomes its text with the path in code, since the site has no such page."""
    def repo_url(target: str) -> str:
        path = re.sub(r"^(\./)+", "", target).lstrip("/")  # './x' and '/x' are x; '.github/x' keeps its dot
        return f"{source_url.rstrip('/')}/{path}"

    relative_labels = {} if source_url else {  # without a source URL, references to these become text
        m["label"].lower(): m["dtarget"] for m in re.finditer(_DEFINITION, _without_code(markdown), re.M)
        if _is_relative(m["dtarget"])}

    def fix(m: re.Match) -> str:
        if m["code"] is not None:
            return m[0]
        if m["target"] is not None:
            if not _is_relative(m["target"]):
                return m[0]
            if source_url:
                return f"[{m['text']}]({repo_url(m['target'])}{m['title'] or ''})"
            return f"{m['text']} (`{m['target']}`)"
        if m["dtarget"] is not None:
            if not _is_relative(m["dtarget"]):
                return m[0]
            return f"{m['indent']}[{m['label']}]: {repo_url(m['dtarget'])}{m['rest']}" if source_url else ""
        label = (m["rlabel"] or m["rtext"]).lower()
        if label not in relative_labels:
            return m[0]
        return f"{m['rtext']} (`{relative_labels[label]}`)"

    forms = [_CODE, _INLINE, _DEFINITION] + ([] if source_url else [_REFERENCE])
    return re.sub("|".join(f"(?:{f})" for f in forms), fix, markdown, flags=re.M | re.S)


def _without_code(markdown: str) -> str:
    return re.sub(_CODE, "", markdown, flags=re.M | re.S)


def render_contributing(site: Site) -> str:
    text = site.options.contributing
    body = rewrite_links(text, site.options.source_url) if text else None
    return ENV.get_template("contributing.md.j2").render(body=body, site=site)


def _bibtex_name(author: dict) -> str:
    """A CFF person or entity as BibTeX reads names: "given von family", or "von family, suffix,
    given" when there is a suffix (Jr., III); an entity or an alias alone is braced, whole."""
    def part(key: str) -> str:
        return str(author.get(key) or "").strip()
    if part("name"):
        return f"{{{part('name')}}}"
    family = " ".join(x for x in (part("name-particle"), part("family-names")) if x)
    if part("name-suffix") and family:
        return ", ".join(x for x in (family, part("name-suffix"), part("given-names")) if x)
    full = " ".join(x for x in (part("given-names"), family) if x)
    return full or (f"{{{part('alias')}}}" if part("alias") else "")


def render_cite(site: Site) -> str:
    cff = site.options.citation or {}
    # An entity (``name``) is braced so BibTeX does not split it into given and family names.
    authors = [name for a in cff.get("authors", []) if isinstance(a, dict) and (name := _bibtex_name(a))]
    year = str(cff.get("date-released", ""))[:4]
    return ENV.get_template("cite.md.j2").render(cff=cff, authors=authors, year=year, site=site)


def home_blocks(site: Site) -> dict[str, str]:
    """HTML fragments the home page (docs/index.md) pulls in through <!-- catalogue:NAME --> markers."""
    cat = site.cat
    counts = {"papers": len(cat.papers), "datasets": len(cat.datasets), "codebases": len(cat.codebases),
              "implementations": len(cat.implementations())}
    links = {"browse": site.rel("index.md", PAGE["browse"]), "datasets": site.rel("index.md", PAGE["datasets"]),
             "codebases": site.rel("index.md", PAGE["codebases"]), "impls": site.rel("index.md", PAGE["impls"]),
             "cite": site.rel("index.md", PAGE["cite"]), "bib": site.rel("index.md", PAGE["bib"])}
    sections = [(s, site.rel("index.md", section_page(s.id)), site.per_page[section_page(s.id)])
                for s in cat.sections]
    tpl = ENV.get_template("home.html.j2")
    context = {"counts": counts, "links": links, "chart": papers_per_year_chart(cat), "sections": sections}
    return {part: tpl.render(part=part, **context).strip() for part in ("counts", "chart", "sections", "cite")}


def render_site(cat: Catalogue, options: SiteOptions | None = None,
                bib: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(generated files: docs path -> text, home page fragments: marker name -> HTML).

    ``bib`` is the rendered catalog.bib when the caller has it already (the pipeline does).
    Like the pipeline, it pauses the cyclic GC: rendering allocates many small objects and
    no cycles, and full collections over the catalogue's models made big sites slow.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        return _render_site(cat, options, bib)
    finally:
        if paused:
            gc.enable()


def _render_site(cat: Catalogue, options: SiteOptions | None, bib: str | None) -> tuple[dict[str, str], dict[str, str]]:
    site = Site(cat, options or SiteOptions(), bib)
    files = {section_page(s.id): render_section(site, s) for s in cat.sections}
    files[PAGE["browse"]] = render_browse(site)
    files[PAGE["datasets"]] = render_datasets(site)
    files[PAGE["codebases"]] = render_codebases(site)
    files[PAGE["questions"]] = render_questions(site)
    files[PAGE["impls"]] = render_impls(site)
    files[PAGE["cite"]] = render_cite(site)
    files[PAGE["contributing"]] = render_contributing(site)
    files[PAGE["bib"]] = site.bib
    for asset in sorted(ASSETS.iterdir()):
        if asset.suffix in (".js", ".css"):
            files[f"assets/mtl/{asset.name}"] = asset.read_text(encoding="utf-8")
    return files, home_blocks(site)
