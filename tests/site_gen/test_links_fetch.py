"""``links``, one URL at a time: which URLs are collected, what is sent, and what an outcome says.

HTTP runs against a small server on 127.0.0.1 (``local_server`` from conftest); where a failure
cannot be staged locally (DNS, TLS, routing), a stub session raises the exception requests would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import requests

import site_gen.links
from site_gen.catalogue import load_catalogue
from site_gen.links import Gates, LinkConfig, Outcome, check_url, collect_links, load_config
from site_gen.metadata import USER_AGENT
from site_gen.problems import Problems

from .conftest import RoutedHandler, edit_catalogue

FAST = dict(timeout=1.0, attempts=1, backoff=0.01, min_interval=0.0)
ROOT = Path(__file__).resolve().parents[2]


class Routes(RoutedHandler):
    """/ok; /chain/N and /get-chain/N (301 down to /ok); /loop-a <-> /loop-b and /get-loop (302 to
    itself); /choices (300) and /bad-request (400), both with a Location to /ok; /nohead; /get-slow;
    /get-500-then-slow; /slow; /always500; /vague-429 (Retry-After: later, once); /to-cafe (raw UTF-8
    Location) and /caf%C3%A9; /latin1-location; /bad-ipv6-location. The /get-* routes answer HEAD
    with 405, so the check falls back to GET there."""

    def _route(self, head: bool) -> None:
        srv, path = self.server, self.path.split("?", 1)[0]
        with srv.lock:
            srv.seen.append((self.command, path, self.headers))  # looked up case-insensitively
            srv.hits[(self.command, path)] = n = srv.hits.get((self.command, path), 0) + 1
        if head and path.startswith(("/get-", "/nohead")):
            return self._send(405)
        if path in ("/ok", "/nohead", "/caf%C3%A9"):
            return self._send(200)
        if path.startswith(("/chain/", "/get-chain/")):
            left = int(path.rsplit("/", 1)[1])
            return self._send(301, "/ok" if left == 0 else f"{path.rsplit('/', 1)[0]}/{left - 1}".encode())
        if path in ("/loop-a", "/loop-b", "/get-loop"):
            return self._send(302, {"/loop-a": b"/loop-b", "/loop-b": b"/loop-a"}.get(path, path.encode()))
        if path in ("/choices", "/bad-request"):
            return self._send(300 if path == "/choices" else 400, b"/ok")
        if path in ("/slow", "/get-slow") or (path == "/get-500-then-slow" and n > 1):
            time.sleep(3.0)
            return self._send(200)
        if path in ("/always500", "/get-500-then-slow"):
            return self._send(500)
        if path == "/vague-429":
            return self._send(429, extra=b"Retry-After: later") if n == 1 else self._send(200)
        locations = {"/to-cafe": "/café".encode(), "/latin1-location": "/café".encode("latin-1"),
                     "/bad-ipv6-location": b"http://[oops/"}
        if path in locations:
            return self._send(302, locations[path])
        self._send(404)

    def _send(self, status: int, location: bytes | str | None = None, extra: bytes | None = None) -> None:
        """Headers go out as raw bytes, so a test can send what a careless server sends."""
        self.send_response(status)
        for line in ([b"Location: " + (location.encode() if isinstance(location, str) else location)]
                     if location else []) + ([extra] if extra else []):
            self._headers_buffer.append(line + b"\r\n")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(local_server):
    httpd = local_server(Routes)
    httpd.lock, httpd.seen, httpd.hits = threading.Lock(), [], {}
    return httpd


@pytest.fixture
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _one(url: str, session: requests.Session | None = None, **config) -> Outcome:
    cfg = LinkConfig(**{**FAST, **config})
    with session or requests.Session() as s:
        return check_url(url, s, Gates(cfg), cfg)


# --- what is collected ---------------------------------------------------------------------------

def test_every_kind_of_link_is_collected_with_file_entry_and_field(project) -> None:
    """Each source reads file:entry:field, the key a maintainer needs to find a broken link; arXiv and
    DOI links are built from the configured bases."""
    cfg = LinkConfig(arxiv_base="https://ax.test/", doi_base="https://doi.test/")
    links = collect_links(load_catalogue(project / "catalog", Problems()), cfg)
    assert [(link.url, link.sources) for link in links] == [
        ("https://github.com/tianheyu927/PCGrad", ["papers.yaml:pcgrad:code"]),
        ("https://ax.test/2001.06782", ["papers.yaml:pcgrad:arxiv"]),
        ("https://doi.test/10.1109/TPAMI.2021.3054719", ["papers.yaml:vandenhende2021multi:doi"]),
        ("https://ax.test/1706.05098", ["papers.yaml:ruder2017overview:arxiv"]),
        ("https://example.org/paper?id=7", ["papers.yaml:uw:url"]),
        ("https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html", ["datasets.yaml:nyuv2:homepage"]),
        ("https://github.com/example/toolkit", ["codebases.yaml:toolkit:url"]),
    ]


def test_link_config_is_read_as_utf8_whatever_the_locale(tmp_path) -> None:
    """links.yaml is UTF-8 like the catalogue: under an ASCII locale a non-ASCII reason still loads."""
    config = tmp_path / "links.yaml"
    config.write_text("hosts:\n  example.org:\n    skip: bloque les robots — hélas\n", encoding="utf-8")
    code = ("import sys; from pathlib import Path; from site_gen.links import load_config; "
            "sys.stdout.buffer.write(load_config(Path(sys.argv[1])).hosts['example.org'].skip.encode('utf-8'))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(config)], env=env, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]
    assert done.stdout.decode("utf-8") == "bloque les robots — hélas"


# --- what is sent --------------------------------------------------------------------------------

def test_head_and_get_carry_our_user_agent_and_accept_whatever_the_session(base, server) -> None:
    """check_all takes any session factory: the checker's own User-Agent and Accept must win over
    the session's defaults, on the HEAD and on the GET fallback."""
    session = requests.Session()
    session.headers.update({"User-Agent": "someone-else/1.0", "Accept": "text/html"})
    assert _one(f"{base}/nohead", session).ok
    sent = [(method, h.get("User-Agent"), h.get("Accept")) for method, _, h in server.seen]
    assert sent == [("HEAD", USER_AGENT, "*/*"), ("GET", USER_AGENT, "*/*")]


