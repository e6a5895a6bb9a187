"""The catalogue's schema: one pydantic model per kind of entry.

Field rules that need only the entry itself live here; rules that need the whole
catalogue (references, duplicates, implementation links) live in ``checks.py``.
Unknown fields are rejected so a typo such as ``autors`` never passes silently.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from typing import Annotated, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SLUG = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
TOPIC_ID = r"^[a-z0-9]+(?:-[a-z0-9]+)*(?:/[a-z0-9]+(?:-[a-z0-9]+)*)*$"
# Identifiers are ASCII: explicit [0-9] classes, never \d (which also matches full-width and other
# scripts' digits). The patterns are also written into the JSON Schema, so no inline flags.
_MONTH = "(?:0[1-9]|1[0-2])"
ARXIV_NEW = re.compile(rf"^[0-9]{{2}}{_MONTH}\.[0-9]{{4,5}}$")             # YYMM.NNNNN
ARXIV_OLD = re.compile(rf"^[a-z]+(?:-[a-z]+)*(?:\.[A-Z]{{2}})?/[0-9]{{2}}{_MONTH}[0-9]{{3}}$")  # cs/YYMMNNN
# A DOI suffix is printable ASCII without spaces or the characters that would break a BibTeX
# field written verbatim (braces, backslash, %) or a quoted value (").
DOI = re.compile(r'^10\.[0-9]{4,9}/[!#-$&-\[\]-z|~]+$')
# An arXiv category: an archive, and a subject class after a dot where the archive has them
# ('cs.LG', 'stat.ML', 'math.OC', 'cond-mat.stat-mech', 'physics.comp-ph', 'hep-th').
ARXIV_CLASS = r"^[a-z]+(?:-[a-z]+)*(?:\.[A-Za-z]+(?:-[a-z]+)*)?$"
# Archives whose subject classes are written in capitals (two letters: 'cs.LG', 'q-bio.NC').
CAPITAL_SUBJECTS = frozenset({"cs", "econ", "eess", "math", "q-bio", "q-fin", "stat", "astro-ph", "nlin"})
IMPL = r"^reference_impls/(?:[A-Za-z_][A-Za-z0-9_]*/)*[A-Za-z_][A-Za-z0-9_]*\.py:[A-Za-z_][A-Za-z0-9_]*$"
FIRST_YEAR = 1950


def _url(value: str) -> str:
    """Accept only absolute http(s) URLs: no javascript:, data:, relative or spaced URLs."""
    parts = urlsplit(value)
    if not parts.scheme and not value.startswith("/") and "." in value.split("/", 1)[0]:
        raise ValueError(f"the URL has no scheme: write 'https://{value}'")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs are allowed, got scheme {parts.scheme or 'none'!r}")
    if value[:8].lower().startswith(("http://", "https://")) and not value.startswith(("http://", "https://")):
        raise ValueError("write the scheme in lowercase: 'https://...'")
    if (not value.startswith(("http://", "https://")) or not parts.hostname
            or any(c.isspace() for c in value) or any(c in value for c in '<>"\\')):
        raise ValueError("not a valid absolute URL")
    try:
        port = parts.port  # None when there is no port, or an empty one ('example.org:')
    except ValueError:  # not a number, or outside 0-65535
        port = 0
    if port == 0:
        raise ValueError("not a valid port (expected a number from 1 to 65535)")
    return value


def _arxiv(value: str) -> str:
    if value.lower().startswith(("arxiv:", "http")):
        raise ValueError("write the bare arXiv id, e.g. '2001.06782', without prefix or URL")
    if re.search(r"v\d+$", value):
        raise ValueError("drop the version suffix (e.g. 'v2'): the id names all versions")
    if not (ARXIV_NEW.match(value) or ARXIV_OLD.match(value)):
        raise ValueError("not an arXiv id (expected e.g. '2001.06782' or 'cs/0701001')")
    if ARXIV_NEW.match(value):
        month, number = value.split(".")
        if month < "0704":
            raise ValueError(f"ids of this form began in April 2007 (0704.xxxx); {month} is earlier: "
                             "an older paper has an id such as 'cs/0612001'")
        digits = 4 if month < "1501" else 5
        if len(number) != digits:
            raise ValueError(f"an arXiv id from {month[:2]}{month[2:]} (YYMM) has {digits} digits after the dot, "
                             f"not {len(number)}")
        today = datetime.date.today()
        if month > f"{today.year % 100:02d}{today.month:02d}":
            raise ValueError(f"the id's month {month} (YYMM) has not come yet")
    return value


def _arxiv_class(value: str) -> str:
    archive, _, subject = value.partition(".")
    if archive in CAPITAL_SUBJECTS and subject and not (len(subject) == 2 and subject.isupper()):
        fix = f"write '{archive}.{subject.upper()}'" if len(subject) == 2 else "as in 'cs.LG' or 'stat.ML'"
        raise ValueError(f"{archive}'s subject classes are two capitals: {fix}")
    return value


def _doi(value: str) -> str:
    if value.lower().startswith(("http", "doi:")):
        raise ValueError("write the bare DOI, e.g. '10.1109/CVPR.2019.00197', without prefix or URL")
    if value.startswith("10.") and "/" in value and any(c in value for c in '{}\\%"'):
        raise ValueError("a DOI with braces, a backslash, % or a double quote cannot be written into "
                         "BibTeX safely: give the paper's url instead")
    if not DOI.match(value):
        raise ValueError("not a DOI (expected '10.<registrant>/<suffix>')")
    return value


def is_group(author: str) -> bool:
    """'{Gemini Team}': an author that is a team or organisation, braced as in BibTeX. Its name
    is printed and cited as written, never split into given and family names."""
    return author.startswith("{") and author.endswith("}")


def _author_not_a_mapping(value: object) -> object:
    if isinstance(value, dict) and len(value) == 1 and None in value.values():
        (name,) = value
        raise ValueError(f"YAML read {{{name}}} as a mapping: quote a team or organisation author, "
                         f"'\"{{{name}}}\"'")
    return value


def _author(value: str) -> str:
    low = value.lower()
    if "..." in value or "\u2026" in value or "et al" in low or low in ("others", "and others"):
        raise ValueError("truncated author list: give every author by name")
    odd = next((c for c in value if _odd_space(c)), None)
    if odd is not None:
        name = unicodedata.name(odd, "control character")  # only the Cc spaces (tab, line feed...) lack a name
        raise ValueError(f"author name contains U+{ord(odd):04X} ({name}): write names with plain spaces only")
    if "  " in value:
        raise ValueError("two spaces in a row in an author name")
    if "{" in value or "}" in value:
        inner = value[1:-1]
        if not is_group(value) or not inner or inner != inner.strip() or "{" in inner or "}" in inner:
            raise ValueError("braces mark a team or organisation author: put its whole name in one pair, "
                             "e.g. '{Gemini Team}'")
        return value
    if value.count(",") > 1 or re.search(r"\s[Aa][Nn][Dd]\s", value):
        raise ValueError("one author per list item ('Given Family' or 'Family, Given')")
    if "," in value and not all(part.strip() for part in value.split(",")):
        raise ValueError(f"{value!r} lacks a family or a given name: write 'Family, Given', or brace a "
                         "name that has only one part (\"{Van Gool}\")")
    if len(value.split()) == 1:
        # Usually an unquoted "Van Gool, Luc" in a YAML flow list, read as two authors.
        raise ValueError(f"one-word author name {value!r}: write 'Given Family', quote "
                         "'Family, Given' names in [...] lists (\"Van Gool, Luc\"), and brace a team "
                         "or organisation (\"{OpenAI}\")")
    return value


def _odd_space(c: str) -> bool:
    """A space other than U+0020, or an invisible formatting character (zero-width space, BOM...)."""
    return (c.isspace() and c != " ") or unicodedata.category(c) in ("Cf", "Zs", "Zl", "Zp") and c != " "


# Lowercase words that belong to the family name in front of it ("van der Berg", "de Freitas").
PARTICLES = frozenset("von van der den de del della dei degli delle des da das do dos di du le la lo "
                      "ten ter te zu zum zur af av".split())


def name_parts(author: str) -> tuple[str, str]:
    """(family, given) of an author as the catalogue writes it: 'Van Gool, Luc' -> ('Van Gool', 'Luc')
    (the comma form marks a family name of several words); 'Tianhe Yu' -> ('Yu', 'Tianhe');
    lowercase particles go with the family name: 'René van der Berg' -> ('van der Berg', 'René');
    a team or organisation is all family name: '{Gemini Team}' -> ('Gemini Team', '')."""
    if is_group(author):
        return author[1:-1], ""
    if "," in author:
        family, given = (part.strip() for part in author.split(",", 1))
        return family, given
    words = author.split(" ")
    start = len(words) - 1
    while start > 1 and words[start - 1] in PARTICLES:
        start -= 1
    return " ".join(words[start:]), " ".join(words[:start])


def particles(family: str) -> tuple[str, str]:
    """('van der', 'Berg') for 'van der Berg': the family name's leading particles and the rest."""
    words = family.split(" ")
    n = 0
    while n < len(words) - 1 and words[n] in PARTICLES:
        n += 1
    return " ".join(words[:n]), " ".join(words[n:])


