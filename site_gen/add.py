"""``python -m site_gen add arxiv:ID | doi:DOI``: pre-fill a paper entry from public indexes.

Steps: fetch the record (arXiv, or doi.org CSL-JSON), ask DBLP where an arXiv preprint
was published, map the result onto our schema (venue key, suggested id, topics), refuse
duplicates, show the entry, then splice it into papers.yaml. The new entry is emitted
by ruamel.yaml in the file's own style and inserted as text, so every existing byte —
order, comments, quoting, indentation — stays as it was.
"""

from __future__ import annotations

import difflib
import io
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from .checks import normalise_title, strip_tracking, tracking_parameters
from .metadata import Endpoints, FetchError, Fetcher, Record, fetch_arxiv, fetch_doi, find_published
from .models import ARXIV_NEW, ARXIV_OLD, DOI, SLUG, Paper, Venue, _url, name_parts
from .output import write_atomic
from .problems import Problems
from .yamlfile import load_yaml, load_yaml_text, marked_at

# Abbreviations that DBLP and Crossref use for venues whose full name is in venues.yaml.
ALIASES = {
    "nips": "NeurIPS", "neurips": "NeurIPS", "iclr": "ICLR", "icml": "ICML", "cvpr": "CVPR", "iccv": "ICCV",
    "eccv": "ECCV", "aaai": "AAAI", "kdd": "KDD", "acl": "ACL", "emnlp": "EMNLP", "corl": "CoRL",
    "recsys": "RecSys", "ijcai": "IJCAI", "www": "WWW", "corr": "arXiv",
    "ieeetranspatternanalmachintell": "TPAMI", "ieeetransknowldataeng": "TKDE",
    "jmachlearnres": "JMLR", "jartifintellres": "JAIR", "machlearn": "MLJ",
}
FIX_FIRST = "fix it first (run python -m site_gen check)"
STOPWORDS = frozenset("a an the on of for to in and with by from via at is are towards toward do does when".split())


class AddError(Exception):
    """The entry cannot be added; the message says why and what to do."""


@dataclass
class Plan:
    entry: dict[str, Any]     # the new paper, fields in catalogue order
    text: str                 # the whole new papers.yaml

    @property
    def line(self) -> int:
        """1-based line of the new entry's '- id:' in the new file."""
        head = f"- id: {self.entry['id']}"
        return next(i for i, text in enumerate(self.text.splitlines(), 1) if text.strip() == head)


# --- mapping a record onto our schema -----------------------------------------------------

def match_venue(name: str | None, venues: dict[str, Venue]) -> str | None:
    """venues.yaml key for a source's venue text: by key, full name, '(ACRONYM)' or a known alias."""
    if not name:
        return None
    by_key = {normalise_title(k): k for k in venues}
    by_name = {normalise_title(v.name): k for k, v in venues.items()}
    candidates = [name, re.sub(r"\s*\(.*?\)\s*", " ", name)]
    candidates += re.findall(r"\(([^)]+)\)", name)                         # "... (CVPR)" -> "CVPR"
    candidates.append(re.sub(r"^(proceedings of (the )?)?(\d{4}|\d+(st|nd|rd|th))\s+", "", name, flags=re.I))
    candidates.append(re.sub(r"\b(19|20)\d{2}\b", "", name))                # "NeurIPS 2020" -> "NeurIPS"
    for text in candidates:
        key = normalise_title(text)
        for table in (by_key, by_name):
            if key in table:
                return table[key]
        alias = ALIASES.get(key)
        if alias in venues:
            return alias
    return None


UNDECOMPOSABLE = str.maketrans({"ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "ß": "ss", "ł": "l", "Ł": "L",
                                 "đ": "d", "Đ": "D", "œ": "oe", "Œ": "OE", "ı": "i"})


def _ascii(text: str) -> str:
    """'Søgaard' -> 'Sogaard', 'Über' -> 'Uber': ids are plain ASCII."""
    return unicodedata.normalize("NFKD", text.translate(UNDECOMPOSABLE)).encode("ascii", "ignore").decode()


def _ascii_slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", _ascii(text).lower())