def test_get_fallback_leaves_redirects_to_the_checker(base, server) -> None:
    """Redirects met by the GET fallback are vetted and counted hop by hop like HEAD ones."""
    o = _one(f"{base}/get-chain/1")
    assert (o.ok, o.status, o.redirects, o.final_url, o.method) == (True, 200, 2, f"{base}/ok", "HEAD")
    assert [(m, p) for m, p, _ in server.seen] == [
        ("HEAD", "/get-chain/1"), ("GET", "/get-chain/1"), ("HEAD", "/get-chain/0"), ("GET", "/get-chain/0"),
        ("HEAD", "/ok")]


def test_get_fallback_has_the_same_timeout(base) -> None:
    """A server that answers HEAD at once but stalls the GET must still time out (server: 3 s)."""
    o = _one(f"{base}/get-slow", timeout=0.5)
    assert (o.ok, o.status, o.error) == (False, None, "timeout after 0.5 s")


# --- retries and errors --------------------------------------------------------------------------

def test_a_vague_retry_after_falls_back_to_the_backoff(base, server) -> None:
    """'Retry-After: later' is neither seconds nor a date: retry after the usual backoff instead."""
    o = _one(f"{base}/vague-429", attempts=2)
    assert (o.ok, o.status, o.attempts) == (True, 200, 2)


def test_no_pause_after_a_final_timeout(base, recorded_sleeps) -> None:
    """The backoff separates attempts; after the last one there is nothing to wait for."""
    pauses = recorded_sleeps(site_gen.links)
    o = _one(f"{base}/slow", timeout=0.3, attempts=2, backoff=0.5)
    assert (o.error, o.attempts) == ("timeout after 0.3 s", 2) and pauses == [0.5]


