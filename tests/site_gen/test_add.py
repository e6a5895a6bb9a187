"""``add``: recorded arXiv / doi.org / DBLP answers served from 127.0.0.1, never the internet.

fixtures/http/README.md says which files are real captures (copied byte for byte from public
recordings, with provenance) and which are reconstructions in the real format (all DBLP answers,
the four MTL arXiv feeds and two IEEE CSL records). The server can be told to answer a route with
429 (with or without Retry-After), 404, 5xx or a stall first, to test retries; rate limits and
timeouts are always simulated.
"""

from __future__ import annotations

import difflib
import html
import json
import re
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from site_gen.add import find_duplicate, match_venue, parse_identifier, suggest_id
from site_gen.metadata import Endpoints, FetchError, Fetcher, Record, parse_arxiv
from site_gen.models import Venue

HTTP = Path(__file__).parent / "fixtures" / "http"
# Status codes the captures were recorded with, when not 200 (arXiv answers a malformed id with 400).
RECORDED_STATUS = {"arxiv/abc.xml": 400}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


class Recorded(BaseHTTPRequestHandler):
    """Serves fixtures by route; ``server.script[route]`` holds misbehaviours to play first."""

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        route = parts.path.split("/")[1]
        self.server.requests.append((route, self.path, dict(self.headers)))
        script = self.server.script.get(route, [])
        trick = script.pop(0) if script else None
        if trick == "timeout":
            time.sleep(self.server.stall)
        if trick == "429":
            return self._send(429, (HTTP / "arxiv" / "rate-exceeded.txt").read_bytes(), "text/plain")
        if trick == "500":
            return self._send(500, b"<html><body>Internal Server Error</body></html>", "text/html")
        if trick and trick.startswith("retry-after:"):
            return self._send(429, b"Rate exceeded.", "text/plain", retry_after=trick.split(":", 1)[1])
        if trick in ("404", "502", "503", "504"):
            return self._send(int(trick), b"", "text/plain")
        if route == "arxiv":
            name = f"arxiv/{query['id_list'][0].replace('/', '_')}.xml"   # astro-ph/0601001 -> astro-ph_0601001
            status = RECORDED_STATUS.get(name, 200)
            return self._send(status, (HTTP / name).read_bytes(), "application/atom+xml; charset=utf-8")
        if route == "dblp":
            body = self.server.dblp.get(_norm(query["q"][0]), self.server.dblp_empty)
            return self._send(200, body, "application/json")
        if route == "doi":
            doi = unquote(parts.path[len("/doi/"):])
            hits = [p for p in (HTTP / "doi").glob("*.json") if p.stem.lower() == doi.replace("/", "_").lower()]
            if hits and self.headers.get("Accept") == "application/vnd.citationstyles.csl+json":
                return self._send(200, hits[0].read_bytes(), "application/vnd.citationstyles.csl+json")
            return self._send(404, (HTTP / "doi" / "notfound.html").read_bytes(), "text/html")
        self._send(404, b"no such fixture route", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str, retry_after: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if retry_after:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(local_server):
    httpd = local_server(Recorded)
    httpd.script, httpd.requests, httpd.stall = {}, [], 2.5
    httpd.dblp = {}
    for path in (HTTP / "dblp").glob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        httpd.dblp[_norm(data["result"]["query"])] = path.read_bytes()
    httpd.dblp_empty = json.dumps({"result": {"query": "", "status": {"@code": "200", "text": "OK"},
                                              "hits": {"@total": "0", "@computed": "0", "@sent": "0",
                                                       "@first": "0"}}}).encode()
    return httpd


@pytest.fixture
def endpoints(server) -> Endpoints:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    return Endpoints(arxiv=f"{base}/arxiv/api/query", doi=f"{base}/doi", dblp=f"{base}/dblp/search/publ/api")


@pytest.fixture
def add(cli, endpoints):
    """Run ``add`` against the local server with short pauses; the 1 s timeout leaves room
    for a loaded CI machine (0.3 s once failed to connect under load)."""

    def run(catalog: Path, *args: str) -> tuple[int, str, str]:
        return cli("add", *args, "--catalog", str(catalog), "--arxiv-api", endpoints.arxiv,
                   "--doi-base", endpoints.doi, "--dblp-api", endpoints.dblp,
                   "--timeout", "1.0", "--attempts", "3", "--backoff", "0.01")

    return run


@pytest.fixture
def catalog(project: Path) -> Path:
    """A temporary copy of the small fixture catalogue plus the CVPR and Science venues."""
    venues = project / "catalog" / "venues.yaml"
    venues.write_text(venues.read_text(encoding="utf-8")
                      + "CVPR: {name: IEEE/CVF Conference on Computer Vision and Pattern Recognition, "
                        "kind: conference}\nScience: {name: Science, kind: journal}\n", encoding="utf-8")
    return project / "catalog"


def _ids(catalog: Path) -> list[str]:
    return [e["id"] for e in yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))]


def _fetcher() -> Fetcher:
    return Fetcher(timeout=1.0, attempts=3, backoff=0.01)


# --- the happy paths --------------------------------------------------------------------------

