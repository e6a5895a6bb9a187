"""``add`` before anything is written: reading the identifier, mapping the fetched record onto the
schema (venue key, suggested id, fields), refusing duplicates and bad values with a message that
names what to fix, and the command's own output. HTTP goes to a small arXiv stand-in on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

import site_gen
from site_gen.add import (AddError, build_entry, check_options, fetch_record, find_duplicate, match_venue,
                          parse_identifier, prepare, suggest_id)
from site_gen.metadata import Endpoints, Fetcher, Record
from site_gen.models import SLUG, Venue

from .conftest import edit_catalogue

HTTP = Path(__file__).parent / "fixtures" / "http"
STUDY = Record(title="A Study of Tasks", authors=["Ana Silva"], year=2020, arxiv="2001.00001", venue="arXiv")
FIX_FIRST = "; fix it first (run python -m site_gen check)"
NEXT_STEPS = "; add notes, code and datasets by hand, then run: python -m site_gen build && python -m site_gen check\n"


@pytest.fixture
def catalog(project: Path) -> Path:
    return project / "catalog"


# --- match_venue --------------------------------------------------------------------------------

VENUES = {
    "NeurIPS": Venue(name="Advances in Neural Information Processing Systems", kind="conference"),
    "ICML": Venue(name="International Conference on Machine Learning", kind="conference"),
}


def test_a_full_name_followed_by_an_unknown_acronym_matches_by_the_name() -> None:
    """'Full Name (NIPS 2018)': the acronym in parentheses is no key or alias, the name without it is."""
    assert match_venue("Advances in Neural Information Processing Systems (NIPS 2018)", VENUES) == "NeurIPS"


@pytest.mark.parametrize("text", ["Proceedings of the 35th International Conference on Machine Learning",
                                  "PROCEEDINGS OF THE 35TH International Conference on Machine Learning",
                                  "37th International Conference on Machine Learning"])
def test_proceedings_of_the_nth_conference_matches_the_conference(text: str) -> None:
    """The 'Proceedings of the 35th' prefix (any case, an ordinal rather than a year) is dropped."""
    assert match_venue(text, VENUES) == "ICML"


# --- suggest_id ---------------------------------------------------------------------------------

def test_a_nickname_becomes_a_hyphenated_slug_without_outer_hyphens() -> None:
    assert suggest_id(STUDY, "(PC Grad)!", set()) == "pc-grad"
    assert suggest_id(STUDY, "Nash-MTL++", set()) == "nash-mtl"


def test_the_family_name_comes_from_family_names_when_the_source_gives_them() -> None:
    """A source's family names win over guessing from the written name (a double surname here)."""
    record = Record(title="Tasks", authors=["Ana Gómez Pérez", "Bo Li"], year=2020,
                    family_names=["Gómez Pérez", "Li"])
    assert suggest_id(record, None, set()) == "gomezperez2020tasks"


def test_without_family_names_the_first_authors_family_name_is_used() -> None:
    record = Record(title="Tasks", authors=["Ana Gómez", "Bo Li"], year=2020)
    assert suggest_id(record, None, set()) == "gomez2020tasks"


@pytest.mark.parametrize("title, word", [("On the", "on"), ("Towards the Tasks", "tasks"),
                                         ("多任务学习", "paper")])
def test_title_word_falls_back_to_the_first_word_then_to_paper(title: str, word: str) -> None:
    """The first word that is not a stopword; only stopwords: the first word; no ASCII word: 'paper'."""
    record = Record(title=title, authors=["Bo Li"], year=2020, family_names=["Li"])
    assert suggest_id(record, None, set()) == f"li2020{word}"


# --- build_entry and find_duplicate --------------------------------------------------------------

def test_only_the_url_loses_tracking_parameters() -> None:
    """A DOI may contain '?utm_source=' as part of the identifier: it is kept byte for byte."""
    record = Record(title="T", authors=["Bo Li"], year=2020, doi="10.1234/abc?utm_source=x",
                    url="https://example.org/p?utm_source=x&a=1")
    entry = build_entry(record, venue="arXiv", topics=["survey"], short=None, entry_id="li2020t", code=[])
    assert (entry["doi"], entry["url"]) == ("10.1234/abc?utm_source=x", "https://example.org/p?a=1")


