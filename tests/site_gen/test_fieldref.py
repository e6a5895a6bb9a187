"""CONTRIBUTING.md's field reference: the type words, the rows of each table, and where the table goes."""

from __future__ import annotations

import copy

import pytest

from site_gen import fieldref
from site_gen.fieldref import BEGIN, END, describe, render_reference, replace_section
from site_gen.jsonschema import schemas

PLACEHOLDER = "(not documented yet: add it to site_gen/fieldref.py)"


@pytest.mark.parametrize("prop, words", [
    ({"type": "boolean"}, "boolean"),       # a type with no word of its own is named as JSON Schema names it
    ({"type": "number"}, "number"),
    ({}, "any"),                            # no type at all: anything goes
    ({"anyOf": [{"type": "boolean"}, {"type": "null"}]}, "boolean"),
    ({"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}, "list of (text or integer)"),
    ({"type": "array", "items": {"type": "string"}}, "list of texts"),
    ({"type": "array", "items": {"$ref": "#/$defs/Section"}}, "list of sections"),
])
def test_describe_words_each_kind_of_property(prop: dict, words: str) -> None:
    """A list of alternatives is bracketed, so 'list of (text or integer)' is not read as
    'list of text, or integers'; types without a word of their own keep their JSON Schema name."""
    assert describe(prop, {}) == words


def test_a_list_with_no_item_type_is_still_described() -> None:
    """`items` is optional in JSON Schema (a bare `list` field): the table still gets a list row."""
    assert describe({"type": "array"}, {}).startswith("list of ")


def _rows(text: str, model: str) -> dict[str, list[str]]:
    """Field name -> its cells (required, type, meaning) in the table of ``model``."""
    table = text.split(f"({model.lower()})", 1)[1].split("\n\n", 2)[1]
    cells = [line.strip("|").split(" | ") for line in table.splitlines()[2:]]
    return {row[0].strip(" `"): [c.strip() for c in row[1:]] for row in cells}


def test_an_undocumented_field_and_a_model_with_no_required_field(monkeypatch) -> None:
    """A field the models gained but HELP lacks gets a row that says where to document it; a model
    whose fields are all optional (pydantic then writes no `required` list) renders, none marked yes."""
    docs = copy.deepcopy(schemas())
    venue = docs["venues"]["$defs"]["Venue"]
    venue["properties"]["city"] = {"type": "string"}
    del venue["required"]
    rows = _rows(render_reference(docs), "Venue")
    assert rows["city"] == ["", "text", PLACEHOLDER]
    assert rows["name"] == ["", "text", fieldref.HELP["Venue"]["name"]]
    monkeypatch.delitem(fieldref.HELP, "Venue")  # a model added to FILES before HELP learns of it
    rows = _rows(render_reference(docs), "Venue")
    assert {name: cells[2] for name, cells in rows.items()} == dict.fromkeys(["name", "kind", "city"], PLACEHOLDER)


def test_required_fields_are_marked_yes() -> None:
    rows = _rows(render_reference(schemas()), "Paper")
    assert rows["id"][0] == "yes" and rows["doi"][0] == ""


def test_the_reference_is_replaced_from_the_first_begin_to_the_first_end() -> None:
    """A guide may open with the table; a BEGIN marker pasted twice inside the old table goes with it;
    text after the table stays even when it quotes the END marker."""
    assert replace_section(f"{BEGIN}\nold\n{END}\nrest\n", "new") == "new\nrest\n"
    assert replace_section(f"a\n{BEGIN}\nx\n{BEGIN}\ny\n{END}\nc\n", "new") == "a\nnew\nc\n"
    assert replace_section(f"a\n{BEGIN}\nx\n{END}\nb {END}\n", "new") == f"a\nnew\nb {END}\n"


def test_an_end_marker_quoted_before_the_table_does_not_hide_it() -> None:
    """The docstring promises None only when the markers are missing; here both are present, in order,
    after a mention of END in the text. Returning None silently drops CONTRIBUTING.md from `schema`
    and `check`: the reference is neither updated nor reported stale."""
    text = f"The table ends at `{END}`.\n\n{BEGIN}\nold\n{END}\n"
    assert replace_section(text, "new") == f"The table ends at `{END}`.\n\nnew\n"
