"""Load catalog/*.yaml into one validated ``Catalogue`` object.

This is the only module that reads the YAML files. Renderers receive the ``Catalogue``
and never touch the files again.
"""

from __future__ import annotations

import datetime
import difflib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .models import ARXIV_CLASS, Codebase, Dataset, Entry, Paper, Section, Venue, _as_list
from .problems import Location, Problems
from .yamlfile import YamlFile, dotted, load_yaml

FILES = ("papers.yaml", "datasets.yaml", "codebases.yaml", "taxonomy.yaml", "venues.yaml")
M = TypeVar("M", bound=BaseModel)


@dataclass
class Catalogue:
    """Every validated entry, plus the source positions checks and messages need."""

    root: Path  # project root: reference_impls/, tests/, README.md live here
    catalog_dir: Path = Path("catalog")
    papers: list[Paper] = field(default_factory=list)
    datasets: list[Dataset] = field(default_factory=list)
    codebases: list[Codebase] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    venues: dict[str, Venue] = field(default_factory=dict)
    sources: dict[str, YamlFile] = field(default_factory=dict)
    # id() of each validated entry -> its index in its file: two entries that share an id
    # (an error, but a common one when an entry is copied as a template) keep their own lines
    positions: dict[int, int] = field(default_factory=dict)
    # file -> the invalid entries of papers, datasets and codebases, each holding only its fields
    # that are valid on their own: the checks across entries still see them (see ``checked``)
    partial: dict[str, list[Entry]] = field(default_factory=dict)

    def checked(self, file: str) -> list:
        """The entries of ``file`` that reference, duplicate and URL checks look at: the valid ones
        and what is valid of the others, so one wrong field does not hide the entry's other
        mistakes. A field that failed is None (or its default) here; never used for output."""
        valid = {"papers.yaml": self.papers, "datasets.yaml": self.datasets, "codebases.yaml": self.codebases}[file]
        return [*valid, *self.partial.get(file, [])]

    def walk_sections(self) -> Iterator[tuple[Section, int]]:
        """Every section with its depth (0 = top level), in taxonomy order."""
        stack = [(s, 0) for s in reversed(self.sections)]
        while stack:
            section, depth = stack.pop()
            yield section, depth
            stack.extend((c, depth + 1) for c in reversed(section.children))

    def leaf_ids(self) -> list[str]:
        return [s.id for s, _ in self.walk_sections() if not s.children]

    def implementations(self) -> set[str]:
        """Every distinct reference implementation a paper links to (``impl`` and ``also_impl``);
        a class two papers link, such as an extension's, counts once. README, home page and
        implementations page all give this count."""
        return {ref for p in self.papers for ref in p.impls}

    def where(self, file: str, entry: BaseModel, *path: str | int) -> Location:
        """Source location of an entry's field, e.g. ``where("papers.yaml", paper, "venue")``;
        the entry itself, not its id, so two entries that share an id keep their own lines."""
        doc = self.sources.get(file)
        if doc is None:
            return self.where_file(file)
        return doc.where((self.positions[id(entry)], *path))

    def where_file(self, file: str) -> Location:
        """Where ``file``'s data begins (past a comment header), for problems about the file as a whole."""
        doc = self.sources.get(file)
        return doc.where(()) if doc is not None else Location(display_name(self.catalog_dir / file))

    def papers_by_topic(self) -> dict[str, list[Paper]]:
        """Leaf id -> papers, newest first (then by title) — the order readers expect."""
        groups: dict[str, list[Paper]] = {leaf: [] for leaf in self.leaf_ids()}
        for paper in self.papers:
            for topic in dict.fromkeys(paper.topics):
                groups.setdefault(topic, []).append(paper)
        for papers in groups.values():
            papers.sort(key=lambda p: (-p.year, p.title.lower(), p.id))
        return groups


def display_name(path: Path) -> str:
    """Path as shown in messages: relative to the working directory when below it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def load_catalogue(catalog_dir: Path, problems: Problems) -> Catalogue:
    """Read and validate every file of ``catalog_dir``; never raises on bad data.

    The project root (README.md, reference_impls/, tests/) is the catalogue's parent folder.
    """
    cat = Catalogue(root=catalog_dir.resolve().parent, catalog_dir=catalog_dir)
    for name in FILES:
        path = catalog_dir / name
        doc = load_yaml(path, display_name(path), problems)
        if doc is not None:
            cat.sources[name] = doc
    cat.papers = _entries(cat, "papers.yaml", Paper, problems)
    cat.datasets = _entries(cat, "datasets.yaml", Dataset, problems)
    cat.codebases = _entries(cat, "codebases.yaml", Codebase, problems)
    cat.sections = _entries(cat, "taxonomy.yaml", Section, problems)
    cat.venues = _venues(cat, problems)
    return cat


def _entries(cat: Catalogue, name: str, model: type[M], problems: Problems) -> list[M]:
    doc = cat.sources.get(name)
    if doc is None:
        return []
    if not isinstance(doc.data, list):
        problems.error(doc.where(()), "-", "-", f"expected a list of entries, got {_kind(doc.data)}",
                       "each entry starts with '- id: ...'")
        return []
    valid: list[M] = []
    for i, raw in enumerate(doc.data):
        if not isinstance(raw, dict):
            problems.error(doc.where((i,)), f"#{i + 1}", "-", f"expected a mapping, got {_kind(raw)}")
            continue
        entry = _validate(model, raw, doc, (i,), problems)
        if entry is not None:
            valid.append(entry)
            cat.positions[id(entry)] = i
        elif name != "taxonomy.yaml":
            partial = _partial(model, raw)
            if partial is not None:
                cat.partial.setdefault(name, []).append(partial)
                cat.positions[id(partial)] = i
    return valid


def _partial(model: type[M], raw: dict[str, Any]) -> M | None:
    """The fields of an invalid entry that are valid on their own; the others, and missing ones,
    take their default (None when required). None when its id is not a valid one."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        values[name] = None if info.is_required() else info.get_default(call_default_factory=True)
        if name in raw:
            try:
                values[name] = _field_validator(model, name).validate_python(raw[name])
            except ValidationError:
                pass
    return model.model_construct(**values) if isinstance(values.get("id"), str) else None


