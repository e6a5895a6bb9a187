"""Each architecture says which text of its paper its equation numbers were checked in, or that
they were not checked: the claim a reader relies on when following a docstring into the paper."""

from __future__ import annotations

import inspect
import sys

import pytest

from reference_impls.architectures import registry
from reference_impls.architectures.gttn import GTTN
from reference_impls.architectures.trace_norm import TraceNormMTL

from ..equation_rules import CITES_A_NUMBER, SAYS_UNCHECKED


def _docstrings(cls: type) -> str:
    """The module's and the class's docstrings, white space folded (sentences wrap across lines)."""
    text = f"{sys.modules[cls.__module__].__doc__ or ''} {inspect.getdoc(cls) or ''}"
    return " ".join(text.split())


@pytest.mark.parametrize("name", registry.available())
def test_the_text_named_is_the_one_the_docstring_names(name):
    cls = registry.get(name)
    text = cls.equations_checked_in
    if text is not None:
        assert isinstance(text, str) and text.strip(), name
        assert " ".join(text.split()) in _docstrings(cls), f"{name}: the docstring does not name {text!r}"


@pytest.mark.parametrize("name", registry.available())
def test_a_docstring_citing_unchecked_numbers_says_so(name):
    cls = registry.get(name)
    doc = _docstrings(cls)
    if cls.equations_checked_in is None and CITES_A_NUMBER.search(doc):
        assert SAYS_UNCHECKED.search(doc), f"{name} cites equation numbers without a text and does not say so"


def test_a_subclass_for_another_paper_does_not_inherit_the_text():
    assert TraceNormMTL.equations_checked_in == "wOOL/TNRDMTL, paper_draft.pdf"
    assert issubclass(GTTN, TraceNormMTL) and GTTN.equations_checked_in is None


def test_the_rules_can_fail():
    assert CITES_A_NUMBER.search("as in Eq. (3)") and CITES_A_NUMBER.search("Eqs. 6-7")
    assert not CITES_A_NUMBER.search("Equations are named, not numbered")
    assert SAYS_UNCHECKED.search("its equation numbers were not checked")
    assert not SAYS_UNCHECKED.search("the paper's initialisation is not checked here. See Eq. (2).")
