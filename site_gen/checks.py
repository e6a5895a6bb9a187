"""Checks that need the whole catalogue: references, duplicates, links to implementations.

Each check appends problems; none raises. The implementation check reads source files
with ``ast`` instead of importing them, so ``check`` never needs PyTorch.
"""

from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import unquote_plus, urlsplit

from .catalogue import Catalogue
from .models import Codebase, Dataset, ImplRef, Paper
from .problems import Problems
from .pysource import defined_names, parse, read_test_file, test_files

Entry = Paper | Dataset | Codebase

IMPL_TOPICS = ("architecture/", "optimization/")
# Surveys and codebases collect many methods: their methods are wanted under their own papers.
NO_IMPL_TOPICS = {"survey", "codebases"}


def wants_impl(paper: Paper) -> bool:
    """Whether a paper without ``impl`` belongs on the "implementation wanted" list."""
    return (not paper.impl and not paper.no_impl and any(t.startswith(IMPL_TOPICS) for t in paper.topics)
            and not NO_IMPL_TOPICS & set(paper.topics))
TRACKING = re.compile(r"^(utm_\w+|fbclid|gclid|mc_[ce]id|ref_src|_hsenc|_hsmi|spm|share_source)$")


def _query_key(pair: str) -> str:
    """The decoded name of one ``name=value`` pair of a query (``utm%5Fsource`` is utm_source)."""
    return unquote_plus(pair.partition("=")[0])


def tracking_parameters(url: str) -> list[str]:
    """Names of the tracking parameters (utm_source, fbclid, ...) in ``url``'s query."""
    names = (_query_key(pair) for pair in urlsplit(url).query.split("&") if pair)
    return [name for name in names if TRACKING.match(name)]


def strip_tracking(url: str) -> str:
    """``url`` without its tracking parameters (the other parameters keep their order, as written):
    the same names as ``tracking_parameters`` finds, so what is stripped is never found again."""
    parts = urlsplit(url)
    pairs = parts.query.split("&")
    kept = [pair for pair in pairs if not TRACKING.match(_query_key(pair))]
    return url if len(kept) == len(pairs) else parts._replace(query="&".join(kept)).geturl()


def run_checks(cat: Catalogue, problems: Problems, *, list_wanted: bool = False) -> None:
    check_taxonomy(cat, problems)
    check_references(cat, problems)
    check_duplicates(cat, problems)
    check_repeated_items(cat, problems)
    check_urls(cat, problems)
    check_impls(cat, problems, list_wanted=list_wanted)
    check_implemented_papers_are_annotated(cat, problems)
    check_to_verify(cat, problems)


def check_to_verify(cat: Catalogue, problems: Problems) -> None:
    """One summary warning for entries whose metadata still awaits confirmation."""
    pending = [p for p in cat.papers if p.to_verify]
    if pending:
        problems.warning(cat.where("papers.yaml", pending[0], "to_verify"), "-", "to_verify",
                         f"{len(pending)} paper(s) have metadata that still needs confirming: "
                         f"{', '.join(p.id for p in pending)}")


