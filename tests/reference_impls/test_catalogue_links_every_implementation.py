"""Every registered architecture and optimization method is reachable from the catalogue.

``site_gen check`` verifies the other direction (an entry's ``impl`` names a tested class).
A class no entry links is missing from the site's implementations page and the README, and
its paper reads as "implementation wanted": LORPMAN was, until this test. An entry links one
class, so the second method of a paper (MTAN's DWA, PLE's single-level CGC) is listed here
with the entry that names it in ``short``.
"""

from pathlib import Path

import pytest

from reference_impls.architectures import registry as architectures
from reference_impls.weighting import registry as methods
from site_gen.catalogue import load_catalogue
from site_gen.problems import Problems

CATALOG = Path(__file__).resolve().parents[2] / "catalog"

# registry name -> (the entry that names it, the short name it goes by there)
SECOND_OF_A_PAPER = {
    "cgc": ("ple", "CGC"),
    "dwa": ("mtan", "DWA"),
    "imtl_g": ("imtl", "IMTL-G"),
    "imtl_l": ("imtl", "IMTL-L"),
    "mgda_ub": ("mgda", "MGDA-UB"),
    # gradient-level forms of methods whose entries link the loss-level class
    "ew_grad": ("unitary-scalarization", "Unitary Scalarization"),
    "rlw_grad": ("rw", "RLW"),
}


def link(cls: type) -> str:
    return f"{cls.__module__.replace('.', '/')}.py:{cls.__name__}"


CLASSES = {**{n: architectures.get(n) for n in architectures.available()}, **methods.methods()}


@pytest.fixture(scope="module")
def papers():
    problems = Problems()
    catalogue = load_catalogue(CATALOG, problems)
    assert not problems.errors, problems.errors
    return {p.id: p for p in catalogue.papers}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_an_entry_links_or_names_the_implementation(name, papers):
    linked = {p.impl for p in papers.values() if p.impl}
    if name not in SECOND_OF_A_PAPER:
        assert link(CLASSES[name]) in linked, f"{name}: no catalogue entry has impl: {link(CLASSES[name])}"
        return
    assert link(CLASSES[name]) not in linked, f"{name} is linked now: drop it from SECOND_OF_A_PAPER"
    entry, short = SECOND_OF_A_PAPER[name]
    assert papers[entry].impl and short in papers[entry].short, f"{name}: entry {entry!r} does not name {short!r}"
