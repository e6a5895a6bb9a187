"""Link-check throughput: site_gen's checker against LinkChecker on the same 1,000 URLs.

Setup: one server process runs a ThreadingHTTPServer on each of ``--hosts`` loopback
addresses (127.0.0.2, 127.0.0.3, ...), so per-host limits apply as they would on the web;
every request (HEAD or GET) waits ``--latency`` seconds before a 200 answer. The URLs are
spread evenly over the hosts. Both tools check the same URLs; LinkChecker reads them from
a generated HTML page (``-r 1 --check-extern``), ours gets the list. Wall-clock time of
whole runs, median of ``--repeats``.

    python benchmarks/links_throughput.py --linkchecker /tmp/lc-venv/bin/linkchecker

LinkChecker must live in its own virtual environment (never this project's); without
``--linkchecker`` only our checker is measured.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from site_gen.links import LinkConfig, check_all  # noqa: E402

SERVER_START_TIMEOUT = 10  # seconds for the server process to listen on every address


class SlowOK(BaseHTTPRequestHandler):
    """Every path answers 200 after a fixed delay, like a distant but healthy site."""

    protocol_version = "HTTP/1.1"
    latency = 0.05
    opt_in = False          # send the header that lets LinkChecker drop its 0.1-0.6 s per-host pause
    body = b"<!doctype html><title>ok</title>ok"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        time.sleep(self.latency)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        if self.opt_in:
            self.send_header("LinkChecker", "full speed allowed")
        self.end_headers()
        if with_body:
            self.wfile.write(self.body)

    def do_HEAD(self) -> None:
        self._answer(False)

    def do_GET(self) -> None:
        self._answer(True)


def serve(addresses: list[str], port: int, latency: float, opt_in: bool, ready: mp.Event) -> None:
    """Child process: one threading server per address, until terminated."""
    import threading

    SlowOK.latency, SlowOK.opt_in = latency, opt_in
    ThreadingHTTPServer.request_queue_size = 512
    ThreadingHTTPServer.daemon_threads = True
    for address in addresses:
        httpd = ThreadingHTTPServer((address, port), SlowOK)
        httpd.handle_error = lambda request, client: None  # clients closing idle keep-alive sockets
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ready.set()
    threading.Event().wait()


def free_port(addresses: list[str]) -> int:
    import socket

    for port in range(18000, 19000):
        try:
            for a in addresses:
                with socket.socket() as s:
                    s.bind((a, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def time_ours(urls: list[str], config: LinkConfig) -> float:
    started = time.perf_counter()
    outcomes = check_all(urls, config)
    elapsed = time.perf_counter() - started
    bad = [o for o in outcomes if not o.ok]
    assert not bad, f"{len(bad)} URLs failed, e.g. {bad[0]}"
    return elapsed


def time_linkchecker(binary: str, page: Path, rc: Path, n_urls: int) -> float:
    command = [binary, "-f", str(rc), "-r", "1", "--check-extern", "--no-status", "--no-warnings", str(page)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    found = re.search(r"(\d+) links? in (\d+) URLs? checked", done.stdout)
    assert found and int(found.group(2)) >= n_urls, done.stdout[-2000:] + done.stderr[-2000:]
    assert "0 errors found" in done.stdout, done.stdout[-2000:]
    return elapsed


def linkchecker_files(urls: list[str], threads: int, per_second: float) -> tuple[Path, Path]:
    """An HTML page with every URL and an rc file; world-readable (LinkChecker drops root to nobody)."""
    folder = Path(tempfile.mkdtemp(prefix="lc-bench-"))
    folder.chmod(0o755)
    page = folder / "links.html"
    page.write_text("<!doctype html><title>links</title>\n" +
                    "\n".join(f'<a href="{u}">{i}</a>' for i, u in enumerate(urls)), encoding="utf-8")
    rc = folder / "linkcheckerrc"
    rc.write_text(f"[checking]\nthreads={threads}\nmaxrequestspersecond={per_second}\ntimeout=30\n"
                  "[output]\nstatus=0\n", encoding="utf-8")
    for path in (page, rc):
        path.chmod(0o644)
    return page, rc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-host", type=int, default=4, help="our concurrent requests per host")
    parser.add_argument("--workers", type=int, default=50, help="our threads in all")
    parser.add_argument("--linkchecker", help="path to the linkchecker executable (separate venv)")
    parser.add_argument("--lc-threads", type=int, default=10, help="LinkChecker threads (its default: 10)")
    parser.add_argument("--lc-rate", type=float, default=10, help="LinkChecker maxrequestspersecond per host (default 10)")
    parser.add_argument("--lc-opt-in", action="store_true",
                        help="servers send a 'LinkChecker' header; only then does LinkChecker pace a host by "
                             "maxrequestspersecond instead of a random 0.1-0.6 s pause between requests")
    args = parser.parse_args()

    addresses = [f"127.0.0.{i + 2}" for i in range(args.hosts)]
    port = free_port(addresses)
    ready = mp.Event()
    server = mp.Process(target=serve, args=(addresses, port, args.latency, args.lc_opt_in, ready), daemon=True)
    server.start()
    try:  # whatever fails from here on, the server process goes too
        if not ready.wait(SERVER_START_TIMEOUT):
            sys.exit(f"the local server on {', '.join(addresses)} port {port} did not start "
                     f"within {SERVER_START_TIMEOUT} s")
        urls = [f"http://{addresses[i % args.hosts]}:{port}/page/{i}" for i in range(args.urls)]
        ours_config = LinkConfig(per_host=args.per_host, min_interval=0.0, workers=args.workers, attempts=1,
                                 timeout=30)
        print(f"{args.urls} URLs on {args.hosts} hosts, {args.latency * 1000:.0f} ms per request, "
              f"{args.repeats} runs each; {os.cpu_count()} CPUs")
        ours = [time_ours(urls, ours_config) for _ in range(args.repeats)]
        med = statistics.median(ours)
        print(f"site_gen links  per_host={args.per_host} workers={args.workers}: median {med:.2f} s "
              f"({args.urls / med:.0f} URLs/s); runs {', '.join(f'{t:.2f}' for t in ours)}")
        if args.linkchecker:
            page, rc = linkchecker_files(urls, args.lc_threads, args.lc_rate)
            try:
                theirs = [time_linkchecker(args.linkchecker, page, rc, args.urls) for _ in range(args.repeats)]
            finally:
                shutil.rmtree(page.parent)
            lc = statistics.median(theirs)
            print(f"linkchecker    threads={args.lc_threads} maxrequestspersecond={args.lc_rate:g}"
                  f"{' opt-in header' if args.lc_opt_in else ''}: median {lc:.2f} s "
                  f"({args.urls / lc:.0f} URLs/s); runs {', '.join(f'{t:.2f}' for t in theirs)}")
            print(f"throughput ratio (ours / linkchecker): {lc / med:.1f}x")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
