"""``python -m site_gen links``: is every external URL of the catalogue still alive?

Design, in the order a URL meets it:

- collect: paper ``url``/``code``, dataset ``homepage``, codebase ``url``, and the arXiv and
  DOI links derived from identifiers; one check per distinct URL, remembering every source;
- cache: a URL found alive less than ``max_age_hours`` ago is not asked again;
- schedule: URLs are grouped by host; each host gets at most ``per_host`` lanes (threads
  working through its queue), and a ``HostGate`` keeps ``min_interval`` seconds between
  request starts to that host, across lanes and redirects;
- request: HEAD without body; 403/405/501 on HEAD -> GET with ``stream=True``, reading at
  most ``byte_cap`` bytes; redirects are followed by hand (only to http(s), at most
  ``max_redirects``, loops detected); 429, 5xx and timeouts are retried with exponential
  backoff, and a Retry-After pauses the whole host;
- report: a terminal summary, JSON, and Markdown for ``$GITHUB_STEP_SUMMARY``; exit 1 when
  any link is broken.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .catalogue import Catalogue
from .metadata import USER_AGENT, retry_after
from .output import write_atomic

RETRY = frozenset({429, 500, 502, 503, 504})


# --- configuration ---------------------------------------------------------------------------

class HostRule(BaseModel):
    """Overrides for one host (and its subdomains)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    skip: str | None = None                 # reason for not checking this host at all
    accept: list[int] = []                  # extra status codes that count as alive here, ...
    reason: str | None = None               # ... and why
    per_host: int | None = Field(default=None, ge=1)
    min_interval: float | None = Field(default=None, ge=0)


class LinkConfig(BaseModel):
    """catalog/links.yaml; every field has a default so the file is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    accept: list[int] = [200, 203, 204, 206]
    head_fallback: list[int] = [403, 405, 501]
    timeout: float = Field(default=15.0, gt=0)
    attempts: int = Field(default=3, ge=1)
    backoff: float = Field(default=2.0, ge=0)
    max_wait: float = Field(default=120.0, ge=0)     # cap on one Retry-After pause
    max_redirects: int = Field(default=10, ge=0)
    per_host: int = Field(default=2, ge=1)
    min_interval: float = Field(default=0.5, ge=0)
    workers: int = Field(default=32, ge=1)
    byte_cap: int = Field(default=2048, ge=1)
    max_age_hours: float = Field(default=168.0, ge=0)
    arxiv_base: str = "https://arxiv.org/abs/"
    doi_base: str = "https://doi.org/"
    hosts: dict[str, HostRule] = {}

    def rule(self, host: str) -> HostRule:
        """The rule for ``host``: an exact entry, else the closest parent domain's, else none."""
        host = host.lower()
        while host:
            if host in self.hosts:
                return self.hosts[host]
            host = host.partition(".")[2]
        return HostRule()


def load_config(path: Path | None, *, required: bool = False) -> LinkConfig:
    """Settings from ``path``; a missing file means the defaults unless it was named (``--config``)."""
    if path is None or not path.exists():
        if required:
            raise SystemExit(f"{path}: no such link configuration file")
        return LinkConfig()
    try:
        return LinkConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except UnicodeDecodeError as exc:
        raise SystemExit(f"{path}: not valid UTF-8 (byte 0x{exc.object[exc.start]:02x}); save it as UTF-8") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise SystemExit(f"{path}: invalid link configuration:\n{exc}") from None


# --- what to check -----------------------------------------------------------------------------

@dataclass
class Link:
    url: str
    sources: list[str] = field(default_factory=list)   # "papers.yaml:pcgrad:url"


