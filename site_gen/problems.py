"""Problems found in the catalogue, each pinned to a file, line and column.

Every step of the pipeline appends to one ``Problems`` list instead of raising, so a
contributor sees every mistake in one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class Location:
    """1-based line and column in a file (line 1, column 1 by default: a file that did not load)."""

    file: str
    line: int = 1
    col: int = 1


@dataclass(frozen=True)
class Problem:
    where: Location
    entry: str  # entry id, or "-" when the problem is not inside one entry
    field: str  # dotted field path, or "-"
    message: str
    hint: str | None = None
    severity: Severity = Severity.ERROR

    def format(self) -> str:
        w = self.where
        text = f"{w.file}:{w.line}:{w.col}: {self.entry}: {self.field}: {self.message}"
        if self.severity is Severity.WARNING:
            text = f"{w.file}:{w.line}:{w.col}: {self.entry}: {self.field}: warning: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


@dataclass
class Problems:
    items: list[Problem] = field(default_factory=list)

    def error(self, where: Location, entry: str, field_: str, message: str, hint: str | None = None) -> None:
        self.items.append(Problem(where, entry, field_, message, hint, Severity.ERROR))

    def warning(self, where: Location, entry: str, field_: str, message: str, hint: str | None = None) -> None:
        self.items.append(Problem(where, entry, field_, message, hint, Severity.WARNING))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.items if p.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.items if p.severity is Severity.WARNING]

    def sorted(self) -> list[Problem]:
        return sorted(self.items, key=lambda p: (p.where, p.entry, p.field, p.message))