def test_items_that_are_not_mappings_do_not_end_the_duplicate_search() -> None:
    papers = [None, "stray text", {"id": "a", "arxiv": "2001.00001"}]
    assert find_duplicate({"arxiv": "2001.00001"}, papers) == "same arXiv id as existing entry 'a'"


def test_a_duplicate_without_id_is_named_by_its_position() -> None:
    """DOIs compare without case; an entry lacking 'id' is called '#N', counted from 1."""
    papers = [{"id": "a", "doi": "10.1/other"}, {"doi": "10.1234/ABC"}]
    assert find_duplicate({"doi": "10.1234/abc"}, papers) == "same DOI as existing entry '#2'"


# --- parse_identifier and fetch_record -----------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("http://arxiv.org/abs/2001.06782v3", ("arxiv", "2001.06782")),
    ("http://doi.org/10.1613/jair.731", ("doi", "10.1613/jair.731")),
    ("cs/0701001", ("arxiv", "cs/0701001")),
    ("10.1613/jair.731", ("doi", "10.1613/jair.731")),
])
def test_plain_http_urls_and_bare_identifiers_are_recognised(text: str, parsed: tuple[str, str]) -> None:
    assert parse_identifier(text) == parsed


def test_an_unrecognised_identifier_is_refused_with_examples() -> None:
    with pytest.raises(AddError) as exc:
        parse_identifier("pcgrad")
    assert str(exc.value) == "'pcgrad' is neither arxiv:<id> nor doi:<doi> (e.g. arxiv:2001.06782, doi:10.1109/...)"


def test_the_old_http_dx_doi_url_is_recognised() -> None:
    assert parse_identifier("http://dx.doi.org/10.1613/jair.731") == ("doi", "10.1613/jair.731")


def test_a_malformed_doi_is_refused_before_any_request(arxiv_server) -> None:
    base = f"http://127.0.0.1:{arxiv_server.server_address[1]}"
    endpoints = Endpoints(arxiv=f"{base}/arxiv", doi=f"{base}/doi", dblp=f"{base}/dblp")
    with pytest.raises(AddError) as exc:
        fetch_record("doi", "10.1/x", Fetcher(timeout=1.0, attempts=1), endpoints)
    assert str(exc.value) == "'10.1/x' is not a DOI (expected 10.<registrant>/<suffix>)"
    assert arxiv_server.requests == []


# --- check_options and prepare's refusals ---------------------------------------------------------

def test_every_tracking_parameter_of_a_code_url_is_named() -> None:
    url = "https://github.com/x/y?utm_source=a&fbclid=b"
    with pytest.raises(AddError) as exc:
        check_options(code=[url])
    assert str(exc.value) == f"--code {url!r} has tracking parameter(s) utm_source, fbclid: remove them"


@pytest.mark.parametrize("url, message", [
    ("https://github.com/x/y?utm_source=a",
     "--code 'https://github.com/x/y?utm_source=a' has tracking parameter(s) utm_source: remove them"),
    ("not a url", "--code 'not a url': only http(s) URLs are allowed, got scheme 'none'"),
])
def test_prepare_checks_code_urls_itself(catalog: Path, url: str, message: str) -> None:
    """prepare() is also called directly: a bad --code URL is refused there too, shown as given."""
    with pytest.raises(AddError) as exc:
        prepare(catalog, STUDY, topics=["survey"], code=[url])
    assert str(exc.value) == message


def test_schema_problems_elsewhere_in_the_catalogue_do_not_stop_add(catalog: Path) -> None:
    """Only an unreadable papers.yaml stops add; a bad dataset is for `check` to report."""
    edit_catalogue(catalog.parent, "datasets.yaml", "  name: NYUv2\n", "  name: NYUv2\n  colour: red\n")
    assert prepare(catalog, STUDY, topics=["survey"]).entry["id"] == "silva2020study"


def test_an_unmatched_venue_says_how_to_fix_it(catalog: Path) -> None:
    record = Record(title="T", authors=["Bo Li"], year=2020, arxiv="2001.00001", venue="Journal of Tasks")
    with pytest.raises(AddError) as exc:
        prepare(catalog, record, topics=["survey"])
    assert str(exc.value) == ("venue 'Journal of Tasks' matches no key of venues.yaml: add it there "
                              "(key: {name: ..., kind: ...}) or pass --venue KEY")


