"""``add`` writing: where the new entry goes in papers.yaml, how it is written, and what is refused.

The promise (site_gen/add.py): the new entry is emitted in the file's own style and spliced in as
text, so every existing byte stays. Most tests therefore compare whole texts: the old file with the
rendered entry inserted at one place, and nothing else changed.
"""

from __future__ import annotations

import pytest
import yaml

from site_gen.add import AddError, plan_insert, render_entry, verify

NEW = {"id": "n", "title": "N", "topics": ["x"]}
ONE_LINE_ERROR = "; fix it first (run python -m site_gen check)"


def _inserted(text: str, entry: dict = NEW) -> str:
    """plan_insert's new text, checked to parse back as the old entries plus ``entry``."""
    new_text = plan_insert(text, entry).text
    old = yaml.safe_load(text)
    assert entry in yaml.safe_load(new_text) and len(yaml.safe_load(new_text)) == len(old) + 1
    return new_text


# --- how the entry is written -----------------------------------------------------------------------

def test_an_old_style_arxiv_id_is_quoted_like_every_arxiv_id() -> None:
    """CONTRIBUTING: arXiv ids are written in quotes, even ones YAML would read as text anyway."""
    text = render_entry({"id": "n", "arxiv": "hep-th/9901001", "topics": ["x"]}, 0)
    assert '\n  arxiv: "hep-th/9901001"\n' in text


def test_values_that_read_back_unchanged_stay_plain() -> None:
    """Only what YAML would misread is quoted: a comma is harmless in a title (it is only a
    separator inside [...]) and so is the letter X anywhere."""
    entry = {"id": "n", "title": "Cross-Stitch Networks, Revisited for X", "authors": ["Xiaojuan Qi", "Xu Li"],
             "topics": ["x"]}
    text = render_entry(entry, 0)
    assert text == ("- id: n\n  title: Cross-Stitch Networks, Revisited for X\n"
                    "  authors: [Xiaojuan Qi, Xu Li]\n  topics: [x]\n")
    assert yaml.safe_load(text) == [entry]


# --- files whose entries start at column 2 ---------------------------------------------------------

INDENTED = ("  - id: a\n    topics: [x]\n\n"
            "  # section y\n  - id: b\n    topics: [y]\n")


def test_an_entry_between_indented_entries_takes_their_indentation() -> None:
    """The new entry's '-' sits at column 2 like the others; the section comment (also at column 2)
    stays above the entry it introduces and keeps its indentation."""
    assert _inserted(INDENTED) == ("  - id: a\n    topics: [x]\n\n"
                                   "  - id: n\n    title: N\n    topics: [x]\n\n"
                                   "  # section y\n  - id: b\n    topics: [y]\n")


@pytest.mark.parametrize("text, dash", [
    ("- id: a\n  topics: [x]\n", ""), ("  - id: a\n    topics: [x]\n", "  "),
    ("-   id: a\n    topics: [x]\n", ""), ("  -   id: a\n      topics: [x]\n", "  "),
    ("-\n  id: a\n  topics: [x]\n", ""), ("  -\n    id: a\n    topics: [x]\n", "  "),
], ids=["col0", "col2", "col0-wide", "col2-wide", "col0-dash-alone", "col2-dash-alone"])
def test_an_appended_entry_puts_its_dash_under_the_first_entrys_dash(text: str, dash: str) -> None:
    """One-entry files in several layouts (extra spaces after '-', '-' alone on its line): the new
    entry's '-' goes in the column of the existing '-', whatever follows it."""
    assert _inserted(text) == text + "\n" + render_entry(NEW, len(dash))
    assert f"\n{dash}- id: n\n" in _inserted(text)


# --- where the entry goes ------------------------------------------------------------------------

def test_an_entry_whose_first_topic_no_entry_has_is_appended() -> None:
    text = "- id: a\n  topics: [x]\n\n- id: b\n  topics: [y, z]\n"
    entry = {"id": "n", "title": "N", "topics": ["z"]}
    assert _inserted(text, entry) == text + "\n" + render_entry(entry, 0)


def test_an_item_that_is_not_an_entry_does_not_stop_placement() -> None:
    """A stray scalar item (check reports it) is kept as it is; the entry still finds its place."""
    text = "- id: a\n  topics: [x]\n\n- just a note\n\n- id: b\n  topics: [y]\n"
    assert _inserted(text) == ("- id: a\n  topics: [x]\n\n" + render_entry(NEW, 0)
                               + "\n- just a note\n\n- id: b\n  topics: [y]\n")


@pytest.mark.parametrize("last_line", ["  notes: [keep my spaces]   \n", "  title: Model X\n"],
                         ids=["trailing-spaces", "ends-in-X"])
def test_appending_keeps_the_last_line_byte_for_byte(last_line: str) -> None:
    text = "- id: a\n  topics: [x]\n" + last_line
    assert _inserted(text) == text + "\n" + render_entry(NEW, 0)


@pytest.mark.parametrize("last_line", ["  notes: [keep my spaces]   \n", "  title: Model X\n"],
                         ids=["trailing-spaces", "ends-in-X"])
def test_inserting_keeps_the_anchor_entrys_last_line_byte_for_byte(last_line: str) -> None:
    anchor, rest = "- id: a\n  topics: [x]\n" + last_line, "- id: b\n  topics: [y]\n"
    assert _inserted(anchor + "\n" + rest) == anchor + "\n" + render_entry(NEW, 0) + "\n" + rest