def test_arxiv_preprint_gets_its_conference_venue_from_dblp(add, catalog, cli) -> None:
    before = (catalog / "papers.yaml").read_text(encoding="utf-8")
    code, out, err = add(catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing",
                         "--short", "MGDA")
    assert code == 0, err
    entry = yaml.safe_load(out)[0]
    assert entry == {
        "id": "mgda", "short": ["MGDA"], "title": "Multi-Task Learning as Multi-Objective Optimization",
        "authors": ["Ozan Sener", "Vladlen Koltun"], "venue": "NeurIPS", "year": 2018, "pages": "527-538",
        "arxiv": "1810.04650", "arxiv_class": "cs.LG",
        "url": "https://proceedings.neurips.cc/paper/2018/hash/432aca3a1e345e339f35a30c8f65edce-Abstract.html",
        "topics": ["optimization/gradient-balancing"]}
    assert list(entry) == ["id", "short", "title", "authors", "venue", "year", "pages", "arxiv", "arxiv_class",
                           "url", "topics"]  # the catalogue's field order
    after = (catalog / "papers.yaml").read_text(encoding="utf-8")
    assert f"added 'mgda' at {catalog / 'papers.yaml'}:{_line_of(catalog, 'mgda')};" in err
    # Placed after the last entry with the same first topic; every old line kept, in order.
    assert _ids(catalog) == ["pcgrad", "mgda", "vandenhende2021multi", "ruder2017overview", "uw"]
    assert out in after
    rest = after.replace(out, "", 1)
    assert [line for line in rest.splitlines() if line.strip()] == [line for line in before.splitlines() if line.strip()]
    assert "\n\n\n" not in after  # one blank line between entries, as before
    assert '  arxiv: "1810.04650"' in after and "  authors: [Ozan Sener, Vladlen Koltun]" in after
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


def test_doi_of_a_conference_paper_maps_the_proceedings_title_to_the_venue_key(add, catalog, cli) -> None:
    code, out, err = add(catalog, "doi:10.1109/CVPR.2018.00781", "--topic", "optimization/loss-balancing")
    assert code == 0, err
    entry = yaml.safe_load(out)[0]
    assert (entry["id"], entry["venue"], entry["year"], entry["pages"], entry["doi"]) == \
        ("kendall2018multi", "CVPR", 2018, "7482-7491", "10.1109/CVPR.2018.00781")
    assert entry["authors"] == ["Alex Kendall", "Yarin Gal", "Roberto Cipolla"]
    assert _ids(catalog)[-1] == "kendall2018multi"  # no entry starts with loss-balancing: appended
    assert (catalog / "papers.yaml").read_text(encoding="utf-8").endswith(
        "\n  topics: [optimization/loss-balancing, optimization/gradient-balancing]\n\n" + out)
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


def test_journal_doi_reproduces_the_hand_written_entry(add, catalog, cli) -> None:
    """Remove the survey from the fixture, add it back by DOI: the fields must match what was there."""
    path = catalog / "papers.yaml"
    text = path.read_text(encoding="utf-8")
    original = next(e for e in yaml.safe_load(text) if e["id"] == "vandenhende2021multi")
    authors_line = next(line for line in text.splitlines() if "Van Gansbeke" in line)
    start = text.index("- id: vandenhende2021multi")
    path.write_text(text[:start] + text[text.index("- id: ruder2017overview"):], encoding="utf-8")
    code, out, err = add(catalog, "doi:10.1109/TPAMI.2021.3054719", "--topic", "survey",
                         "--id", "vandenhende2021multi")
    assert code == 0, err
    entry = yaml.safe_load(out)[0]
    for key in ("title", "authors", "venue", "year", "doi", "topics"):
        assert entry[key] == original[key], key
    # Early-access (online) date is 2021, the issue is 2022: the print date wins, like the catalogue.
    assert (entry["volume"], entry["number"], entry["pages"]) == ("44", "7", "3614-3633")
    assert _ids(catalog) == ["pcgrad", "ruder2017overview", "vandenhende2021multi", "uw"]  # after the last survey
    assert authors_line in (catalog / "papers.yaml").read_text(encoding="utf-8").splitlines()
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


def test_preprint_that_dblp_lists_only_on_corr_stays_on_arxiv(endpoints) -> None:
    from site_gen.add import fetch_record

    record = fetch_record("arxiv", "1706.05098", _fetcher(), endpoints)
    assert (record.venue, record.year, record.arxiv_class, record.url) == ("arXiv", 2017, "cs.LG", None)


def test_pcgrad_preprint_is_found_at_neurips(endpoints) -> None:
    from site_gen.add import fetch_record

    record = fetch_record("arxiv", "2001.06782", _fetcher(), endpoints)
    assert (record.venue, record.kind, record.year) == ("NeurIPS", "conference", 2020)
    assert record.url.endswith("/2020/hash/3fe78a8acf5fda99de95303940a2420c-Abstract.html")
    assert record.authors[2] == "Abhishek Gupta"  # arXiv's name, not DBLP's "Abhishek Gupta 0004"


def test_base_urls_come_from_the_environment(monkeypatch, endpoints, catalog, cli) -> None:
    monkeypatch.setenv("SITE_GEN_ARXIV_API", endpoints.arxiv)
    monkeypatch.setenv("SITE_GEN_DBLP_API", endpoints.dblp)
    code, out, err = cli("add", "arxiv:1810.04650", "--catalog", str(catalog), "--topic", "optimization/pareto",
                         "--venue", "NeurIPS", "--dry-run", "--backoff", "0.01")
    assert code == 1 and "unknown topic(s) optimization/pareto" in err  # got past the network: env worked
    assert Endpoints.from_env().arxiv == endpoints.arxiv


# --- real captures (see fixtures/http/README.md for where each was recorded) -------------------

def _capture_names(name: str) -> list[str]:
    """Every <name> in a captured feed, read with a regex so the oracle is not the parser under test."""
    text = (HTTP / "arxiv" / name).read_text(encoding="utf-8")
    return [html.unescape(n) for n in re.findall(r"<name>([^<]*)</name>", text)]


