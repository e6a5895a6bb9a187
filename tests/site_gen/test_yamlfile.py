"""site_gen.yamlfile: every value keeps its line and column, and bad YAML is one located problem, never a crash.

Expected positions are counted by hand from the tiny inputs (lines and columns are 1-based).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
import yaml

from site_gen.problems import Location, Problem, Problems
from site_gen.yamlfile import YamlFile, load_yaml

from .conftest import edit_catalogue


def _load(tmp_path: Path, content: str | bytes) -> tuple[YamlFile | None, list[Problem]]:
    path = tmp_path / "f.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    problems = Problems()
    doc = load_yaml(path, "f.yaml", problems)
    return doc, problems.items


def _at(line: int, col: int) -> Location:
    return Location("f.yaml", line, col)


# --- locating values -------------------------------------------------------------------------------------------

def test_a_path_that_leaves_the_tree_is_located_at_its_last_existing_node(tmp_path: Path) -> None:
    """An index past a list's end, a key into a list, an index into a scalar: the closest existing parent."""
    doc, problems = _load(tmp_path, "- [a, b]\n- c\n")
    assert problems == [] and doc is not None
    inner, c = _at(1, 3), _at(2, 3)
    assert doc.where((0, 1)) == _at(1, 7)
    assert doc.where((0, 2)) == inner  # one past the end
    assert doc.where((0, 5)) == inner
    assert doc.where((2,)) == doc.where(()) == _at(1, 1)
    assert doc.where((0, "x")) == inner  # a list has no keys
    assert doc.where((1, 0)) == c  # nothing lies below a scalar


def test_a_file_without_a_node_tree_still_names_the_file() -> None:
    assert YamlFile("f.yaml").where((0, "id")) == Location("f.yaml")


def test_a_list_item_has_no_key_so_key_where_gives_the_item(tmp_path: Path) -> None:
    doc, _ = _load(tmp_path, "- {id: a}\n- {id: b}\n")
    assert doc is not None
    assert doc.key_where((1,)) == doc.where((1,)) == _at(2, 3)
    assert doc.key_where(()) == _at(1, 1)
    assert doc.key_where((1, "id")) == _at(2, 4)  # a mapping key: the key itself


def test_entry_id_names_the_entry_or_dash_when_none_is_known(tmp_path: Path) -> None:
    """The documented rule: the entry's id, else its 1-based position, and "-" outside every entry."""
    doc, _ = _load(tmp_path, "- {id: a}\n- b\n")
    assert doc is not None
    assert doc.entry_id((0, "year")) == "a"
    assert doc.entry_id((1,)) == "#2"
    assert doc.entry_id(()) == "-"
    assert doc.entry_id((2,)) == doc.entry_id((7, "id")) == "-"  # past the last entry: in none
    scalar, _ = _load(tmp_path, "just text\n")
    assert scalar is not None and scalar.entry_id((0,)) == "-"


def test_a_bad_key_of_the_top_level_mapping_lies_in_no_entry(tmp_path: Path) -> None:
    _, problems = _load(tmp_path, "12: {name: a}\n")
    assert [(p.where, p.entry, p.field) for p in problems] == [(_at(1, 1), "-", "-")]


# --- unusable files: located at the offending character ------------------------------------------------------

@pytest.mark.parametrize("raw, where", [
    (b"a: 1\nb: 2\nc: \xe9\n", (3, 4)),  # the last line of several
    (b"\nx: \xe9\n", (2, 4)),  # after a blank first line
    (b"x: \xe9\ny: 1\nz: 2\n", (1, 4)),  # the first line of several
], ids=["last-line", "after-blank-line", "first-line"])
def test_a_byte_that_is_not_utf8_is_located_at_its_line_and_column(tmp_path: Path, raw: bytes,
                                                                    where: tuple[int, int]) -> None:
    doc, problems = _load(tmp_path, raw)
    assert doc is None
    assert [(p.where, p.entry, p.field) for p in problems] == [(_at(*where), "-", "-")]


