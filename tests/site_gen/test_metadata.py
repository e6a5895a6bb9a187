"""``site_gen.metadata`` on its own: what each source's answer becomes, what is asked of each
source, and what a failed lookup says. Answers come from a small scripted server on 127.0.0.1
(never the internet); feeds are the recorded fixtures in fixtures/http, edited where a test needs
a field gone. The last tests are bugs found while reading the survivors, fixed since.
"""

from __future__ import annotations

import json
import re
import socket
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from site_gen.metadata import (Endpoints, FetchError, Fetcher, Record, fetch_arxiv, fetch_doi, find_published,
                               parse_arxiv, parse_csl, pick_published, retry_after)

HTTP = Path(__file__).parent / "fixtures" / "http"
FEED = (HTTP / "arxiv" / "1810.04650.xml").read_text(encoding="utf-8")
CSL = (HTTP / "doi" / "10.1109_CVPR.2018.00781.json").read_bytes()


class Scripted(BaseHTTPRequestHandler):
    """Plays ``server.answers`` in order (the last one repeats) and records each request's path.

    An answer is (status, body) or (status, body, headers). Status "cut" promises 1000 bytes, sends
    a few and hangs up; status "loop" redirects to the path that was asked for."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        answers = self.server.answers
        status, body, headers = (*answers[min(len(self.server.paths), len(answers)) - 1], {})[:3]
        if status == "loop":
            status, headers = 302, {"Location": self.path}
        self.send_response(200 if status == "cut" else status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "1000" if status == "cut" else str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if status == "cut":
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def serve(local_server):
    """``serve(*answers) -> (base URL, server)``; ``server.paths`` lists what was asked."""

    def start(*answers: tuple) -> tuple[str, object]:
        httpd = local_server(Scripted)
        httpd.answers, httpd.paths = list(answers), []
        return f"http://127.0.0.1:{httpd.server_address[1]}", httpd

    return start


def _fetcher() -> Fetcher:
    return Fetcher(timeout=2.0, attempts=2, backoff=0.0)


def _query(path: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(path).query)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Endpoints -------------------------------------------------------------------------------------

def test_endpoints_come_from_the_environment_or_the_public_defaults(monkeypatch) -> None:
    """Each of the three variables overrides its own base URL; unset, the class defaults apply."""
    names = {"arxiv": "SITE_GEN_ARXIV_API", "doi": "SITE_GEN_DOI_BASE", "dblp": "SITE_GEN_DBLP_API"}
    for name in names.values():
        monkeypatch.delenv(name, raising=False)
    assert Endpoints.from_env() == Endpoints()
    for source, name in names.items():
        monkeypatch.setenv(name, f"http://127.0.0.1:9/{source}")
    assert Endpoints.from_env() == Endpoints(arxiv="http://127.0.0.1:9/arxiv", doi="http://127.0.0.1:9/doi",
                                             dblp="http://127.0.0.1:9/dblp")


# --- Fetcher: what a failed lookup says -------------------------------------------------------------

@pytest.mark.parametrize("fetch, ident, what", [
    (fetch_arxiv, "1810.04650", "arXiv lookup of 1810.04650"),
    (fetch_doi, "10.1000/xyz", "DOI lookup of 10.1000/xyz"),
])
def test_a_lookup_that_keeps_failing_names_the_lookup_and_the_last_answer(serve, fetch, ident, what) -> None:
    """Every attempt gets an empty 503: the sentence names the lookup, the status alone (no empty
    quoted body) and that nothing was written."""
    base, server = serve((503, b""))
    with pytest.raises(FetchError) as caught:
        fetch(_fetcher(), Endpoints(arxiv=base, doi=base), ident)
    assert str(caught.value) == f"{what} failed after 2 attempts: HTTP 503; nothing was written, try again later"
    assert len(server.paths) == 2


def test_a_refused_connection_is_named_as_such() -> None:
    """No server on the port: the user reads 'cannot connect (connection refused)', after every attempt."""
    endpoints = Endpoints(arxiv=f"http://127.0.0.1:{_closed_port()}/api")
    with pytest.raises(FetchError, match=r"^arXiv lookup of 1810\.04650 failed after 2 attempts: "
                                         r"cannot connect \(connection refused\); nothing was written"):
        fetch_arxiv(_fetcher(), endpoints, "1810.04650")


# --- arXiv -----------------------------------------------------------------------------------------

def test_arxiv_is_asked_for_the_one_id_and_one_result(serve) -> None:
    """fixtures/http/README.md: ``add`` asks for ``max_results=1``; the id goes in ``id_list``."""
    base, server = serve((200, FEED.encode()))
    assert fetch_arxiv(_fetcher(), Endpoints(arxiv=base), "1810.04650").title == \
        "Multi-Task Learning as Multi-Objective Optimization"
    [path] = server.paths
    assert _query(path) == {"id_list": ["1810.04650"], "max_results": ["1"]}


def test_an_arxiv_error_status_without_an_error_entry_gives_the_status(serve) -> None:
    """A 404 page (not an Atom error entry) has no reason to pass on: say which status came back."""
    base, _ = serve((404, b"<html><body>Not Found</body></html>"))
    with pytest.raises(FetchError, match=r"^arXiv answered HTTP 404 for 1810\.04650$"):
        fetch_arxiv(_fetcher(), Endpoints(arxiv=base), "1810.04650")


def test_an_arxiv_answer_that_is_not_xml_is_named() -> None:
    with pytest.raises(FetchError, match=r"^arXiv sent something that is not an Atom feed \(.+\)$"):
        parse_arxiv(b"<html><body>Rate exceeded.", "1810.04650")


def test_an_entry_without_its_own_id_is_still_read() -> None:
    """arxiv_error looks for '/api/errors' in the entry's <id>; an entry lacking one is a paper, not a crash."""
    feed = FEED.replace("<id>http://arxiv.org/abs/1810.04650v2</id>", "", 1)
    record = parse_arxiv(feed.encode(), "1810.04650")
    assert (record.title, record.year, record.arxiv_class) == \
        ("Multi-Task Learning as Multi-Objective Optimization", 2018, "cs.LG")