def test_journal_doi_capture_gives_every_field_and_keeps_the_subtitle(add, catalog, cli) -> None:
    """Crossref's CSL-JSON for a Science article: one author, print issue, title and subtitle split."""
    code, out, err = add(catalog, "doi:10.1126/science.169.3946.635", "--topic", "survey")
    assert code == 0, err
    assert yaml.safe_load(out)[0] == {
        "id": "frank1970structure",
        "title": "The Structure of Ordinary Water: New data and interpretations are yielding new insights "
                 "into this fascinating substance.",
        "authors": ["Henry S. Frank"], "venue": "Science", "year": 1970, "volume": "169", "number": "3946",
        "pages": "635-641", "doi": "10.1126/science.169.3946.635", "topics": ["survey"]}
    assert '\n  title: "The Structure of Ordinary Water: New data and interpretations' in out  # ': ' is quoted
    assert _ids(catalog) == ["pcgrad", "vandenhende2021multi", "ruder2017overview", "frank1970structure", "uw"]
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0
    # The same DOI again, typed in another case: refused, file untouched.
    before = (catalog / "papers.yaml").read_bytes()
    code, out, err = add(catalog, "doi:10.1126/SCIENCE.169.3946.635", "--topic", "survey")
    assert code == 1 and "same DOI as existing entry 'frank1970structure'" in err
    assert (catalog / "papers.yaml").read_bytes() == before


def test_arxiv_capture_keeps_all_34_authors_in_order(add, catalog, cli) -> None:
    names = _capture_names("1707.08567.xml")
    assert len(names) == 34 and names[0] == "Kees A. Schouhamer Immink" and names[-1] == "Hirosuke Yamamoto"
    code, out, err = add(catalog, "arxiv:1707.08567", "--topic", "survey", "--no-dblp")
    assert code == 0, err
    entry = yaml.safe_load(out)[0]
    assert entry["authors"] == names
    assert {"Peter H. N. de With", "Joost van der Putten", "Dirk Wübben"} <= set(entry["authors"])
    assert (entry["id"], entry["title"], entry["venue"], entry["year"], entry["arxiv"], entry["arxiv_class"]) == (
        "immink2017proceedings",
        "Proceedings of Workshop AEW10: Concepts in Information Theory and Communications",
        "arXiv", 2017, "1707.08567", "cs.IT")
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0
    code, out, err = add(catalog, "arxiv:1707.08567v1", "--topic", "survey", "--no-dblp")
    assert code == 1 and "same arXiv id as existing entry 'immink2017proceedings'" in err


def test_arxiv_capture_whose_title_is_a_number_stays_a_string(add, catalog, cli) -> None:
    """arXiv 2104.12255 is titled "0": written unquoted, YAML would read it back as the integer 0."""
    code, out, err = add(catalog, "arxiv:2104.12255", "--topic", "survey", "--no-dblp")
    assert code == 0, err
    entry = next(e for e in yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))
                 if e.get("arxiv") == "2104.12255")
    assert (entry["title"], entry["authors"], entry["year"], entry["arxiv_class"]) == \
        ("0", ["Quan Thoi Minh Nguyen"], 2021, "cs.CR")
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


def test_old_style_arxiv_id_capture(endpoints) -> None:
    from site_gen.add import fetch_record

    record = fetch_record("arxiv", "astro-ph/0601001", _fetcher(), endpoints, use_dblp=False)
    assert record.title == ("Frequency of Hot Jupiters and Very Hot Jupiters from the OGLE-III Transit Surveys "
                            "Toward the Galactic Bulge and Carina")
    assert record.authors == _capture_names("astro-ph_0601001.xml") == \
        ["Andrew Gould", "Susan Dorsher", "B. Scott Gaudi", "Andrzej Udalski"]
    assert (record.year, record.arxiv, record.arxiv_class, record.venue) == (2006, "astro-ph/0601001", "astro-ph", "arXiv")


@pytest.mark.parametrize("arxiv_id", ["1605.08386", "1707.08567", "2104.12255", "astro-ph/0601001"])
def test_every_captured_feed_parses_to_the_facts_in_it(arxiv_id) -> None:
    """Title, authors and year against the capture's own text, read with regexes rather than the parser."""
    raw = (HTTP / "arxiv" / f"{arxiv_id.replace('/', '_')}.xml").read_bytes()
    entry = raw.decode("utf-8").split("<entry>", 1)[1]
    record = parse_arxiv(raw, arxiv_id)
    assert record.title == " ".join(re.search(r"<title>([^<]*)</title>", entry).group(1).split())
    assert record.authors == _capture_names(f"{arxiv_id.replace('/', '_')}.xml")
    assert record.year == int(re.search(r"<published>(\d{4})-", entry).group(1))
    assert (record.arxiv, record.venue, record.kind) == (arxiv_id, "arXiv", "preprint")


def test_malformed_id_answered_with_http_400_reports_arxivs_reason_without_retrying(endpoints, server) -> None:
    """The captured API answers id_list=abc with HTTP 400 and an Atom error entry; say what it says."""
    from site_gen.metadata import fetch_arxiv

    with pytest.raises(FetchError, match="^arXiv rejected abc: incorrect id format for abc$"):
        fetch_arxiv(_fetcher(), endpoints, "abc")
    assert [r[0] for r in server.requests] == ["arxiv"]  # a 400 is final: one request


def test_csl_subtitle_already_in_the_title_is_not_repeated() -> None:
    from site_gen.metadata import parse_csl

    data = {"title": "Deep Learning: A Survey", "subtitle": ["A survey"], "author": [{"family": "Li", "given": "X"}],
            "issued": {"date-parts": [[2020]]}}
    assert parse_csl(data, "10.1/x").title == "Deep Learning: A Survey"
    assert parse_csl({**data, "subtitle": []}, "10.1/x").title == "Deep Learning: A Survey"
    assert parse_csl({**data, "title": ["Deep Learning"]}, "10.1/x").title == "Deep Learning: A survey"


# --- refusals: nothing is written --------------------------------------------------------------

@pytest.mark.parametrize("ident, existing, label", [
    ("arxiv:2001.06782", "pcgrad", "arXiv id"),
    ("doi:10.1109/tpami.2021.3054719", "vandenhende2021multi", "DOI"),
    ("arxiv:1706.05098", "ruder2017overview", "arXiv id"),
])
def test_duplicates_are_refused_naming_the_existing_entry(add, catalog, ident, existing, label) -> None:
    err = _refused(add, catalog, ident, "--topic", "survey")
    assert f"same {label} as existing entry '{existing}' (papers.yaml line {_line_of(catalog, existing)})" in err