def collect_links(cat: Catalogue, config: LinkConfig) -> list[Link]:
    """Every distinct external URL, in catalogue order, with where it is used."""
    found: dict[str, Link] = {}

    def add(url: str | None, file: str, entry: str, what: str) -> None:
        if url:
            found.setdefault(url, Link(url)).sources.append(f"{file}:{entry}:{what}")

    for p in cat.papers:
        add(p.url, "papers.yaml", p.id, "url")
        for u in p.code:
            add(u, "papers.yaml", p.id, "code")
        if p.arxiv:
            add(f"{config.arxiv_base}{p.arxiv}", "papers.yaml", p.id, "arxiv")
        if p.doi:
            add(f"{config.doi_base}{p.doi}", "papers.yaml", p.id, "doi")
    for d in cat.datasets:
        add(d.homepage, "datasets.yaml", d.id, "homepage")
    for c in cat.codebases:
        add(c.url, "codebases.yaml", c.id, "url")
    return list(found.values())


# --- the result of one check -------------------------------------------------------------------

@dataclass
class Outcome:
    url: str
    ok: bool
    status: int | None = None
    error: str | None = None
    final_url: str | None = None
    redirects: int = 0
    attempts: int = 0
    method: str = "HEAD"
    seconds: float = 0.0
    skipped: str | None = None
    cached: bool = False
    checked_at: float = 0.0

    @property
    def label(self) -> str:
        if self.skipped:
            return "skipped"
        return str(self.status) if self.status is not None and not self.error else (self.error or "?")


# --- politeness --------------------------------------------------------------------------------

class HostGate:
    """At most ``slots`` requests in flight to a host, starts at least ``interval`` s apart."""

    def __init__(self, slots: int, interval: float):
        self._slots = threading.Semaphore(slots)
        self._lock = threading.Lock()
        self._interval = interval
        self._next = 0.0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._slots:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next)
                self._next = start + self._interval
            if start > now:
                time.sleep(start - now)
            yield

    def pause(self, seconds: float) -> None:
        """Retry-After: no request to this host before ``seconds`` from now."""
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


class Gates:
    def __init__(self, config: LinkConfig):
        self._config = config
        self._gates: dict[str, HostGate] = {}
        self._lock = threading.Lock()

    def __getitem__(self, host: str) -> HostGate:
        with self._lock:
            if host not in self._gates:
                rule = self._config.rule(host)
                self._gates[host] = HostGate(rule.per_host or self._config.per_host,
                                             self._config.min_interval if rule.min_interval is None
                                             else rule.min_interval)
            return self._gates[host]


# --- checking one URL --------------------------------------------------------------------------

def _request(session: requests.Session, url: str, config: LinkConfig, method: list[str]) -> requests.Response:
    """HEAD; if the server dislikes HEAD, a GET that reads no more than ``byte_cap`` bytes. ``method``
    holds the request being made, so a GET that fails is reported as the GET."""
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    method[0] = "HEAD"
    response = session.head(url, allow_redirects=False, timeout=config.timeout, headers=headers)
    response.close()
    if response.status_code not in config.head_fallback:
        return response
    method[0] = "GET"
    response = session.get(url, allow_redirects=False, timeout=config.timeout, headers=headers, stream=True)
    try:
        next(response.iter_content(chunk_size=config.byte_cap), b"")
    except requests.RequestException:
        pass  # the status line is what we wanted; a broken body does not make the link dead
    finally:
        response.close()
    return response


def _fetch(url: str, session: requests.Session, gates: Gates, config: LinkConfig
           ) -> tuple[requests.Response | None, str | None, int, str]:
    """One URL, with retries: (response, error, attempts, method)."""
    host = (urlsplit(url).hostname or "").lower()
    gate = gates[host]
    problem, method = "", ["HEAD"]
    for attempt in range(1, config.attempts + 1):
        wait = config.backoff * 2 ** (attempt - 1)
        try:
            with gate.turn():
                response = _request(session, url, config, method)
        except requests.Timeout:
            problem = f"timeout after {config.timeout:g} s"
        except requests.ConnectionError as exc:
            return None, f"connection failed ({_short_reason(exc)})", attempt, method[0]
        except (requests.RequestException, ValueError) as exc:
            # ValueError: urllib3 refusing a host ('example..org'), requests decoding a Location that is not UTF-8
            return None, f"request failed ({type(exc).__name__})", attempt, method[0]
        else:
            if response.status_code not in RETRY or attempt == config.attempts:
                return response, None, attempt, method[0]
            header = response.headers.get("Retry-After")
            if header:
                gate.pause(min(retry_after(header, default=wait), config.max_wait))
                continue
        if attempt < config.attempts:
            time.sleep(min(wait, config.max_wait))
    return None, problem, config.attempts, method[0]