def suggest_id(record: Record, short: str | None, taken: set[str]) -> str:
    """Our convention: the nickname lowercased, else <family><year><first significant title word>."""
    base = re.sub(r"[^a-z0-9]+", "-", _ascii(short).lower()).strip("-") if short else ""
    if not base:  # no nickname, or one without a Latin letter or digit ('多任务', '++')
        family = record.family_names[0] if record.family_names else name_parts(record.authors[0])[0]
        words = [w for w in re.split(r"[^A-Za-z0-9]+", _ascii(record.title)) if w]
        first = next((w for w in words if w.lower() not in STOPWORDS), words[0] if words else "paper")
        base = f"{_ascii_slug(family)}{record.year}{_ascii_slug(first)}"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def build_entry(record: Record, *, venue: str, topics: list[str], short: str | None,
                entry_id: str, code: list[str]) -> dict[str, Any]:
    """Fields in the order the catalogue writes them; empty ones left out."""
    entry: dict[str, Any] = {"id": entry_id}
    if short:
        entry["short"] = [short]
    entry.update(title=record.title, authors=record.authors, venue=venue, year=record.year)
    for key in ("volume", "number", "pages", "arxiv", "arxiv_class", "doi", "url"):
        value = getattr(record, key)
        if value:
            entry[key] = strip_tracking(str(value)) if key == "url" else str(value)
    if code:
        entry["code"] = code
    entry["topics"] = topics
    return entry


# --- duplicates -----------------------------------------------------------------------------

def find_duplicate(entry: dict[str, Any], papers: list[Any],
                   line_of: Callable[[int], int] | None = None) -> str | None:
    """Describe an existing entry with the same arXiv id, DOI or normalised title, if any;
    ``line_of(i)`` gives entry i's line where the entries do not carry their own (ruamel's do)."""
    probes = [("arxiv", str, "arXiv id"), ("doi", lambda s: str(s).lower(), "DOI"),
              ("title", lambda s: normalise_title(str(s)), "title")]
    for i, raw in enumerate(papers):
        if not isinstance(raw, dict):
            continue
        for key, norm, label in probes:
            if entry.get(key) and raw.get(key) and norm(raw[key]) == norm(entry[key]):
                line = raw.lc.line + 1 if hasattr(raw, "lc") else line_of(i) if line_of else None
                where = f" (papers.yaml line {line})" if line else ""
                return f"same {label} as existing entry '{raw.get('id', f'#{i + 1}')}'{where}"
    return None


# --- writing ---------------------------------------------------------------------------------

def _yaml() -> Any:
    """A round-trip ruamel.yaml instance (imported here so other commands never need ruamel)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    return yaml


def render_entry(entry: dict[str, Any], indent: int) -> str:
    """The entry as one block-sequence item, lists in flow style like the rest of the file."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    node = CommentedMap()
    for key, value in entry.items():
        if isinstance(value, list):
            seq = CommentedSeq(DoubleQuotedScalarString(v) if _needs_quotes(v, flow=True) else v for v in value)
            seq.fa.set_flow_style()
            node[key] = seq
        elif key == "arxiv" or (isinstance(value, str) and _needs_quotes(value)):
            node[key] = DoubleQuotedScalarString(value)
        else:
            node[key] = value
    yaml = _yaml()
    yaml.indent(mapping=2, sequence=indent + 2, offset=indent)
    out = io.StringIO()
    yaml.dump([node], out)
    return out.getvalue()


def _needs_quotes(value: str, flow: bool = False) -> bool:
    """Whether ``value`` must be quoted: written plain, as a flow-list item or a mapping value,
    the project's YAML reader would not give it back unchanged (``?`` in a URL inside ``[...]``,
    ``yes``, ``12``, ``: ``, `` #``...). Asking the parser avoids keeping a list of characters."""
    import yaml as pyyaml

    if not isinstance(value, str):
        return False
    if not value or value != value.strip() or any(c in value for c in "\n\r\t"):
        return True
    sample, wanted = (f"[{value}]", [value]) if flow else (f"k: {value}", {"k": value})
    try:
        return pyyaml.safe_load(sample) != wanted
    except pyyaml.YAMLError:
        return True


def load_papers(text: str, name: str = "papers.yaml") -> Any:
    """papers.yaml read by ruamel (which keeps positions); a file it cannot read is an AddError."""
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        return _yaml().load(text)
    except MarkedYAMLError as exc:
        where = ":".join([name, *map(str, marked_at(exc))])
        what = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise AddError(f"{where}: {what}; {FIX_FIRST}") from None
    except YAMLError as exc:
        raise AddError(f"{name}: {str(exc).splitlines()[0]}; {FIX_FIRST}") from None
    except (ValueError, KeyError, TypeError) as exc:  # ruamel constructing a value its tag refuses: '!!int x'
        problems = Problems()
        load_yaml_text(text, name, problems)  # the catalogue's own loader locates it
        raise AddError(f"{_first_error(problems) or f'{name}: {exc}'}; {FIX_FIRST}") from None