def test_duplicate_title_is_refused(catalog) -> None:
    papers = yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))
    clash = find_duplicate({"title": "gradient surgery for multi-task learning."}, papers)
    assert clash == "same title as existing entry 'pcgrad'"


@pytest.mark.parametrize("ident, script, message", [
    ("arxiv:0000.0000", {}, "'0000.0000' is not an arXiv id"),      # month 00: refused before any request
    ("arxiv:0808.05394", {}, "arXiv has no paper 0808.05394"),      # real capture: empty feed
    ("doi:10.1126/science.169.3946.635", {}, "venue 'Science' matches no key of venues.yaml"),
    ("doi:10.1109/NOTAREAL.2099.0000001", {}, "doi.org does not know DOI 10.1109/NOTAREAL.2099.0000001"),
    ("arxiv:1810.04650", {"arxiv": ["429"] * 3}, "HTTP 429 'Rate exceeded.'"),
    ("arxiv:1810.04650", {"arxiv": ["timeout"] * 3}, "no answer within 1 s"),
    ("arxiv:1810.04650", {"dblp": ["500"] * 3}, "DBLP search failed after 3 attempts: HTTP 500"),
    ("arxiv:1705.07115", {}, "venue 'CVPR' matches no key of venues.yaml"),
])
def test_failures_write_nothing_and_say_why(add, project, server, ident, script, message) -> None:
    catalog = project / "catalog"  # no CVPR venue here
    before = (catalog / "papers.yaml").read_bytes()
    # Copies: the server pops what it plays, and the parameter's lists must stay whole when the test runs
    # twice in one process (mutmut does; with the lists themselves the second run met no 429 and exited 0).
    server.script.update({route: list(tricks) for route, tricks in script.items()})
    code, out, err = add(catalog, ident, "--topic", "optimization/loss-balancing")
    assert code == 1 and out == ""
    assert message in err
    assert (catalog / "papers.yaml").read_bytes() == before
    if script:
        route = next(iter(script))
        assert sum(r[0] == route for r in server.requests) == 3  # every attempt was made


def test_rate_limit_then_success_is_retried(add, catalog, server) -> None:
    server.script["arxiv"] = ["429", "500"]   # simulated; the third answer is the real capture
    code, out, err = add(catalog, "arxiv:1707.08567", "--topic", "survey", "--no-dblp")
    assert code == 0, err
    assert [r[0] for r in server.requests] == ["arxiv"] * 3
    assert yaml.safe_load(out)[0]["id"] == "immink2017proceedings"


def test_doi_lookup_asks_for_csl_json(add, catalog, server) -> None:
    add(catalog, "doi:10.1109/CVPR.2018.00781", "--topic", "survey", "--dry-run")
    doi_requests = [headers for route, _, headers in server.requests if route == "doi"]
    assert doi_requests and doi_requests[0]["Accept"] == "application/vnd.citationstyles.csl+json"
    assert all(headers["User-Agent"].startswith("awesome-mtl-site-gen/") for _, _, headers in server.requests)


# --- pieces ----------------------------------------------------------------------------------

VENUES = {
    "arXiv": Venue(name="arXiv", kind="preprint"),
    "NeurIPS": Venue(name="Advances in Neural Information Processing Systems", kind="conference"),
    "CVPR": Venue(name="IEEE/CVF Conference on Computer Vision and Pattern Recognition", kind="conference"),
    "TPAMI": Venue(name="IEEE Transactions on Pattern Analysis and Machine Intelligence", kind="journal"),
}


@pytest.mark.parametrize("text, key", [
    ("NeurIPS", "NeurIPS"), ("NIPS", "NeurIPS"), ("neurips 2020", "NeurIPS"), ("CoRR", "arXiv"),
    ("IEEE Transactions on Pattern Analysis and Machine Intelligence", "TPAMI"),
    ("IEEE Trans. Pattern Anal. Mach. Intell.", "TPAMI"),
    ("2018 IEEE/CVF Conference on Computer Vision and Pattern Recognition", "CVPR"),
    ("2019 IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)", "CVPR"),
    ("Advances in Neural Information Processing Systems", "NeurIPS"),
    ("International Conference on Robotics and Automation", None), (None, None),
])
def test_match_venue(text, key) -> None:
    assert match_venue(text, VENUES) == key


def test_suggested_ids_follow_the_convention() -> None:
    survey = Record(title="Multi-Task Learning for Dense Prediction Tasks: A Survey", year=2022,
                    authors=["Simon Vandenhende"], family_names=["Vandenhende"])
    overview = Record(title="An Overview of Multi-Task Learning in Deep Neural Networks", year=2017,
                      authors=["Sebastian Ruder"], family_names=["Ruder"])
    accented = Record(title="Über Tasks", year=2019, authors=["Anders Søgaard"], family_names=["Søgaard"])
    assert suggest_id(survey, None, set()) == "vandenhende2022multi"
    assert suggest_id(overview, None, set()) == "ruder2017overview"
    assert suggest_id(accented, None, set()) == "sogaard2019uber"
    assert suggest_id(overview, "PCGrad", set()) == "pcgrad"
    assert suggest_id(overview, "Nash-MTL", {"nash-mtl"}) == "nash-mtl-2"
    assert suggest_id(overview, None, {"ruder2017overview", "ruder2017overview-2"}) == "ruder2017overview-3"


@pytest.mark.parametrize("text, parsed", [
    ("arxiv:2001.06782", ("arxiv", "2001.06782")), ("https://arxiv.org/abs/2001.06782v4", ("arxiv", "2001.06782")),
    ("2001.06782", ("arxiv", "2001.06782")), ("2001.06782v2", ("arxiv", "2001.06782")),
    ("doi:10.1109/TPAMI.2021.3054719", ("doi", "10.1109/TPAMI.2021.3054719")),
    ("https://doi.org/10.1613/jair.731", ("doi", "10.1613/jair.731")),
    ("https://dx.doi.org/10.1613/jair.731", ("doi", "10.1613/jair.731")),
])
def test_parse_identifier(text, parsed) -> None:
    assert parse_identifier(text) == parsed


