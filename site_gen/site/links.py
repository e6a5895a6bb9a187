"""Where each generated page lives, relative URLs between pages, and a paper's outbound links.

Links inside the raw-HTML blocks of generated pages are not rewritten by MkDocs, so they
are computed here, for the directory URLs MkDocs uses by default (``papers/theory.md`` is
served at ``papers/theory/``).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote

from ..models import Paper

ARXIV_NEW = re.compile(r"^\d{4}\.\d{4,5}$")  # only new-style ids have a Hugging Face papers page


def safe_url(url: str) -> str:
    """Refuse anything but absolute http(s) URLs, whatever the schema let through."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or rest[0] in "/?#" \
            or any(c in url for c in ' "<>') or any(ord(c) < 32 for c in url):
        raise ValueError(f"refusing to render unsafe URL {url!r}")
    return url


def page_url(src: str, directory_urls: bool = True) -> str:
    """Site path of a docs page: 'papers/theory.md' -> 'papers/theory/', 'index.md' -> ''."""
    stem = src.removesuffix(".md")
    if not directory_urls:
        return stem + ".html"
    if stem == "index" or stem.endswith("/index"):
        return stem.removesuffix("index")
    return stem + "/"


def relative(from_src: str, to_src: str, anchor: str = "", directory_urls: bool = True) -> str:
    """URL of ``to_src`` (a page or a file) as seen from the page ``from_src``."""
    base = "/" + page_url(from_src, directory_urls)
    base_dir = base if base.endswith("/") else posixpath.dirname(base) + "/"
    target = "/" + (page_url(to_src, directory_urls) if to_src.endswith(".md") else to_src)
    rel = posixpath.relpath(target, base_dir)
    if rel == ".":
        rel = "./"
    elif target.endswith("/"):
        rel += "/"
    return rel + (f"#{anchor}" if anchor else "")


def source_relative(from_src: str, to_src: str) -> str:
    """Path of the docs file ``to_src`` as seen from the page ``from_src``, for a Markdown
    link: MkDocs checks such a link and turns it into the page's URL, while a URL written
    into Markdown (``../../codebases/``) fails ``mkdocs build --strict``."""
    return posixpath.relpath(to_src, posixpath.dirname(from_src) or ".")


@dataclass(frozen=True)
class Link:
    label: str
    url: str
    kind: str  # css hook: paper, arxiv, doi, code, hf, impl


def paper_links(paper: Paper, impl_url: str | None) -> list[Link]:
    """Every outbound link of a paper, in reading order; ``impl_url`` is already relative."""
    links: list[Link] = []
    if paper.url:
        links.append(Link("Paper", safe_url(paper.url), "paper"))
    if paper.arxiv:
        links.append(Link("arXiv", f"https://arxiv.org/abs/{quote(paper.arxiv, safe='/.')}", "arxiv"))
    if paper.doi:
        links.append(Link("DOI", f"https://doi.org/{quote(paper.doi, safe='/.:;()-_')}", "doi"))
    for i, code in enumerate(paper.code):
        links.append(Link("Code" if len(paper.code) == 1 else f"Code {i + 1}", safe_url(code), "code"))
    if paper.arxiv and ARXIV_NEW.match(paper.arxiv):
        links.append(Link("Hugging Face", f"https://huggingface.co/papers/{paper.arxiv}", "hf"))
    if impl_url:
        links.append(Link("Reference implementation", impl_url, "impl"))
    return links
