"""JSON Schema for each catalogue file, generated from the pydantic models.

Editors that speak the YAML language server read ``catalog/schema/<name>.schema.json``
(named in each YAML file's first line) and flag a typo, a missing field or an unquoted
arXiv id while the contributor types. The models stay the single source of truth:
pydantic writes the schema, and the few rules that live in plain validator functions
(URL, arXiv id, DOI, first year, "one item may be written without a list") are added
here by the function's name. ``check`` fails when the committed files are stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from .catalogue import display_name
from .checks import UNIQUE_ITEMS
from .fieldref import HELP, render_reference, replace_section
from .models import ARXIV_NEW, ARXIV_OLD, DOI, FIRST_YEAR, Codebase, Dataset, Paper, Section, Venue
from .output import read_generated, write_atomic, write_all
from .problems import Location, Problems
from .yamlfile import line_col

DIALECT = "https://json-schema.org/draft/2020-12/schema"
HINT = "run python -m site_gen schema"

# Extra JSON Schema for values checked by AfterValidator functions of models.py, by function name.
AFTER = {
    # Lowercase scheme, no spaces, <, >, " or backslash (the port's range is left to `check`).
    "_url": {"pattern": r"^https?://[^\s<>\"\\]+$", "format": "uri"},
    # Not blank, and one line once the ends are stripped.
    "_one_line": {"pattern": r"^\s*(?:\S|\S[^\n]*\S)\s*$"},
    "_arxiv": {"pattern": f"({ARXIV_NEW.pattern})|({ARXIV_OLD.pattern})"},
    "_doi": {"pattern": DOI.pattern},
    "_year": {"minimum": FIRST_YEAR},
    "_needs_identifier": {"anyOf": [{"required": ["arxiv"]}, {"required": ["doi"]}, {"required": ["url"]}],
                          "not": {"required": ["impl", "no_impl"]},
                          "dependentRequired": {"also_impl": ["impl"]}},
}

UNIQUE = {model: UNIQUE_ITEMS[file] for model, file in
          (("Paper", "papers.yaml"), ("Dataset", "datasets.yaml"), ("Codebase", "codebases.yaml"))}

SHAPES = {  # file stem -> (type it holds, title)
    "papers": (list[Paper], "Papers of the MTL catalogue (catalog/papers.yaml)"),
    "datasets": (list[Dataset], "Datasets and benchmarks (catalog/datasets.yaml)"),
    "codebases": (list[Codebase], "Libraries and code collections (catalog/codebases.yaml)"),
    "taxonomy": (list[Section], "Section tree (catalog/taxonomy.yaml)"),
    "venues": (dict[str, Venue], "Venue key -> full name and kind (catalog/venues.yaml)"),
}


class CatalogueSchema(GenerateJsonSchema):
    """pydantic's generator, plus the rules that validator functions enforce."""

    def function_after_schema(self, schema: Any) -> dict[str, Any]:
        out = super().function_after_schema(schema)
        return {**out, **AFTER.get(_name(schema), {})}

    def function_before_schema(self, schema: Any) -> dict[str, Any]:
        out = super().function_before_schema(schema)
        name = _name(schema)
        if name == "_as_list":  # `short: PCGrad` is as good as `short: [PCGrad]`
            return {"anyOf": [out["items"], out]}
        if name == "_as_str":   # `volume: 44` is as good as `volume: "44"`
            return {"anyOf": [out, {"type": "integer"}]}
        return out


def _name(schema: Any) -> str:
    """Name of the validator function behind a core schema (pydantic may wrap it in a partial)."""
    func = schema["function"]["function"]
    while not hasattr(func, "__name__") and hasattr(func, "func"):
        func = func.func
    return getattr(func, "__name__", "")


