"""The optimization, affinity, merging, sampling, distillation and adversarial modules keep the
architectures' rule (tests/reference_impls/architectures/test_equation_sources.py): a docstring
that cites equation numbers either says which text of the paper they were checked in or says
they were not checked."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .equation_rules import CITES_A_NUMBER, NAMES_A_TEXT, SAYS_UNCHECKED

ROOT = Path(__file__).resolve().parents[2] / "reference_impls"
FOLDERS = ("weighting", "affinity", "merging", "sampling", "distillation", "adversarial")
MODULES = sorted(p for folder in FOLDERS for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py")


def docstrings(path: Path) -> str:
    """The module's and its classes' docstrings, white space folded (sentences wrap across lines)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in tree.body if isinstance(n, ast.ClassDef)]
    return " ".join(" ".join(ast.get_docstring(n) or "" for n in nodes).split())


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cited_numbers_name_their_text_or_say_they_are_unchecked(path):
    doc = docstrings(path)
    if CITES_A_NUMBER.search(doc):
        assert NAMES_A_TEXT.search(doc) or SAYS_UNCHECKED.search(doc), (
            f"{path.name} cites equation numbers without naming the text they were checked in "
            "or saying that they are unchecked")


def test_the_rule_can_fail():
    assert len(MODULES) > 60
    assert NAMES_A_TEXT.search("Equation numbers were checked in a Markdown conversion of arXiv:1.2v3")
    assert NAMES_A_TEXT.search("Equation numbers are those of arXiv:2406.16232v3")
    assert not NAMES_A_TEXT.search("The numbers follow independent notes; the PDF was not consulted.")
    assert not NAMES_A_TEXT.search("checked in the audit against the authors' code. See Eq. (2).")
