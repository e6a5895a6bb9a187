"""The link-checker benchmark: its slow server, the files it hands LinkChecker, how it reads
LinkChecker's report, and a whole run on loopback hosts (no network)."""

import multiprocessing
import os
import shutil
import socket
import stat
import sys
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from site_gen.links import LinkConfig

from .conftest import load_script

links = load_script("links_throughput")


@pytest.fixture
def slow_server():
    """The benchmark's server on two loopback hosts, 50 ms per answer, with the LinkChecker header."""
    addresses = ["127.0.0.2", "127.0.0.3"]
    port = links.free_port(addresses)
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=links.serve, args=(addresses, port, 0.05, True, ready), daemon=True)
    server.start()
    assert ready.wait(10)
    yield addresses, port
    server.terminate()
    server.join(5)


def test_every_host_answers_any_path_with_200_after_the_latency(slow_server):
    addresses, port = slow_server
    for address in addresses:
        began = time.perf_counter()
        got = requests.get(f"http://{address}:{port}/any/path/7", timeout=5)
        assert time.perf_counter() - began >= 0.05
        assert got.status_code == 200 and got.text == links.SlowOK.body.decode()
        assert got.headers["Content-Type"] == "text/html" and got.headers["LinkChecker"] == "full speed allowed"
        head = requests.head(f"http://{address}:{port}/other", timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(links.SlowOK.body))


def test_a_free_port_is_one_every_address_can_bind():
    addresses = ["127.0.0.2", "127.0.0.3"]
    first = links.free_port(addresses)
    with closing(socket.socket()) as taken:  # the port taken on the second address only
        taken.bind((addresses[1], first))
        second = links.free_port(addresses)
        assert second != first and 18000 <= second < 19000
        for address in addresses:
            with closing(socket.socket()) as probe:
                probe.bind((address, second))


def test_ours_is_timed_over_the_whole_list_and_a_broken_url_fails_the_run(slow_server):
    addresses, port = slow_server
    urls = [f"http://{addresses[i % 2]}:{port}/page/{i}" for i in range(8)]
    config = LinkConfig(per_host=4, min_interval=0.0, workers=8, attempts=1, timeout=5)
    assert 0.05 <= links.time_ours(urls, config) < 5
    with closing(socket.socket()) as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    with pytest.raises(AssertionError, match="1 URLs failed"):
        links.time_ours(urls + [f"http://127.0.0.1:{closed_port}/refused"], config)


def test_linkchecker_gets_a_page_of_every_url_and_a_readable_rc_file(request):
    urls = ["http://127.0.0.2:18000/page/0", "http://127.0.0.3:18000/page/1"]
    page, rc = links.linkchecker_files(urls, threads=7, per_second=2.5)
    request.addfinalizer(lambda: shutil.rmtree(page.parent))
    assert page.read_text(encoding="utf-8").splitlines()[1:] == [f'<a href="{u}">{i}</a>' for i, u in enumerate(urls)]
    assert rc.read_text(encoding="utf-8") == ("[checking]\nthreads=7\nmaxrequestspersecond=2.5\ntimeout=30\n"
                                              "[output]\nstatus=0\n")
    assert stat.S_IMODE(page.parent.stat().st_mode) == 0o755  # LinkChecker run as root drops to nobody
    assert {stat.S_IMODE(p.stat().st_mode) for p in (page, rc)} == {0o644}


def fake_linkchecker(tmp_path, report):
    """An executable that records its arguments and the page it was given, and prints ``report``
    as LinkChecker's summary."""
    script = tmp_path / "linkchecker"
    record = (f"open({str(tmp_path / 'args')!r}, 'w').write(' '.join(sys.argv[1:]))\n"
              f"open({str(tmp_path / 'page.html')!r}, 'w').write(open(sys.argv[-1]).read())")
    script.write_text(f"#!{sys.executable}\nimport sys\n{record}\nprint({report!r})\n", encoding="utf-8")
    script.chmod(0o755)
    return script


