"""Fetch a paper's metadata from arXiv, doi.org (CSL-JSON) and DBLP.

Each source answers in its own format; each parser turns one answer into the same
``Record``. Network access goes through ``Fetcher``, which retries rate limits, server
errors and timeouts with exponential backoff and then fails with one clear sentence.
Base URLs come from ``Endpoints`` so tests can point every client at 127.0.0.1.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime

import requests

from .checks import normalise_title  # the same rule `check` uses for duplicate titles
from .models import name_parts

ATOM = "{http://www.w3.org/2005/Atom}"
ARXIV_NS = "{http://arxiv.org/schemas/atom}"
OPENSEARCH = "{http://a9.com/-/spec/opensearch/1.1/}"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
USER_AGENT = "awesome-mtl-site-gen/0.1 (catalogue maintenance; +https://github.com/)"


class FetchError(Exception):
    """A source could not be reached or did not know the identifier; the message says which."""


@dataclass(frozen=True)
class Endpoints:
    """Where each source lives. Environment variables override the public defaults."""

    arxiv: str = "http://export.arxiv.org/api/query"
    doi: str = "https://doi.org"
    dblp: str = "https://dblp.org/search/publ/api"

    @classmethod
    def from_env(cls) -> "Endpoints":
        base = cls()
        return cls(arxiv=os.environ.get("SITE_GEN_ARXIV_API", base.arxiv),
                   doi=os.environ.get("SITE_GEN_DOI_BASE", base.doi),
                   dblp=os.environ.get("SITE_GEN_DBLP_API", base.dblp))


@dataclass
class Record:
    """What one source says about a paper, before it is mapped onto our schema."""

    title: str
    authors: list[str]
    year: int
    arxiv: str | None = None
    arxiv_class: str | None = None
    doi: str | None = None
    venue: str | None = None          # the source's venue text, e.g. "NeurIPS" or a journal's full name
    kind: str | None = None           # "conference", "journal" or "preprint" when the source says so
    url: str | None = None
    volume: str | None = None
    number: str | None = None
    pages: str | None = None
    family_names: list[str] = field(default_factory=list)  # first author's family name first, if known


@dataclass
class Fetcher:
    """GET with retries: 429, 5xx and timeouts are retried, anything else fails at once."""

    timeout: float = 15.0
    attempts: int = 4
    backoff: float = 2.0          # first pause in seconds; doubles after each failed attempt
    max_wait: float = 60.0        # never sleep longer than this, whatever Retry-After says
    session: requests.Session = field(default_factory=requests.Session)

    def get(self, url: str, *, params: dict | None = None, headers: dict | None = None,
            what: str = "request") -> requests.Response:
        headers = {"User-Agent": USER_AGENT, **(headers or {})}
        problem = ""
        for attempt in range(self.attempts):
            wait = self.backoff * 2 ** attempt
            try:
                response = self.session.get(url, params=params, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                problem = f"no answer within {self.timeout:g} s"
            except requests.ConnectionError as exc:
                problem = f"cannot connect ({_reason(exc)})"
            except requests.exceptions.ChunkedEncodingError:
                problem = "the connection broke off in the middle of the answer"
            except requests.RequestException as exc:  # a URL requests cannot use, a redirect loop: retrying won't help
                raise FetchError(f"{what} failed: {_unusable(exc)} ({url}); nothing was written") from None
            else:
                if response.status_code not in RETRY_STATUS:
                    return response
                body = response.text.strip()[:80]
                problem = f"HTTP {response.status_code}" + (f" {body!r}" if body else "")
                wait = retry_after(response.headers.get("Retry-After"), default=wait)
            if attempt + 1 < self.attempts:
                time.sleep(min(wait, self.max_wait))
        raise FetchError(f"{what} failed after {self.attempts} attempts: {problem}; "
                         "nothing was written, try again later")


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return default
    value = value.strip()
    if value.isascii() and value.isdigit():  # '²' is a digit to isdigit(), not to float()
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


def _unusable(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.TooManyRedirects):
        return "the server keeps redirecting"
    if isinstance(exc, (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidURL)):
        return "not an http(s) URL"
    return type(exc).__name__


def _reason(exc: Exception) -> str:
    text = str(exc)
    for hint in ("Connection refused", "Name or service not known", "Temporary failure in name resolution"):
        if hint in text:
            return hint.lower()
    return type(exc).__name__


def _clean(text: str | None) -> str:
    """Collapse the line breaks and runs of spaces that Atom and CSL titles carry, and drop the
    invisible characters publishers' records hold (soft hyphens, zero-width spaces): the
    catalogue refuses them in text, and they are no part of a title."""
    collapsed = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", text or "")))
    return "".join(c for c in collapsed if unicodedata.category(c) not in ("Cc", "Cf")).strip()


def _text(value: object, what: str) -> str | None:
    """A JSON field that should be text: DBLP sends a list when it knows several values (a paper
    in a joint venue), so take the first string; a number becomes its text; anything else is refused."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, (str, int)) and not isinstance(v, bool)), value or None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FetchError(f"DBLP sent a {what} that is not text ({type(value).__name__}); add the paper by hand")
    return _clean(str(value)) or None


