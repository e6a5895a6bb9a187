"""Argument checks shared by every reference implementation.

A bad number from the command line (``--arch-kw num_experts=0``, ``--method-kw temperature=0``)
should be refused when the object is built, with a ValueError that names it, not surface as
a division by zero, a negative tensor dimension or NaN somewhere inside the first step.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """' (did you mean 'mmoe'?)' for a mistyped or wrongly cased registry name, else ''."""
    by_lower = {known.lower(): known for known in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def require_at_least(minimum: int, **sizes: int) -> None:
    """A ValueError naming every size or count below ``minimum``, instead of a division by
    zero, a negative tensor dimension or an empty stack somewhere later."""
    bad = [f"{name} must be at least {minimum}, got {value}" for name, value in sizes.items() if not value >= minimum]
    if bad:
        raise ValueError("; ".join(bad))


def require_above(bound: float, **values: float) -> None:
    """A ValueError naming every value not above ``bound`` (NaN included): a temperature of 0
    divides by zero, a negative one silently turns a softmax upside down."""
    bad = [f"{name} must be above {bound}, got {value}" for name, value in values.items() if not value > bound]
    if bad:
        raise ValueError("; ".join(bad))


def require_positive(**sizes: int) -> None:
    """Sizes that must be at least 1: a width, a rank, a number of experts or layers."""
    require_at_least(1, **sizes)


def require_each_positive(name: str, sizes: Sequence[int]) -> None:
    """``require_positive`` for every entry of a list of sizes, named ``name[i]``."""
    require_positive(**{f"{name}[{i}]": size for i, size in enumerate(sizes)})


def require_non_negative(**sizes: int) -> None:
    """Counts of optional parts, where 0 is a real model (no prompts, no task experts)."""
    require_at_least(0, **sizes)


def require_finite(**values: float) -> None:
    """Reported outcomes (a validation metric, a return, a quality score) that must be finite:
    a NaN compares False with everything, so a scheduler would quietly read it as "no better"."""
    bad = [f"{name} must be finite, got {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise ValueError("; ".join(bad))


def require_known_tasks(what: str, given: Iterable[str], known: Iterable[str]) -> None:
    """A ValueError when ``given`` (the tasks of a batch's outputs) is empty or names a task
    outside ``known``, instead of a bare KeyError or an empty stack inside a loss."""
    given, known = list(given), list(known)
    if not given:
        raise ValueError(f"no {what}: give at least one task's")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{what} for unknown task(s) {unknown}; the tasks are {sorted(known)}")


def require_all_tasks(what: str, given: Iterable[str], required: Iterable[str]) -> None:
    """The converse of :func:`require_known_tasks`: ``given`` must hold every task of ``required``."""
    missing = sorted(set(required) - set(given))
    if missing:
        raise ValueError(f"{what} lack task(s) {missing}")