def test_topics_are_required_and_unknown_ones_are_listed_with_the_leaf_ids(catalog: Path) -> None:
    with pytest.raises(AddError) as none:
        prepare(catalog, STUDY, topics=[])
    assert str(none.value) == ("give at least one --topic (a leaf id of taxonomy.yaml, "
                               "e.g. optimization/gradient-balancing)")
    with pytest.raises(AddError) as unknown:
        prepare(catalog, STUDY, topics=["nope", "survey", "gone"])
    assert str(unknown.value) == ("unknown topic(s) nope, gone; leaf ids: benchmarks/vision, "
                                  "optimization/gradient-balancing, optimization/loss-balancing, survey")


CHILD = """
import locale, sys
from pathlib import Path
from site_gen.add import prepare
from site_gen.metadata import Record
print(locale.getencoding())
record = Record(title="A Study of Tasks", authors=["Ana Silva"], year=2020, arxiv="2001.00001", venue="arXiv")
Path(sys.argv[2]).write_text(prepare(Path(sys.argv[1]), record, topics=["survey"]).text, encoding="utf-8")
"""


def test_papers_yaml_is_read_as_utf8_whatever_the_locale(catalog: Path, tmp_path: Path) -> None:
    """Under an ASCII locale (LC_ALL=C, no UTF-8 mode) the plan still keeps 'Søgaard' intact."""
    out = tmp_path / "plan.yaml"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONPATH": str(Path(site_gen.__file__).resolve().parent.parent)}
    run = subprocess.run([sys.executable, "-c", CHILD, str(catalog), str(out)], env=env, capture_output=True,
                         text=True, encoding="utf-8", errors="replace")
    if run.stdout.split()[:1] and "utf" in run.stdout.split()[0].lower():
        pytest.skip("this platform has no non-UTF-8 locale to test with")
    assert run.returncode == 0, run.stderr
    text = out.read_text(encoding="utf-8")
    assert "Anders Søgaard" in text and "- id: silva2020study" in text


TAB_AFTER_KEY = ("  venue: NeurIPS\n", "  venue:\tNeurIPS\n")  # line 5 of the fixture's papers.yaml


def test_a_file_only_the_writer_cannot_read_is_located_in_papers_yaml(catalog: Path, monkeypatch) -> None:
    """A tab after 'venue:' passes the project's reader but not ruamel's: still file:line:col, shown as
    the working directory sees it."""
    edit_catalogue(catalog.parent, "papers.yaml", *TAB_AFTER_KEY)
    monkeypatch.chdir(catalog.parent)
    with pytest.raises(AddError) as exc:
        prepare(Path("catalog"), STUDY, topics=["survey"])
    assert str(exc.value).startswith("catalog/papers.yaml:5:9: ") and str(exc.value).endswith(FIX_FIRST)


def test_add_and_check_agree_on_a_tab_after_a_key(catalog: Path, cli) -> None:
    edit_catalogue(catalog.parent, "papers.yaml", *TAB_AFTER_KEY)
    try:
        prepare(catalog, STUDY, topics=["survey"])
    except AddError:
        assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 1


# --- prepare: values the schema refuses ------------------------------------------------------------

def test_a_bad_short_value_is_named_by_its_option(catalog: Path) -> None:
    """--short passes check_options (not blank) but not the schema: the message names --short."""
    with pytest.raises(AddError, match=r"^--short .*: must be a single line$"):
        prepare(catalog, STUDY, topics=["survey"], short="MGDA\nv2")


def test_a_record_that_does_not_fit_lists_every_field_and_why(catalog: Path) -> None:
    record = Record(title="A\nB", authors=["Ana Silva et al."], year=2020, arxiv="2001.00001", venue="arXiv")
    with pytest.raises(AddError) as exc:
        prepare(catalog, record, topics=["survey"])
    assert str(exc.value) == ("the fetched record does not fit the schema (title: must be a single line; "
                              "authors.0: truncated author list: give every author by name); add it by hand")


def test_a_record_without_any_identifier_is_refused_as_a_whole(catalog: Path) -> None:
    """The rule that needs arxiv, doi or url belongs to no single field, and still gets a clean message."""
    record = Record(title="T", authors=["Bo Li"], year=2020, venue="arXiv")
    with pytest.raises(AddError, match=r"^the fetched record does not fit the schema \(.*a paper needs at least "
                                       r"one of arxiv, doi or url\); add it by hand$"):
        prepare(catalog, record, topics=["survey"])


