"""BibTeX for every paper, written with bibtexparser.

Entry types follow the venue's kind: ``@inproceedings`` (conferences, workshops) with the
full booktitle, ``@article`` (journals) with the full journal name, ``@misc`` for
preprints with eprint / archivePrefix / primaryClass. The file is UTF-8, which biber
and bibtexparser read natively; only BibTeX's special characters are escaped.
"""

from __future__ import annotations

import re

import bibtexparser
from bibtexparser.library import Library
from bibtexparser.model import Entry, Field

from .catalogue import Catalogue
from .models import Paper, Venue, is_group, name_parts, particles

# Characters with a meaning in (La)TeX, and what to write instead.
_SPECIAL = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "&": r"\&", "%": r"\%", "$": r"\$",
            "#": r"\#", "_": r"\_", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_SPECIAL_RE = re.compile("|".join(re.escape(c) for c in _SPECIAL))
# A word part whose capitals must survive bibliography styles that lowercase titles:
# an acronym (MTL), a capital after the first letter (PCGrad, NYUv2) or a digit mix (M3ViT).
_PROTECT = re.compile(r"^(?=.*[A-Z])(?:.+[A-Z]|[A-Z].*\d|\d.*[A-Z])")


def escape(text: str) -> str:
    return _SPECIAL_RE.sub(lambda m: _SPECIAL[m.group()], text)


# Inline TeX math such as ``$\ell_1$``: passed through unescaped (braced, so styles that
# lowercase titles leave it alone) when it is safe inside a BibTeX field: balanced braces,
# no %, and no line break. As in pandoc, the opening $ is followed by a non-space and the closing
# one preceded by a non-space and not followed by a digit, so "$100 or $200" is not math.
# Any other $ is escaped and prints as a dollar sign.
_MATH = re.compile(r"\$(?=[^\s$])[^$\n%]+(?<=\S)\$(?![0-9])")


def _balanced(text: str) -> bool:
    depth = 0
    for i, c in enumerate(text):
        if c in "{}" and i and text[i - 1] == "\\":
            continue  # \{ and \} are literal braces
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


def _protect_words(text: str) -> str:
    out = []
    for word in text.split(" "):
        parts = re.split(r"([-/:])", word)
        out.append("".join("{" + escape(p) + "}" if _PROTECT.match(p) else escape(p) for p in parts))
    return " ".join(out)


def protect_title(title: str) -> str:
    """Escape specials and brace the words whose capitalisation matters; keep TeX math as written."""
    out, last = [], 0
    for m in _MATH.finditer(title):
        if _balanced(m.group()):
            out += [_protect_words(title[last:m.start()]), "{" + m.group() + "}"]
            last = m.end()
    out.append(_protect_words(title[last:]))
    return "".join(out)


def family_given(name: str) -> str:
    """'Tianhe Yu' -> 'Yu, Tianhe'; 'Van Gool, Luc' -> '{Van Gool}, Luc'; 'René van der Berg' ->
    'van der Berg, René' (BibTeX reads lowercase particles as the "von" part); a one-word name stays;
    a team stays braced whole, '{Gemini Team}', so that no style abbreviates it to 'T. Gemini'."""
    if is_group(name):
        return "{" + escape(name[1:-1]) + "}"
    family, given = name_parts(name)
    von, last = particles(family)
    if " " in last:  # keep multi-word family names together
        last = "{" + escape(last) + "}"
        family = f"{escape(von)} {last}" if von else last
    else:
        family = escape(family)
    return f"{family}, {escape(given)}" if given else family


def entry_for(paper: Paper, venue: Venue | None) -> Entry:
    kind = venue.kind if venue else "preprint"
    fields = [("title", protect_title(paper.title)),
              ("author", " and ".join(family_given(a) for a in paper.authors))]
    if kind in ("conference", "workshop"):
        entry_type = "inproceedings"
        fields.append(("booktitle", escape(venue.name)))
    elif kind == "journal":
        entry_type = "article"
        fields.append(("journal", escape(venue.name)))
        fields += [(k, escape(v)) for k in ("volume", "number") if (v := getattr(paper, k))]
    else:
        entry_type = "misc"
    if paper.pages:
        fields.append(("pages", escape(paper.pages.replace("--", "-").replace("-", "--"))))
    fields.append(("year", str(paper.year)))
    if paper.arxiv:
        fields += [("eprint", paper.arxiv), ("archivePrefix", "arXiv")]
        if paper.arxiv_class:
            fields.append(("primaryClass", paper.arxiv_class))
    if paper.doi:
        fields.append(("doi", paper.doi))  # verbatim in biblatex, like url; models.DOI refuses {, }, % and \
    fields.append(("url", paper.link))
    return Entry(entry_type, paper.id, [Field(k, v) for k, v in fields])


def bibtex_entries(cat: Catalogue) -> dict[str, str]:
    """Paper id -> its BibTeX text (what the site shows per paper)."""
    return {p.id: render_library([entry_for(p, cat.venues.get(p.venue))]).strip() for p in cat.papers}


def render_library(entries: list[Entry]) -> str:
    fmt = bibtexparser.BibtexFormat()
    fmt.indent = "  "
    fmt.block_separator = "\n"
    # The entries are built for this call only, so the writer may modify them in place
    # instead of deep-copying every block (most of the cost for large catalogues).
    stack = bibtexparser.middlewares.default_unparse_stack(allow_inplace_modification=True)
    return bibtexparser.write_string(Library(entries), unparse_stack=stack, bibtex_format=fmt)


def render_bibtex(cat: Catalogue) -> str:
    """The whole catalogue as one .bib file, papers sorted by id for stable diffs."""
    header = ("% Generated by `python -m site_gen build` from catalog/papers.yaml. Do not edit by hand.\n"
              "% Encoding: UTF-8\n\n")
    papers = sorted(cat.papers, key=lambda p: p.id)
    return header + render_library([entry_for(p, cat.venues.get(p.venue)) for p in papers])


def line_ranges(bib: str) -> dict[str, tuple[int, int]]:
    """Entry key -> (first line, last line), 1-based, for links like catalog.bib#L10-L18."""
    ranges: dict[str, tuple[int, int]] = {}
    start, key = 0, None
    for n, line in enumerate(bib.splitlines(), 1):
        m = re.match(r"@\w+\{([^,]+),", line)
        if m:
            start, key = n, m.group(1)
        elif line == "}" and key:
            ranges[key] = (start, n)
            key = None
    return ranges