@pytest.mark.parametrize("old, new", [
    ("<published>2018-10-10T17:31:38Z</published>", ""),
    ("<published>2018-10-10T17:31:38Z</published>", "<published>soon</published>"),
    ("<title>Multi-Task Learning as Multi-Objective Optimization</title>", "<title> \n </title>"),
    (re.search(r"<author>.*</author>", FEED, re.S).group(0), ""),
], ids=["no-date", "bad-date", "blank-title", "no-authors"])
def test_an_entry_missing_a_title_authors_or_a_date_is_an_empty_record(old, new) -> None:
    """Each of the three is needed for an entry; any one missing is refused with the id, not a traceback."""
    assert old in FEED
    with pytest.raises(FetchError, match=r"^arXiv has no paper 1810\.04650 \(empty record\)$"):
        parse_arxiv(FEED.replace(old, new, 1).encode(), "1810.04650")


def test_an_entry_without_a_primary_category_has_no_class() -> None:
    feed = re.sub(r"<arxiv:primary_category [^>]*/>", "", FEED)
    assert feed != FEED
    assert parse_arxiv(feed.encode(), "1810.04650").arxiv_class is None


# --- doi.org ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["/doi/", "/DX"])
def test_the_doi_goes_after_the_base_with_one_slash(serve, suffix) -> None:
    """A base given with a trailing slash still gives '<base>/<doi>'; nothing else is cut off the base."""
    base, server = serve((200, CSL))
    record = fetch_doi(_fetcher(), Endpoints(doi=base + suffix), "10.1109/CVPR.2018.00781")
    assert record.venue == "2018 IEEE/CVF Conference on Computer Vision and Pattern Recognition"
    assert server.paths == [suffix.rstrip("/") + "/10.1109/CVPR.2018.00781"]


@pytest.mark.parametrize("answer, message", [
    ((410, b"gone"), "doi.org answered HTTP 410 for 10.1000/xyz"),
    ((200, b"<html>a landing page</html>"), "doi.org sent no CSL-JSON for 10.1000/xyz (the registrar may not "
                                            "support it)"),
])
def test_doi_answers_that_are_not_a_record_are_named(serve, answer, message) -> None:
    base, server = serve(answer)
    with pytest.raises(FetchError) as caught:
        fetch_doi(_fetcher(), Endpoints(doi=base), "10.1000/xyz")
    assert str(caught.value) == message
    assert len(server.paths) == 1  # neither is worth a retry


def _csl(**fields: object) -> dict:
    return {"title": "T", "author": [{"family": "Li", "given": "X"}], "issued": {"date-parts": [[2020]]}, **fields}


