"""The plain pipeline: load -> validate -> check -> render. Every command goes through here."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from .bibtex import render_bibtex
from .catalogue import Catalogue, display_name, load_catalogue
from .checks import run_checks
from .jsonschema import check_model_outputs
from .output import read_generated
from .problems import Location, Problems
from .readme import render_readme

GENERATED = ("README.md", "catalog.bib")


@dataclass
class Result:
    catalogue: Catalogue
    problems: Problems
    outputs: dict[Path, str]  # generated file -> expected content (empty when invalid)


def run(catalog_dir: Path, *, list_wanted: bool = False, check_sync: bool = False, render: bool = True) -> Result:
    """Load, validate and check the catalogue; render README.md and catalog.bib unless ``render`` is
    False (the website renders its own pages and needs neither)."""
    # The pipeline allocates hundreds of thousands of long-lived objects (YAML nodes, models)
    # and no reference cycles worth collecting; pausing the cyclic GC avoids repeated full
    # scans that made large catalogues super-linear.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _run(catalog_dir, list_wanted=list_wanted, check_sync=check_sync, render=render or check_sync)
    finally:
        if paused:
            gc.enable()


def _run(catalog_dir: Path, *, list_wanted: bool, check_sync: bool, render: bool) -> Result:
    problems = Problems()
    cat = load_catalogue(catalog_dir, problems)
    run_checks(cat, problems, list_wanted=list_wanted)
    outputs: dict[Path, str] = {}
    if render and not problems.errors:
        outputs = render_all(cat)
        if check_sync:
            for path, text in outputs.items():
                name = display_name(path)
                if not path.exists():
                    problems.error(Location(name), "-", "-", "generated file is missing",
                                   "run `python -m site_gen build`")
                elif read_generated(path) != text:
                    problems.error(Location(name), "-", "-", "out of date with the catalogue",
                                   "run `python -m site_gen build` and commit the result")
    if check_sync:
        check_model_outputs(catalog_dir, problems)  # catalog/schema/*.json, CONTRIBUTING.md field reference
    return Result(cat, problems, outputs)


def render_all(cat: Catalogue) -> dict[Path, str]:
    bib = render_bibtex(cat)
    return {cat.root / "README.md": render_readme(cat, bib), cat.root / "catalog.bib": bib}