def test_a_tab_in_the_indentation_is_located_at_the_first_tab(tmp_path: Path) -> None:
    doc, problems = _load(tmp_path, "- id: a\n  \t\ttitle: x\n")
    assert doc is None
    assert [p.where for p in problems] == [_at(2, 3)]


def test_a_syntax_error_is_located_at_its_column(tmp_path: Path) -> None:
    doc, problems = _load(tmp_path, "- id: a\n  title: x: y\n")  # the second colon, column 11
    assert doc is None
    assert [(p.where, p.entry, p.field) for p in problems] == [(_at(2, 11), "-", "-")]


@pytest.mark.parametrize("text, where", [
    ("- id: a\n  title: b\x07c\n", (2, 11)),
    ("- id: é\n  title: ü\x00\n", (2, 11)),  # columns count characters, not UTF-8 bytes
    ("\ufeff- id: a\x1b\n", (1, 8)),  # after a byte-order mark
], ids=["bell", "nul-after-non-ascii", "escape-after-bom"])
def test_a_control_character_is_located_at_its_line_and_column(tmp_path: Path, text: str,
                                                               where: tuple[int, int]) -> None:
    """PyYAML's reader refuses the file without a line; we find the character ourselves, in one line of text."""
    doc, problems = _load(tmp_path, text)
    assert doc is None
    [problem] = problems
    assert (problem.where, problem.entry, problem.field) == (_at(*where), "-", "-")
    assert "\n" not in problem.format()


def test_nesting_too_deep_is_reported_for_the_file_without_blaming_an_alias(tmp_path: Path) -> None:
    """900 levels: under PyYAML's own limit (1000 since 6.0.4), so the conversion runs out of stack first
    (the limit is lowered to make sure) and the file as a whole is blamed, not an alias."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(600)
    try:
        doc, problems = _load(tmp_path, "- " + "[" * 900 + "]" * 900 + "\n")
    finally:
        sys.setrecursionlimit(limit)
    assert doc is None
    [problem] = problems
    assert (problem.where, problem.entry, problem.field, problem.hint) == (Location("f.yaml"), "-", "-", None)
    assert problem.message == "YAML error: nested too deeply"


def test_nesting_past_pyyamls_own_limit_is_one_problem_that_blames_no_alias(tmp_path: Path) -> None:
    """3000 levels: PyYAML 6.0.4 refuses them while scanning (located where the limit is passed),
    older versions leave it to the conversion (the whole file); either way one problem, no alias."""
    doc, problems = _load(tmp_path, "- " + "[" * 3000 + "]" * 3000 + "\n")
    assert doc is None
    [problem] = problems
    assert problem.where.file == "f.yaml" and problem.where.line == 1 and "nest" in problem.message
    assert "alias" not in problem.message


# --- keys and merges ---------------------------------------------------------------------------------------------

def test_a_mapping_made_only_of_merges_takes_the_first_merge_for_a_shared_key(tmp_path: Path) -> None:
    """YAML merge keys: with ``<<: [*a, *b]`` a key both bring is no duplicate key, and its value is the
    one PyYAML's own loader picks (*a's up to PyYAML 6.0.3, *b's in 6.0.4)."""
    text = "- &a {id: a, year: 2020}\n- &b {id: b, year: 2021}\n- <<: [*a, *b]\n"
    doc, problems = _load(tmp_path, text)
    assert problems == [] and doc is not None
    assert doc.data == yaml.safe_load(text)
    assert doc.data[2] in ({"id": "a", "year": 2020}, {"id": "b", "year": 2021})


def test_a_duplicate_key_in_a_nested_mapping_is_located_in_its_entry(tmp_path: Path) -> None:
    doc, problems = _load(tmp_path, "- id: a\n  links: {home: x, home: y}\n")
    assert doc is not None and doc.data == [{"id": "a", "links": {"home": "x"}}]  # the first value is kept
    assert [(p.where, p.entry, p.field) for p in problems] == [(_at(2, 20), "a", "links.home")]