# --- arXiv: Atom feed --------------------------------------------------------------------

def fetch_arxiv(fetcher: Fetcher, endpoints: Endpoints, arxiv_id: str) -> Record:
    response = fetcher.get(endpoints.arxiv, params={"id_list": arxiv_id, "max_results": "1"},
                           what=f"arXiv lookup of {arxiv_id}")
    if response.status_code != 200:
        # The API answers a malformed id with HTTP 400 *and* an Atom error entry: pass its reason on.
        reason = arxiv_error(response.content)
        raise FetchError(f"arXiv rejected {arxiv_id}: {reason}" if reason
                         else f"arXiv answered HTTP {response.status_code} for {arxiv_id}")
    return parse_arxiv(response.content, arxiv_id)


def arxiv_error(xml: bytes) -> str | None:
    """arXiv's own words when a feed is an error entry (``<id>…/api/errors#…</id>``), else None."""
    try:
        entry = ET.fromstring(xml).find(f"{ATOM}entry")
    except ET.ParseError:
        return None
    if entry is None or "/api/errors" not in entry.findtext(f"{ATOM}id", ""):
        return None
    return _clean(entry.findtext(f"{ATOM}summary")) or "error"


def parse_arxiv(xml: bytes, arxiv_id: str) -> Record:
    """One Atom entry -> Record. Errors come as a feed too (HTTP 200 or 400), so look inside."""
    try:
        feed = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise FetchError(f"arXiv sent something that is not an Atom feed ({exc})") from None
    entries = feed.findall(f"{ATOM}entry")
    total = feed.findtext(f"{OPENSEARCH}totalResults")
    if not entries or total == "0":
        raise FetchError(f"arXiv has no paper {arxiv_id} (check the id)")
    reason = arxiv_error(xml)
    if reason:
        raise FetchError(f"arXiv rejected {arxiv_id}: {reason}")
    entry = entries[0]
    title = _clean(entry.findtext(f"{ATOM}title"))
    authors = [_clean(a.findtext(f"{ATOM}name")) for a in entry.findall(f"{ATOM}author")]
    published = entry.findtext(f"{ATOM}published", "")
    if not title or not authors or not published[:4].isdigit():
        raise FetchError(f"arXiv has no paper {arxiv_id} (empty record)")
    primary = entry.find(f"{ARXIV_NS}primary_category")
    doi = _clean(entry.findtext(f"{ARXIV_NS}doi")) or None
    return Record(title=title, authors=authors, year=int(published[:4]), arxiv=arxiv_id,
                  arxiv_class=primary.get("term") if primary is not None else None,
                  doi=None if doi and doi.lower().startswith("10.48550/") else doi,
                  venue="arXiv", kind="preprint",
                  family_names=[name_parts(a)[0] for a in authors])