def schemas() -> dict[str, dict[str, Any]]:
    """File stem -> JSON Schema document."""
    docs = {}
    for stem, (shape, title) in SHAPES.items():
        body = TypeAdapter(shape).json_schema(schema_generator=CatalogueSchema)
        for model, fields in UNIQUE.items():  # `check` refuses an item listed twice
            for name in fields:
                prop = body.get("$defs", {}).get(model, {}).get("properties", {}).get(name, {})
                for variant in [prop, *prop.get("anyOf", [])]:
                    if variant.get("type") == "array":
                        variant["uniqueItems"] = True
        for model, props in HELP.items():
            for name, text in props.items():
                prop = body.get("$defs", {}).get(model, {}).get("properties", {}).get(name)
                if prop is not None:
                    prop["description"] = text
        docs[stem] = {"$schema": DIALECT, "title": title,
                      "description": "Generated from site_gen/models.py by `python -m site_gen schema`; do not edit.",
                      **body}
    return docs


def contributing_guide(catalog_dir: Path) -> Path:
    """CONTRIBUTING.md beside the catalogue folder: its field reference is generated from the models."""
    return catalog_dir.resolve().parent / "CONTRIBUTING.md"


def model_outputs(catalog_dir: Path) -> dict[Path, str]:
    """Every file derived from the models: the schemas, and CONTRIBUTING.md's field reference."""
    docs = schemas()
    outputs = {catalog_dir / "schema" / f"{stem}.schema.json": json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
               for stem, doc in docs.items()}
    guide = contributing_guide(catalog_dir)
    text = read_generated(guide)  # None when missing or not UTF-8 (check says so)
    if text is not None:
        new = replace_section(text, render_reference(docs))
        if new is not None:
            outputs[guide] = new
    return outputs


def check_model_outputs(catalog_dir: Path, problems: Problems) -> None:
    """Stale or missing schema files and a stale field reference are errors.

    A catalogue folder without a schema/ folder (a test fixture, a fork that opted out) is skipped.
    """
    if not (catalog_dir / "schema").is_dir():
        return
    guide = contributing_guide(catalog_dir)
    if guide.is_file():
        raw = guide.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.error(Location(display_name(guide), *line_col(raw, exc.start)), "-", "-",
                           f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}), so its field reference cannot be checked",
                           "save it as UTF-8")
    for path, text in model_outputs(catalog_dir).items():
        name = display_name(path)
        if not path.exists():
            problems.error(Location(name), "-", "-", f"missing, {HINT}")
        elif (old := read_generated(path)) != text:
            line = 1
            if path.suffix == ".md" and old is not None:
                from .fieldref import BEGIN
                line = old[:old.find(BEGIN)].count("\n") + 1
            problems.error(Location(name, line), "-", "-", f"out of date, {HINT}")


def write_model_outputs(catalog_dir: Path) -> list[Path]:
    return write_all(model_outputs(catalog_dir))


def header(path: Path) -> str:
    return f"# yaml-language-server: $schema=schema/{path.stem}.schema.json"


def ensure_schema_header(path: Path) -> bool:
    """Make ``path`` start with the yaml-language-server line naming its schema; True if changed."""
    text = path.read_text(encoding="utf-8").removeprefix("\ufeff")  # a BOM may only start the file
    first, _, rest = text.partition("\n")
    wanted = header(path)
    if first == wanted:
        return False
    body = rest if first.startswith("# yaml-language-server:") else text
    write_atomic(path, f"{wanted}\n{body}")
    return True


def command(args: Any) -> int:
    """The ``schema`` subcommand."""
    import sys

    if not args.catalog.is_dir():  # a typo must not become a new folder of schema files
        print(f"error: --catalog {args.catalog}: no such folder (a catalogue folder holds papers.yaml, ...)",
              file=sys.stderr)
        return 1
    changed = write_model_outputs(args.catalog)
    for path in model_outputs(args.catalog):
        print(f"{display_name(path)}: {'written' if path in changed else 'unchanged'}")
    if args.headers:
        for stem in SHAPES:
            path = args.catalog / f"{stem}.yaml"
            if path.exists() and ensure_schema_header(path):
                print(f"{display_name(path)}: schema header added")
    return 0