def test_a_key_read_as_a_date_is_named_as_a_date(tmp_path: Path) -> None:
    """The message names the type YAML gave the key, whatever it is, not "null"."""
    _, problems = _load(tmp_path, "- id: a\n  2020-01-02: x\n")
    [problem] = problems
    assert problem.where == _at(2, 3)
    assert f"read as a {datetime.date.__name__} " in problem.message


# --- values the safe constructor refuses ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "!!int abc", "!!float abc", "!!bool maybe", "!!timestamp abc", "!Fake news", "<<", "!!seq x", "!!map x",
])
def test_a_value_yaml_cannot_construct_is_a_located_problem_not_a_crash(tmp_path: Path, value: str) -> None:
    """``yaml.safe_load`` raises on these (ConstructorError, ValueError, KeyError, AttributeError, by tag);
    a collection tag on a scalar must be refused too, not read as an empty list or mapping."""
    with pytest.raises(Exception):
        yaml.safe_load(f"x: {value}\n")
    doc, problems = _load(tmp_path, f"- id: a\n  title: {value}\n")
    assert doc is not None
    [problem] = problems
    assert (problem.where, problem.entry, problem.field) == (_at(2, 10), "a", "title")
    assert value.split()[-1] in problem.message  # names the value as written


def test_a_key_yaml_cannot_construct_is_a_located_problem_and_is_dropped(tmp_path: Path) -> None:
    doc, problems = _load(tmp_path, "- id: a\n  !!int abc: x\n")
    assert doc is not None and doc.data == [{"id": "a"}]
    assert [(p.where, p.entry) for p in problems] == [(_at(2, 3), "a")]


@pytest.mark.parametrize("text, where", [
    ("- <<: 1\n  id: a\n", (1, 7)),
    ("- <<: [1]\n  id: a\n", (1, 8)),
], ids=["scalar", "list-of-scalar"])
def test_a_merge_of_something_not_a_mapping_is_a_located_problem(tmp_path: Path, text: str,
                                                                  where: tuple[int, int]) -> None:
    doc, problems = _load(tmp_path, text)
    assert doc is not None and doc.data == [{"id": "a"}]
    assert [(p.where, p.entry) for p in problems] == [(_at(*where), "a")]


def test_a_title_starting_with_an_exclamation_mark_fails_check_cleanly(cli, project: Path) -> None:
    """``title: !Fake news`` is a YAML tag: ``check`` names the place and exits 1 instead of a traceback."""
    edit_catalogue(project, "papers.yaml", "  title: Gradient Surgery", "  title: !Fake news Gradient Surgery")
    code, _, err = cli("check", "--catalog", str(project / "catalog"), "--no-sync")
    assert code == 1 and "Traceback" not in err
    assert any(line.split("/project/", 1)[-1].startswith("catalog/papers.yaml:3:10: pcgrad: title: ")
               for line in err.splitlines())


# --- what each problem says --------------------------------------------------------------------------------------

def test_a_control_character_problem_names_the_character_and_says_what_to_do(tmp_path: Path) -> None:
    """The message names the character by its code point (it is invisible in an editor), and a hint follows."""
    _, problems = _load(tmp_path, "- id: a\n  title: b\x07c\n")
    [problem] = problems
    assert problem.message == "character U+0007 is not allowed in YAML"
    assert problem.hint


def test_an_unreadable_value_is_kept_as_written_and_its_tag_is_named_as_written(tmp_path: Path) -> None:
    """``!!int abc``: the data keeps the text ``abc`` (the problem is already reported), and the message
    names the tag in the short ``!!`` form the contributor wrote, not PyYAML's long one."""
    doc, problems = _load(tmp_path, "- id: a\n  title: !!int abc\n")
    assert doc is not None and doc.data == [{"id": "a", "title": "abc"}]
    [problem] = problems
    assert problem.message == "YAML cannot read `abc` as !!int"