def _location(response: requests.Response) -> str | None:
    """The Location header as the server sent it: http.client reads header bytes as Latin-1, so UTF-8
    bytes ('/café') are decoded again, as requests does when it follows redirects itself."""
    value = response.headers.get("Location")
    try:
        return value.encode("latin-1").decode("utf-8") if value else value
    except UnicodeError:
        return value


def _short_reason(exc: Exception) -> str:
    text = str(exc)
    for hint in ("Connection refused", "Name or service not known", "Connection reset",
                 "No route to host", "certificate verify failed"):
        if hint.lower() in text.lower():
            return hint.lower()
    return type(exc).__name__


def check_url(url: str, session: requests.Session, gates: Gates, config: LinkConfig) -> Outcome:
    """Follow redirects by hand so each hop is vetted (scheme, loops, count) and rate-limited."""
    started = time.monotonic()
    chain = [url]
    attempts = 0

    def done(**fields: Any) -> Outcome:
        return Outcome(url=url, redirects=len(chain) - 1, attempts=attempts, final_url=chain[-1],
                       seconds=round(time.monotonic() - started, 3), checked_at=time.time(), **fields)

    while True:
        current = chain[-1]
        parts = urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            what = "redirect to a non-http(s) URL" if len(chain) > 1 else "not an http(s) URL"
            return done(ok=False, error=f"{what}: {current}")
        rule = config.rule(parts.hostname)
        if rule.skip:
            return done(ok=True, skipped=rule.skip)
        response, error, tries, method = _fetch(current, session, gates, config)
        attempts += tries
        if error:
            return done(ok=False, error=error, method=method)
        status = response.status_code
        location = _location(response)
        if 300 <= status < 400 and status != 304 and location:
            try:
                target = urljoin(current, location.strip())
            except ValueError:  # 'http://[oops/': not a URL at all
                return done(ok=False, status=status, method=method, error=f"bad redirect target: {location!r}")
            if target in chain:
                chain.append(target)
                return done(ok=False, status=status, method=method,
                            error=f"redirect loop ({len(chain) - 1} hops)")
            if len(chain) > config.max_redirects:
                return done(ok=False, status=status, method=method,
                            error=f"more than {config.max_redirects} redirects")
            chain.append(target)
            continue
        ok = status in config.accept or status in rule.accept
        return done(ok=ok, status=status, method=method)


# --- the cache ---------------------------------------------------------------------------------