def test_arxiv_error_feed_is_reported_not_parsed_as_a_paper() -> None:
    with pytest.raises(FetchError, match="arXiv rejected abc: incorrect id format for abc"):
        parse_arxiv((HTTP / "arxiv" / "abc.xml").read_bytes(), "abc")


# --- what is written, and where ------------------------------------------------------------------

def _line_of(catalog: Path, entry_id: str) -> int:
    """1-based line of '- id: <entry_id>' in papers.yaml, read as text."""
    lines = (catalog / "papers.yaml").read_text(encoding="utf-8").splitlines()
    return lines.index(f"- id: {entry_id}") + 1


def _refused(add, catalog: Path, *args: str) -> str:
    """Run ``add`` expecting a refusal: exit 1, no entry printed, papers.yaml byte for byte unchanged."""
    before = (catalog / "papers.yaml").read_bytes()
    code, out, err = add(catalog, *args)
    assert code == 1 and out == "", err
    assert (catalog / "papers.yaml").read_bytes() == before
    return err


def test_dry_run_prints_the_entry_and_writes_nothing(add, catalog) -> None:
    before = (catalog / "papers.yaml").read_bytes()
    code, out, err = add(catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing", "--dry-run")
    assert code == 0 and yaml.safe_load(out)[0]["arxiv"] == "1810.04650"
    assert "(dry run: papers.yaml not changed)" in err
    assert (catalog / "papers.yaml").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (("--id", "pcgrad"), "id 'pcgrad' is already used; pass another with --id"),
    (("--venue", "NOPE"), "--venue NOPE is not a key of venues.yaml"),
    (("--code", "not a url"), "--code 'not a url': only http(s) URLs are allowed"),
])
def test_bad_options_are_refused_naming_the_option(add, catalog, args, message) -> None:
    err = _refused(add, catalog, "arxiv:1810.04650", "--topic", "survey", "--no-dblp", *args)
    assert message in err


def test_a_failed_rename_leaves_papers_yaml_as_it_was(add, catalog, rename_fails) -> None:
    """The new file is written beside papers.yaml and renamed over it: a failure there changes nothing."""
    before, files = (catalog / "papers.yaml").read_bytes(), sorted(catalog.iterdir())
    with pytest.raises(OSError, match="disk full"):
        add(catalog, "arxiv:1810.04650", "--topic", "survey", "--no-dblp")
    assert (catalog / "papers.yaml").read_bytes() == before
    assert sorted(catalog.iterdir()) == files  # no temporary file left beside it


def test_comments_stay_with_the_entry_they_belong_to() -> None:
    """A comment indented inside an entry stays with it; a section comment stays above its entry."""
    from site_gen.add import plan_insert

    text = ("- id: a\n  title: A\n  topics: [x]\n  # note on a\n\n"
            "# section y\n- id: b\n  title: B\n  topics: [y]\n")
    plan = plan_insert(text, {"id": "n", "title": "N", "topics": ["x"]})
    assert plan.text == ("- id: a\n  title: A\n  topics: [x]\n  # note on a\n\n"
                         "- id: n\n  title: N\n  topics: [x]\n\n"
                         "# section y\n- id: b\n  title: B\n  topics: [y]\n")
    assert plan.line == 6


@pytest.mark.parametrize("edit", ["drop", "reorder", "change"])
def test_verify_refuses_a_file_that_is_not_the_old_data_plus_the_entry(edit) -> None:
    from site_gen.add import AddError, verify

    old = "- id: a\n  topics: [x]\n\n- id: b\n  topics: [y]\n"
    entry = {"id": "n", "topics": ["x"]}
    new_entry = "\n- id: n\n  topics: [x]\n"
    verify(old, old + new_entry, entry)  # the honest edit passes
    bad = {"drop": "- id: a\n  topics: [x]\n",
           "reorder": "- id: b\n  topics: [y]\n\n- id: a\n  topics: [x]\n",
           "change": "- id: a\n  topics: [z]\n\n- id: b\n  topics: [y]\n"}[edit]
    with pytest.raises(AddError, match="would not round-trip; nothing written"):
        verify(old, bad + new_entry + ("\n- id: c\n" if edit == "drop" else ""), entry)


# --- metadata: retries and pauses ----------------------------------------------------------------

@pytest.fixture
def sleeps(recorded_sleeps) -> list[float]:
    """The pauses Fetcher asks for, recorded instead of slept."""
    import site_gen.metadata

    return recorded_sleeps(site_gen.metadata)


def test_backoff_doubles_is_capped_and_no_pause_follows_the_last_attempt(endpoints, server, sleeps) -> None:
    from site_gen.metadata import fetch_arxiv

    server.script["arxiv"] = ["500"] * 4
    with pytest.raises(FetchError, match="failed after 4 attempts: HTTP 500"):
        fetch_arxiv(Fetcher(timeout=1.0, attempts=4, backoff=0.5, max_wait=1.5), endpoints, "1810.04650")
    assert sleeps == [0.5, 1.0, 1.5]  # 0.5, 1, 2 -> capped at max_wait; none after the 4th
    assert sum(r[0] == "arxiv" for r in server.requests) == 4


def test_retry_after_seconds_replace_the_backoff(endpoints, server, sleeps) -> None:
    from site_gen.metadata import fetch_arxiv

    server.script["arxiv"] = ["retry-after:7", "retry-after:90"]
    record = fetch_arxiv(Fetcher(timeout=1.0, attempts=3, backoff=0.5, max_wait=60), endpoints, "1810.04650")
    assert record.arxiv == "1810.04650" and sleeps == [7.0, 60]