def test_a_tagged_collection_used_as_a_key_is_called_this_value(tmp_path: Path) -> None:
    """A key ``!!int [1]`` has no text to quote back, so the message says "this value", at the key."""
    doc, problems = _load(tmp_path, "- id: a\n  ? !!int [1]\n  : x\n")
    assert doc is not None and doc.data == [{"id": "a"}]
    assert [(p.where, p.entry, p.message) for p in problems] == [
        (_at(2, 5), "a", "YAML cannot read this value as !!int")]


def test_the_keys_after_an_unreadable_key_are_still_read(tmp_path: Path) -> None:
    """An unreadable key drops only itself: the mapping's later keys stay."""
    doc, problems = _load(tmp_path, "- id: a\n  !!int abc: x\n  title: t\n  year: 2020\n")
    assert doc is not None and doc.data == [{"id": "a", "title": "t", "year": 2020}]
    assert [p.where for p in problems] == [_at(2, 3)]


def test_a_tab_that_ruamel_accepts_is_not_blamed_when_ruamel_refuses_something_else(tmp_path: Path) -> None:
    """A tab inside a quoted title is fine for both YAML readers; ruamel.yaml still refuses this file, for
    its duplicate key, and that must not turn into a "tab character" problem: the duplicate is the only one."""
    doc, problems = _load(tmp_path, '- id: a\n  title: "x\ty"\n  id: b\n')
    assert doc is not None and doc.data == [{"id": "a", "title": "x\ty"}]
    assert [(p.where, p.message) for p in problems] == [(_at(3, 3), "duplicate key 'id' (first defined on line 1)")]


def test_a_str_tagged_collection_key_is_refused_like_any_other_tagged_collection_key(tmp_path: Path) -> None:
    """``? !!str {b: c}`` cannot be read as text, like ``? !!int [1]``; the message should say so plainly."""
    _, problems = _load(tmp_path, "- id: a\n  ? !!str {b: c}\n  : x\n")
    assert [(p.where, p.message) for p in problems] == [(_at(2, 5), "YAML cannot read this value as !!str")]


def test_a_tag_on_a_collection_value_is_a_located_problem(tmp_path: Path) -> None:
    """``tags: !Fake [x]`` and ``title: !!str [x]`` are refused by PyYAML's safe loader, as ``!Fake news`` is."""
    for value in ("!Fake [x]", "!!str [x]"):
        with pytest.raises(yaml.constructor.ConstructorError):
            yaml.safe_load(f"x: {value}\n")
        _, problems = _load(tmp_path, f"- id: a\n  tags: {value}\n")
        assert [(p.where, p.entry, p.field) for p in problems] == [(_at(2, 9), "a", "tags")]


def test_a_self_alias_is_located_even_after_a_tab_that_only_libyaml_reads(tmp_path: Path) -> None:
    """``venue:<tab>NeurIPS`` is read by the C loader we compose with, but PyYAML's pure-Python scanner
    refuses it; looking for the alias must read the file the same way, or the tab becomes a traceback."""
    doc, problems = _load(tmp_path, "- id: a\n  venue:\tNeurIPS\n- &b [*b]\n")
    assert doc is None
    assert [(p.where, p.message) for p in problems] == [
        (_at(3, 7), "YAML error: alias *b is used inside the node it names")]


def test_a_syntax_error_gives_pyyamls_context_and_problem_in_one_line(tmp_path: Path) -> None:
    """An unclosed ``[``: the message is what PyYAML says (its context, then its problem, a space apart),
    on one line, located where PyYAML noticed it (the end of the file)."""
    text = "- id: a\n  tags: [x, y\n"
    with pytest.raises(yaml.MarkedYAMLError) as raised:
        yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert raised.value.context and raised.value.problem
    doc, problems = _load(tmp_path, text)
    assert doc is None
    assert [(p.where, p.message) for p in problems] == [
        (_at(3, 1), f"YAML syntax error: {raised.value.context} {raised.value.problem}")]