def _hint(value: str, choices: Iterable[str]) -> str | None:
    """The closest choice, letter case aside ('iclr' -> 'ICLR', 'NeurIPs' -> 'NeurIPS')."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"did you mean '{by_lower[close[0]]}'?" if close else None


def check_taxonomy(cat: Catalogue, problems: Problems) -> None:
    seen: set[str] = set()

    def visit(section, parent: str | None, path: tuple) -> None:
        where = cat.sources["taxonomy.yaml"].where(path + ("id",))
        if section.id in seen:
            problems.error(where, section.id, "id", "duplicate section id")
        seen.add(section.id)
        if parent and not section.id.startswith(parent + "/"):
            problems.error(where, section.id, "id", f"a subsection id must start with '{parent}/'")
        for i, child in enumerate(section.children):
            visit(child, section.id, path + ("children", i))

    for i, section in enumerate(cat.sections):
        visit(section, None, (i,))
    doc = cat.sources.get("taxonomy.yaml")
    if doc is not None and doc.data == []:  # topics go unchecked (check_references) and no paper is listed
        problems.error(doc.where(()), "-", "-", "the taxonomy has no sections",
                       "every paper's topics name a section of taxonomy.yaml: add them")


def declared_ids(cat: Catalogue, file: str) -> set[str] | None:
    """Ids (or venue keys) written in ``file``, valid or not; None if the file could not be read.

    References are checked against these rather than against valid entries only, so one
    broken entry yields one error, not one more for every reference to it.
    """
    doc = cat.sources.get(file)
    if doc is None:
        return None
    if file == "venues.yaml":
        return {str(k) for k in doc.data} if isinstance(doc.data, dict) else None
    if isinstance(doc.data, list):
        return {raw["id"] for raw in doc.data if isinstance(raw, dict) and isinstance(raw.get("id"), str)}
    return None


def check_references(cat: Catalogue, problems: Problems) -> None:
    leaves = set(cat.leaf_ids())
    parents = {s.id: s for s, _ in cat.walk_sections() if s.children}
    paper_ids = declared_ids(cat, "papers.yaml")
    dataset_ids = declared_ids(cat, "datasets.yaml")
    venue_keys = declared_ids(cat, "venues.yaml")
    if declared_ids(cat, "taxonomy.yaml") is None or not cat.sections:
        leaves = None

    def ref(file: str, entry: Entry, field: str, i: int | None, value: str | None, known: set[str] | None,
            what: str) -> None:
        if value is None or known is None or value in known:  # invalid field, or target file unreadable:
            return  # reported already
        path = (field,) if i is None else (field, i)
        where = cat.where(file, entry, *path)
        problems.error(where, entry.id, ".".join(map(str, path)), f"unknown {what} '{value}'", _hint(value, known))

    for p in cat.checked("papers.yaml"):
        ref("papers.yaml", p, "venue", None, p.venue, venue_keys, "venue")
        for i, topic in enumerate(p.topics or []):
            if topic in parents:
                subs = ", ".join(c.id for c in parents[topic].children)
                problems.error(cat.where("papers.yaml", p, "topics", i), p.id, f"topics.{i}",
                               f"'{topic}' has subsections; use one of them", f"one of: {subs}")
            else:
                ref("papers.yaml", p, "topics", i, topic, leaves, "topic")
        for i, d in enumerate(p.datasets or []):
            ref("papers.yaml", p, "datasets", i, d, dataset_ids, "dataset")
        for field in ("extends", "similar_to"):
            for i, other in enumerate(getattr(p, field) or []):
                if other == p.id:
                    problems.error(cat.where("papers.yaml", p, field, i), p.id, f"{field}.{i}",
                                   "a paper cannot refer to itself")
                else:
                    ref("papers.yaml", p, field, i, other, paper_ids, "paper")
    for d in cat.checked("datasets.yaml"):
        domains = None if leaves is None else {x for x in leaves if x.startswith("benchmarks/")}
        ref("datasets.yaml", d, "domain", None, d.domain, domains, "benchmark domain")
        if d.paper:
            ref("datasets.yaml", d, "paper", None, d.paper, paper_ids, "paper")
    for c in cat.checked("codebases.yaml"):
        for i, pid in enumerate(c.papers or []):
            ref("codebases.yaml", c, "papers", i, pid, paper_ids, "paper")
        for i, did in enumerate(c.datasets or []):
            ref("codebases.yaml", c, "datasets", i, did, dataset_ids, "dataset")


def normalise_title(title: str) -> str:
    """Comparison key for titles and names: NFKC, case-folded, letters, marks and digits of any script.

    'Multi-Task Learning' and 'multi task learning' meet; two titles in Chinese or Japanese
    stay apart (an ASCII-only rule would reduce both to '')."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", title).casefold())
    return "".join(c for c in text if unicodedata.category(c)[0] in "LNM")


def check_duplicates(cat: Catalogue, problems: Problems) -> None:
    def unique(file: str, entries, field: str, key, label: str) -> None:
        first: dict[str, Entry] = {}
        for e in entries:
            value = getattr(e, field)
            if not value:
                continue
            k = key(value)
            if k in first:
                other = first[k]
                line = cat.where(file, other, field).line
                problems.error(cat.where(file, e, field), e.id, field,
                               f"duplicate {label}: same as entry '{other.id}' (line {line})")
            else:
                first[k] = e

    for file in ("papers.yaml", "datasets.yaml", "codebases.yaml"):
        seen: dict[str, Entry] = {}
        for e in cat.checked(file):
            if e.id in seen:
                problems.error(cat.where(file, e, "id"), e.id, "id",
                               f"duplicate id (first used on line {cat.where(file, seen[e.id], 'id').line})",
                               "ids are permanent anchors; choose a new one")
            else:
                seen[e.id] = e
    papers = cat.checked("papers.yaml")
    unique("papers.yaml", papers, "arxiv", str, "arXiv id")
    unique("papers.yaml", papers, "doi", str.lower, "DOI")
    unique("papers.yaml", papers, "title", normalise_title, "title")
    unique("papers.yaml", papers, "url", lambda u: u.rstrip("/").lower(), "URL")
    unique("datasets.yaml", cat.checked("datasets.yaml"), "name", normalise_title, "name")
    unique("codebases.yaml", cat.checked("codebases.yaml"), "url", lambda u: u.rstrip("/").lower(), "URL")


# List fields in which one value written twice is a mistake. Authors are left out: two
# co-authors may share a name (two people called Wei Wang on one paper).
UNIQUE_ITEMS = {"papers.yaml": ("topics", "datasets", "code", "also_impl", "extends", "similar_to", "short"),
                "datasets.yaml": ("tasks",), "codebases.yaml": ("methods", "datasets", "papers")}


