"""``links`` after the checks: the cache, the progress bar, the scheduler's lanes, the three reports
and the command's options, each checked by what a user (or the next run) reads back.

HTTP runs against a server on 127.0.0.1 (``local_server`` from conftest); nothing leaves the machine."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from dataclasses import asdict
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests

from .conftest import edit_catalogue
from site_gen.links import (Cache, LinkConfig, Outcome, Progress, check_all, json_report, markdown_report,
                            terminal_report)

NOW = 1_800_000_000.0  # a fixed "now" for Cache.fresh, so cache ages are exact
FAST = dict(timeout=2.0, attempts=1, backoff=0.0, min_interval=0.0)


def _closed_port_url(path: str = "/x") -> str:
    """A URL on 127.0.0.1 where nothing listens: a request to it fails at once, never reaching the network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}{path}"


# --- a server that counts requests, and can hold each one until another is in flight --------------

class Meet(BaseHTTPRequestHandler):
    """200 to every HEAD. With ``server.hold`` > 0 an answer waits (at most ``hold`` s) until two requests
    have been in flight together, so overlap is certain when the client allows it; ``server.most`` is the
    most requests ever in flight at once, ``server.hits`` the requests per path."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        srv = self.server
        with srv.cond:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            srv.in_flight += 1
            srv.most = max(srv.most, srv.in_flight)
            srv.cond.notify_all()
            srv.cond.wait_for(lambda: srv.most > 1, timeout=srv.hold)
            srv.in_flight -= 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(local_server):
    httpd = local_server(Meet)
    httpd.cond, httpd.hits, httpd.in_flight, httpd.most, httpd.hold = threading.Condition(), {}, 0, 0, 0.0
    return httpd


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _serve_catalogue(project: Path, base: str, config: Path, settings: str = "") -> None:
    """Point every URL of the small catalogue (7 distinct ones, arXiv and DOI links included) at ``base``."""
    for name in ("papers.yaml", "datasets.yaml", "codebases.yaml"):
        path = project / "catalog" / name
        path.write_text(path.read_text(encoding="utf-8").replace("https://", f"{base}/was/"), encoding="utf-8")
    config.write_text(f"min_interval: 0\nattempts: 1\narxiv_base: {base}/arxiv/\ndoi_base: {base}/doi/\n{settings}",
                      encoding="utf-8")


# --- the cache -------------------------------------------------------------------------------------

def _cache_file(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps({"version": 1, "results": entries}), encoding="utf-8")
    return path


def _entry(url: str, **fields) -> dict:
    return {"url": url, "ok": True, "status": 200, "checked_at": NOW, **fields}


def test_cache_age_is_measured_in_hours_of_3600_s(tmp_path) -> None:
    """``max_age_hours: 1`` reuses a link checked 3599.5 s ago and re-checks one checked 3600.5 s ago."""
    url = "https://example.org/a"
    for age, reused in ((3599.5, True), (3600.5, False)):
        cache = Cache(_cache_file(tmp_path / "links.json", {url: _entry(url, checked_at=NOW - age)}), 1)
        assert (cache.fresh(url, NOW) is not None) == reused, age


@pytest.mark.parametrize("entry", [_entry("https://example.org/a", skipped="needs login"),
                                   {"url": "https://example.org/a", "ok": True, "status": 200}],
                         ids=["skipped", "no-time"])
def test_cache_entries_that_are_never_reused(tmp_path, entry) -> None:
    """A skip comes from today's links.yaml, never from the cache (a file from an older run or edited by hand
    may hold one); an entry without ``checked_at`` counts as old. Either way the URL is checked again."""
    url = entry["url"]
    cache = Cache(_cache_file(tmp_path / "links.json", {url: entry}), 24)
    assert cache.fresh(url, NOW) is None


def test_a_fresh_entry_comes_back_as_a_cached_outcome(tmp_path) -> None:
    """The control for the test above: a live, timed, unskipped entry is reused as it was stored."""
    url = "https://example.org/a"
    hit = Cache(_cache_file(tmp_path / "links.json", {url: _entry(url, unknown_key=1)}), 24).fresh(url, NOW)
    assert hit == Outcome(url, ok=True, status=200, checked_at=NOW, cached=True)


@pytest.mark.parametrize("text", ["{broken", "[1, 2]", '{"version": 1}'])
def test_an_unreadable_cache_file_counts_as_empty(tmp_path, text) -> None:
    """Bad JSON, JSON that is not an object, or an object without results: nothing is reused, nothing
    crashes, and the next save writes a good file over it."""
    path = tmp_path / "links.json"
    path.write_text(text, encoding="utf-8")
    cache = Cache(path, 24)
    assert cache.fresh("https://example.org/a", NOW) is None
    cache.save([Outcome("https://example.org/a", ok=True, status=200, checked_at=NOW)])
    assert list(json.loads(path.read_text(encoding="utf-8"))["results"]) == ["https://example.org/a"]


@pytest.mark.parametrize("results", [None, [], {"https://example.org/a": "alive"},
                                     {"https://example.org/a": _entry("https://example.org/a", checked_at="today")}],
                         ids=["null", "list", "entry-not-an-object", "time-not-a-number"])
def test_a_cache_file_of_the_wrong_shape_counts_as_empty(tmp_path, results) -> None:
    """The cache is restored from CI and may be given with --cache, so its content is input: a file that parses
    but does not hold a URL -> entry mapping must be ignored like a file that does not parse."""
    path = tmp_path / "links.json"
    path.write_text(json.dumps({"version": 1, "results": results}), encoding="utf-8")
    cache = Cache(path, 24)
    assert cache.fresh("https://example.org/a", NOW) is None
    cache.save([Outcome("https://example.org/b", ok=True, status=200, checked_at=NOW)])


def test_cache_file_holds_one_entry_per_url_actually_checked(tmp_path) -> None:
    """The next run (in CI, restored from the Actions cache) reads this file: version 1, and per checked URL
    the outcome's fields; a skipped URL or one answered from the cache adds nothing. The folder is created
    even when several levels are missing, with a .gitignore that keeps it out of git."""
    path = tmp_path / "new" / "cache" / "links.json"
    alive = Outcome("https://a.org/", ok=True, status=200, checked_at=NOW, seconds=0.25)
    dead = Outcome("https://b.org/", ok=False, status=404, checked_at=NOW)
    skipped = Outcome("https://c.org/", ok=True, skipped="needs login", checked_at=NOW)
    reused = Outcome("https://d.org/", ok=True, status=200, cached=True, checked_at=NOW)
    Cache(path, 24).save([alive, dead, skipped, reused])
    stored = {o.url: {k: v for k, v in asdict(o).items() if k != "cached"} for o in (alive, dead)}
    assert json.loads(path.read_text(encoding="utf-8")) == {"version": 1, "results": stored}
    assert (path.parent / ".gitignore").read_text(encoding="utf-8").splitlines()[-1] == "*"


# --- the progress bar ------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar(done: int, total: int, broken: int) -> str:
    filled = done * 30 // total
    return f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} checked, {broken} broken"


def test_progress_in_a_log_writes_a_line_per_tenth() -> None:
    """Not a terminal: a new line each time another tenth is done, so ten URLs give ten lines, from 1/10."""
    stream = io.StringIO()
    progress = Progress(10, stream=stream)
    for i in range(10):
        progress.step(Outcome(f"u{i}", ok=i != 2))
    assert stream.getvalue().splitlines() == [_bar(done, 10, int(done >= 3)) for done in range(1, 11)]


def test_progress_on_a_terminal_redraws_one_line() -> None:
    """On a terminal the bar is redrawn in place (carriage return, no newline) and ends with one newline."""
    stream = Terminal()
    progress = Progress(3, stream=stream)
    for ok in (True, False, True):
        progress.step(Outcome("u", ok=ok))
    assert stream.getvalue() == f"\r{_bar(1, 3, 0)}\r{_bar(2, 3, 1)}\r{_bar(3, 3, 1)}\n"


def test_progress_for_one_url_and_when_disabled() -> None:
    """A catalogue with a single link still gets its bar; ``enabled=False`` (--quiet) writes nothing."""
    shown, hidden = io.StringIO(), io.StringIO()
    Progress(1, stream=shown).step(Outcome("u", ok=True))
    quiet = Progress(2, stream=hidden, enabled=False)
    quiet.step(Outcome("u", ok=True))
    assert shown.getvalue() == _bar(1, 1, 0) + "\n" and hidden.getvalue() == ""


# --- check_all -------------------------------------------------------------------------------------

def test_progress_counts_links_answered_from_the_cache(tmp_path) -> None:
    """A URL found fresh in the cache is not requested but still advances the bar."""
    url = _closed_port_url()
    cache = Cache(_cache_file(tmp_path / "links.json", {url: _entry(url, checked_at=time.time())}), 24)
    stream = io.StringIO()
    outcomes = check_all([url], LinkConfig(**FAST), cache=cache, progress=Progress(1, stream=stream))
    assert [o.cached for o in outcomes] == [True] and stream.getvalue() == _bar(1, 1, 0) + "\n"


def test_urls_without_a_host_are_reported_not_fatal() -> None:
    """mailto: and file: URLs have no host to queue under: each gets its own error, and no request is made."""
    urls = ["mailto:someone@example.org", "file:///etc/passwd"]
    outcomes = check_all(urls, LinkConfig(**FAST))
    assert [(o.ok, o.error) for o in outcomes] == [(False, f"not an http(s) URL: {url}") for url in urls]


def test_each_host_gets_its_own_lanes_one_session_each(base, server) -> None:
    """A lane is a thread with its own session working through one host's queue; a host gets
    min(its URLs, per_host) lanes. Here 127.0.0.1 has 3 URLs and localhost 2, per_host is 3: five lanes,
    so five sessions (lanes shared between hosts, or idle extra lanes, would change the count)."""
    port = server.server_address[1]
    urls = [f"http://127.0.0.1:{port}/a{i}" for i in range(3)] + [f"http://localhost:{port}/b{i}" for i in range(2)]
    sessions = []

    def session_factory() -> requests.Session:
        sessions.append(requests.Session())
        return sessions[-1]

    outcomes = check_all(urls, LinkConfig(**{**FAST, "per_host": 3}), session_factory=session_factory)
    assert all(o.ok for o in outcomes) and len(sessions) == 5


# --- reports ---------------------------------------------------------------------------------------

SOURCES = {"https://y.org/b": ["papers.yaml:p:url", "papers.yaml:q:code"]}


def _outcomes() -> list[Outcome]:
    return [Outcome("https://x.org/a", ok=True, skipped="needs\nlogin"),
            Outcome("https://y.org/b", ok=False, status=404),
            Outcome("https://y.org/c", ok=False, error="a | b"),
            Outcome("https://z.org/d", ok=True, status=200, redirects=1, final_url="https://z.org/e"),
            Outcome("https://z.org/f", ok=True, status=200)]


def test_terminal_report_lists_each_broken_link_with_all_its_uses() -> None:
    """One summary line, then one line per broken link naming every place that uses it."""
    lines = terminal_report(_outcomes(), SOURCES).split("\n")
    assert lines[1:] == ["  BROKEN 404  https://y.org/b  <- papers.yaml:p:url, papers.yaml:q:code",
                         "  BROKEN a | b  https://y.org/c  <- "]
    assert lines[0].startswith("5 URLs: 2 alive, 2 broken, 1 skipped")


def test_json_report_content() -> None:
    """report.json: a UTC timestamp, the summary, and each outcome with its sources ([] when none is known)."""
    outcomes = _outcomes()
    data = json.loads(json_report(outcomes, SOURCES))
    assert datetime.fromisoformat(data["generated"]).utcoffset() == timedelta(0)
    assert data["summary"] == {"checked": 5, "ok": 2, "broken": 2, "skipped": 1, "cached": 0, "redirected": 1}
    assert data["results"] == [{**asdict(o), "sources": SOURCES.get(o.url, [])} for o in outcomes]


KINDS = {"h2": r"## \S.*", "h3": r"### \S.*", "open": r"<details><summary>[^<>]+</summary>", "close": "</details>"}


def _cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def _layout(md: str) -> list:
    """The report as GitHub renders its blocks: cut at blank lines; a block is a table (returned as its rows
    of cells, after checking the header and the |---| line) or a single line, reduced to its kind."""
    assert md.endswith("\n") and not md.endswith("\n\n")
    shape: list = []
    for block in md[:-1].split("\n\n"):
        lines = block.split("\n")
        if lines[0].startswith("|"):
            width = len(_cells(lines[0]))
            assert lines[1] == "|" + "---|" * width, block
            rows = [_cells(line) for line in lines[2:]]
            assert all(len(row) == width for row in rows), block
            shape.append(rows)
            continue
        assert len(lines) == 1, block
        line = lines[0]
        shape.append(next((k for k, pattern in KINDS.items() if re.fullmatch(pattern, line, re.I)), line))
    return shape


def test_markdown_report_layout() -> None:
    """The $GITHUB_STEP_SUMMARY report: heading, counts, then a table of broken links and folded tables of
    skipped and redirected ones, each separated by blank lines so GitHub renders the tables (also inside
    <details>). Cells keep a pipe escaped and a newline as a space, so each row stays one row."""
    md = markdown_report(_outcomes(), SOURCES)
    shape = _layout(md)
    assert re.findall(r"\d+", shape[1]) == ["5", "2", "2", "1", "0", "1"]
    assert shape[:1] + shape[2:] == [
        "h2", "h3",
        [["404", "<https://y.org/b>", "papers.yaml:p:url, papers.yaml:q:code"], ["a \\| b", "<https://y.org/c>", ""]],
        "open", [["<https://x.org/a>", "needs login"]], "close",
        "open", [["<https://z.org/d>", "<https://z.org/e>"]], "close"]


def test_markdown_report_with_nothing_to_list() -> None:
    """All alive and direct: just the heading and the counts."""
    shape = _layout(markdown_report([Outcome("https://z.org/f", ok=True, status=200)], {}))
    assert shape[0] == "h2" and len(shape) == 2


def test_markdown_report_keeps_a_url_with_a_pipe_in_one_cell() -> None:
    """A DOI such as 10.1234/a|b is valid in the catalogue; its broken-link row must still have three cells."""
    url = "https://doi.org/10.1234/a|b"
    shape = _layout(markdown_report([Outcome(url, ok=False, status=404)], {url: ["papers.yaml:p:doi"]}))
    assert shape[3] == [["404", "<https://doi.org/10.1234/a\\|b>", "papers.yaml:p:doi"]]


# --- the command ---------------------------------------------------------------------------------

def test_links_exits_0_when_all_alive_quiet_and_without_cache(project, base, cli, tmp_path) -> None:
    """Exit 0 when nothing is broken; --quiet leaves stderr empty (no bar); --no-cache writes no cache."""
    config = tmp_path / "links.yaml"
    _serve_catalogue(project, base, config)
    code, out, err = cli("links", "--catalog", str(project / "catalog"), "--config", str(config),
                         "--no-cache", "--quiet")
    assert (code, err) == (0, "") and out.startswith("7 URLs: 7 alive, 0 broken")
    assert not (project / ".cache").exists()


def test_links_second_run_answers_from_the_cache(project, base, server, cli, tmp_path) -> None:
    """With --cache, a second run reuses every live link: each URL was requested once in all."""
    config, cache, report = tmp_path / "links.yaml", tmp_path / "c" / "links.json", tmp_path / "r.json"
    _serve_catalogue(project, base, config)
    for _ in range(2):
        cli("links", "--catalog", str(project / "catalog"), "--config", str(config), "--cache", str(cache),
            "--quiet", "--json", str(report))
    assert json.loads(report.read_text(encoding="utf-8"))["summary"]["cached"] == 7
    assert len(server.hits) == 7 and set(server.hits.values()) == {1}


def test_links_workers_option_overrides_the_config(project, base, server, cli, tmp_path) -> None:
    """--workers 1 over ``workers: 8`` in the config: one request in flight at a time, though per_host
    would allow four (the server holds each answer up to 0.2 s waiting for a second request)."""
    config = tmp_path / "links.yaml"
    _serve_catalogue(project, base, config, "workers: 8\nper_host: 4\n")
    server.hold = 0.2
    code, _, _ = cli("links", "--catalog", str(project / "catalog"), "--config", str(config),
                     "--no-cache", "--quiet", "--workers", "1")
    assert code == 0 and sum(server.hits.values()) == 7 and server.most == 1


def _break_catalogue(project: Path) -> None:
    """An invalid catalogue: links stops before checking anything (so no test below can reach the network)."""
    edit_catalogue(project, "papers.yaml", "year: 2020", "year: soon")


def test_links_reads_links_yaml_beside_the_catalogue(project, cli) -> None:
    """Without --config, <catalog>/links.yaml is the configuration: a typo in it is reported with its path."""
    _break_catalogue(project)
    (project / "catalog" / "links.yaml").write_text("timout: 3\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"catalog/links\.yaml: invalid link configuration:(.|\n)*timout"):
        cli("links", "--catalog", str(project / "catalog"), "--no-cache", "--quiet")


def test_links_refuses_an_invalid_catalogue_with_one_line(project, cli) -> None:
    """The only output is one line on stderr that says what to run; exit 2."""
    _break_catalogue(project)
    code, out, err = cli("links", "--catalog", str(project / "catalog"), "--no-cache", "--quiet")
    assert (code, out, err) == (2, "", "the catalogue has errors; run python -m site_gen check first\n")


def test_a_cache_named_with_cache_is_used_and_its_folder_left_to_git(project, base, cli, tmp_path) -> None:
    """--cache FILE in a folder of the project: the cache is written and read back, but no catch-all
    .gitignore lands beside it (only the default .cache/ folder gets one)."""
    config, cache = tmp_path / "links.yaml", tmp_path / "reports" / "links.json"
    _serve_catalogue(project, base, config)
    outs = [cli("links", "--catalog", str(project / "catalog"), "--config", str(config), "--cache", str(cache),
                "--quiet")[1] for _ in range(2)]
    assert outs[1].startswith("7 URLs: 7 alive, 0 broken, 0 skipped (7 from cache")
    assert not Cache(cache, 1).foreign and not (cache.parent / ".gitignore").exists()  # a cache file, left to git