def _first_error(problems: Problems) -> str | None:
    """``file:line:col: message`` of the first error in ``problems``, if any."""
    if not problems.errors:
        return None
    first = problems.errors[0]
    return f"{first.where.file}:{first.where.line}:{first.where.col}: {first.message}"


def plan_insert(text: str, entry: dict[str, Any]) -> Plan:
    """Where the entry goes: after the last entry sharing its first topic, else at the end."""
    doc = load_papers(text)
    if not isinstance(doc, list):
        raise AddError(f"papers.yaml is not a list of entries; {FIX_FIRST}")
    if not len(doc) or doc.fa.flow_style():  # '[]' or '[{...}]': text appended after ']' would not parse
        if len(doc):
            raise AddError("papers.yaml is a flow list ('[...]'); add writes entries as a block list "
                           "('- id: ...' per entry): rewrite it that way first")
        kept = "".join(line for line in text.splitlines(keepends=True) if not line.strip().startswith("["))
        return Plan(entry, (kept.rstrip("\n") + "\n\n" if kept.strip() else "") + render_entry(entry, 0))
    dup = find_duplicate(entry, doc)
    if dup:
        raise AddError(f"not added: {dup}")
    lines = text.splitlines(keepends=True)
    indent = _item_indent(lines, doc)
    anchor = None
    for i, raw in enumerate(doc):
        topics = raw.get("topics") if isinstance(raw, dict) else None
        if isinstance(topics, list) and topics and topics[0] == entry["topics"][0]:
            anchor = i
    if anchor is None or anchor == len(doc) - 1:
        body = "".join(lines).rstrip("\n")
        new_text = f"{body}\n\n{render_entry(entry, indent)}" if body.strip() else render_entry(entry, indent)
        return Plan(entry, new_text)
    # Insert before the line of the next entry, backing up over blank lines and its own comments.
    cut = doc.lc.data[anchor + 1][0]
    while not lines[cut].lstrip().startswith("-"):  # the entry's '-' stands alone on a line above it
        cut -= 1
    while cut > 0 and (not lines[cut - 1].strip() or lines[cut - 1].lstrip().startswith("#")) \
            and not _ends_entry(lines, cut - 1, indent):
        cut -= 1
    new_text = "".join(lines[:cut]).rstrip("\n") + "\n\n" + render_entry(entry, indent) + "\n" \
        + "".join(lines[cut:]).lstrip("\n")
    return Plan(entry, new_text)


def _item_indent(lines: list[str], doc: Any) -> int:
    """Column of the '-' that starts each top-level entry (0 or 2 in practice) of a non-empty block list."""
    line = lines[doc.lc.data[0][0]]
    return len(line) - len(line.lstrip()) if line.lstrip().startswith("-") else max(0, doc.lc.data[0][1] - 2)


def _ends_entry(lines: list[str], i: int, indent: int) -> bool:
    """A comment indented inside the previous entry belongs to it, not to the next one."""
    line = lines[i]
    return line.lstrip().startswith("#") and len(line) - len(line.lstrip()) > indent


def verify(old_text: str, new_text: str, entry: dict[str, Any]) -> None:
    """Refuse to write unless the new file is exactly the old data plus the new entry."""
    import yaml as pyyaml  # the project's safe loader, independent of ruamel

    try:
        old = pyyaml.safe_load(old_text) or []
        new = pyyaml.safe_load(new_text)
    except pyyaml.YAMLError:
        new = None
    plain = pyyaml.safe_load(pyyaml.safe_dump(entry))
    if not isinstance(new, list) or len(new) != len(old) + 1 or plain not in new \
            or [e for e in new if e != plain] != [e for e in old if e != plain]:
        raise AddError("internal error: the edited papers.yaml would not round-trip; nothing written")


# --- the command -----------------------------------------------------------------------------