class Cache:
    """URL -> last outcome, as JSON. Only live links are reused, and only while fresh."""

    def __init__(self, path: Path | None, max_age_hours: float, *, own_folder: bool = True):
        self.path = path
        self.max_age = max_age_hours * 3600
        self.own_folder = own_folder  # the default .cache/ folder: keep it out of git
        self.entries: dict[str, dict[str, Any]] = {}
        self.foreign = False  # an existing file that is no link cache: not to be overwritten when named
        if path and path.exists():
            data = _read_json(path)
            self.foreign = not _is_cache(data)
            self.entries = _cache_entries(data)

    def fresh(self, url: str, now: float) -> Outcome | None:
        entry = self.entries.get(url)
        if not entry or not entry.get("ok") or entry.get("skipped") or now - entry.get("checked_at", 0) > self.max_age:
            return None
        known = {k: v for k, v in entry.items() if k in Outcome.__dataclass_fields__}
        return Outcome(**{**known, "cached": True})

    def save(self, outcomes: list[Outcome]) -> None:
        if self.path is None:
            return
        for o in outcomes:
            if not o.cached and not o.skipped:
                self.entries[o.url] = {k: v for k, v in asdict(o).items() if k != "cached"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ignore = self.path.parent / ".gitignore"
        if self.own_folder and not ignore.exists():  # keep .cache/ out of git, the project's .gitignore untouched
            ignore.write_text("# written by python -m site_gen links\n*\n", encoding="utf-8")
        write_atomic(self.path, json.dumps({"version": 1, "results": self.entries}, indent=1, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8
        return None


def _is_cache(data: Any) -> bool:
    """Is ``data`` what ``Cache.save`` writes (so ``--cache`` may overwrite its file)?"""
    return isinstance(data, dict) and "version" in data and isinstance(data.get("results"), dict)


def _cache_entries(data: Any) -> dict[str, dict[str, Any]]:
    """The entries of a cache file that have the shape ``save`` writes; anything else is dropped (the
    file comes back from CI caches of older runs, or from a wrong ``--cache``)."""
    if not _is_cache(data):
        return {}
    return {url: entry for url, entry in data["results"].items()
            if isinstance(entry, dict) and entry.get("url") == url and isinstance(entry.get("checked_at"), (int, float))
            and not isinstance(entry.get("checked_at"), bool)}


# --- progress ----------------------------------------------------------------------------------

class Progress:
    """A plain-text bar on stderr: redrawn in place on a terminal, every 10% in a log."""

    def __init__(self, total: int, stream: Any = None, enabled: bool = True):
        self.total, self.done, self.broken = total, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._lock = threading.Lock()
        self._last_decile = -1

    def step(self, outcome: Outcome) -> None:
        with self._lock:
            self.done += 1
            self.broken += not outcome.ok
            if not self.enabled:
                return
            decile = self.done * 10 // self.total
            if self.tty or decile != self._last_decile:
                self._last_decile = decile
                filled = self.done * 30 // self.total
                line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} checked, {self.broken} broken"
                self.stream.write(("\r" + line) if self.tty else line + "\n")
                if self.tty and self.done == self.total:
                    self.stream.write("\n")
                self.stream.flush()


# --- running everything ------------------------------------------------------------------------

def check_all(urls: list[str], config: LinkConfig, *, cache: Cache | None = None,
              progress: Progress | None = None,
              session_factory: Callable[[], requests.Session] = requests.Session) -> list[Outcome]:
    """Check ``urls`` concurrently; outcomes come back in the order of ``urls``."""
    now = time.time()
    results: dict[str, Outcome] = {}
    queues: dict[str, deque[str]] = {}
    for url in dict.fromkeys(urls):
        hit = cache.fresh(url, now) if cache else None
        if hit:
            results[url] = hit
            if progress:
                progress.step(hit)
        else:
            queues.setdefault((urlsplit(url).hostname or "").lower(), deque()).append(url)
    gates = Gates(config)

    def lane(host: str) -> None:
        with session_factory() as session:
            while True:
                try:
                    url = queues[host].popleft()
                except IndexError:
                    return
                outcome = check_url(url, session, gates, config)
                results[url] = outcome
                if progress:
                    progress.step(outcome)

    lanes = _interleave({host: min(len(q), config.rule(host).per_host or config.per_host) for host, q in queues.items()})
    with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="links") as pool:
        for future in [pool.submit(lane, host) for host in lanes]:
            future.result()
    return [results[url] for url in dict.fromkeys(urls)]


def _interleave(counts: dict[str, int]) -> list[str]:
    """Round-robin over hosts so the first lanes to start cover as many hosts as possible."""
    order, round_ = [], 0
    while len(order) < sum(counts.values()):
        order += [host for host, n in counts.items() if n > round_]
        round_ += 1
    return order


# --- reports -----------------------------------------------------------------------------------

def summarise(outcomes: list[Outcome]) -> dict[str, int]:
    return {"checked": len(outcomes), "ok": sum(o.ok and not o.skipped for o in outcomes),
            "broken": sum(not o.ok for o in outcomes), "skipped": sum(bool(o.skipped) for o in outcomes),
            "cached": sum(o.cached for o in outcomes), "redirected": sum(o.redirects > 0 for o in outcomes)}


def terminal_report(outcomes: list[Outcome], sources: dict[str, list[str]]) -> str:
    s = summarise(outcomes)
    lines = [f"{s['checked']} URLs: {s['ok']} alive, {s['broken']} broken, {s['skipped']} skipped "
             f"({s['cached']} from cache, {s['redirected']} redirected)"]
    for o in outcomes:
        if not o.ok:
            lines.append(f"  BROKEN {o.label}  {o.url}  <- {', '.join(sources.get(o.url, []))}")
    return "\n".join(lines)


def json_report(outcomes: list[Outcome], sources: dict[str, list[str]]) -> str:
    return json.dumps({"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "summary": summarise(outcomes),
                       "results": [{**asdict(o), "sources": sources.get(o.url, [])} for o in outcomes]},
                      indent=2, ensure_ascii=False) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_report(outcomes: list[Outcome], sources: dict[str, list[str]]) -> str:
    s = summarise(outcomes)
    out = ["## Link check", "",
           f"{s['checked']} URLs checked: **{s['ok']} alive**, **{s['broken']} broken**, {s['skipped']} skipped "
           f"({s['cached']} from cache, {s['redirected']} redirected).", ""]
    broken = [o for o in outcomes if not o.ok]
    if broken:
        out += ["### Broken", "", "| status | URL | used in |", "|---|---|---|"]
        out += [f"| {_cell(o.label)} | <{_cell(o.url)}> | {_cell(', '.join(sources.get(o.url, [])))} |" for o in broken]
        out.append("")
    skipped = [o for o in outcomes if o.skipped]
    if skipped:
        out += ["<details><summary>Skipped (per-host exclusions)</summary>", "", "| URL | reason |", "|---|---|"]
        out += [f"| <{_cell(o.url)}> | {_cell(o.skipped or '')} |" for o in skipped]
        out += ["", "</details>", ""]
    moved = [o for o in outcomes if o.ok and o.redirects and not o.skipped]
    if moved:
        out += ["<details><summary>Redirected (consider updating)</summary>", "", "| URL | now at |", "|---|---|"]
        out += [f"| <{_cell(o.url)}> | <{_cell(o.final_url or '')}> |" for o in moved]
        out += ["", "</details>", ""]
    return "\n".join(out)


def command(args: Any) -> int:
    """The ``links`` subcommand."""
    from .catalogue import load_catalogue
    from .problems import Problems

    config = load_config(args.config or args.catalog / "links.yaml", required=args.config is not None)
    overrides = {k: v for k, v in (("workers", args.workers), ("timeout", args.timeout)) if v is not None}
    config = config.model_copy(update=overrides)
    problems = Problems()
    cat = load_catalogue(args.catalog, problems)
    if problems.errors:
        print("the catalogue has errors; run python -m site_gen check first", file=sys.stderr)
        return 2
    links = collect_links(cat, config)
    sources = {link.url: link.sources for link in links}
    cache = None if args.no_cache else Cache(args.cache or cat.root / ".cache" / "links.json", config.max_age_hours,
                                             own_folder=args.cache is None)
    if cache and cache.foreign and args.cache:  # a broken default cache is just replaced
        print(f"error: --cache {args.cache} exists and is not a link cache; name a new file or a cache file",
              file=sys.stderr)
        return 2
    progress = Progress(len(links), enabled=not args.quiet)
    outcomes = check_all([link.url for link in links], config, cache=cache, progress=progress)
    if cache:
        cache.save(outcomes)
    print(terminal_report(outcomes, sources))
    if args.json:
        write_atomic(args.json, json_report(outcomes, sources))
    if args.markdown:
        write_atomic(args.markdown, markdown_report(outcomes, sources))
    return 1 if any(not o.ok for o in outcomes) else 0