# --- DOI: CSL-JSON by content negotiation ------------------------------------------------

CSL_KIND = {"article-journal": "journal", "journal-article": "journal",
            "paper-conference": "conference", "proceedings-article": "conference"}


def fetch_doi(fetcher: Fetcher, endpoints: Endpoints, doi: str) -> Record:
    response = fetcher.get(f"{endpoints.doi.rstrip('/')}/{doi}",
                           headers={"Accept": "application/vnd.citationstyles.csl+json"},
                           what=f"DOI lookup of {doi}")
    if response.status_code == 404:
        raise FetchError(f"doi.org does not know DOI {doi} (check it)")
    if response.status_code != 200:
        raise FetchError(f"doi.org answered HTTP {response.status_code} for {doi}")
    try:
        data = response.json()
    except ValueError:
        raise FetchError(f"doi.org sent no CSL-JSON for {doi} (the registrar may not support it)") from None
    return parse_csl(data, doi)


# The JSON types of the CSL fields we read, as Crossref and DataCite send them.
CSL_TYPES = {"author": list, "DOI": str, "type": str, "container-title": (str, list), "page": (str, int),
             "volume": (str, int), "issue": (str, int)}  # a title of another type counts as missing (_first)
PERSON_FIELDS = ("family", "given", "literal", "name")


def _check_csl_shape(data: object, doi: str) -> None:
    """Refuse CSL-JSON whose fields are of other types than the registrars send, naming the field."""
    def refuse(what: str, value: object) -> None:
        raise FetchError(f"the CSL-JSON of DOI {doi} has {what} that is a {type(value).__name__}, not what "
                         "doi.org sends; add the paper by hand")

    if not isinstance(data, dict):
        refuse("a top level", data)
    for key, kinds in CSL_TYPES.items():
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            refuse(f"a field {key!r}", value)
        if isinstance(value, list) and key != "author":
            for item in value:
                if not isinstance(item, str):
                    refuse(f"an item of {key!r}", item)
    for person in data.get("author") or []:
        if not isinstance(person, dict):
            refuse("an author", person)
        for key in PERSON_FIELDS:
            if person.get(key) is not None and not isinstance(person[key], str):
                refuse(f"an author's {key!r}", person[key])


def parse_csl(data: dict, doi: str) -> Record:
    """CSL-JSON -> Record. Journals list an early-access date first; prefer the issue's print date."""
    _check_csl_shape(data, doi)
    authors, families = [], []
    for person in data.get("author", []):
        family, given = _clean(person.get("family")), _clean(person.get("given"))
        if family and given:
            # Multi-word family names ("Van Gool") are written "Family, Given" so BibTeX splits them right.
            authors.append(f"{family}, {given}" if " " in family else f"{given} {family}")
            families.append(family)
        elif whole := family or _clean(person.get("literal") or person.get("name")) or given:
            # A team, or a name with only one part: braced, so it is cited whole and never split.
            authors.append("{" + whole + "}")
            families.append(whole)
    year = _year(data, "published-print") or _year(data, "issued") or _year(data, "published-online")
    title, subtitle = _first(data.get("title")), _first(data.get("subtitle"))
    if subtitle and normalise_title(subtitle) not in normalise_title(title):
        title = f"{title}: {subtitle}"    # Crossref keeps "Title: Subtitle" in two fields; we keep one
    if not title or not authors or not year:
        raise FetchError(f"the record of DOI {doi} lacks a title, authors or a year")
    container = data.get("container-title")
    if isinstance(container, list):
        container = container[0] if container else None
    pages = data.get("page")
    registered = data.get("DOI") or doi
    return Record(title=title, authors=authors, year=year,
                  doi=doi if registered.lower() == doi.lower() else registered,  # keep the casing typed
                  venue=_clean(container) or None, kind=CSL_KIND.get(data.get("type", "")),
                  volume=data.get("volume"), number=data.get("issue"),
                  pages=None if pages in (None, "1-1") else str(pages).replace("--", "-"),
                  family_names=families)


