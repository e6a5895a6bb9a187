"""``links`` against a real HTTP server on 127.0.0.1 that plays every kind of bad host."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from site_gen.links import Cache, LinkConfig, Progress, check_all, check_url, Gates, markdown_report

from .conftest import RoutedHandler

FAST = dict(timeout=1.0, attempts=2, backoff=0.01, min_interval=0.0, per_host=4, workers=16)
BIG_BODY = 64 * 1024 * 1024


class Bad(RoutedHandler):
    """Routes: /ok, /chain/N, /missing, /gone, /ratelimited, /flaky, /slow, /loop-a, /nohead,
    /to-ftp, /busy/N, /forbidden, /big (HEAD 405, GET streams a huge body), /always500,
    /ratelimited-long (Retry-After: 60 once), /not-modified (304 with a Location), /head403 and
    /head501 (that status on HEAD, 200 on GET)."""

    def _route(self, head: bool) -> None:
        srv, path = self.server, self.path.split("?", 1)[0]
        with srv.lock:
            srv.hits[path] = srv.hits.get(path, 0) + 1
            srv.times.setdefault(path, []).append(time.monotonic())
            n = srv.hits[path]
            srv.methods.append((self.command, path))
        if path == "/ok" or path.startswith("/busy/"):
            if path.startswith("/busy/"):
                with srv.lock:
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                time.sleep(0.05)
                with srv.lock:
                    srv.in_flight -= 1
            return self._send(200)
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            return self._send(301, location="/ok" if left == 0 else f"/chain/{left - 1}")
        if path == "/missing":
            return self._send(404)
        if path == "/gone":
            return self._send(410)
        if path == "/forbidden":
            return self._send(403)
        if path == "/ratelimited":
            return self._send(429, retry_after="1") if n == 1 else self._send(200)
        if path == "/always500":
            return self._send(500)
        if path == "/ratelimited-long":
            return self._send(429, retry_after="60") if n == 1 else self._send(200)
        if path == "/not-modified":
            return self._send(304, location="/ok")
        if path in ("/head403", "/head501"):
            return self._send(int(path[5:]) if head else 200)
        if path == "/flaky":
            return self._send(500) if n == 1 else self._send(200)
        if path == "/slow":
            time.sleep(3.0)
            return self._send(200)
        if path == "/loop-a":
            return self._send(302, location=f"http://127.0.0.1:{srv.server_address[1]}/loop-b")
        if path == "/loop-b":
            return self._send(302, location="/loop-a")
        if path == "/to-ftp":
            return self._send(302, location="ftp://example.org/file.txt")
        if path in ("/nohead", "/big"):
            if head:
                return self._send(405)
            if path == "/nohead":
                return self._send(200)
            return self._stream_big()
        self._send(404)

    def _send(self, status: int, location: str | None = None, retry_after: str | None = None) -> None:
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        if retry_after:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_big(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(BIG_BODY))
        self.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(BIG_BODY // len(chunk)):
                self.wfile.write(chunk)
                self.server.big_sent += len(chunk)
        except OSError:
            pass  # the client hung up after reading its few bytes: what we want to see


@pytest.fixture
def server(local_server):
    httpd = local_server(Bad)
    httpd.lock = threading.Lock()
    httpd.hits, httpd.times, httpd.methods = {}, {}, []
    httpd.in_flight = httpd.max_in_flight = httpd.big_sent = 0
    return httpd


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(url: str, **config) -> object:
    cfg = LinkConfig(**{**FAST, **config})
    with requests.Session() as session:
        return check_url(url, session, Gates(cfg), cfg)


# --- one URL at a time ---------------------------------------------------------------------------

def test_alive_url(base) -> None:
    o = _one(f"{base}/ok")
    assert (o.ok, o.status, o.redirects, o.method, o.error) == (True, 200, 0, "HEAD", None)


def test_redirect_chain_is_followed_to_the_end(base) -> None:
    o = _one(f"{base}/chain/3")
    assert (o.ok, o.status, o.redirects, o.final_url) == (True, 200, 4, f"{base}/ok")


@pytest.mark.parametrize("path, status", [("/missing", 404), ("/gone", 410), ("/forbidden", 403)])
def test_dead_urls(base, path, status) -> None:
    o = _one(f"{base}{path}")
    assert (o.ok, o.status) == (False, status)


def test_429_waits_for_retry_after_then_succeeds(base, server) -> None:
    o = _one(f"{base}/ratelimited")
    assert (o.ok, o.status, o.attempts) == (True, 200, 2)
    first, second = server.times["/ratelimited"]
    assert second - first >= 0.95  # Retry-After: 1


def test_500_then_200_is_retried(base, server) -> None:
    o = _one(f"{base}/flaky")
    assert (o.ok, o.status, o.attempts) == (True, 200, 2) and server.hits["/flaky"] == 2


def test_5xx_that_persists_is_broken_after_all_attempts(base, server) -> None:
    o = _one(f"{base}/flaky", attempts=1)
    assert (o.ok, o.status, o.attempts) == (False, 500, 1)


def test_slow_server_times_out_after_retries(base, server) -> None:
    started = time.monotonic()
    o = _one(f"{base}/slow")
    assert (o.ok, o.status, o.error, o.attempts) == (False, None, "timeout after 1 s", 2)
    # two 1 s timeouts; waiting out the 3 s server on both attempts would take 6 s (slack for a loaded CI)
    assert time.monotonic() - started < 5.0 and server.hits["/slow"] == 2


def test_refused_connection_is_broken_at_once() -> None:
    o = _one(f"http://127.0.0.1:{_closed_port()}/x")
    assert not o.ok and o.error == "connection failed (connection refused)" and o.attempts == 1


def test_redirect_loop_is_detected(base) -> None:
    o = _one(f"{base}/loop-a")
    assert not o.ok and o.error == "redirect loop (2 hops)"


def test_too_many_redirects(base) -> None:
    o = _one(f"{base}/chain/5", max_redirects=3)
    assert not o.ok and o.error == "more than 3 redirects"


def test_redirect_to_another_scheme_is_refused(base) -> None:
    o = _one(f"{base}/to-ftp")
    assert not o.ok and o.error == "redirect to a non-http(s) URL: ftp://example.org/file.txt"


def test_only_http_urls_are_checked() -> None:
    o = _one("file:///etc/passwd")
    assert not o.ok and o.error == "not an http(s) URL: file:///etc/passwd"


@pytest.mark.parametrize("path", ["/nohead", "/head403", "/head501"])  # 405, 403, 501 on HEAD
def test_head_refused_falls_back_to_get(base, server, path) -> None:
    o = _one(f"{base}{path}")
    assert (o.ok, o.status, o.method) == (True, 200, "GET")
    assert server.methods == [("HEAD", path), ("GET", path)]


def test_get_fallback_reads_only_a_few_bytes(base, server) -> None:
    o = _one(f"{base}/big", byte_cap=1024)
    assert o.ok and o.method == "GET"
    time.sleep(0.2)
    assert server.big_sent < BIG_BODY // 4  # the client hung up instead of downloading 64 MiB


def test_host_rules_skip_with_reason_and_accept_extra_codes(base) -> None:
    rules = {"127.0.0.1": {"accept": [403], "reason": "answers bots with 403"}}
    assert _one(f"{base}/forbidden", hosts=rules).ok
    o = _one("https://www.example.com/paper", hosts={"example.com": {"skip": "blocks automated checks"}})
    assert o.ok and o.skipped == "blocks automated checks"


# --- many URLs ------------------------------------------------------------------------------

def test_per_host_limit_and_order_of_results(base, server) -> None:
    urls = [f"{base}/busy/{i}" for i in range(10)] + [f"{base}/missing"]
    outcomes = check_all(urls, LinkConfig(**{**FAST, "per_host": 2, "workers": 8}))
    assert [o.url for o in outcomes] == urls
    assert server.max_in_flight == 2
    assert [o.ok for o in outcomes] == [True] * 10 + [False]


def _assert_spaced(arrivals: list[float], began: float, interval: float) -> None:
    """The gate books start k at or after began + k * interval, and a request arrives after its start, so
    the k-th arrival is no earlier than that: a bound that scheduling delays cannot break (only loosen),
    unlike the gaps between arrivals. Without the gate every arrival lands within ~20 ms of ``began``."""
    late = [(k, round(t - began, 3)) for k, t in enumerate(sorted(arrivals)) if t < began + k * interval]
    assert not late, f"arrivals earlier than k * {interval} s after the start: {late}"


def test_min_interval_spaces_requests_to_one_host(base, server) -> None:
    urls = [f"{base}/busy/{i}" for i in range(6)]
    began = time.monotonic()
    check_all(urls, LinkConfig(**{**FAST, "per_host": 4, "min_interval": 0.1}))
    arrivals = [t for ts in server.times.values() for t in ts]
    assert len(arrivals) == 6
    _assert_spaced(arrivals, began, 0.1)


def test_cache_reuses_alive_links_and_rechecks_broken_ones(base, server, tmp_path) -> None:
    path = tmp_path / ".cache" / "links.json"
    urls = [f"{base}/ok", f"{base}/missing"]
    cfg = LinkConfig(**FAST)
    first = check_all(urls, cfg, cache=Cache(path, 24))
    Cache(path, 24).save(first)
    assert (tmp_path / ".cache" / ".gitignore").read_text(encoding="utf-8").endswith("*\n")
    second = check_all(urls, cfg, cache=Cache(path, 24))
    assert [o.cached for o in second] == [True, False]
    assert server.hits == {"/ok": 1, "/missing": 2}
    check_all(urls, cfg, cache=Cache(path, 0))  # max age 0: everything is stale
    assert server.hits["/ok"] == 2


def test_progress_bar_is_plain_text_on_stderr(base, capsys) -> None:
    urls = [f"{base}/busy/{i}" for i in range(20)]
    check_all(urls, LinkConfig(**FAST), progress=Progress(len(urls)))
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == f"[{'#' * 30}] 20/20 checked, 0 broken" and 5 <= len(lines) <= 11


# --- the command ---------------------------------------------------------------------------------

def test_links_command_reports_and_exits_1_on_broken(project, base, cli, tmp_path, server) -> None:
    papers = project / "catalog" / "papers.yaml"
    text = papers.read_text(encoding="utf-8")
    text = text.replace("https://github.com/tianheyu927/PCGrad", f"{base}/chain/2")
    text = text.replace("https://example.org/paper?id=7", f"{base}/gone")
    papers.write_text(text, encoding="utf-8")
    for name in ("datasets.yaml", "codebases.yaml"):
        path = project / "catalog" / name
        path.write_text(path.read_text(encoding="utf-8").replace("https://", f"{base}/ok?was="), encoding="utf-8")
    config = tmp_path / "links.yaml"
    config.write_text(f"timeout: 1.0\nattempts: 2\nbackoff: 0.01\nmin_interval: 0\n"
                      f"arxiv_base: {base}/ok?arxiv=\ndoi_base: {base}/missing?doi=\n", encoding="utf-8")
    report_json, report_md = tmp_path / "r.json", tmp_path / "r.md"
    code, out, err = cli("links", "--catalog", str(project / "catalog"), "--config", str(config),
                         "--json", str(report_json), "--markdown", str(report_md))
    assert code == 1
    data = json.loads(report_json.read_text(encoding="utf-8"))
    broken = {r["url"]: r for r in data["results"] if not r["ok"]}
    assert set(broken) == {f"{base}/gone", f"{base}/missing?doi=10.1109/TPAMI.2021.3054719"}
    assert broken[f"{base}/gone"]["sources"] == ["papers.yaml:uw:url"]
    assert data["summary"]["broken"] == 2 and data["summary"]["redirected"] == 1
    assert f"| 410 | <{base}/gone> | papers.yaml:uw:url |" in report_md.read_text(encoding="utf-8")
    assert f"BROKEN 410  {base}/gone  <- papers.yaml:uw:url" in out
    assert "checked, 2 broken" in err
    assert (project / ".cache" / "links.json").exists()


def test_markdown_lists_skipped_hosts_with_reasons() -> None:
    from site_gen.links import Outcome

    md = markdown_report([Outcome("https://x.org/a", ok=True, skipped="needs login"),
                          Outcome("https://y.org/b", ok=False, status=404)], {"https://y.org/b": ["papers.yaml:p:url"]})
    assert "| 404 | <https://y.org/b> | papers.yaml:p:url |" in md and "| <https://x.org/a> | needs login |" in md


def test_committed_config_loads_and_bad_config_is_refused(tmp_path) -> None:
    from site_gen.links import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "catalog" / "links.yaml")
    assert config.rule("export.arxiv.org").per_host == 1  # a rule covers subdomains
    assert config.rule("www.researchgate.net").skip
    bad = tmp_path / "links.yaml"
    bad.write_text("timeout: 5\ntimout: 3\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="timout"):
        load_config(bad)


# --- rules pinned one by one -------------------------------------------------------------------

@pytest.fixture
def pauses(recorded_sleeps) -> list[float]:
    """The backoff pauses ``links`` asks for, recorded instead of slept (the gate never waits here)."""
    import site_gen.links

    return recorded_sleeps(site_gen.links)


def test_persistent_5xx_backs_off_exponentially_then_reports_the_status(base, server, pauses) -> None:
    o = _one(f"{base}/always500", attempts=3, backoff=0.5)
    assert (o.ok, o.status, o.error, o.attempts) == (False, 500, None, 3) and server.hits["/always500"] == 3
    assert pauses == [0.5, 1.0]  # 0.5 then doubled; no pause after the last attempt


def test_retry_after_is_capped_by_max_wait(base, server) -> None:
    started = time.monotonic()
    o = _one(f"{base}/ratelimited-long", max_wait=0.2)
    assert (o.ok, o.status, o.attempts) == (True, 200, 2)
    assert time.monotonic() - started < 10.0  # the server asked for 60 s


def test_exactly_max_redirects_is_still_alive(base) -> None:
    o = _one(f"{base}/chain/2", max_redirects=3)  # /chain/2 -> 1 -> 0 -> /ok: three hops
    assert (o.ok, o.redirects, o.final_url) == (True, 3, f"{base}/ok")


def test_304_is_a_status_not_a_redirect(base) -> None:
    o = _one(f"{base}/not-modified")
    assert (o.ok, o.status, o.redirects, o.final_url) == (False, 304, 0, f"{base}/not-modified")


def test_host_rule_overrides_lanes_and_spacing(base, server) -> None:
    urls = [f"{base}/busy/{i}" for i in range(4)]
    check_all(urls, LinkConfig(**{**FAST, "hosts": {"127.0.0.1": {"per_host": 1}}}))
    assert server.max_in_flight == 1
    server.times.clear()
    began = time.monotonic()
    check_all(urls, LinkConfig(**{**FAST, "hosts": {"127.0.0.1": {"min_interval": 0.15}}}))
    arrivals = [t for ts in server.times.values() for t in ts]
    assert len(arrivals) == 4
    _assert_spaced(arrivals, began, 0.15)


def test_a_host_rule_can_raise_the_slots_of_its_gate() -> None:
    gate = Gates(LinkConfig(per_host=1, min_interval=0, hosts={"h.org": {"per_host": 2}}))["h.org"]

    def two_at_once() -> None:
        with gate.turn(), gate.turn():
            pass

    worker = threading.Thread(target=two_at_once, daemon=True)
    worker.start()
    worker.join(timeout=5.0)
    assert not worker.is_alive()  # with one slot the second turn would wait forever


def test_cache_age_is_in_hours(base, server, tmp_path) -> None:
    path = tmp_path / "links.json"
    url = f"{base}/ok"
    entry = {"url": url, "ok": True, "status": 200, "checked_at": time.time() - 2 * 3600}
    path.write_text(json.dumps({"version": 1, "results": {url: entry}}), encoding="utf-8")
    assert check_all([url], LinkConfig(**FAST), cache=Cache(path, 3))[0].cached  # 2 h old, 3 h allowed
    assert not check_all([url], LinkConfig(**FAST), cache=Cache(path, 1))[0].cached
    assert server.hits == {"/ok": 1}


def test_cache_write_is_atomic(base, tmp_path, rename_fails) -> None:
    path = tmp_path / "links.json"
    path.write_text('{"version": 1, "results": {}}\n', encoding="utf-8")
    with pytest.raises(OSError, match="disk full"):
        Cache(path, 24).save(check_all([f"{base}/ok"], LinkConfig(**FAST)))
    assert path.read_text(encoding="utf-8") == '{"version": 1, "results": {}}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name != ".gitignore"] == ["links.json"]


def test_a_url_used_twice_is_checked_once_and_names_both_uses(project) -> None:
    from site_gen.catalogue import load_catalogue
    from site_gen.links import collect_links
    from site_gen.problems import Problems

    papers = project / "catalog" / "papers.yaml"
    papers.write_text(papers.read_text(encoding="utf-8").replace(
        "https://example.org/paper?id=7", "https://github.com/tianheyu927/PCGrad"), encoding="utf-8")
    links = collect_links(load_catalogue(project / "catalog", Problems()), LinkConfig())
    shared = [link for link in links if link.url == "https://github.com/tianheyu927/PCGrad"]
    assert len(shared) == 1 and shared[0].sources == ["papers.yaml:pcgrad:code", "papers.yaml:uw:url"]


def test_reports_count_skipped_apart_escape_cells_and_list_only_live_redirects() -> None:
    from site_gen.links import Outcome, summarise, terminal_report

    outcomes = [Outcome("https://x.org/a", ok=True, skipped="needs login"),
                Outcome("https://y.org/b", ok=False, status=302, redirects=2, error="redirect loop (2 hops)"),
                Outcome("https://y.org/c", ok=False, error="a | b"),
                Outcome("https://z.org/d", ok=True, status=200, redirects=1, final_url="https://z.org/e")]
    assert summarise(outcomes) == {"checked": 4, "ok": 1, "broken": 2, "skipped": 1, "cached": 0, "redirected": 2}
    md = markdown_report(outcomes, {})
    assert "| redirect loop (2 hops) | <https://y.org/b> |  |" in md and "| a \\| b | <https://y.org/c> |  |" in md
    assert "| <https://z.org/d> | <https://z.org/e> |" in md and "<https://y.org/b> | <" not in md
    assert "BROKEN redirect loop (2 hops)  https://y.org/b" in terminal_report(outcomes, {})


def test_links_command_timeout_option_overrides_the_config(project, base, cli, tmp_path) -> None:
    for name in ("papers.yaml", "datasets.yaml", "codebases.yaml"):  # every URL local: /slow, else /ok
        path = project / "catalog" / name
        text = path.read_text(encoding="utf-8").replace("https://example.org/paper?id=7", f"{base}/slow")
        path.write_text(text.replace("https://", f"{base}/ok?was="), encoding="utf-8")
    config = tmp_path / "links.yaml"
    config.write_text(f"attempts: 1\nmin_interval: 0\narxiv_base: {base}/ok?arxiv=\ndoi_base: {base}/ok?doi=\n",
                      encoding="utf-8")
    report = tmp_path / "r.json"
    started = time.monotonic()
    cli("links", "--catalog", str(project / "catalog"), "--config", str(config), "--no-cache", "--quiet",
        "--timeout", "0.5", "--json", str(report))
    results = {r["url"]: r for r in json.loads(report.read_text(encoding="utf-8"))["results"]}
    assert results[f"{base}/slow"]["error"] == "timeout after 0.5 s"
    assert time.monotonic() - started < 10.0


def test_links_command_refuses_an_invalid_catalogue(project, cli) -> None:
    papers = project / "catalog" / "papers.yaml"
    papers.write_text(papers.read_text(encoding="utf-8").replace("year: 2020", "year: soon"), encoding="utf-8")
    code, out, err = cli("links", "--catalog", str(project / "catalog"), "--no-cache", "--quiet")
    assert code == 2 and "the catalogue has errors; run python -m site_gen check first" in err and out == ""
