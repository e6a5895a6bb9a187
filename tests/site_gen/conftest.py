"""Shared helpers for site_gen tests: a small valid catalogue copied into tmp_path."""

from __future__ import annotations

import re
import shutil
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from site_gen.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
collect_ignore_glob = ["fixtures/*"]
LINK = re.compile(r"(?<!\\)\[((?:\\.|[^\]\\])*)\]\(([^)\s]*)\)")  # a Markdown link; group 2 is its URL
ITEM = re.compile(r"^\s*- ")


class RoutedHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 test server's handler: HEAD and GET both go to ``_route(head)``, which
    a test's subclass writes to answer its routes."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        raise NotImplementedError


def main_links(text: str) -> list[tuple[int, str]]:
    """(line, URL) of each link awesome-lint's double-link rule counts: the first link of a list
    item, and every link outside list items. Later links of an item (arXiv, Code, ...) may repeat."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        urls = [m.group(2) for m in LINK.finditer(line)]
        found += [(number, url) for url in (urls[:1] if ITEM.match(line) else urls)]
    return found


def repeated(links: list[tuple[int, str]]) -> dict[str, list[int]]:
    """URL -> its lines, for each URL that appears more than once in ``links``."""
    lines: dict[str, list[int]] = {}
    for number, url in links:
        lines.setdefault(url, []).append(number)
    return {url: numbers for url, numbers in lines.items() if len(numbers) > 1}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the small fixture project (catalog/, reference_impls/, tests/)."""
    root = tmp_path / "project"
    shutil.copytree(FIXTURES / "small", root, ignore=shutil.ignore_patterns("README.golden.md"))
    return root


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``python -m site_gen ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def edit_catalogue(project: Path, file: str, old: str, new: str) -> None:
    """Replace the first ``old`` in one catalogue file of ``project`` (which must contain it)."""
    path = project / "catalog" / file
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.fixture
def rename_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """write_atomic's final rename fails (as on a full disk): nothing may be left half-written."""
    import site_gen.output

    def refuse(src: str, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(site_gen.output.os, "replace", refuse)


@pytest.fixture
def recorded_sleeps(monkeypatch: pytest.MonkeyPatch):
    """``record(module) -> pauses``: the module's ``time.sleep`` calls are recorded instead of slept."""

    def record(module: object) -> list[float]:
        pauses: list[float] = []
        monkeypatch.setattr(module, "time", types.SimpleNamespace(
            sleep=pauses.append, monotonic=time.monotonic, time=time.time))
        return pauses

    return record


@pytest.fixture
def local_server():
    """``start(handler_class) -> server`` on a free port of 127.0.0.1, shut down after the test.

    Handler threads are daemons and their errors are swallowed: several tests stall an answer
    on purpose, and the client hangs up on it."""
    started: list[ThreadingHTTPServer] = []

    def start(handler: type) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.handle_error = lambda request, address: None
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        started.append(httpd)
        return httpd

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()