def test_retry_after_header_forms() -> None:
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from site_gen.metadata import retry_after

    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    past = format_datetime(datetime.now(timezone.utc) - timedelta(hours=1), usegmt=True)
    assert retry_after("12", default=1.0) == 12.0
    assert 20 <= retry_after(soon, default=1.0) <= 31
    assert retry_after(past, default=1.0) == 0.0
    assert retry_after("soon", default=1.5) == retry_after(None, default=1.5) == 1.5


@pytest.mark.parametrize("status", ["502", "503", "504"])
def test_every_retryable_5xx_is_retried(endpoints, server, status) -> None:
    from site_gen.metadata import fetch_arxiv

    server.script["arxiv"] = [status]
    assert fetch_arxiv(_fetcher(), endpoints, "1810.04650").arxiv == "1810.04650"
    assert sum(r[0] == "arxiv" for r in server.requests) == 2


def test_dblp_answering_404_is_an_error_not_no_venue(endpoints, server) -> None:
    from site_gen.add import fetch_record

    server.script["dblp"] = ["404"]
    with pytest.raises(FetchError, match="^DBLP answered HTTP 404$"):
        fetch_record("arxiv", "1810.04650", _fetcher(), endpoints)


# --- metadata: parsed fields ----------------------------------------------------------------------

def test_arxivs_own_doi_is_not_taken_for_a_publisher_doi() -> None:
    raw = (HTTP / "arxiv" / "1810.04650.xml").read_text(encoding="utf-8")
    ns = 'xmlns:arxiv="http://arxiv.org/schemas/atom"'
    tagged = raw.replace("<entry>", f"<entry {ns}><arxiv:doi>{{}}</arxiv:doi>", 1)
    assert parse_arxiv(tagged.format("10.48550/arXiv.1810.04650").encode(), "1810.04650").doi is None
    assert parse_arxiv(tagged.format("10.5555/3326943.3326992").encode(), "1810.04650").doi == "10.5555/3326943.3326992"


def test_a_feed_that_counts_no_results_is_no_paper_whatever_entry_it_carries() -> None:
    raw = (HTTP / "arxiv" / "1810.04650.xml").read_text(encoding="utf-8")
    total = '<opensearch:totalResults xmlns:opensearch="http://a9.com/-/spec/opensearch/1.1/">'
    assert f"{total}1<" in raw
    with pytest.raises(FetchError, match=r"^arXiv has no paper 1810\.04650 \(check the id\)$"):
        parse_arxiv(raw.replace(f"{total}1<", f"{total}0<").encode(), "1810.04650")


def _csl(**fields: object) -> dict:
    return {"title": "T", "author": [{"family": "Li", "given": "X"}], "issued": {"date-parts": [[2020]]}, **fields}


def test_csl_pages_kind_and_literal_authors() -> None:
    from site_gen.metadata import parse_csl

    assert parse_csl(_csl(title="Tasks &amp; <i>Nets</i>,\n  again"), "10.1/x").title == "Tasks & Nets, again"
    assert parse_csl(_csl(title="Multi\u00adTask\u200b Nets\u0007"), "10.1/x").title == "MultiTask Nets"  # invisible
    assert parse_csl(_csl(page="12--20"), "10.1/x").pages == "12-20"
    assert parse_csl(_csl(page="1-1"), "10.1/x").pages is None  # Crossref's placeholder for "no pages"
    assert parse_csl(_csl(type="journal-article"), "10.1/x").kind == "journal"
    assert parse_csl(_csl(type="proceedings-article"), "10.1/x").kind == "conference"
    team = parse_csl(_csl(author=[{"literal": "The  ATLAS Collaboration"}, {"family": "Li", "given": "X"}]), "10.1/x")
    assert (team.authors, team.family_names) == (["{The ATLAS Collaboration}", "X Li"], ["The ATLAS Collaboration", "Li"])
    # written into papers.yaml quoted, so YAML reads the braced team back as a name, not a mapping
    from site_gen.add import render_entry
    written = yaml.safe_load(render_entry({"authors": team.authors}, 0))
    assert written == [{"authors": ["{The ATLAS Collaboration}", "X Li"]}]


def test_csl_authors_without_a_given_name_and_teams_under_name() -> None:
    from site_gen.metadata import parse_csl

    record = parse_csl(_csl(author=[{"family": "Van Gool"}, {"family": "Li"}, {"name": "OpenAI"},
                                    {"given": "Madonna"}, {"family": "Van Gool", "given": "Luc"}]), "10.1/x")
    # A name with one part is cited whole, like a team: "Van Gool" alone is not given "Van", family "Gool",
    # a one-word "Li" is no error, and a given name alone is kept, not dropped.
    assert record.authors == ["{Van Gool}", "{Li}", "{OpenAI}", "{Madonna}", "Van Gool, Luc"]
    assert record.family_names == ["Van Gool", "Li", "OpenAI", "Madonna", "Van Gool"]


def test_csl_container_title_list_gives_its_first_name() -> None:
    from site_gen.metadata import parse_csl

    data = _csl(**{"container-title": ["Proceedings of the IEEE Conference on Computer Vision", "CVPR"]})
    assert parse_csl(data, "10.1/x").venue == "Proceedings of the IEEE Conference on Computer Vision"
    assert parse_csl(_csl(**{"container-title": []}), "10.1/x").venue is None


def _dblp(*infos: dict) -> dict:
    hits = [{"info": i} for i in infos]
    return {"result": {"hits": {"hit": hits[0] if len(hits) == 1 else hits}}}


PREPRINT = Record(title="Deep Tasks", authors=["Ana Silva", "Bo Li"], year=2019, arxiv="1901.00001",
                  venue="arXiv", kind="preprint", family_names=["Silva", "Li"])
