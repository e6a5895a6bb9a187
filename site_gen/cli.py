"""Command line: ``python -m site_gen check|build``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .add import command as add_command
from .catalogue import display_name
from .jsonschema import command as schema_command
from .links import command as links_command
from .output import write_all
from .pipeline import run
from .problems import Problems


def _number(kind: type, low: float, strict: bool = False):
    """An argparse type for ``kind`` values >= low (> low if ``strict``): a usage error, not a
    traceback from the HTTP library, for --timeout 0 or --attempts -1."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):  # nan and inf reach the HTTP library or time.sleep, which crash
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _file_path(text: str) -> Path:
    """An argparse type for a file to write: a folder there is a usage error, not a traceback after the work."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file")
    return path


def _report(problems: Problems) -> None:
    out = sys.stderr
    for problem in problems.sorted():
        print(problem.format(), file=out)
    n_err, n_warn = len(problems.errors), len(problems.warnings)
    print(f"{n_err} error(s), {n_warn} warning(s)", file=out)


def cmd_check(args: argparse.Namespace) -> int:
    result = run(args.catalog, list_wanted=args.list_wanted, check_sync=not args.no_sync)
    _report(result.problems)
    return 1 if result.problems.errors else 0


def cmd_build(args: argparse.Namespace) -> int:
    result = run(args.catalog, list_wanted=args.list_wanted)
    if result.problems.errors:
        _report(result.problems)
        print("nothing written: fix the errors above first", file=sys.stderr)
        return 1
    changed = write_all(result.outputs)
    if result.problems.warnings:
        _report(result.problems)
    for path in result.outputs:
        state = "written" if path in changed else "unchanged"
        print(f"{display_name(path)}: {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m site_gen",
                                     description="Validate the MTL catalogue and generate README, BibTeX and site.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--catalog", type=Path, default=Path("catalog"),
                       help="catalogue folder (default: ./catalog); outputs go to its parent folder")
        p.add_argument("--list-wanted", action="store_true",
                       help="name every architecture/optimization paper that lacks a reference implementation")

    p = sub.add_parser("check", help="report every problem in the catalogue (exit 1 on errors)")
    common(p)
    p.add_argument("--no-sync", action="store_true", help="skip the check that README.md/catalog.bib are current")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("build", help="write README.md and catalog.bib (nothing if the catalogue is invalid)")
    common(p)
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("add", help="pre-fill a paper entry from arXiv/DOI metadata and insert it into papers.yaml")
    p.add_argument("identifier", help="arxiv:ID or doi:DOI, e.g. arxiv:2001.06782 or doi:10.1109/TPAMI.2021.3054719")
    p.add_argument("--catalog", type=Path, default=Path("catalog"), help="catalogue folder (default: ./catalog)")
    p.add_argument("--topic", action="append", default=[], help="taxonomy leaf id (repeat for several)")
    p.add_argument("--short", help="nickname, e.g. PCGrad (also gives the id: pcgrad)")
    p.add_argument("--venue", help="venues.yaml key, when the fetched venue is not recognised")
    p.add_argument("--id", help="entry id, instead of the suggested one")
    p.add_argument("--code", action="append", default=[], help="official code URL (repeat for several)")
    p.add_argument("--dry-run", action="store_true", help="show the entry, write nothing")
    p.add_argument("--no-dblp", action="store_true", help="do not ask DBLP where an arXiv preprint was published")
    p.add_argument("--verbose", action="store_true", help="print the fetched record")
    p.add_argument("--timeout", type=_number(float, 0, strict=True), default=15.0, help="seconds per request (default 15)")
    p.add_argument("--attempts", type=_number(int, 1), default=4, help="tries per request on 429/5xx/timeouts (default 4)")
    p.add_argument("--backoff", type=_number(float, 0), default=2.0, help="first retry pause in seconds, doubled each time")
    p.add_argument("--arxiv-api", help="arXiv API URL (env SITE_GEN_ARXIV_API)")
    p.add_argument("--doi-base", help="DOI resolver URL (env SITE_GEN_DOI_BASE)")
    p.add_argument("--dblp-api", help="DBLP search API URL (env SITE_GEN_DBLP_API)")
    p.set_defaults(func=add_command)
    p = sub.add_parser("schema", help="write catalog/schema/*.schema.json and the field reference in CONTRIBUTING.md")
    p.add_argument("--catalog", type=Path, default=Path("catalog"), help="catalogue folder (default: ./catalog)")
    p.add_argument("--headers", action="store_true",
                   help="also make each catalogue YAML file start with its yaml-language-server schema line")
    p.set_defaults(func=schema_command)
    p = sub.add_parser("links", help="check every external URL of the catalogue (exit 1 if any is broken)")
    p.add_argument("--catalog", type=Path, default=Path("catalog"), help="catalogue folder (default: ./catalog)")
    p.add_argument("--config", type=Path, help="link-check settings (default: <catalog>/links.yaml)")
    p.add_argument("--json", type=_file_path, help="write the full results as JSON here")
    p.add_argument("--markdown", type=_file_path, help="write a Markdown report here (fits $GITHUB_STEP_SUMMARY)")
    p.add_argument("--cache", type=_file_path, help="cache file (default: .cache/links.json in the project root)")
    p.add_argument("--no-cache", action="store_true", help="check every URL, ignore and keep no cache")
    p.add_argument("--workers", type=_number(int, 1), help="threads in all (overrides the config)")
    p.add_argument("--timeout", type=_number(float, 0, strict=True), help="seconds per request (overrides the config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=links_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