@pytest.mark.parametrize("data", [
    {"title": "T", "issued": {"date-parts": [[2020]]}},
    {"title": "T", "author": [{"family": "Li", "given": "X"}]},
    {"author": [{"family": "Li", "given": "X"}], "issued": {"date-parts": [[2020]]}},
    _csl(title=2020), _csl(title=[{"value": "T"}]),
], ids=["no-author", "no-year", "no-title", "number-title", "object-title"])
def test_a_csl_record_without_title_authors_or_year_is_refused(data) -> None:
    """Any one of the three missing (a title that is not text counts as missing) is a located FetchError."""
    with pytest.raises(FetchError, match=r"^the record of DOI 10\.1/x lacks a title, authors or a year$"):
        parse_csl(data, "10.1/x")


def test_the_online_date_is_the_last_resort_for_the_year() -> None:
    """Neither print nor issued date: the online date gives the year; print still wins when present."""
    online = {"published-online": {"date-parts": [[2021, 3]]}}
    assert parse_csl({**_csl(), "issued": None, **online}, "10.1/x").year == 2021
    assert parse_csl(_csl(**online, **{"published-print": {"date-parts": [[2022]]}}), "10.1/x").year == 2022


def test_the_registered_doi_wins_unless_it_differs_only_in_case() -> None:
    """doi.org may resolve an alias to another DOI: keep the one it registered; a case-only
    difference keeps the spelling the user typed."""
    assert parse_csl(_csl(DOI="10.1/Registered"), "10.1/alias").doi == "10.1/Registered"
    assert parse_csl(_csl(DOI="10.1/ABC"), "10.1/abc").doi == "10.1/abc"
    assert parse_csl(_csl(), "10.1/Typed").doi == "10.1/Typed"


# --- DBLP ------------------------------------------------------------------------------------------

PREPRINT = Record(title="Deep Tasks", authors=["Ana Silva", "Bo Li"], year=2019, arxiv="1901.00001",
                  venue="arXiv", kind="preprint", family_names=["Silva", "Li"])
HIT = {"type": "Journal Articles", "title": "Deep Tasks.", "venue": "JMLR", "year": "2021",
       "authors": {"author": [{"text": "Ana Silva 0002"}, {"text": "Bo Li"}]}}


def _dblp(*infos: dict) -> dict:
    return {"result": {"hits": {"@total": str(len(infos)), "hit": [{"info": i} for i in infos]}}}


def test_dblp_is_asked_for_json_about_the_title(serve) -> None:
    """README: the search API is called with ``format=json`` (else DBLP answers XML); ``h`` bounds the hits."""
    base, server = serve((200, json.dumps(_dblp(HIT)).encode()))
    assert find_published(_fetcher(), Endpoints(dblp=base), PREPRINT).venue == "JMLR"
    [path] = server.paths
    query = _query(path)
    assert (query["q"], query["format"]) == (["Deep Tasks"], ["json"])
    assert query["h"][0].isdigit() and int(query["h"][0]) > 0


def test_a_dblp_answer_that_is_not_json_is_named(serve) -> None:
    base, _ = serve((200, b"<?xml version='1.0'?><result/>"))
    with pytest.raises(FetchError, match="^DBLP sent something that is not JSON$"):
        find_published(_fetcher(), Endpoints(dblp=base), PREPRINT)


@pytest.mark.parametrize("data", [
    {"result": {"hits": {"@total": "0", "@sent": "0"}}}, {"result": {"status": {"@code": "200"}}}, {},
    {"result": {"hits": {"hit": [{}]}}},
], ids=["no-hit-list", "no-hits", "no-result", "hit-without-info"])
def test_dblp_answers_without_hits_find_nothing(data) -> None:
    """DBLP leaves out the ``hit`` list when nothing matched; missing levels mean no hit, not a crash."""
    assert pick_published(data, PREPRINT) is None


@pytest.mark.parametrize("authors", [{}, None, {"author": {"text": "Ana Silva"}}],
                         ids=["empty", "absent", "single-object"])
def test_dblp_author_lists_dblp_may_send(authors) -> None:
    """No author list means nothing to compare, so the hit is taken; one author comes as an object."""
    info = {key: value for key, value in HIT.items() if key != "authors"}
    if authors is not None:
        info["authors"] = authors
    assert pick_published(_dblp(info), PREPRINT).venue == "JMLR"


def test_a_preprint_without_family_names_takes_the_title_match() -> None:
    found = pick_published(_dblp(HIT), Record(title="Deep Tasks", authors=["Ana Silva"], year=2019))
    assert (found.venue, found.kind, found.year) == ("JMLR", "journal", 2021)


def test_a_dblp_hit_without_a_title_matches_no_preprint() -> None:
    """Whatever the preprint is called (even a placeholder-like 'XXXX'), an untitled hit is not it."""
    untitled = {key: value for key, value in HIT.items() if key != "title"}
    assert pick_published(_dblp(untitled), PREPRINT) is None
    assert pick_published(_dblp({**untitled, "authors": {}}), Record(title="XXXX", authors=["A B"], year=1)) is None


