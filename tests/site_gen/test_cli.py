"""The command line itself (site_gen/cli.py): every subcommand and option explains itself, a default the
help states is the real one, number options refuse bad values with a usage error, and paths stay paths."""

from __future__ import annotations

import argparse
import json
import re
import time

import pytest

import site_gen.links
from site_gen.cli import build_parser
from site_gen.links import Outcome

from .conftest import edit_catalogue

STATED_DEFAULT = re.compile(r"\(default:? ([^<>();\s]+)[);]")  # "(default: ./catalog)", "(default 4)"
POSITIONALS = {"add": ["arxiv:2001.06782"]}  # what each subcommand needs before it parses at all


def _subcommands() -> tuple[argparse.ArgumentParser, argparse.Action]:
    parser = build_parser()
    return parser, next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _options(sub: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_and_option_has_help() -> None:
    """``--help`` is the only reference a user has at the terminal: nothing may be listed unexplained."""
    parser, subs = _subcommands()
    assert parser.description and parser.description.strip()
    listed = {a.dest: a.help for a in subs._choices_actions}
    assert set(listed) == set(subs.choices) == {"check", "build", "add", "schema", "links"}
    assert [name for name, text in listed.items() if not (text or "").strip()] == []
    unexplained = [(name, a.dest) for name, sub in subs.choices.items() for a in _options(sub)
                   if not (a.help or "").strip()]
    assert unexplained == []


def test_a_default_the_help_states_is_the_one_used() -> None:
    """Giving the stated default explicitly must change nothing: ``(default: ./catalog)`` that is not the
    folder used, or ``(default 4)`` that is not 4, misleads whoever relies on it."""
    parser, subs = _subcommands()
    checked = []
    for name, sub in subs.choices.items():
        base = [name, *POSITIONALS.get(name, [])]
        for action in _options(sub):
            stated = STATED_DEFAULT.search(action.help or "")
            if stated and action.option_strings:
                given = parser.parse_args([*base, action.option_strings[0], stated.group(1)])
                assert getattr(parser.parse_args(base), action.dest) == getattr(given, action.dest), (name, action.dest)
                checked.append((name, action.option_strings[0]))
    assert {(name, "--catalog") for name in subs.choices} <= set(checked)


@pytest.mark.parametrize("args, dest, value", [
    (["add", "arxiv:2001.06782", "--attempts", "1"], "attempts", 1),  # one try, no retry: the smallest allowed
    (["add", "arxiv:2001.06782", "--backoff", "0"], "backoff", 0.0),  # retry at once
    (["add", "arxiv:2001.06782", "--timeout", "0.5"], "timeout", 0.5),
    (["links", "--workers", "1"], "workers", 1),
    (["links", "--timeout", "2"], "timeout", 2.0),
])
def test_number_options_accept_their_bounds(args: list[str], dest: str, value: float) -> None:
    """The lowest value an option documents as allowed parses, to the option's own type."""
    parsed = getattr(build_parser().parse_args(args), dest)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("args, message", [
    (["add", "arxiv:2001.06782", "--timeout", "0"], "argument --timeout: must be > 0, got 0"),
    (["add", "arxiv:2001.06782", "--attempts", "0"], "argument --attempts: must be >= 1, got 0"),
    (["add", "arxiv:2001.06782", "--backoff", "-1"], "argument --backoff: must be >= 0, got -1"),
    (["add", "arxiv:2001.06782", "--timeout", "soon"], "argument --timeout: 'soon' is not a number"),
    (["links", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["links", "--workers", "2.5"], "argument --workers: '2.5' is not an integer"),
    (["links", "--timeout", "-0.5"], "argument --timeout: must be > 0, got -0.5"),
])
def test_bad_numbers_are_usage_errors_naming_the_option(cli, capsys, args: list[str], message: str) -> None:
    """Exit 2 with the option, the rule and the value given, under a usage line with the command to run."""
    with pytest.raises(SystemExit) as stop:
        cli(*args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err
    assert err.startswith(f"usage: python -m site_gen {args[0]} ")


@pytest.mark.parametrize("args, flag", [
    (["add", "--verbose", "arxiv:2001.06782"], "verbose"),
    (["add", "--dry-run", "arxiv:2001.06782"], "dry_run"),
    (["check", "--no-sync", "--list-wanted"], "no_sync"),
    (["links", "--no-cache", "--quiet"], "no_cache"),
])
def test_switches_take_no_value(args: list[str], flag: str) -> None:
    """A switch placed before the identifier must not swallow it as its value."""
    parsed = build_parser().parse_args(args)
    assert getattr(parsed, flag) is True
    assert getattr(parsed, "identifier", "arxiv:2001.06782") == "arxiv:2001.06782"
    assert getattr(build_parser().parse_args([a for a in args if not a.startswith("--")]), flag) is False


@pytest.fixture
def offline_links(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``links`` checks nothing over the network: every URL it asks for is answered 200 and recorded."""
    asked: list[str] = []

    def answer(urls, config, *, cache=None, progress=None):
        asked.extend(urls)
        return [Outcome(url, ok=True, status=200, attempts=1, checked_at=time.time()) for url in urls]

    monkeypatch.setattr(site_gen.links, "check_all", answer)
    return asked


def test_links_cache_option_is_where_the_cache_goes(project, cli, offline_links, tmp_path) -> None:
    """``--cache FILE`` keeps the results of every URL in FILE, and nothing in the default place."""
    cache = tmp_path / "elsewhere" / "links-cache.json"
    code, out, err = cli("links", "--catalog", str(project / "catalog"), "--cache", str(cache), "--quiet")
    assert code == 0 and offline_links
    assert set(json.loads(cache.read_text(encoding="utf-8"))["results"]) == set(offline_links)
    assert not (project / ".cache").exists()


# --- bugs found while reading the survivors (each test failed before the fix) ---------------------

@pytest.mark.parametrize("args", [
    ["add", "arxiv:2001.06782", "--timeout", "nan"],
    ["add", "arxiv:2001.06782", "--timeout", "inf"],
    ["add", "arxiv:2001.06782", "--backoff", "nan"],
    ["links", "--timeout", "nan"],
])
def test_non_finite_numbers_are_usage_errors(capsys, args: list[str]) -> None:
    """``_number`` promises a usage error instead of a traceback from the HTTP library."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {args[-2]}: must be a finite number, got {args[-1]}" in err


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_schema_refuses_a_catalog_that_is_not_a_folder(cli, tmp_path, kind: str) -> None:
    """A typo in --catalog must be reported, not turned into a new folder of schema files."""
    target = tmp_path / "catalgo"
    if kind == "file":
        target.write_text("not a folder\n", encoding="utf-8")
    code, out, err = cli("schema", "--catalog", str(target))
    assert code != 0 and "catalgo" in err
    assert not (tmp_path / "catalgo" / "schema").exists() if kind == "missing" else target.is_file()


def test_links_cache_option_spares_other_files(project, cli, offline_links) -> None:
    """Pointing --cache at the wrong file (here the project's notes) must not destroy it, nor hide the folder
    from git: the '*' .gitignore belongs only in the default .cache folder."""
    notes = project / "notes.txt"
    notes.write_text("keep me\n", encoding="utf-8")
    code, out, err = cli("links", "--catalog", str(project / "catalog"), "--cache", str(notes), "--quiet")
    assert (code, err) == (2, f"error: --cache {notes} exists and is not a link cache; name a new file or a "
                              "cache file\n")
    assert notes.read_text(encoding="utf-8") == "keep me\n"
    assert not (project / ".gitignore").exists()


@pytest.mark.parametrize("option", ["--cache", "--json", "--markdown"])
def test_links_output_paths_that_are_folders_are_refused(project, cli, capsys, tmp_path, option) -> None:
    """A folder given where a file is expected is the user's mistake: a usage error naming it, before any
    request (--json used to fail with IsADirectoryError after the whole check had run)."""
    folder = tmp_path / "reports"
    folder.mkdir()
    with pytest.raises(SystemExit) as stop:
        cli("links", "--catalog", str(project / "catalog"), option, str(folder), "--quiet")
    assert stop.value.code == 2 and f"argument {option}: {folder} is a folder; name a file" in capsys.readouterr().err


def test_build_of_an_invalid_catalogue_says_nothing_was_written(project, cli) -> None:
    """After the problems and their count, the last line tells the user that no file was touched."""
    edit_catalogue(project, "papers.yaml", "year: 2020", "year: soon")
    code, out, err = cli("build", "--catalog", str(project / "catalog"))
    lines = err.splitlines()
    assert code == 1 and out == "" and not (project / "README.md").exists()
    assert re.fullmatch(r"[1-9]\d* error\(s\), \d+ warning\(s\)", lines[-2]) and "nothing written" in lines[-1]