PUBLISHED = {"type": "Journal Articles", "title": "Deep Tasks.", "venue": "J. Mach. Learn. Res.", "year": "2021",
             "volume": "22", "number": "7", "pages": "1-30", "doi": "10.5555/jmlr.22.7",
             "authors": {"author": [{"text": "Ana Silva 0002"}, {"text": "Bo Li"}]},
             "ee": ["https://doi.org/10.5555/jmlr.22.7", "https://arxiv.org/abs/1901.00001",
                    "https://jmlr.org/papers/v22/silva21a.html"]}


def test_dblp_hit_gives_venue_year_issue_and_landing_page() -> None:
    from site_gen.metadata import pick_published

    found = pick_published(_dblp(PUBLISHED), PREPRINT)  # one hit: DBLP sends an object, not a list
    assert (found.venue, found.kind, found.year, found.volume, found.number, found.pages, found.doi, found.url) == (
        "J. Mach. Learn. Res.", "journal", 2021, "22", "7", "1-30", "10.5555/jmlr.22.7",
        "https://jmlr.org/papers/v22/silva21a.html")
    assert (found.title, found.authors, found.arxiv) == (PREPRINT.title, PREPRINT.authors, "1901.00001")
    arxiv_doi = pick_published(_dblp({**PUBLISHED, "doi": "10.48550/arXiv.1901.00001"}), PREPRINT)
    assert arxiv_doi.doi is None


def test_dblp_landing_page_replaces_the_preprints_own_url() -> None:
    from dataclasses import replace

    from site_gen.metadata import pick_published

    found = pick_published(_dblp(PUBLISHED), replace(PREPRINT, url="https://example.org/preprint"))
    assert found.url == "https://jmlr.org/papers/v22/silva21a.html"
    no_page = {**PUBLISHED, "ee": ["https://doi.org/10.5555/jmlr.22.7"]}
    assert pick_published(_dblp(no_page), replace(PREPRINT, url="https://example.org/preprint")).url == \
        "https://example.org/preprint"


def test_dblp_hit_by_another_first_author_is_not_taken() -> None:
    from site_gen.metadata import pick_published

    other = {**PUBLISHED, "authors": {"author": [{"text": "Bo Li"}, {"text": "Ana Silva"}]}}
    assert pick_published(_dblp(other), PREPRINT) is None
    assert pick_published(_dblp(other, PUBLISHED), PREPRINT).venue == "J. Mach. Learn. Res."


def test_dblp_lists_skip_booleans_and_years_must_be_ascii_digits() -> None:
    from site_gen.metadata import pick_published

    assert pick_published(_dblp({**PUBLISHED, "venue": [True, "JMLR"]}), PREPRINT).venue == "JMLR"
    with pytest.raises(FetchError, match=r"^DBLP sent the year '\uff12\uff10\uff12\uff11'; add the paper by hand$"):
        pick_published(_dblp({**PUBLISHED, "year": "\uff12\uff10\uff12\uff11"}), PREPRINT)  # full-width digits


# --- inputs that used to crash add or write entries that check refuses ------------------------------

def _mgda_dblp(server, **info_changes) -> None:
    """Change the first DBLP hit for MGDA's title (the NeurIPS version) before the request."""
    key = next(k for k in server.dblp if "multiobjective" in k)
    data = json.loads(server.dblp[key])
    data["result"]["hits"]["hit"][0]["info"].update(info_changes)
    server.dblp[key] = json.dumps(data).encode()