def check_repeated_items(cat: Catalogue, problems: Problems) -> None:
    """A topic, dataset, link... listed twice in one entry; authors written twice only warn."""
    for file in ("papers.yaml", "datasets.yaml", "codebases.yaml"):
        for e in cat.checked(file):
            fields = UNIQUE_ITEMS[file] + (("authors",) if file == "papers.yaml" else ())
            for field in fields:
                first: dict[str, int] = {}
                for i, value in enumerate(getattr(e, field) or []):
                    if value not in first:
                        first[value] = i
                        continue
                    where = cat.where(file, e, field, i)
                    if field == "authors":
                        problems.warning(where, e.id, f"{field}.{i}", f"author '{value}' is listed twice",
                                         "remove the repeat, unless two co-authors share the name")
                    else:
                        problems.error(where, e.id, f"{field}.{i}",
                                       f"'{value}' is listed twice (also item {first[value]})", "remove the repeat")


def check_urls(cat: Catalogue, problems: Problems) -> None:
    def one(file: str, entry: Entry, path: tuple, url: str | None) -> None:
        if not url:
            return
        parts = urlsplit(url)
        field = ".".join(map(str, path))
        tracking = tracking_parameters(url)
        if tracking:
            problems.error(cat.where(file, entry, *path), entry.id, field,
                           f"tracking parameter(s) in URL: {', '.join(tracking)}", "remove them")
        if parts.scheme == "http":
            problems.warning(cat.where(file, entry, *path), entry.id, field, "plain http URL",
                             "use https if the site supports it")

    for p in cat.checked("papers.yaml"):
        one("papers.yaml", p, ("url",), p.url)
        for i, u in enumerate(p.code or []):
            one("papers.yaml", p, ("code", i), u)
    for d in cat.checked("datasets.yaml"):
        one("datasets.yaml", d, ("homepage",), d.homepage)
    for c in cat.checked("codebases.yaml"):
        one("codebases.yaml", c, ("url",), c.url)


def tested_symbols(root: Path) -> set[tuple[str, str]]:
    """(module, name) pairs that some test under ``root/tests`` imports."""
    found: set[tuple[str, str]] = set()
    for path in test_files(root):
        facts = read_test_file(path)
        if facts is not None:
            found |= facts.imports
    return found


def link_problem(root: Path, ref: ImplRef, tested: Callable[[], set[tuple[str, str]]]) -> tuple[str, str | None] | None:
    """What is wrong with an implementation link (message, hint), or None."""
    path, symbol = ref
    if not (root / path).is_file():
        return f"file not found: {path}", None
    tree = parse(root / path)
    if tree is None:
        return f"{path} is not valid Python", None
    names = defined_names(tree)
    if symbol not in names:
        return f"{path} defines no '{symbol}'", _hint(symbol, names)
    if (ref.module, symbol) not in tested():
        return (f"no test imports {ref.module}.{symbol}",
                f"add a test under tests/ with 'from {ref.module} import {symbol}'")
    return None


def check_implemented_papers_are_annotated(cat: Catalogue, problems: Problems) -> None:
    """A paper with a reference implementation carries notes and open questions: the
    implementation page and the questions page show them next to the code. Other papers
    without them are named in one warning, as work still to do."""
    unannotated: list[Paper] = []
    for p in cat.papers:
        if not p.impls:
            if not (p.notes and p.questions):
                unannotated.append(p)
            continue
        for field, what in (("notes", "what the method does and why"), ("questions", "what the paper leaves open")):
            if not getattr(p, field):
                problems.error(cat.where("papers.yaml", p, "impl"), p.id, field,
                               f"a paper with a reference implementation needs {field}",
                               f"add {field}: {what}, in your own words")
    if unannotated:  # located at the first of them
        problems.warning(cat.where("papers.yaml", unannotated[0]), "-", "notes",
                         f"{len(unannotated)} paper(s) have no notes or no open questions yet: "
                         f"{', '.join(p.id for p in unannotated)}")


def check_impls(cat: Catalogue, problems: Problems, *, list_wanted: bool = False) -> None:
    tested = functools.cache(lambda: tested_symbols(cat.root))  # read the tests only if a link needs it
    wanted: list[Paper] = []
    for p in cat.papers:
        if not p.impl and wants_impl(p):
            wanted.append(p)
        fields = [("impl",)] + [("also_impl", i) for i in range(len(p.also_impl))]
        for field, ref in zip(fields, p.impl_refs):
            found = link_problem(cat.root, ref, tested)
            if found:
                problems.error(cat.where("papers.yaml", p, *field), p.id, field[0], *found)
    if wanted:
        loc = cat.where("papers.yaml", wanted[0])  # the first of them
        listing = f": {', '.join(p.id for p in wanted)}" if list_wanted else ""
        problems.warning(loc, "-", "impl",
                         f"{len(wanted)} architecture/optimization paper(s) have no reference implementation "
                         f"yet (implementation wanted){listing}",
                         None if list_wanted else "run with --list-wanted to name them")
