"""``add``: recorded arXiv / doi.org / DBLP answers served from 127.0.0.1, never the internet.

fixtures/http/README.md says which files are real captures (copied byte for byte from public
recordings, with provenance) and which are reconstructions in the real format (all DBLP answers,
the four MTL arXiv feeds and two IEEE CSL records). The server can be told to answer a route with
429, 500 or a stall first, to test retries; rate limits and timeouts are always simulated.
"""

from __future__ import annotations

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

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
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
    after = (catalog / "papers.yaml").read_text(encoding="utf-8")
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
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0


def test_journal_doi_reproduces_the_hand_written_entry(add, catalog, cli) -> None:
    """Remove the survey from the fixture, add it back by DOI: the fields must match what was there."""
    path = catalog / "papers.yaml"
    text = path.read_text(encoding="utf-8")
    original = next(e for e in yaml.safe_load(text) if e["id"] == "vandenhende2021multi")
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
    assert "frank1970structure" in _ids(catalog)
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
    before = (catalog / "papers.yaml").read_bytes()
    code, out, err = add(catalog, ident, "--topic", "survey")
    assert code == 1 and out == ""
    assert f"same {label} as existing entry '{existing}'" in err
    assert (catalog / "papers.yaml").read_bytes() == before


def test_duplicate_title_is_refused(catalog) -> None:
    papers = yaml.safe_load((catalog / "papers.yaml").read_text(encoding="utf-8"))
    clash = find_duplicate({"title": "gradient surgery for multi-task learning."}, papers)
    assert clash == "same title as existing entry 'pcgrad'"


@pytest.mark.parametrize("ident, script, message", [
    ("arxiv:0000.0000", {}, "arXiv has no paper 0000.0000"),        # real capture: empty feed
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
    server.script.update(script)
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


@pytest.mark.parametrize("text, parsed", [
    ("arxiv:2001.06782", ("arxiv", "2001.06782")), ("https://arxiv.org/abs/2001.06782v4", ("arxiv", "2001.06782")),
    ("2001.06782", ("arxiv", "2001.06782")), ("doi:10.1109/TPAMI.2021.3054719", ("doi", "10.1109/TPAMI.2021.3054719")),
    ("https://doi.org/10.1613/jair.731", ("doi", "10.1613/jair.731")),
])
def test_parse_identifier(text, parsed) -> None:
    assert parse_identifier(text) == parsed


def test_arxiv_error_feed_is_reported_not_parsed_as_a_paper() -> None:
    with pytest.raises(FetchError, match="arXiv rejected abc: incorrect id format for abc"):
        parse_arxiv((HTTP / "arxiv" / "abc.xml").read_bytes(), "abc")