@pytest.mark.parametrize("short", ["多任务", "++"])
def test_a_short_name_that_gives_no_id_is_blamed_on_short(catalog: Path, short: str) -> None:
    try:
        plan = prepare(catalog, STUDY, topics=["survey"], short=short)
    except AddError as exc:
        assert "--short" in str(exc) and "--id ''" not in str(exc), str(exc)
    else:
        assert re.match(SLUG, plan.entry["id"])


def test_a_record_without_a_venue_asks_for_venue(catalog: Path) -> None:
    record = Record(title="T", authors=["Bo Li"], year=2020, doi="10.1234/abc")  # e.g. CSL with no container-title
    with pytest.raises(AddError) as exc:
        prepare(catalog, record, topics=["survey"])
    assert "'None'" not in str(exc.value) and "--venue" in str(exc.value)


def test_a_bad_short_value_is_shown_as_typed(catalog: Path) -> None:
    with pytest.raises(AddError, match=r"^--short 'MGDA\\nv2': "):
        prepare(catalog, STUDY, topics=["survey"], short="MGDA\nv2")


# --- the command ------------------------------------------------------------------------------------

class ArxivStandIn(BaseHTTPRequestHandler):
    """Answers arXiv API queries with the recorded feeds; ``server.failures`` first answers are HTTP 500."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.server.failures:
            self.server.failures -= 1
            body, status = b"Internal Server Error", 500
        else:
            ident = parse_qs(urlsplit(self.path).query)["id_list"][0]
            body, status = (HTTP / "arxiv" / f"{ident}.xml").read_bytes(), 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def arxiv_server(local_server):
    httpd = local_server(ArxivStandIn)
    httpd.requests, httpd.failures = [], 0
    return httpd


@pytest.fixture
def add(cli, arxiv_server):
    """``add`` of arXiv 1810.04650 (MGDA) to the survey topic, without DBLP; extra options appended."""
    url = f"http://127.0.0.1:{arxiv_server.server_address[1]}/arxiv/api/query"

    def run(catalog: Path, *args: str) -> tuple[int, str, str]:
        return cli("add", "arxiv:1810.04650", "--catalog", str(catalog), "--topic", "survey", "--no-dblp",
                   "--arxiv-api", url, "--timeout", "1.0", "--attempts", "2", *args)

    return run


def test_backoff_option_sets_the_first_retry_pause(add, catalog, arxiv_server, recorded_sleeps) -> None:
    import site_gen.metadata

    pauses = recorded_sleeps(site_gen.metadata)
    arxiv_server.failures = 1
    code, out, err = add(catalog, "--backoff", "0.25", "--dry-run")
    assert code == 0, err
    assert pauses == [0.25] and len(arxiv_server.requests) == 2


def test_a_blank_short_name_is_refused_before_any_request(add, catalog, arxiv_server) -> None:
    code, out, err = add(catalog, "--short", "  ")
    assert (code, out, err) == (1, "", "error: --short is empty\n")
    assert arxiv_server.requests == []


def test_verbose_shows_the_fetched_record_on_stderr_only(add, catalog) -> None:
    code, out, err = add(catalog, "--verbose", "--dry-run")
    assert code == 0, err
    assert out.startswith("- id: sener2018multi\n") and len(yaml.safe_load(out)) == 1
    shown, note = err[:err.rindex("(dry run")], err[err.rindex("(dry run"):]
    record = json.loads(shown)
    assert (record["arxiv"], record["title"]) == ("1810.04650", "Multi-Task Learning as Multi-Objective Optimization")
    assert note == "(dry run: papers.yaml not changed)\n"


def test_a_dry_run_says_so_in_one_line(add, catalog) -> None:
    code, out, err = add(catalog, "--dry-run")
    assert code == 0 and err == "(dry run: papers.yaml not changed)\n"


def test_after_adding_the_next_steps_are_named(add, catalog) -> None:
    """The closing line says where the entry went and which commands to run next."""
    code, out, err = add(catalog)
    assert code == 0, err
    line = (catalog / "papers.yaml").read_text(encoding="utf-8").splitlines().index("- id: sener2018multi") + 1
    assert err == f"added 'sener2018multi' at {catalog / 'papers.yaml'}:{line}{NEXT_STEPS}"
