"""Mutation score of a reference_impls package: how many small source changes its tests notice.

    pip install -e '.[torch,dev,mutation]'
    python benchmarks/mutation_score.py weighting [--only aw pcgrad] [--workers 2] [--survivors FILE]
    python benchmarks/mutation_score.py weighting --rerun FILE  # only the survivors a --survivors run wrote

mutmut (pinned in the ``mutation`` extra) changes the package's code one small edit at a time
(an operator, a comparison, a constant, a dropped argument, ...) and runs the tests that reach
the changed function; a *mutant* is killed when one of them fails. It runs in a scratch copy
of the working tree, so the checkout is never touched, with the package's own test folder
(``tests/reference_impls/<package>/``). The script prints, per module, the mutants, how many
were killed and survived, and the score (killed / mutants), then the whole package's.

A survivor is not always a missing test: many mutants change nothing a caller can see (a tie
``<`` against ``<=`` on a float, a solver's start value, an argument equal to its default).
``--survivors FILE`` writes each survivor's diff for triage (see docs/benchmarks-tests.md).

``--rerun FILE`` runs again only the mutants named in such a file, after tests were added: the
table then counts those mutants alone (killed now, or still surviving). Tests added can only
kill more, so a module's new score is its earlier killed count plus the killed column here,
over its earlier mutant count. Where a function's source has changed since, its mutants are
other edits under the same names: each mutant's diff is compared with the file's, and a changed
one is counted under "other", with its module named for a full run with ``--only``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_LINE = re.compile(r"^\s+(reference_impls\.\S+): (\w[\w ]*)$")


@dataclass(frozen=True)
class Row:
    module: str
    mutants: int
    killed: int
    survived: int

    @property
    def other(self) -> int:  # no tests reach it, timed out, or not run
        return self.mutants - self.killed - self.survived

    @property
    def score(self) -> float:
        return self.killed / self.mutants if self.mutants else float("nan")


def mutmut_section(package: str, only: list[str]) -> str:
    """The ``[tool.mutmut]`` table: mutate one package, select tests from its test folder."""
    lines = ["", "[tool.mutmut]",
             f'source_paths = ["reference_impls/{package}/"]',
             'also_copy = ["reference_impls/", "tests/", "catalog/"]',
             f'pytest_add_cli_args_test_selection = ["tests/reference_impls/{package}/"]']
    if only:
        lines.append("only_mutate = [" + ", ".join(f'"reference_impls/{package}/{m}.py"' for m in only) + "]")
    return "\n".join(lines) + "\n"


def read_statuses(text: str) -> dict[str, str]:
    """``mutmut results --all true`` output -> {mutant name: status}."""
    return {m.group(1): m.group(2) for line in text.splitlines() if (m := RESULT_LINE.match(line))}


def module_of(name: str, package: str) -> str:
    """``reference_impls.weighting.aw.xǁAWǁ...__mutmut_9`` -> ``aw``; a function of the package's
    ``__init__.py`` has no module part (``reference_impls.data.x_load__mutmut_2``) -> ``__init__``."""
    prefix = f"reference_impls.{package}."
    if not name.startswith(prefix):
        raise ValueError(f"mutant {name!r} is not in package {package!r}")
    module, dot, _ = name[len(prefix):].partition(".")
    return module if dot else "__init__"


def summarise(statuses: dict[str, str], package: str) -> list[Row]:
    """One row per module (sorted by score, lowest first), then ``all``."""
    counts: dict[str, Counter] = {}
    for name, status in statuses.items():
        counts.setdefault(module_of(name, package), Counter())[status] += 1
    rows = [Row(m, sum(c.values()), c["killed"], c["survived"]) for m, c in counts.items()]
    rows.sort(key=lambda r: (r.score, r.module))
    total = Row("all", *(sum(getattr(r, f) for r in rows) for f in ("mutants", "killed", "survived")))
    return rows + [total]


SURVIVOR_LINE = re.compile(r"^# (reference_impls\.\S+): survived$", re.M)


def survivor_blocks(text: str, package: str) -> dict[str, str]:
    """A ``--survivors`` file -> {mutant name: its diff}, each name checked to belong to ``package``."""
    parts = SURVIVOR_LINE.split(text)  # [before, name, diff, name, diff, ...]
    if len(parts) < 3:
        raise ValueError("no '# <mutant>: survived' line: not a file written by --survivors")
    blocks = {name: diff.strip() for name, diff in zip(parts[1::2], parts[2::2])}
    for name in blocks:
        module_of(name, package)
    return blocks


def changed_since(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """Names whose mutant is no longer the recorded edit (its function's source changed)."""
    return sorted(name for name, diff in recorded.items() if now.get(name) != diff)


def table(rows: list[Row]) -> str:
    width = max(len(r.module) for r in rows)
    lines = [f"{'module':<{width}}  mutants  killed  survived  other  score"]
    lines += [f"{r.module:<{width}}  {r.mutants:7d}  {r.killed:6d}  {r.survived:8d}  {r.other:5d}  {r.score:6.1%}"
              for r in rows]
    return "\n".join(lines)


def scratch_copy(work: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, as they are now."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def mutmut(work: Path, *args: str, capture: bool = False) -> str:
    executable = Path(sys.executable).with_name("mutmut")
    if not executable.exists():
        sys.exit("mutmut is not installed: pip install -e '.[torch,dev,mutation]'")
    done = subprocess.run([str(executable), *args], cwd=work, text=True, capture_output=True)
    if done.returncode:  # mutmut says why on stdout ("Failed to run clean test", a test's traceback)
        shown = " ".join(args[:4]) + (f" ... ({len(args) - 4} more)" if len(args) > 4 else "")
        sys.exit(f"mutmut {shown} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout if capture else ""


# One process for every diff: ``mutmut show`` per survivor would start Python hundreds of times.
DIFFS = """
import sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
for name in sys.stdin.read().split():
    print(f"# {name}: survived")
    print(get_diff_for_mutant(name))
    print()
"""


def survivor_diffs(work: Path, names: list[str]) -> str:
    done = subprocess.run([sys.executable, "-c", DIFFS], cwd=work, input="\n".join(names), text=True,
                          capture_output=True)
    if done.returncode:
        sys.exit(f"could not read the survivors' diffs:\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("package", help="a folder of reference_impls, e.g. weighting")
    parser.add_argument("--only", nargs="+", default=[], metavar="MODULE", help="mutate only these modules")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--survivors", type=Path, help="write each survivor's diff here")
    parser.add_argument("--rerun", type=Path, metavar="FILE", help="run only the survivors a --survivors run wrote")
    args = parser.parse_args(argv)
    if not (REPO / "reference_impls" / args.package).is_dir():
        parser.error(f"no package reference_impls/{args.package}")
    for module in args.only:
        if not (REPO / "reference_impls" / args.package / f"{module}.py").is_file():
            parser.error(f"no module reference_impls/{args.package}/{module}.py")
    recorded: dict[str, str] = {}
    if args.rerun:
        if args.only:
            parser.error("--rerun takes its modules from the file; leave out --only")
        try:
            recorded = survivor_blocks(args.rerun.read_text(), args.package)
        except (OSError, ValueError) as error:
            parser.error(f"--rerun {args.rerun}: {error}")
        args.only = sorted({module_of(n, args.package) for n in recorded})
    with tempfile.TemporaryDirectory(prefix="mutation_") as scratch:
        work = Path(scratch)
        scratch_copy(work)
        with (work / "pyproject.toml").open("a") as config:
            config.write(mutmut_section(args.package, args.only))
        mutmut(work, "run", "--max-children", str(args.workers), *recorded)
        statuses = read_statuses(mutmut(work, "results", "--all", "true", capture=True))
        if recorded:
            changed = changed_since(recorded, survivor_blocks(survivor_diffs(work, list(recorded)), args.package))
            statuses = {n: "source changed" if n in changed else statuses[n] for n in recorded}
            if changed:
                modules = sorted({module_of(n, args.package) for n in changed})
                print(f"{len(changed)} named mutants are other edits now, counted under 'other': "
                      f"run {' '.join(modules)} in full with --only", file=sys.stderr)
        if args.survivors:
            args.survivors.write_text(survivor_diffs(work, [n for n, s in statuses.items() if s == "survived"]))
    rows = summarise(statuses, args.package)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