@functools.cache
def _field_validator(model: type[BaseModel], name: str) -> TypeAdapter:
    """Validates one field of ``model`` alone, as the model would (its rules and its whitespace setting)."""
    info = model.model_fields[name]
    strip = bool(model.model_config.get("str_strip_whitespace"))
    return TypeAdapter(Annotated[info.annotation, info], config=ConfigDict(str_strip_whitespace=strip))


def _venues(cat: Catalogue, problems: Problems) -> dict[str, Venue]:
    doc = cat.sources.get("venues.yaml")
    if doc is None:
        return {}
    if not isinstance(doc.data, dict):
        problems.error(doc.where(()), "-", "-", f"expected a mapping of venue keys, got {_kind(doc.data)}",
                       "write 'NeurIPS: {name: ..., kind: conference}'")
        return {}
    venues: dict[str, Venue] = {}
    for key, raw in doc.data.items():
        if not isinstance(raw, dict):
            problems.error(doc.where((key,)), str(key), "-", f"expected a mapping, got {_kind(raw)}",
                           "write '{name: ..., kind: conference}'")
            continue
        venue = _validate(Venue, raw, doc, (key,), problems)
        if venue is not None:
            venues[str(key)] = venue
    return venues


def _validate(model: type[M], raw: dict[str, Any], doc: YamlFile, path: tuple, problems: Problems) -> M | None:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        entry = doc.entry_id(path)
        for err in exc.errors(include_url=False):
            loc = _data_loc(raw, err["loc"])
            full = path + loc
            message, hint = _explain(err, model, loc, doc.scalar_text(full))
            where = doc.key_where(full) if err["type"] == "extra_forbidden" else doc.where(full)
            problems.error(where, entry, dotted(full), message, hint)
        return None


def _data_loc(raw: Any, loc: tuple) -> tuple:
    """A pydantic error location as a path into the data: without the names pydantic gives a union
    member or a validator (``function-after[...]``), yet keeping a key the file does contain, even one
    with a '[' in it (an unknown field ``tags[0]`` is still reported as that field)."""
    kept, node = [], raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            if isinstance(part, str) and "[" in part:
                continue  # not in the data: a union member or validator of the same value
            node = None
        kept.append(part)
    return tuple(kept)


def _explain(err: dict[str, Any], model: type[BaseModel], loc: tuple,
             source: str | None = None) -> tuple[str, str | None]:
    """Turn a pydantic error into a plain sentence and, where possible, a fix.

    ``source`` is the value as written in the file, when it is a scalar."""
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
        return "unknown field", (f"did you mean '{close[0]}'?" if close else
                                 f"allowed fields: {', '.join(model.model_fields)}")
    if kind == "missing":
        return "required field is missing", None
    if kind == "string_type" and isinstance(err.get("input"), (int, float)):
        field = _field_name(loc)
        text = source if source is not None else str(err["input"])
        example = f'{field}: [..., "{text}"]' if loc and isinstance(loc[-1], int) else f'{field}: "{text}"'
        what = "a boolean" if isinstance(err["input"], bool) else "a number"
        why = "trailing zeros are lost" if field == "arxiv" else f"YAML reads {what}"
        return "must be a string", f"quote it in YAML, e.g. {example} (unquoted, {why})"
    if kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern", "")
        if "reference_impls" in pattern:
            return "not an implementation link", "write 'reference_impls/<folder>/<file>.py:<ClassOrFunction>'"
        if pattern == ARXIV_CLASS:
            return "not an arXiv category", "write the primary category as arXiv lists it, e.g. 'cs.LG' or 'stat.ML'"
        return "not a valid id", "use lowercase letters, digits and single hyphens, e.g. 'nash-mtl'"
    if kind in ("too_short", "string_too_short") and not err.get("input"):
        if loc and isinstance(loc[-1], int):
            return "empty list item", "delete it"
        info = model.model_fields.get(str(loc[-1])) if loc else None
        optional = info is not None and not info.is_required()
        return "must not be empty", "leave the field out instead" if optional else None
    if kind == "int_type":
        field = _field_name(loc)
        value = err.get("input")
        if isinstance(value, str) and value.strip().isdigit():
            return "must be a whole number", f"write it without quotes: {field}: {value.strip()}"
        if isinstance(value, datetime.date):
            return "must be a whole number", f"write the year alone: {field}: {value.year}"
        return "must be a whole number", None
    if kind == "list_type":
        field = _field_name(loc)
        info = model.model_fields.get(field)
        if info is not None and any(getattr(m, "func", None) is _as_list for m in info.metadata):
            return "must be a text or a list of texts", f'write {field}: "..." or {field}: ["...", "..."]'
        return "must be a list", f"write {field}: [a, b], or one '- item' per line"
    if kind == "value_error":
        return msg.removeprefix("Value error, "), None
    return msg[0].lower() + msg[1:], None


def _field_name(loc: tuple) -> str:
    """The field an error location ends in (``authors`` for ``authors.5``)."""
    return next((str(part) for part in reversed(loc) if isinstance(part, str)), "value")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(value),
                                                                                           type(value).__name__)