def test_linkcheckers_report_must_count_every_url_and_no_error(tmp_path):
    page, rc = tmp_path / "links.html", tmp_path / "rc"
    page.write_text("<a href=x>0</a>", encoding="utf-8")
    good = fake_linkchecker(tmp_path, "That's it. 12 links in 11 URLs checked. 0 warnings found. 0 errors found.")
    assert links.time_linkchecker(str(good), page, rc, 11) > 0
    assert (tmp_path / "args").read_text().split() == [
        "-f", str(rc), "-r", "1", "--check-extern", "--no-status", "--no-warnings", str(page)]
    with pytest.raises(AssertionError):  # fewer URLs checked than listed
        links.time_linkchecker(str(good), page, rc, 12)
    failing = fake_linkchecker(tmp_path, "That's it. 12 links in 11 URLs checked. 0 warnings found. 2 errors found.")
    with pytest.raises(AssertionError, match="2 errors found"):
        links.time_linkchecker(str(failing), page, rc, 11)


def test_a_whole_run_times_both_checkers_on_the_same_urls_and_prints_their_ratio(tmp_path, monkeypatch, capsys):
    report = "That's it. 30 links in 30 URLs checked. 0 warnings found. 0 errors found."
    binary = fake_linkchecker(tmp_path, report)
    monkeypatch.setattr(sys, "argv", ["links_throughput.py", "--urls", "30", "--hosts", "3", "--latency", "0.01",
                                      "--repeats", "2", "--linkchecker", str(binary), "--lc-threads", "4"])
    links.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("30 URLs on 3 hosts, 10 ms per request, 2 runs each; ")
    assert lines[1].startswith("site_gen links  per_host=4 workers=50: median ") and lines[1].count(", ") == 1
    assert lines[2].startswith("linkchecker    threads=4 maxrequestspersecond=10: median ")
    page = Path((tmp_path / "args").read_text().split()[-1])
    assert not page.parent.exists()  # the page and rc file LinkChecker read are removed after its runs
    anchors = (tmp_path / "page.html").read_text(encoding="utf-8").splitlines()[1:]
    hosts = [anchor.split('"')[1].split("/")[2].rsplit(":", 1)[0] for anchor in anchors]
    assert hosts == ["127.0.0.2", "127.0.0.3", "127.0.0.4"] * 10  # spread evenly, in turn
    ours, theirs = (float(line.split("median ")[1].split(" s")[0]) for line in lines[1:3])
    ratio = float(lines[3].removeprefix("throughput ratio (ours / linkchecker): ").removesuffix("x"))
    assert (theirs - 0.005) / (ours + 0.005) - 0.05 <= ratio <= (theirs + 0.005) / (ours - 0.005) + 0.05


class RecordedProcess(multiprocessing.Process):
    """multiprocessing.Process that remembers every instance, to see the server go after a failure."""
    started: list = []

    def start(self):
        RecordedProcess.started.append(self)
        super().start()


def never_ready(addresses, port, latency, opt_in, ready):
    time.sleep(60)  # a server that never says it listens


@pytest.mark.parametrize("failure", ["server never ready", "checker fails"])
def test_a_failed_run_stops_the_server_process(monkeypatch, capsys, failure):
    RecordedProcess.started = []
    monkeypatch.setattr(links.mp, "Process", RecordedProcess)
    monkeypatch.setattr(sys, "argv", ["links_throughput.py", "--urls", "4", "--hosts", "2", "--repeats", "1"])
    if failure == "server never ready":
        monkeypatch.setattr(links, "serve", never_ready)
        monkeypatch.setattr(links, "SERVER_START_TIMEOUT", 0.2)
        with pytest.raises(SystemExit, match=r"the local server on 127.0.0.2, 127.0.0.3 port \d+ did not start "
                                             r"within 0.2 s"):
            links.main()
    else:
        monkeypatch.setattr(links, "time_ours", lambda urls, config: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            links.main()
    server, = RecordedProcess.started
    server.join(5)
    assert not server.is_alive() and server.exitcode == -15  # terminated (SIGTERM)


class BindsOnly:
    """socket.socket stand-in whose bind succeeds only for the ports in ``free``."""
    free: set = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, address):
        if address[1] not in BindsOnly.free:
            raise OSError("address in use")