def test_a_refused_connection_is_an_outcome_of_the_head_request() -> None:
    """No request ever answered, so the outcome names the HEAD that was tried; ok is a real boolean."""
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    o = _one(f"http://127.0.0.1:{port}/x")
    assert (o.ok, o.method, o.error) == (False, "HEAD", "connection failed (connection refused)")


def test_a_failed_retry_after_a_get_fallback_keeps_the_get_method(base) -> None:
    """HEAD 405, GET 500, then the retried GET times out: the failing request was a GET."""
    o = _one(f"{base}/get-500-then-slow", timeout=0.5, attempts=2)
    assert (o.ok, o.error, o.method, o.attempts) == (False, "timeout after 0.5 s", "GET", 2)


def test_a_request_that_cannot_be_made_names_the_exception() -> None:
    """A port outside 1-65535 never reaches the network; requests refuses it with InvalidURL."""
    o = _one("http://127.0.0.1:99999/x")
    assert (o.ok, o.error, o.attempts) == (False, "request failed (InvalidURL)", 1)


class _Failing:
    """A session whose every request raises ``exc``, as requests does for failures we cannot stage."""

    def __init__(self, exc: Exception):
        self.exc = exc

    def head(self, *args: object, **kwargs: object) -> None:
        raise self.exc

    def __enter__(self) -> _Failing:
        return self

    def __exit__(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("exc, reason", [
    (requests.ConnectionError("HTTPSConnectionPool(host='gone.example', port=443): Max retries exceeded "
                              "(Caused by NameResolutionError: [Errno -2] Name or service not known)"),
     "name or service not known"),
    (requests.ConnectionError("('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))"),
     "connection reset"),
    (requests.ConnectionError("NewConnectionError: Failed to establish a new connection: [Errno 113] No route to host"),
     "no route to host"),
    (requests.exceptions.SSLError("SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] "
                                  "certificate verify failed: self-signed certificate')"),
     "certificate verify failed"),
    (requests.exceptions.ProxyError("Unable to connect to proxy"), "ProxyError"),
])
def test_connection_failures_are_named_briefly(exc, reason) -> None:
    """The report shows a short reason a maintainer can act on, else the exception's class."""
    o = _one("https://example.org/x", _Failing(exc))
    assert (o.ok, o.error, o.attempts) == (False, f"connection failed ({reason})", 1)


# --- the outcome ---------------------------------------------------------------------------------

def test_seconds_is_the_time_the_check_took(base, monkeypatch) -> None:
    """On a clock that only moves when links sleeps, a check with two backoff pauses took their sum."""
    clock = [1000.0]
    monkeypatch.setattr(site_gen.links, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s), time=time.time))
    o = _one(f"{base}/always500", attempts=3, backoff=0.25)
    assert (o.status, o.attempts, o.seconds) == (500, 3, 0.75)


def test_attempts_add_up_over_the_redirect_hops(base) -> None:
    """Three redirects and the final page: four requests in all."""
    o = _one(f"{base}/chain/2")
    assert (o.ok, o.redirects, o.attempts) == (True, 3, 4)


def test_300_with_a_location_is_a_redirect_but_400_is_not(base) -> None:
    """Every 3xx except 304 is followed; a 4xx is final even if it carries a Location."""
    o = _one(f"{base}/choices")
    assert (o.ok, o.status, o.redirects, o.final_url) == (True, 200, 1, f"{base}/ok")
    o = _one(f"{base}/bad-request")
    assert (o.ok, o.status, o.redirects, o.final_url) == (False, 400, 0, f"{base}/bad-request")


def test_a_non_http_url_is_broken_with_a_boolean_ok() -> None:
    """JSON reports dump ok as is: it must be false, not null."""
    assert _one("mailto:someone@example.org").ok is False