def person(author: str) -> str:
    """Display form of an author: 'Van Gool, Luc' -> 'Luc Van Gool'; '{Gemini Team}' -> 'Gemini Team'."""
    if is_group(author):
        return author[1:-1]
    if "," in author:
        family, given = name_parts(author)
        return f"{given} {family}"
    return author


def _year(value: int) -> int:
    last = datetime.date.today().year + 1
    if not FIRST_YEAR <= value <= last:
        raise ValueError(f"implausible year (expected {FIRST_YEAR}..{last})")
    return value


def _one_line(value: str) -> str:
    if "\n" in value.strip():
        raise ValueError("must be a single line")
    hidden = next((c for c in value.strip() if unicodedata.category(c) in ("Cc", "Cf")), None)
    if hidden is not None:
        name = unicodedata.name(hidden, "control character")
        raise ValueError(f"contains the invisible character U+{ord(hidden):04X} ({name}): delete it "
                         "(it is copied into the README and BibTeX as it is)")
    return value.strip()


def _as_list(value: object) -> object:
    """Let a single string stand for a one-item list (``short: PCGrad``)."""
    return [value] if isinstance(value, str) else value


def _as_str(value: object) -> object:
    """Volume, number and pages may be written as YAML integers."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Text = Annotated[str, Field(min_length=1), AfterValidator(_one_line)]
Url = Annotated[str, AfterValidator(_url)]
Slug = Annotated[str, Field(pattern=SLUG)]
TopicId = Annotated[str, Field(pattern=TOPIC_ID)]
Author = Annotated[str, BeforeValidator(_author_not_a_mapping), Field(min_length=1), AfterValidator(_author)]
StrList = Annotated[list[Text], BeforeValidator(_as_list)]
BibField = Annotated[str, BeforeValidator(_as_str), Field(min_length=1)]
ImplLink = Annotated[str, Field(pattern=IMPL)]


class ImplRef(NamedTuple):
    """An implementation link ``path:Symbol`` taken apart."""

    path: str
    symbol: str

    @property
    def module(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Paper(Entry):
    id: Slug
    short: StrList = []
    title: Text
    authors: Annotated[list[Author], Field(min_length=1)]
    venue: Text
    year: Annotated[int, Field(strict=True), AfterValidator(_year)]
    arxiv: Annotated[str, AfterValidator(_arxiv)] | None = None
    arxiv_class: Annotated[str, Field(pattern=ARXIV_CLASS), AfterValidator(_arxiv_class)] | None = None
    doi: Annotated[str, AfterValidator(_doi)] | None = None
    url: Url | None = None
    code: list[Url] = []
    topics: Annotated[list[TopicId], Field(min_length=1)]
    datasets: list[Slug] = []
    impl: ImplLink | None = None
    # The same paper's other methods, each with its own implementation (PLE's CGC, MTAN's DWA).
    also_impl: list[ImplLink] = []
    # Why there is no method to implement (an empirical study, a theory paper).
    no_impl: Text | None = None
    notes: StrList = []
    questions: StrList = []
    findings: StrList = []
    extends: list[Slug] = []
    similar_to: list[Slug] = []
    volume: BibField | None = None
    number: BibField | None = None
    pages: BibField | None = None
    # What a maintainer still has to confirm (e.g. "given names of the authors"); `check` counts these.
    to_verify: Text | None = None

    @model_validator(mode="after")
    def _needs_identifier(self) -> "Paper":
        if not (self.arxiv or self.doi or self.url):
            raise ValueError("a paper needs at least one of arxiv, doi or url")
        if self.impl and self.no_impl:
            raise ValueError("a paper has either impl or no_impl, not both: drop no_impl if the implementation is real")
        if self.also_impl and not self.impl:
            raise ValueError("also_impl lists a paper's further implementations: put the main one in impl first")
        links = self.impls
        repeated = sorted({link for link in links if links.count(link) > 1})
        if repeated:
            raise ValueError(f"implementation linked twice: {', '.join(repeated)}")
        return self

    @property
    def impls(self) -> list[str]:
        """Every implementation link: ``impl`` first, then ``also_impl``."""
        return [self.impl, *self.also_impl] if self.impl else []

    @property
    def impl_refs(self) -> list[ImplRef]:
        """``impls`` as (path, symbol) pairs."""
        return [ImplRef(*link.split(":", 1)) for link in self.impls]

    @property
    def link(self) -> str:
        """The best single link to the paper: official page, then DOI, then arXiv."""
        if self.url:
            return self.url
        if self.doi:
            return f"https://doi.org/{self.doi}"
        return f"https://arxiv.org/abs/{self.arxiv}"


class Dataset(Entry):
    id: Slug
    name: Text
    domain: TopicId
    tasks: Annotated[list[Text], Field(min_length=1)]
    num_tasks: Annotated[int, Field(strict=True, ge=1)] | None = None
    samples: Text | None = None
    resolution: Text | None = None
    homepage: Url | None = None
    paper: Slug | None = None
    license: Text | None = None
    description: Text

    @property
    def task_count(self) -> int:
        return self.num_tasks or len(self.tasks)


class Codebase(Entry):
    id: Slug
    name: Text
    url: Url
    framework: Text
    description: Text
    methods: list[Text] = []
    datasets: list[Slug] = []
    papers: list[Slug] = []
    license: Text | None = None


class Section(Entry):
    id: TopicId
    title: Text
    description: Text
    children: list["Section"] = []


class Venue(Entry):
    name: Text
    kind: Literal["conference", "journal", "workshop", "preprint"]
