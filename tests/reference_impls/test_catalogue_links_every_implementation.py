"""Every registered architecture and optimization method is linked from the catalogue.

``site_gen check`` verifies the other direction (an entry's ``impl`` and ``also_impl`` name
tested classes). A class no entry links is missing from the site's implementations page and
the README, and its paper reads as "implementation wanted": LORPMAN was, until this test.
"""

from pathlib import Path

import pytest

from reference_impls.architectures import registry as architectures
from reference_impls.weighting import registry as methods
from site_gen.catalogue import load_catalogue
from site_gen.problems import Problems

CATALOG = Path(__file__).resolve().parents[2] / "catalog"
CLASSES = {**{n: architectures.get(n) for n in architectures.available()}, **methods.methods()}


def link(cls: type) -> str:
    return f"{cls.__module__.replace('.', '/')}.py:{cls.__name__}"


@pytest.fixture(scope="module")
def linked() -> set[str]:
    problems = Problems()
    catalogue = load_catalogue(CATALOG, problems)
    assert not problems.errors, problems.errors
    return {ref for p in catalogue.papers for ref in p.impls}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_an_entry_links_the_implementation(name, linked):
    assert link(CLASSES[name]) in linked, f"{name}: no entry has {link(CLASSES[name])} in impl or also_impl"