def test_free_port_searches_18000_to_18999_from_the_bottom_and_says_when_none_is_free(monkeypatch):
    monkeypatch.setattr(socket, "socket", BindsOnly)
    BindsOnly.free = set(range(17000, 20000))
    assert links.free_port(["127.0.0.2", "127.0.0.3"]) == 18000
    BindsOnly.free = {17999, 19000}  # free, but outside the benchmark's range
    with pytest.raises(RuntimeError, match="no free port"):
        links.free_port(["127.0.0.2"])


def test_linkchecker_time_is_the_clock_difference_around_its_run(tmp_path, monkeypatch):
    """The clock is faked: the time reported is the end reading minus the start reading."""
    page, rc = tmp_path / "links.html", tmp_path / "rc"
    page.write_text("<a href=x>0</a>", encoding="utf-8")
    good = fake_linkchecker(tmp_path, "That's it. 1 link in 1 URL checked. 0 warnings found. 0 errors found.")
    readings = iter([100.0, 102.5])
    monkeypatch.setattr(links, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    assert links.time_linkchecker(str(good), page, rc, 1) == 2.5


def test_a_linkchecker_run_without_a_summary_fails_showing_its_stdout_and_stderr(tmp_path):
    page, rc = tmp_path / "links.html", tmp_path / "rc"
    page.write_text("<a href=x>0</a>", encoding="utf-8")
    crashing = tmp_path / "linkchecker"
    crashing.write_text(f"#!{sys.executable}\nimport sys\nprint('checking started')\n"
                        "sys.stderr.write('Traceback: config error')\nsys.exit(2)\n", encoding="utf-8")
    crashing.chmod(0o755)
    with pytest.raises(AssertionError) as failure:
        links.time_linkchecker(str(crashing), page, rc, 1)
    assert "checking started" in str(failure.value) and "Traceback: config error" in str(failure.value)


def test_linkcheckers_files_are_links_html_and_linkcheckerrc_in_a_fresh_lc_bench_folder(request):
    """The lc-bench- prefix identifies a folder a killed run left in the temp directory."""
    page, rc = links.linkchecker_files(["http://127.0.0.2:18000/page/0"], threads=1, per_second=1)
    request.addfinalizer(lambda: shutil.rmtree(page.parent))
    assert page.parent == rc.parent and page.parent.name.startswith("lc-bench-")
    assert (page.name, rc.name) == ("links.html", "linkcheckerrc")  # LinkChecker parses a local file by its suffix


class FakeServerProcess:
    """Stands in for the server process: remembers how it was made, is ready at once, serves nothing."""

    def __init__(self, target, args, **kwargs):
        self.target, self.args, self.terminated = target, args, False

    def start(self):
        self.args[-1].set()

    def terminate(self):
        self.terminated = True


@pytest.fixture
def run_main(monkeypatch, capsys):
    """main() with the server, the port search and both timed runs replaced; returns what it printed and
    what each stand-in was given. The linkchecker stand-in reads the page and rc file while they exist."""
    def run(arguments, ours_seconds, theirs_seconds=()):
        seen = SimpleNamespace(servers=[], ours=[], theirs=[], port_for=None)
        ours_left, theirs_left = iter(ours_seconds), iter(theirs_seconds)

        def process(target, args, **kwargs):
            seen.servers.append(FakeServerProcess(target, args, **kwargs))
            return seen.servers[-1]

        def free_port(addresses):
            seen.port_for = addresses
            return 18123

        def time_ours(urls, config):
            seen.ours.append((urls, config))
            return next(ours_left)

        def time_linkchecker(binary, page, rc, n_urls):
            seen.theirs.append((binary, page.read_text(encoding="utf-8"), rc.read_text(encoding="utf-8"), n_urls))
            return next(theirs_left)

        monkeypatch.setattr(links.mp, "Process", process)
        monkeypatch.setattr(links, "free_port", free_port)
        monkeypatch.setattr(links, "time_ours", time_ours)
        monkeypatch.setattr(links, "time_linkchecker", time_linkchecker)
        monkeypatch.setattr(sys, "argv", ["links_throughput.py", *arguments])
        links.main()
        seen.lines = capsys.readouterr().out.splitlines()
        return seen
    return run


def test_by_default_ours_checks_1000_urls_on_10_hosts_with_the_documented_settings(run_main):
    """docs/benchmarks-links.md: 1,000 URLs, 100 on each of 127.0.0.2 ... 127.0.0.11, 50 ms per request;
    ours with per_host=4, min_interval=0, 50 threads, one attempt, the 30 s timeout LinkChecker gets too."""
    seen = run_main([], ours_seconds=[2.0, 1.0, 4.0, 5.0, 3.0])
    hosts = [f"127.0.0.{i}" for i in range(2, 12)]
    assert seen.port_for == hosts
    server, = seen.servers
    assert server.target is links.serve and server.args[:4] == (hosts, 18123, 0.05, False) and server.terminated
    assert len(seen.ours) == 5  # default --repeats
    urls, config = seen.ours[0]
    assert all(run == (urls, config) for run in seen.ours)
    assert len(urls) == 1000 == len(set(urls))
    assert [url.split("/")[2] for url in urls[:10]] == [f"{host}:18123" for host in hosts]
    assert {host: sum(f"//{host}:" in url for url in urls) for host in hosts} == dict.fromkeys(hosts, 100)
    assert (config.per_host, config.min_interval, config.workers, config.attempts, config.timeout) == (4, 0, 50, 1, 30)
    assert seen.lines == [f"1000 URLs on 10 hosts, 50 ms per request, 5 runs each; {os.cpu_count()} CPUs",
                          "site_gen links  per_host=4 workers=50: median 3.00 s (333 URLs/s); "
                          "runs 2.00, 1.00, 4.00, 5.00, 3.00"]


def test_by_default_linkchecker_gets_its_own_defaults_and_the_rows_give_medians_rates_and_the_ratio(run_main):
    """LinkChecker's defaults (docs table): 10 threads, maxrequestspersecond=10, on every URL ours checked."""
    seen = run_main(["--repeats", "3", "--linkchecker", "/opt/lc/bin/linkchecker"],
                    ours_seconds=[2.0, 2.5, 1.5], theirs_seconds=[40.0, 60.0, 50.0])
    assert len(seen.theirs) == 3
    binary, page, rc, n_urls = seen.theirs[0]
    assert (binary, n_urls) == ("/opt/lc/bin/linkchecker", 1000)
    assert "threads=10\nmaxrequestspersecond=10\n" in rc
    assert [line.split('"')[1] for line in page.splitlines()[1:]] == seen.ours[0][0]
    assert seen.lines[1:] == [
        "site_gen links  per_host=4 workers=50: median 2.00 s (500 URLs/s); runs 2.00, 2.50, 1.50",
        "linkchecker    threads=10 maxrequestspersecond=10: median 50.00 s (20 URLs/s); runs 40.00, 60.00, 50.00",
        "throughput ratio (ours / linkchecker): 25.0x"]


def test_the_opt_in_flag_a_fractional_rate_and_the_latency_reach_the_server_rc_file_and_rows(run_main):
    """As in the docs' full-speed command: --lc-opt-in is a flag that makes the server send the header and
    is named in LinkChecker's row; --lc-rate may be fractional; the latency is printed in ms."""
    seen = run_main(["--repeats", "1", "--latency", "2", "--linkchecker", "lc", "--lc-opt-in", "--lc-rate", "2.5"],
                    ours_seconds=[1.0], theirs_seconds=[4.0])
    assert seen.servers[0].args[2:4] == (2.0, True)
    assert "maxrequestspersecond=2.5\n" in seen.theirs[0][2]
    assert seen.lines[0].startswith("1000 URLs on 10 hosts, 2000 ms per request, 1 runs each; ")
    assert seen.lines[2] == ("linkchecker    threads=10 maxrequestspersecond=2.5 opt-in header: median 4.00 s "
                             "(250 URLs/s); runs 4.00")