def parse_identifier(ident: str) -> tuple[str, str]:
    """'arxiv:2001.06782' / 'doi:10.1109/...' (URLs and bare ids accepted) -> (kind, value)."""
    value = ident.strip()
    low = value.lower()
    for prefix in ("https://arxiv.org/abs/", "http://arxiv.org/abs/", "arxiv:"):
        if low.startswith(prefix):
            return "arxiv", re.sub(r"v\d+$", "", value[len(prefix):])
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/", "http://dx.doi.org/", "doi:"):
        if low.startswith(prefix):
            return "doi", value[len(prefix):]
    if ARXIV_NEW.match(re.sub(r"v\d+$", "", value)) or ARXIV_OLD.match(value):
        return "arxiv", re.sub(r"v\d+$", "", value)
    if DOI.match(value):
        return "doi", value
    raise AddError(f"'{ident}' is neither arxiv:<id> nor doi:<doi> (e.g. arxiv:2001.06782, doi:10.1109/...)")


def fetch_record(kind: str, value: str, fetcher: Fetcher, endpoints: Endpoints,
                 *, use_dblp: bool = True) -> Record:
    if kind == "arxiv":
        if not (ARXIV_NEW.match(value) or ARXIV_OLD.match(value)):
            raise AddError(f"'{value}' is not an arXiv id (expected e.g. 2001.06782)")
        record = fetch_arxiv(fetcher, endpoints, value)
        if use_dblp:
            record = find_published(fetcher, endpoints, record) or record
        return record
    if not DOI.match(value):
        raise AddError(f"'{value}' is not a DOI (expected 10.<registrant>/<suffix>)")
    return fetch_doi(fetcher, endpoints, value)


# Fields that come from a command-line option rather than from the fetched record.
OPTIONS = {"id": "--id", "code": "--code", "short": "--short", "venue": "--venue", "topics": "--topic"}


def _plain(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def check_options(*, entry_id: str | None = None, code: list[str] | None = None, short: str | None = None) -> None:
    """Refuse bad option values before any request: they would only fail after the fetch."""
    if entry_id is not None and not re.match(SLUG, entry_id):
        raise AddError(f"--id {entry_id!r} is not a valid id: use lowercase letters, digits and single "
                       "hyphens, e.g. 'nash-mtl'")
    if short is not None and not short.strip():
        raise AddError("--short is empty")
    for url in code or []:
        try:
            _url(url)
        except ValueError as exc:
            raise AddError(f"--code {url!r}: {exc}") from None
        found = tracking_parameters(url)
        if found:
            raise AddError(f"--code {url!r} has tracking parameter(s) {', '.join(found)}: remove them")


def check_choices(cat: Any, *, topics: list[str], venue: str | None) -> None:
    """The --topic and --venue values against the catalogue's taxonomy and venues."""
    if venue is not None and venue not in cat.venues:
        close = difflib.get_close_matches(venue.lower(), [key.lower() for key in cat.venues], n=1)
        hint = next((f" (did you mean '{key}'?)" for key in cat.venues if close and key.lower() == close[0]), "")
        raise AddError(f"--venue {venue} is not a key of venues.yaml{hint}")
    leaves = set(cat.leaf_ids())
    if not topics:
        raise AddError("give at least one --topic (a leaf id of taxonomy.yaml, e.g. optimization/gradient-balancing)")
    unknown = [t for t in topics if t not in leaves]
    if unknown:
        raise AddError(f"unknown topic(s) {', '.join(unknown)}; leaf ids: {', '.join(sorted(leaves))}")


def readable_papers(catalog_dir: Path) -> Path:
    """papers.yaml's path, once the catalogue's loader reads it (syntax errors, duplicate keys...)."""
    from .catalogue import display_name

    papers_path = catalog_dir / "papers.yaml"
    unreadable = Problems()
    load_yaml(papers_path, display_name(papers_path), unreadable)
    first = _first_error(unreadable)
    if first:
        raise AddError(f"{first}; {FIX_FIRST}")
    return papers_path


def check_before_fetch(catalog_dir: Path, kind: str, value: str, *, topics: list[str], venue: str | None) -> None:
    """What can be refused without the network: a paper already in the catalogue under this
    identifier, and --topic or --venue values the catalogue does not have."""
    from .catalogue import load_catalogue

    readable_papers(catalog_dir)
    cat = load_catalogue(catalog_dir, Problems())  # its plain YAML reading, not ruamel's slower round trip
    doc = cat.sources["papers.yaml"]
    papers = doc.data if isinstance(doc.data, list) else []
    duplicate = find_duplicate({kind: value}, papers, line_of=lambda i: doc.where((i,)).line)
    if duplicate:
        raise AddError(f"{kind}:{value} is already in the catalogue: {duplicate}")
    check_choices(cat, topics=topics, venue=venue)


def prepare(catalog_dir: Path, record: Record, *, topics: list[str], short: str | None = None,
            venue: str | None = None, entry_id: str | None = None, code: list[str] | None = None) -> Plan:
    """Map, validate and place the entry; raises AddError with a fix when it cannot be added."""
    from .catalogue import display_name, load_catalogue

    check_options(entry_id=entry_id, code=code, short=short)
    papers_path = readable_papers(catalog_dir)
    cat = load_catalogue(catalog_dir, Problems())
    check_choices(cat, topics=topics, venue=venue)
    venue_key = venue or match_venue(record.venue, cat.venues)
    if venue_key is None and record.venue is None:
        raise AddError("the source names no venue for this paper: pass --venue KEY (a key of venues.yaml)")
    if venue_key is None:
        raise AddError(f"venue '{record.venue}' matches no key of venues.yaml: add it there "
                       "(key: {name: ..., kind: ...}) or pass --venue KEY")
    text = papers_path.read_text(encoding="utf-8")
    taken = {str(raw.get("id")) for raw in (load_papers(text, display_name(papers_path)) or [])
             if isinstance(raw, dict)}
    entry = build_entry(record, venue=venue_key, topics=topics, short=short,
                        entry_id=entry_id or suggest_id(record, short, taken), code=code or [])
    if entry["id"] in taken:
        raise AddError(f"id '{entry['id']}' is already used; pass another with --id")
    try:
        Paper.model_validate(entry)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for e in errors:  # a value the user gave names its option
            option = OPTIONS.get(str(e["loc"][0])) if e["loc"] else None
            if option:
                value = short if option == "--short" else entry[e["loc"][0]]  # the entry holds [short]
                raise AddError(f"{option} {value!r}: {_plain(e['msg'])}") from None
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {_plain(e['msg'])}" if e["loc"] else _plain(e["msg"])
                           for e in errors)
        raise AddError(f"the fetched record does not fit the schema ({detail}); add it by hand") from None
    plan = plan_insert(text, entry)
    verify(text, plan.text, entry)
    return plan


