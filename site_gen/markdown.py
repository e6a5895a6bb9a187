"""Escaping for Markdown output: catalogue text is data, never markup."""

from __future__ import annotations

import re

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#!])")
_HTML = {"<": "&lt;", ">": "&gt;"}
_ENTITY = re.compile(r"&(?=#?\w+;)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # any URL scheme; only http(s) may pass


def md(text: object) -> str:
    """Escape text for Markdown: no raw HTML or entities survive, inline syntax is backslash-escaped."""
    text = _ENTITY.sub("&amp;", str(text))
    text = re.sub(r"[<>]", lambda m: _HTML[m.group()], text)
    return _MD_SPECIAL.sub(r"\\\1", text)


def md_url(url: str) -> str:
    """A URL safe inside ``[text](url)``: only http(s) or relative paths; parentheses encoded."""
    if _SCHEME.match(url):
        safe = url.lower().startswith(("http://", "https://"))
    else:  # a relative path or a fragment
        safe = re.match(r"^[A-Za-z0-9_./#-]", url) is not None
    if not safe:
        raise ValueError(f"refusing to render unsafe URL {url!r}")
    return url.replace(" ", "%20").replace("(", "%28").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.lower())
    return slug.replace(" ", "-")
