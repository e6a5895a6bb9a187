"""The schema generator's own machinery: validator names, the bytes of the files, and where staleness is reported."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BeforeValidator, TypeAdapter

from site_gen import models
from site_gen.fieldref import BEGIN, END, HELP
from site_gen.jsonschema import CatalogueSchema, check_model_outputs, ensure_schema_header, model_outputs
from site_gen.problems import Problems

from .test_write_atomic import run_in_ascii_locale

STALE = "CONTRIBUTING.md:{}:1: -: -: out of date, run python -m site_gen schema"


def _schema(annotation: object) -> dict:
    return TypeAdapter(annotation).json_schema(schema_generator=CatalogueSchema)


def test_a_validator_wrapped_in_partials_keeps_its_schema_rules() -> None:
    """pydantic may hand the generator a functools.partial instead of the function: the rules added by
    the function's name (the URL pattern, the one-item list) must still be found through the wrapping."""
    url = _schema(Annotated[str, AfterValidator(functools.partial(functools.partial(models._url)))])
    assert url["format"] == "uri" and url["pattern"].startswith("^https?://")
    items = _schema(Annotated[list[str], BeforeValidator(functools.partial(models._as_list))])
    assert items == {"anyOf": [{"type": "string"}, {"items": {"type": "string"}, "type": "array"}]}


def test_descriptions_keep_non_ascii_text_as_written(monkeypatch, tmp_path: Path) -> None:
    """An editor shows a field's description from the schema file; accented text is written as
    itself, not as \\u escapes, so the committed file reads like the guide it comes from."""
    monkeypatch.setitem(HELP["Paper"], "title", "Title as printed, accents included (Søgaard).")
    text = model_outputs(tmp_path / "catalog")[tmp_path / "catalog" / "schema" / "papers.schema.json"]
    assert "accents included (Søgaard)." in text and "\\u00f8" not in text
    assert json.loads(text)["$defs"]["Paper"]["properties"]["title"]["description"].endswith("(Søgaard).")


def _sync_problems(catalog: Path) -> list[str]:
    problems = Problems()
    check_model_outputs(catalog, problems)
    return [p.format() for p in problems.items]


def test_a_stale_reference_is_reported_at_its_first_begin_marker(project: Path, cli, monkeypatch) -> None:
    """The location is the line of the BEGIN marker that `schema` replaces from, the first one, even
    when a second copy of the marker sits inside the old table."""
    monkeypatch.chdir(project)
    (project / "catalog" / "schema").mkdir()
    assert cli("schema", "--catalog", "catalog")[0] == 0
    (project / "CONTRIBUTING.md").write_text(f"# Guide\n\n{BEGIN}\nold\n{BEGIN}\n{END}\n", encoding="utf-8")
    assert _sync_problems(Path("catalog")) == [STALE.format(3)]


def test_the_guide_and_catalogue_are_read_as_utf8_whatever_the_locale(project: Path) -> None:
    """CONTRIBUTING.md and papers.yaml hold non-ASCII text (Søgaard): `schema`, `schema --headers` and
    `check` read them as UTF-8 under any locale, and still place a stale reference at its line."""
    (project / "catalog" / "schema").mkdir()
    (project / "CONTRIBUTING.md").write_text(f"# Übersicht\n\n{BEGIN}\nold\n{END}\n", encoding="utf-8")
    out = run_in_ascii_locale(f"""
        from pathlib import Path
        from site_gen.jsonschema import check_model_outputs, ensure_schema_header, write_model_outputs
        from site_gen.problems import Problems
        catalog, guide = Path("catalog"), Path("CONTRIBUTING.md")
        write_model_outputs(catalog)
        for stale in (False, True):
            if stale:
                guide.write_text("# \\u00dcbersicht\\n\\n{BEGIN}\\nold\\n{END}\\n", encoding="utf-8")
            problems = Problems()
            check_model_outputs(catalog, problems)
            print([p.format() for p in problems.items])
        print(ensure_schema_header(catalog / "papers.yaml"))
    """, project)
    assert out.splitlines() == ["[]", repr([STALE.format(3)]), "True"]
    papers = project / "catalog" / "papers.yaml"
    assert papers.read_text(encoding="utf-8").startswith("# yaml-language-server: $schema=schema/papers.schema.json\n")
    assert any("Anders Søgaard" in p["authors"] for p in yaml.safe_load(papers.read_text(encoding="utf-8")))


def test_a_schema_header_before_a_byte_order_mark_keeps_the_file_valid(tmp_path: Path) -> None:
    """`check` accepts a catalogue file saved with a BOM (Windows editors do this). Adding the header
    in front leaves U+FEFF at the start of line 2, and the file then fails with a YAML syntax error."""
    path = tmp_path / "venues.yaml"
    body = "arXiv: {name: arXiv, kind: preprint}\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert ensure_schema_header(path) is True
    assert yaml.safe_load(path.read_text(encoding="utf-8-sig")) == yaml.safe_load(body)


def test_a_schema_file_that_is_not_utf8_is_reported_out_of_date(project: Path, cli, monkeypatch) -> None:
    """`check` reports a generated file it cannot read as out of date (the fix, `schema`, rewrites it)
    instead of stopping with a UnicodeDecodeError traceback."""
    monkeypatch.chdir(project)
    (project / "catalog" / "schema").mkdir()
    assert cli("schema", "--catalog", "catalog")[0] == 0
    Path("catalog/schema/papers.schema.json").write_bytes('{"caf\u00e9": 1}\n'.encode("latin-1"))
    assert _sync_problems(Path("catalog")) == [
        "catalog/schema/papers.schema.json:1:1: -: -: out of date, run python -m site_gen schema"]


def test_a_guide_that_is_not_utf8_is_one_error_and_left_alone(project: Path, cli, monkeypatch) -> None:
    """CONTRIBUTING.md is written by people, with a generated part: one saved as Latin-1 is reported
    (it cannot be compared) and `schema` does not rewrite it, where it used to stop with a traceback."""
    monkeypatch.chdir(project)
    (project / "catalog" / "schema").mkdir()
    guide = Path("CONTRIBUTING.md")
    guide.write_bytes(f"# \u00dcbersicht\n\n{BEGIN}\nold\n{END}\n".encode("latin-1"))
    before = guide.read_bytes()
    assert cli("schema", "--catalog", "catalog")[0] == 0
    assert guide.read_bytes() == before
    assert _sync_problems(Path("catalog")) == [
        "CONTRIBUTING.md:1:3: -: -: not valid UTF-8 (byte 0xdc), so its field reference cannot be checked "
        "(hint: save it as UTF-8)"]