def test_the_authors_disambiguation_number_is_not_part_of_the_name() -> None:
    """DBLP's 'Lu Ma 0001' is Lu Ma: a preprint whose first author is 'Anna Max' is another paper."""
    max_first = Record(title="Deep Tasks", authors=["Anna Max"], year=2019, family_names=["Max"])
    by_ma = {**HIT, "authors": {"author": [{"text": "Lu Ma 0001"}]}}
    assert pick_published(_dblp(by_ma), max_first) is None


def test_a_dblp_hit_without_a_year_keeps_the_preprints_year() -> None:
    info = {key: value for key, value in HIT.items() if key != "year"}
    assert pick_published(_dblp(info), PREPRINT).year == 2019


@pytest.mark.parametrize("field, label", [("title", "title"), ("doi", "DOI"), ("year", "year"), ("venue", "venue"),
                                          ("volume", "volume"), ("number", "number"), ("pages", "pages")])
def test_a_dblp_field_that_is_not_text_is_named_with_its_type(field, label) -> None:
    """The message names the field and the JSON type that came instead, so the user knows what to type by hand."""
    with pytest.raises(FetchError) as caught:
        pick_published(_dblp({**HIT, field: {"@key": "x"}}), PREPRINT)
    assert str(caught.value) == f"DBLP sent a {label} that is not text (dict); add the paper by hand"


# --- bugs found while reading the survivors (each test failed before the fix) -----------------------

@pytest.mark.parametrize("base", ["127.0.0.1:9/api", "ftp://127.0.0.1/api"])
def test_a_base_url_that_requests_cannot_use_is_an_error_line(cli, project, base) -> None:
    code, out, err = cli("add", "arxiv:1810.04650", "--catalog", str(project / "catalog"), "--topic", "survey",
                         "--arxiv-api", base, "--no-dblp", "--attempts", "1")
    assert code == 1 and out == "" and err.startswith("error: ") and base in err


@pytest.mark.parametrize("status", ["cut", "loop"])
def test_a_broken_answer_is_a_fetch_error_not_a_traceback(serve, status) -> None:
    base, _ = serve((status, b"<feed"))
    with pytest.raises(FetchError, match=r"^arXiv lookup of 1810\.04650 failed"):
        fetch_arxiv(_fetcher(), Endpoints(arxiv=base), "1810.04650")


@pytest.mark.parametrize("data", [None, [_csl()], _csl(DOI=5), _csl(**{"container-title": {"a": "b"}}),
                                  _csl(author=["X Li"]), _csl(type=["article-journal"])],
                         ids=["null", "list", "number-DOI", "object-container", "string-author", "list-type"])
def test_csl_json_of_another_shape_is_a_fetch_error(data) -> None:
    with pytest.raises(FetchError, match="10.1/x"):
        parse_csl(data, "10.1/x")


@pytest.mark.parametrize("body", [b"null", b"[]"])
def test_dblp_json_that_is_not_an_object_is_a_fetch_error(serve, body) -> None:
    base, _ = serve((200, body))
    with pytest.raises(FetchError, match="^DBLP sent"):
        find_published(_fetcher(), Endpoints(dblp=base), PREPRINT)


def test_a_family_name_inside_another_name_is_not_the_same_author() -> None:
    li_first = Record(title="Deep Tasks", authors=["Xin Li"], year=2019, family_names=["Li"])
    by_oliver = {**HIT, "authors": {"author": [{"text": "Alice Oliver"}]}}
    assert pick_published(_dblp(by_oliver), li_first) is None


def test_a_retry_after_that_is_not_a_number_falls_back_to_the_backoff() -> None:
    assert retry_after("\u00b2", default=1.5) == 1.5


@pytest.mark.parametrize("dblp_name, same", [
    ("Luc Van Gool", True), ("Luc van Gool 0001", True), ("Luc Van-Gool", True),
    ("Luc Gool", False), ("Vangool Smith", False),
])
def test_a_family_name_of_several_words_is_the_end_of_dblps_name(dblp_name, same) -> None:
    """The whole-word rule that keeps 'Li' out of 'Alice Oliver' still finds 'Van Gool' at the end of a name."""
    preprint = Record(title="Deep Tasks", authors=["Luc Van Gool"], year=2019, family_names=["Van Gool"])
    hit = {**HIT, "authors": {"author": [{"text": dblp_name}]}}
    assert (pick_published(_dblp(hit), preprint) is not None) == same