def _first(value: str | list | None) -> str:
    """CSL text fields come as a string or as a list of strings; take the first, cleaned."""
    if isinstance(value, list):
        value = value[0] if value else None
    return _clean(value if isinstance(value, str) else None)


def _year(data: dict, key: str) -> int | None:
    try:
        return int(data[key]["date-parts"][0][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


# --- DBLP: where was a preprint published? ----------------------------------------------

DBLP_KIND = {"Conference and Workshop Papers": "conference", "Journal Articles": "journal"}


def find_published(fetcher: Fetcher, endpoints: Endpoints, record: Record) -> Record | None:
    """The peer-reviewed version of ``record`` according to DBLP, or None if DBLP lists none."""
    response = fetcher.get(endpoints.dblp, params={"q": record.title, "format": "json", "h": "10"},
                           what="DBLP search")
    if response.status_code != 200:
        raise FetchError(f"DBLP answered HTTP {response.status_code}")
    try:
        return pick_published(response.json(), record)
    except ValueError:
        raise FetchError("DBLP sent something that is not JSON") from None


def pick_published(data: dict, record: Record) -> Record | None:
    """Among DBLP hits with the same title and first author, take a conference or journal version."""
    if not isinstance(data, dict):
        raise FetchError(f"DBLP sent JSON that is a {type(data).__name__}, not an object; add the paper by hand")
    hits = data.get("result", {}).get("hits", {}).get("hit", [])
    hits = [hits] if isinstance(hits, dict) else hits   # DBLP sends one hit as an object
    want = normalise_title(record.title)
    first_family = normalise_title(record.family_names[0]) if record.family_names else ""
    for hit in hits:
        info = hit.get("info", {})
        kind = DBLP_KIND.get(info.get("type", ""))
        if kind is None or normalise_title(_text(info.get("title"), "title") or "") != want:
            continue
        names = info.get("authors", {}).get("author", [])
        names = [names] if isinstance(names, dict) else names
        authors = [re.sub(r"\s+\d{4}$", "", _clean(a.get("text"))) for a in names]  # "Abhishek Gupta 0004"
        if first_family and authors and not _same_family(first_family, authors[0]):
            continue
        links = info.get("ee") or []
        links = [u for u in ([links] if isinstance(links, str) else links) if isinstance(u, str)]
        page = next((u for u in links if "doi.org/" not in u and "arxiv.org/" not in u), None)
        doi = _text(info.get("doi"), "DOI")
        year = _text(info.get("year"), "year") or str(record.year)
        if not year.isascii() or not year.isdigit():
            raise FetchError(f"DBLP sent the year {year!r}; add the paper by hand")
        return replace(record, venue=_text(info.get("venue"), "venue"), kind=kind, year=int(year),
                       doi=record.doi or (doi if doi and not doi.lower().startswith("10.48550/") else None),
                       url=page or record.url,
                       volume=_text(info.get("volume"), "volume") or record.volume,
                       number=_text(info.get("number"), "number") or record.number,
                       pages=_text(info.get("pages"), "pages") or record.pages)
    return None


def _same_family(family: str, name: str) -> bool:
    """Is ``family`` the last word or words of DBLP's ``name`` ("Given Family")? Whole words, so 'Li'
    is not found inside 'Alice Oliver', while 'Van Gool' is the end of 'Luc Van Gool'."""
    words = [w for w in (normalise_title(part) for part in re.split(r"[\s\-]+", name)) if w]
    return any("".join(words[i:]) == family for i in range(len(words)))


def dump_record(record: Record) -> str:
    """The record as JSON, for ``--verbose`` output and debugging."""
    return json.dumps(record.__dict__, indent=2, ensure_ascii=False)
