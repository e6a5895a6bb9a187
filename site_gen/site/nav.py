"""Turn the ``nav`` of mkdocs.yml into one that names only pages that exist.

mkdocs.yml may use a glob (``papers/*.md``: every generated section page, in catalogue
order), may name optional pages that other parts of the project write (benchmark
reports), and may hold one ``"..."`` entry: every page placed nowhere else. A listed page
that does not exist is left out instead of failing the strict build.
"""

from __future__ import annotations

import fnmatch
from typing import Any

REST = "..."


def _is_pattern(path: str) -> bool:
    """A glob, unless it is an outside link (a URL may hold '?') or the name of a page that exists."""
    return any(c in path for c in "*?[") and not path.startswith(("http://", "https://"))


def _expand_path(path: str, pages: list[str], order: list[str]) -> list[str]:
    if path in pages:  # a page whose name holds '[' or '?' is itself, not a pattern
        return [path]
    if _is_pattern(path):
        hits = [p for p in pages if fnmatch.fnmatchcase(p, path)]
        rank = {p: i for i, p in enumerate(order)}
        return sorted(hits, key=lambda p: (rank.get(p, len(rank)), p))
    return [path] if path in pages or path.startswith(("http://", "https://")) else []


def _expand(nav: list[Any], pages: list[str], order: list[str], used: set[str], rest: list[str] | None) -> list[Any]:
    out: list[Any] = []
    for item in nav:
        if item == REST:
            if rest is not None:
                out += rest
            else:
                out.append(REST)  # first pass: keep the placeholder
        elif isinstance(item, str):
            found = _expand_path(item, pages, order)
            used.update(found)
            out += found
        elif isinstance(item, dict) and len(item) == 1:
            (title, value), = item.items()
            if isinstance(value, list):
                children = _expand(value, pages, order, used, rest)
                if children:
                    out.append({title: children})
            else:
                found = _expand_path(str(value), pages, order)
                used.update(found)
                if len(found) == 1 and (str(value) in pages or not _is_pattern(str(value))):
                    out.append({title: found[0]})
                elif found:
                    out.append({title: found})
    return out


def _drop_empty(nav: list[Any]) -> list[Any]:
    out = []
    for item in nav:
        if item == REST:
            continue
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _drop_empty(value)
                if not value:
                    continue
            item = {title: value}
        out.append(item)
    return out


def expand_nav(nav: list[Any] | None, pages: list[str], order: list[str]) -> list[Any] | None:
    """Nav with globs and ``"..."`` expanded, missing pages and emptied sections dropped."""
    if nav is None:
        return None
    used: set[str] = set()
    first = _expand(nav, pages, order, used, None)
    rest = sorted(p for p in pages if p not in used)
    return _drop_empty(_expand(first, pages, order, set(), rest))