def test_a_dblp_venue_given_as_a_list_takes_its_first_name(add, catalog, server) -> None:
    _mgda_dblp(server, venue=["NeurIPS", "NIPS"])
    code, out, err = add(catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing", "--dry-run")
    assert code == 0, err
    assert yaml.safe_load(out)[0]["venue"] == "NeurIPS"


@pytest.mark.parametrize("venue", [{"name": "NeurIPS"}, [{"name": "NeurIPS"}], True])
def test_a_dblp_venue_that_is_not_text_is_a_fetch_error(add, catalog, server, venue) -> None:
    _mgda_dblp(server, venue=venue)
    err = _refused(add, catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing")
    assert "Traceback" not in err and "error: DBLP sent a venue that is not text" in err


def test_a_fetched_url_loses_its_tracking_parameters(add, catalog, server, cli) -> None:
    _mgda_dblp(server, ee="https://proceedings.neurips.cc/paper/2018/x.html?utm_source=dblp&utm_medium=web&v=2")
    code, out, err = add(catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing")
    assert code == 0, err
    assert yaml.safe_load(out)[0]["url"] == "https://proceedings.neurips.cc/paper/2018/x.html?v=2"
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


@pytest.mark.parametrize("url", ["https://github.com/x/y?a=1", "https://github.com/x/y#readme,more",
                                 "https://github.com/x/y?q=[1]", "https://example.org/a,b"])
def test_a_code_url_that_yaml_would_misread_is_quoted(add, catalog, cli, url: str) -> None:
    code, out, err = add(catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing", "--short", "MGDA",
                         "--code", url)
    assert code == 0 and "Traceback" not in err, err
    assert yaml.safe_load(out)[0]["code"] == [url]
    assert [e.get("code") for e in yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))
            if e["id"] == "mgda"] == [[url]]
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


@pytest.mark.parametrize("value, flow, quoted", [
    ("https://github.com/x/y?a=1", True, True), ("https://github.com/x/y", True, False),
    ("a, b", True, True), ("a, b", False, False), ("yes", False, True), ("12", True, True),
    ("Title: Subtitle", False, True), ("C# #tag", False, True), ("?x", False, False), ("- x", False, True),
    ("Multi-Task Learning", False, False), ("", False, True), (" padded", True, True),
    ("trailing\u00a0", False, True),  # YAML keeps a no-break space plain, but it is invisible: quoted
])
def test_quoting_is_decided_by_asking_the_yaml_parser(value: str, flow: bool, quoted: bool) -> None:
    from site_gen.add import _needs_quotes

    assert _needs_quotes(value, flow=flow) is quoted


@pytest.mark.parametrize("broken, expected", [
    ("- id: a\n  title: [unclosed\n", "catalog/papers.yaml:3:1: YAML syntax error: while parsing a flow sequence"),
    ("- id: a\n  id: b\n", "catalog/papers.yaml:2:3: duplicate key 'id' (first defined on line 1)"),
    ("- id: a\n  yes: 1\n", "catalog/papers.yaml:2:3: key `yes` is read as a boolean by YAML"),
    ("- id: a\n  notes: &n [*n]\n", "catalog/papers.yaml:2:14: YAML error: alias *n is used inside the node it names"),
], ids=["syntax", "duplicate-key", "bool-key", "recursive-alias"])
def test_a_broken_papers_yaml_is_one_located_line_and_nothing_is_written(add, catalog, broken: str, expected: str,
                                                                         monkeypatch) -> None:
    monkeypatch.chdir(catalog.parent.parent)  # locations are shown relative to the working directory
    (catalog / "papers.yaml").write_text(broken, encoding="utf-8")
    err = _refused(add, catalog.relative_to(catalog.parent.parent), "arxiv:1810.04650", "--topic", "survey",
                   "--no-dblp")
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: project/{expected}") and line.endswith("; fix it first (run python -m site_gen check)"), line


@pytest.mark.parametrize("args, message", [
    (("--code", "https://github.com/x/y?utm_source=twitter"),
     "error: --code 'https://github.com/x/y?utm_source=twitter' has tracking parameter(s) utm_source: remove them"),
    (("--code", "https://github.com/x/y?fbclid=1&a=2"),
     "error: --code 'https://github.com/x/y?fbclid=1&a=2' has tracking parameter(s) fbclid: remove them"),
    (("--code", "https://github.com:99999/x"),
     "error: --code 'https://github.com:99999/x': not a valid port (expected a number from 1 to 65535)"),
    (("--id", "Foo_Bar"),
     "error: --id 'Foo_Bar' is not a valid id: use lowercase letters, digits and single hyphens, e.g. 'nash-mtl'"),
    (("--id", "nash--mtl"),
     "error: --id 'nash--mtl' is not a valid id: use lowercase letters, digits and single hyphens, e.g. 'nash-mtl'"),
], ids=["utm", "fbclid", "port", "id-underscore", "id-double-hyphen"])
def test_bad_option_values_are_refused_as_options_before_any_request(add, catalog, server, args, message) -> None:
    err = _refused(add, catalog, "arxiv:1810.04650", "--topic", "survey", *args)
    assert err.strip() == message
    assert "does not fit the schema" not in err
    assert server.requests == []


def test_prepare_names_the_option_of_a_bad_value(catalog) -> None:
    """prepare() is also called directly: a bad --short / --id is still named by its option."""
    from site_gen.add import AddError, prepare

    record = Record(title="A Study", authors=["Ana Gómez"], year=2020, arxiv="2001.00001")
    with pytest.raises(AddError, match=r"^--id 'Foo_Bar' is not a valid id"):
        prepare(catalog, record, topics=["survey"], entry_id="Foo_Bar")


def test_prepare_refuses_a_blank_short_name_before_mapping_it(catalog) -> None:
    from site_gen.add import AddError, prepare

    record = Record(title="A Study", authors=["Ana Gómez"], year=2020, arxiv="2001.00001")
    with pytest.raises(AddError, match=r"^--short is empty$"):
        prepare(catalog, record, topics=["survey"], short="   ")


def test_an_arxiv_author_with_particles_gets_them_in_the_family_name() -> None:
    xml = (HTTP / "arxiv" / "1810.04650.xml").read_text(encoding="utf-8").replace("Ozan Sener", "René van der Berg", 1)
    record = parse_arxiv(xml.encode(), "1810.04650")
    assert record.family_names[0] == "van der Berg"
    assert suggest_id(record, None, set()) == "vanderberg2018multi"


@pytest.mark.parametrize("args, message", [
    (("arxiv:2001.06782", "--topic", "survey"), "arxiv:2001.06782 is already in the catalogue: same arXiv id as "
                                                "existing entry 'pcgrad'"),
    (("doi:10.1109/TPAMI.2021.3054719", "--topic", "survey"), "is already in the catalogue: same DOI as existing "
                                                              "entry 'vandenhende2021multi'"),
    (("arxiv:1810.04650", "--topic", "surveys"), "unknown topic(s) surveys"),
    (("arxiv:1810.04650",), "give at least one --topic"),
    (("arxiv:1810.04650", "--topic", "survey", "--venue", "neurips"),
     "--venue neurips is not a key of venues.yaml (did you mean 'NeurIPS'?)"),
], ids=["duplicate-arxiv", "duplicate-doi", "unknown-topic", "no-topic", "venue-case"])
def test_what_the_catalogue_can_refuse_is_refused_before_any_request(add, catalog, server, args, message) -> None:
    err = _refused(add, catalog, *args)
    assert message in err
    assert server.requests == []  # refused from the catalogue alone, offline as online


def test_a_papers_yaml_with_windows_line_endings_keeps_them(add, catalog) -> None:
    path = catalog / "papers.yaml"
    before = path.read_bytes().replace(b"\n", b"\r\n")
    path.write_bytes(before)
    code, out, err = add(catalog, "arxiv:1810.04650", "--topic", "optimization/gradient-balancing", "--no-dblp")
    assert code == 0, err
    after = path.read_bytes()
    assert b"\n" not in after.replace(b"\r\n", b"")  # every line ends in CRLF, the new ones too
    changes = difflib.SequenceMatcher(None, before.split(b"\r\n"), after.split(b"\r\n"), autojunk=False).get_opcodes()
    assert [tag for tag, *_ in changes if tag != "equal"] == ["insert"]  # one block added, no other line touched
    [(_, _, _, start, end)] = [c for c in changes if c[0] == "insert"]
    assert any(b"1810.04650" in line for line in after.split(b"\r\n")[start:end])  # and it is the new entry