def test_a_blank_line_inside_the_anchor_entry_does_not_split_it() -> None:
    text = "- id: a\n  title: A\n\n  topics: [x]\n- id: b\n  topics: [y]\n"
    assert _inserted(text) == ("- id: a\n  title: A\n\n  topics: [x]\n\n" + render_entry(NEW, 0)
                               + "\n- id: b\n  topics: [y]\n")


def test_a_note_indented_inside_the_anchor_entry_stays_with_it() -> None:
    """No blank line between the note and the next entry: the note still belongs to 'a'."""
    text = "- id: a\n  topics: [x]\n  # note on a\n- id: b\n  topics: [y]\n"
    assert _inserted(text) == ("- id: a\n  topics: [x]\n  # note on a\n\n" + render_entry(NEW, 0)
                               + "\n- id: b\n  topics: [y]\n")


def test_section_comments_split_by_blank_lines_all_stay_above_the_next_entry() -> None:
    section = "# section y\n\n# about b\n- id: b\n  topics: [y]\n"
    text = "- id: a\n  topics: [x]\n\n" + section
    assert _inserted(text) == "- id: a\n  topics: [x]\n\n" + render_entry(NEW, 0) + "\n" + section


# --- what is refused, and how it is said -----------------------------------------------------------

@pytest.mark.parametrize("broken, start, what", [
    ("- id: a\n  title: [unclosed\n", "papers.yaml:3:1: ",
     "while parsing a flow sequence expected ',' or ']', but got '<stream end>'"),
    ("- id: a\n   b: c\n", "papers.yaml:2:5: ", "mapping values are not allowed here"),
    ("- id: a\x07\n", "papers.yaml: ", "unacceptable character #x0007: special characters are not allowed"),
], ids=["with-context", "without-context", "reader-error"])
def test_an_unreadable_papers_yaml_is_one_located_line(broken: str, start: str, what: str) -> None:
    """plan_insert is public: called on a broken file it says where (line:column of the problem, 1-based)
    and what, on one line, and nothing else."""
    with pytest.raises(AddError) as info:
        plan_insert(broken, NEW)
    assert str(info.value) == start + what + ONE_LINE_ERROR


def test_a_papers_yaml_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(AddError) as info:
        plan_insert("id: a\ntopics: [x]\n", NEW)
    assert str(info.value) == "papers.yaml is not a list of entries; fix it first (run python -m site_gen check)"


ROUND_TRIP = "internal error: the edited papers.yaml would not round-trip; nothing written"


@pytest.mark.parametrize("new_text", ["", "n: 1\n", "- id: a\n  topics: [x]\n\n- id: n\n  title: N\n  topics: [x]\n"
                                      "\n- id: n\n  title: N\n  topics: [x]\n"],
                         ids=["empty", "mapping", "entry-twice"])
def test_verify_refuses_a_new_text_that_is_not_the_old_list_plus_one(new_text: str) -> None:
    """Not a list at all, or the new entry written twice: refused with the internal-error message."""
    with pytest.raises(AddError) as info:
        verify("- id: a\n  topics: [x]\n", new_text, NEW)
    assert str(info.value) == ROUND_TRIP


# --- bugs found by reading the survivors (each test failed on the code before the fix) --------------

def test_an_entry_added_to_an_empty_flow_list_is_the_only_entry() -> None:
    """'[]' is how an empty catalogue is written, and check accepts it; text appended after the ']'
    was not YAML."""
    new_text = plan_insert("# papers, newest topic first\n[]\n", NEW).text
    assert yaml.safe_load(new_text) == [NEW] and "- id: n\n" in new_text.splitlines(keepends=True)
    assert new_text.startswith("# papers, newest topic first\n")


def test_a_flow_list_with_entries_is_refused_before_anything_is_planned() -> None:
    with pytest.raises(AddError, match=r"^papers\.yaml is a flow list \('\[\.\.\.\]'\); add writes entries as a "
                                       r"block list"):
        plan_insert("[{id: a, topics: [x]}]\n", NEW)


def test_verify_refuses_a_new_text_that_does_not_parse() -> None:
    """The round-trip check is the last guard before writing: an edit that is not YAML at all is its
    'nothing written' error, not a traceback from the YAML library."""
    with pytest.raises(AddError, match="would not round-trip; nothing written"):
        verify("[]\n", "[]\n\n- id: n\n  title: N\n  topics: [x]\n", NEW)


def test_an_entry_goes_between_dash_alone_entries_intact() -> None:
    """With '-' alone on its line, the new entry went between that '-' and its mapping."""
    text = "-\n  id: a\n  topics: [x]\n-\n  id: b\n  topics: [y]\n"
    assert yaml.safe_load(plan_insert(text, NEW).text) == [{"id": "a", "topics": ["x"]}, NEW,
                                                           {"id": "b", "topics": ["y"]}]


@pytest.mark.parametrize("tag", ["!!int", "!!float", "!!bool"])
def test_a_value_its_tag_cannot_hold_is_a_located_error(tag: str) -> None:
    """ruamel raises a bare ValueError/KeyError for '!!int x'; it is now an AddError at the value."""
    with pytest.raises(AddError, match=r"^papers\.yaml:1:7: .*fix it first \(run python -m site_gen check\)$"):
        plan_insert(f"- id: {tag} x\n  topics: [x]\n", NEW)