@pytest.mark.parametrize("path, method, hops", [("/loop-a", "HEAD", 2), ("/get-loop", "GET", 1)])
def test_a_redirect_loop_keeps_the_status_method_and_closing_url(base, path, method, hops) -> None:
    """The outcome names the last answer (302, by HEAD or by the GET fallback) and the URL met twice."""
    o = _one(f"{base}{path}")
    assert (o.ok, o.status, o.method, o.error) == (False, 302, method, f"redirect loop ({hops} hops)")
    assert (o.final_url, o.redirects) == (f"{base}{path}", hops)


@pytest.mark.parametrize("path, method", [("/chain/3", "HEAD"), ("/get-chain/3", "GET")])
def test_too_many_redirects_keeps_the_status_and_method(base, path, method) -> None:
    """Giving up on a long chain still reports the redirect status and how it was asked."""
    o = _one(f"{base}{path}", max_redirects=1)
    assert (o.ok, o.status, o.method, o.error) == (False, 301, method, "more than 1 redirects")


# --- bugs found while reading the survivors (each test failed before the fix) -------------------------

def _replace_all(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")


def _local_catalogue(project: Path, base: str, tmp_path: Path) -> Path:
    """Point every URL of the fixture project at ``base``/ok; returns a links.yaml that does the same."""
    for name in ("papers.yaml", "datasets.yaml", "codebases.yaml"):
        _replace_all(project / "catalog" / name, "https://", f"{base}/ok?was=")
    config = tmp_path / "links.yaml"
    config.write_text(f"attempts: 1\nmin_interval: 0\narxiv_base: {base}/ok?arxiv=\ndoi_base: {base}/ok?doi=\n",
                      encoding="utf-8")
    return config


def test_a_catalogue_url_with_an_empty_host_label_is_reported_broken(project, base, cli, tmp_path) -> None:
    """'https://example..org/' passes the catalogue's URL check; the link check must list it, not crash."""
    config = _local_catalogue(project, base, tmp_path)
    edit_catalogue(project, "papers.yaml", f"{base}/ok?was=example.org/paper?id=7", "https://example..org/paper")
    code, out, _ = cli("links", "--catalog", str(project / "catalog"), "--config", str(config),
                       "--no-cache", "--quiet")
    assert code == 1 and "https://example..org/paper  <- papers.yaml:uw:url" in out


@pytest.mark.parametrize("path", ["/latin1-location", "/bad-ipv6-location"])
def test_a_malformed_location_header_is_an_outcome_not_a_crash(base, path) -> None:
    """One careless server must not abort the whole run: its link is simply reported as broken."""
    o = _one(f"{base}{path}")
    assert (o.url, o.ok) == (f"{base}{path}", False)


def test_a_utf8_location_is_followed_to_the_right_page(base, server) -> None:
    """requests itself re-decodes Location as UTF-8 for this reason; the hand-made redirect loop does not."""
    o = _one(f"{base}/to-cafe")
    assert (o.ok, o.status, o.redirects) == (True, 200, 1)


def test_a_missing_config_given_on_the_command_line_is_refused(project, base, cli, tmp_path) -> None:
    """A mistyped --config must not quietly run with other settings (timeouts, skipped hosts)."""
    _local_catalogue(project, base, tmp_path)
    missing = tmp_path / "linkz.yaml"
    with pytest.raises(SystemExit, match="linkz.yaml"):
        cli("links", "--catalog", str(project / "catalog"), "--config", str(missing), "--no-cache", "--quiet")


def test_a_config_that_is_not_utf8_is_refused_with_its_path(tmp_path) -> None:
    """The catalogue files report 'not valid UTF-8' with their name; links.yaml should do as well."""
    config = tmp_path / "links.yaml"
    config.write_bytes("hosts:\n  example.org:\n    skip: hélas\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="links.yaml"):
        load_config(config)


def test_a_timeout_of_the_get_fallback_is_reported_as_get(base) -> None:
    """HEAD answered 405 at once; it is the GET that timed out."""
    o = _one(f"{base}/get-slow", timeout=0.5)
    assert (o.error, o.method) == ("timeout after 0.5 s", "GET")
