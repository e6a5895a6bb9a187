"""Safe YAML loading that keeps the line and column of every value.

PyYAML's safe loader silently keeps the last of two duplicate keys and forgets where each
value came from. We compose the node tree with the (C-accelerated when available) safe
loader, then convert it ourselves: duplicate keys become problems, and every value's
position is recorded under its path, e.g. ``(3, "authors", 2)``, so schema errors can be
reported at ``file:line:col``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .problems import Location, Problems

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Path_ = tuple  # a path into the data: keys and list indices


@dataclass
class YamlFile:
    """Plain data from one YAML file, plus its node tree for locating any value on demand.

    Positions are looked up by walking the node tree along a path only when a problem is
    reported, so loading a valid catalogue pays nothing for them.
    """

    name: str  # display name used in problem locations
    data: Any = None
    root: yaml.Node | None = None
    # (path, (line, col), message, hint) of each bad key or value, reported once ``data`` can name the entry
    key_problems: list[tuple[Path_, tuple[int, int], str, str | None]] = field(default_factory=list)

    def _nodes(self, path: Path_) -> list[tuple[yaml.Node | None, yaml.Node]]:
        """(key node, value node) pairs from the root down along ``path``, as far as it exists."""
        trail: list[tuple[yaml.Node | None, yaml.Node]] = []
        node = self.root
        if node is None:
            return trail
        trail.append((None, node))
        for part in path:
            if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
                trail.append((None, node))
            elif isinstance(node, yaml.MappingNode):
                hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
                if hit is None:
                    break
                trail.append(hit)
                node = hit[1]
            else:
                break
        return trail

    def where(self, path: Path_) -> Location:
        """Location of the value at ``path``, or of its closest existing parent."""
        trail = self._nodes(path)
        if not trail:
            return Location(self.name)
        mark = trail[-1][1].start_mark
        return Location(self.name, mark.line + 1, mark.column + 1)

    def scalar_text(self, path: Path_) -> str | None:
        """The value at ``path`` exactly as written in the file, if it is a scalar."""
        trail = self._nodes(path)
        if len(trail) == len(path) + 1 and isinstance(trail[-1][1], yaml.ScalarNode):
            return trail[-1][1].value
        return None

    def key_where(self, path: Path_) -> Location:
        """Location of the mapping key that ends ``path`` (falls back to the value)."""
        trail = self._nodes(path)
        if len(trail) == len(path) + 1 and trail[-1][0] is not None:
            mark = trail[-1][0].start_mark
            return Location(self.name, mark.line + 1, mark.column + 1)
        return self.where(path)

    def entry_id(self, path: Path_) -> str:
        """Id of the top-level entry that ``path`` lies in ("-" if none is known)."""
        if not path:
            return "-"
        head = path[0]
        if isinstance(self.data, list) and isinstance(head, int) and head < len(self.data):
            item = self.data[head]
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                return item["id"]
            return f"#{head + 1}"
        if isinstance(self.data, dict):
            return str(head)
        return "-"


def load_yaml(path: Path, name: str, problems: Problems) -> YamlFile | None:
    """Read ``path``; return None (and record why) if it cannot be used at all."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        problems.error(Location(name), "-", "-", "file not found",
                       "a catalogue folder holds papers.yaml, datasets.yaml, codebases.yaml, taxonomy.yaml, venues.yaml")
        return None
    except OSError as exc:
        problems.error(Location(name), "-", "-", f"cannot read file: {exc.strerror}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.error(Location(name, *line_col(raw, exc.start)), "-", "-",
                       f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", "save the file as UTF-8")
        return None
    return load_yaml_text(text, name, problems)


def load_yaml_text(text: str, name: str, problems: Problems) -> YamlFile | None:
    """``load_yaml`` for text already read (``add`` checks the papers.yaml it is about to edit)."""
    doc = YamlFile(name)
    if text.startswith("\ufeff"):
        text = text[1:]
    bad = _NOT_IN_YAML.search(text)
    if bad:  # else PyYAML's reader refuses the file with no line, and a message over two lines
        problems.error(Location(name, *line_col(text, bad.start())), "-", "-",
                       f"character U+{ord(bad.group()):04X} is not allowed in YAML",
                       "delete it: control characters often come in with pasted text")
        return None
    for lineno, line in enumerate(text.splitlines(), 1):
        indent = len(line) - len(line.lstrip(" \t"))
        if "\t" in line[:indent]:
            problems.error(Location(name, lineno, line.index("\t") + 1), "-", "-",
                           "tab character in indentation", "indent with spaces")
            return None
    try:
        node = yaml.compose(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        loc = Location(name, *marked_at(exc))
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        problems.error(loc, "-", "-", f"YAML syntax error: {message}")
        return None
    except yaml.YAMLError as exc:  # pragma: no cover - unmarked errors are rare
        problems.error(Location(name), "-", "-", f"YAML error: {exc}")
        return None
    if node is None:
        problems.error(Location(name), "-", "-", "file is empty")
        return None
    doc.root = node
    try:
        doc.data = _convert(node, (), doc, Loader(""))
    except RecursionError:
        # An alias inside the node it names (``notes: &a [*a]``) makes the node tree a cycle.
        where = _recursive_alias(text)
        loc = Location(name, *where[1:]) if where else Location(name)
        what = f"alias *{where[0]} is used inside the node it names" if where else "nested too deeply"
        problems.error(loc, "-", "-", f"YAML error: {what}",
                       "an alias may only repeat a node that is already complete" if where else None)
        doc.root = None
        return None
    for path, (line, col), message, hint in doc.key_problems:
        problems.error(Location(name, line, col), doc.entry_id(path), dotted(path), message, hint)
    if "\t" in text:
        _tab_ruamel_refuses(text, name, problems)
    return doc


def _tab_ruamel_refuses(text: str, name: str, problems: Problems) -> None:
    """PyYAML reads a tab after a key or a value (``venue:\tNeurIPS``); ruamel.yaml, which ``add``
    edits papers.yaml with, does not. Ask ruamel, only for a file with a tab, so the two agree."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    try:
        YAML().load(text)
    except MarkedYAMLError as exc:
        at = marked_at(exc)
        if at and "'\\t'" in str(exc.problem):
            problems.error(Location(name, *at), "-", "-",
                           "tab character where YAML needs spaces", "replace the tab with a space")


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NOT_IN_YAML = yaml.reader.Reader.NON_PRINTABLE  # the characters YAML's reader refuses
_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"})
_UNREADABLE = object()  # what _construct gives for a scalar that the safe constructor refuses


def _convert(node: yaml.Node, path: Path_, doc: YamlFile, constructor: Any) -> Any:
    """Plain data from ``node``; the hot path for large catalogues, so it records nothing else."""
    if isinstance(node, yaml.ScalarNode):
        # Fast path: most scalars are plain strings and need no constructor.
        if node.tag == _STR_TAG:
            return node.value
        value = _construct(node, path, doc, constructor)
        return node.value if value is _UNREADABLE else value  # the text as written: already a problem
    if node.tag not in _COLLECTION_TAGS:  # '!Fake [x]', '!!str [x]': the safe loader refuses these too
        doc.key_problems.append((path, _pos(node), f"YAML cannot read this value as {_short_tag(node.tag)}",
                                 "remove the tag"))
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (i,), doc, constructor) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        # Keys merged in by ``<<`` come first after flattening; the mapping's own keys override them.
        merges = any(k.tag == _MERGE_TAG for k, _ in node.value)
        own_keys = {id(k) for k, _ in node.value} if merges else None
        while True:
            try:
                constructor.flatten_mapping(node)
                break
            except yaml.constructor.ConstructorError as exc:  # ``<<: 1``; the bad ``<<`` is gone: go on
                doc.key_problems.append((path, marked_at(exc), f"YAML error: {exc.problem}",
                                         "`<<` merges in a mapping, e.g. `<<: *base`"))
        result: dict[Any, Any] = {}
        first_key: dict[Any, yaml.Node] = {}
        overridden: set[int] = set()
        for key_node, value_node in node.value:
            plain = isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR_TAG  # not '? !!str [b]'
            key = key_node.value if plain else _construct(key_node, path, doc, constructor)
            if key is _UNREADABLE:
                continue
            if not isinstance(key, str):  # checked first: a list key cannot even be looked up
                doc.key_problems.append((path, _pos(key_node), *_key_problem(key, key_node)))
                continue
            earlier = first_key.get(key)
            if earlier is not None and (own_keys is None or id(earlier) in own_keys):
                doc.key_problems.append((path + (key,), _pos(key_node), f"duplicate key {key!r} (first defined "
                                         f"on line {earlier.start_mark.line + 1})", "remove one of the two"))
                continue
            if earlier is not None:  # a merged-in key overridden: locate the value that is kept
                overridden.add(id(earlier))
            first_key[key] = key_node
            result[key] = _convert(value_node, path + (key,), doc, constructor)
        if overridden:
            node.value = [(k, v) for k, v in node.value if id(k) not in overridden]
        return result
    return constructor.construct_object(node, deep=True)  # pragma: no cover - no other node kinds


def _construct(node: yaml.Node, path: Path_, doc: YamlFile, constructor: Any) -> Any:
    """What the safe loader makes of a tagged or typed scalar; one it refuses is a problem, and _UNREADABLE.

    PyYAML raises ConstructorError for an unknown tag (``title: !Fake news``, ``id: <<``), but ValueError,
    KeyError or AttributeError for a known tag on a bad value (``!!int abc``, ``!!bool maybe``)."""
    try:
        return constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, LookupError, AttributeError, TypeError):
        tag = _short_tag(node.tag)
        written = f"`{node.value}`" if isinstance(node, yaml.ScalarNode) else "this value"
        doc.key_problems.append((path, _pos(node), f"YAML cannot read {written} as {tag}",
                                 "quote the whole value to keep it as text"))
        return _UNREADABLE


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


def _key_problem(key: Any, node: yaml.Node) -> tuple[str, str | None]:
    """Message and hint for a mapping key that YAML does not read as a string."""
    if isinstance(node, yaml.ScalarNode):
        kind = ("a boolean" if isinstance(key, bool) else "a number" if isinstance(key, (int, float))
                else "null" if key is None else f"a {type(key).__name__}")
        return f"key `{node.value}` is read as {kind} by YAML", "quote it or use a known field"
    return f"mapping key {key!r} is not a string", None


def _recursive_alias(text: str) -> tuple[str, int, int] | None:
    """(anchor, line, column) of the first alias used inside the collection it names, if any."""
    open_anchors: list[str | None] = []
    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_anchors.append(event.anchor)
        elif isinstance(event, yaml.CollectionEndEvent):
            open_anchors.pop()
        elif isinstance(event, yaml.AliasEvent) and event.anchor in open_anchors:
            return event.anchor, event.start_mark.line + 1, event.start_mark.column + 1
    return None


def marked_at(exc: Any) -> tuple[int, int] | tuple[()]:
    """1-based (line, column) of a PyYAML or ruamel.yaml MarkedYAMLError: its problem's, else its
    context's; () when it has neither."""
    mark = exc.problem_mark or exc.context_mark
    return (mark.line + 1, mark.column + 1) if mark else ()


def line_col(text: str | bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset``, counted in bytes for bytes and in characters for text."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text.count(newline, 0, offset) + 1, offset - (text.rfind(newline, 0, offset) + 1) + 1


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def dotted(path: Path_) -> str:
    """Field path inside an entry: drops the entry's own index or key."""
    return ".".join(str(p) for p in path[1:]) or "-"