def write(catalog_dir: Path, plan: Plan) -> None:
    """Keep the file's line endings: a papers.yaml with Windows (CRLF) endings stays so, and only
    the new entry's lines differ."""
    path = catalog_dir / "papers.yaml"
    write_atomic(path, plan.text, newline="\r\n" if b"\r\n" in path.read_bytes() else "\n")


__all__ = ["AddError", "FetchError", "Plan", "build_entry", "fetch_record", "find_duplicate", "match_venue",
           "parse_identifier", "plan_insert", "prepare", "render_entry", "suggest_id", "write"]


def command(args: Any) -> int:
    """The ``add`` subcommand: fetch, show, insert. Exit 1 (nothing written) on any problem."""
    import sys

    from .metadata import dump_record

    endpoints = Endpoints.from_env()
    endpoints = Endpoints(arxiv=args.arxiv_api or endpoints.arxiv, doi=args.doi_base or endpoints.doi,
                          dblp=args.dblp_api or endpoints.dblp)
    fetcher = Fetcher(timeout=args.timeout, attempts=args.attempts, backoff=args.backoff)
    try:
        check_options(entry_id=args.id, code=args.code, short=args.short)
        kind, value = parse_identifier(args.identifier)
        check_before_fetch(args.catalog, kind, value, topics=args.topic, venue=args.venue)
        record = fetch_record(kind, value, fetcher, endpoints, use_dblp=not args.no_dblp)
        if args.verbose:
            print(dump_record(record), file=sys.stderr)
        plan = prepare(args.catalog, record, topics=args.topic, short=args.short, venue=args.venue,
                       entry_id=args.id, code=args.code)
    except (AddError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(render_entry(plan.entry, 0), end="")
    if args.dry_run:
        print("(dry run: papers.yaml not changed)", file=sys.stderr)
        return 0
    write(args.catalog, plan)
    print(f"added '{plan.entry['id']}' at {args.catalog / 'papers.yaml'}:{plan.line}; add notes, code and "
          "datasets by hand, then run: python -m site_gen build && python -m site_gen check", file=sys.stderr)
    return 0
