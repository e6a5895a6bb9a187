"""Bad input gets one located, plain message per problem, exit 1, and nothing written."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import yaml

from site_gen.problems import Problems
from site_gen.yamlfile import load_yaml

from .conftest import edit_catalogue

NEXT_YEAR = datetime.date.today().year + 1


def _check(cli, project: Path) -> tuple[int, list[str]]:
    code, _, err = cli("check", "--catalog", str(project / "catalog"), "--no-sync")
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if ": warning: " not in line]


def _problem_lines(lines: list[str]) -> list[str]:
    return [line.split("/project/", 1)[-1] for line in lines[:-1]]


def _problems_of_failed_check(cli, project: Path) -> list[str]:
    """The problem lines of a ``check`` that must fail (exit 1)."""
    code, lines = _check(cli, project)
    assert code == 1, lines
    return _problem_lines(lines)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- id: a\n  title: [unclosed\n",
         "catalog/papers.yaml:3:1: -: -: YAML syntax error: while parsing a flow sequence"),
        ("- id: a\n\ttitle: x\n",
         "catalog/papers.yaml:2:1: -: -: tab character in indentation (hint: indent with spaces)"),
        ("",
         "catalog/papers.yaml:1:1: -: -: file is empty"),
        ("# only a comment\n",
         "catalog/papers.yaml:1:1: -: -: file is empty"),
        ("id: a\n",
         "catalog/papers.yaml:1:1: -: -: expected a list of entries, got a mapping (hint: each entry starts with '- id: ...')"),
        ("- just a string\n",
         "catalog/papers.yaml:1:3: #1: -: expected a mapping, got a string"),
        ("-\n",
         "catalog/papers.yaml:1:2: #1: -: expected a mapping, got nothing"),
    ],
    ids=["syntax", "tab", "empty", "comment-only", "not-a-list", "not-a-mapping", "empty-entry"],
)
def test_unusable_file(cli, project: Path, text: str, expected: str) -> None:
    (project / "catalog" / "papers.yaml").write_text(text, encoding="utf-8")
    code, lines = _check(cli, project)
    assert code == 1
    # Other files may now hold dangling references to papers; papers.yaml itself has one problem.
    problems = [p for p in _problem_lines(lines) if p.startswith("catalog/papers.yaml")]
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


def test_non_utf8_bytes(cli, project: Path) -> None:
    path = project / "catalog" / "papers.yaml"
    path.write_bytes(b"- id: a\n  title: Caf\xe9\n")
    assert _problems_of_failed_check(cli, project) == [
        "catalog/papers.yaml:2:13: -: -: not valid UTF-8 (byte 0xe9) (hint: save the file as UTF-8)"]


def test_missing_file(cli, project: Path) -> None:
    (project / "catalog" / "venues.yaml").unlink()
    assert _problems_of_failed_check(cli, project) == [
        "catalog/venues.yaml:1:1: -: -: file not found (hint: a catalogue folder holds papers.yaml, datasets.yaml, "
        "codebases.yaml, taxonomy.yaml, venues.yaml)"]


def test_duplicate_key_inside_one_mapping(cli, project: Path) -> None:
    """The first value is kept: the implausible second year adds no second error."""
    edit_catalogue(project, "papers.yaml", "  year: 2020\n", "  year: 2020\n  year: 1850\n")
    assert _problems_of_failed_check(cli, project) == [
        "catalog/papers.yaml:7:3: pcgrad: year: duplicate key 'year' (first defined on line 6) (hint: remove one of the two)"]


@pytest.mark.parametrize("key, shown", [
    ("1.5", "key `1.5` is read as a number by YAML (hint: quote it or use a known field)"),
    ("[a, b]", "mapping key ['a', 'b'] is not a string"),
    ("{a: 1}", "mapping key {'a': 1} is not a string"),
    ("yes", "key `yes` is read as a boolean by YAML (hint: quote it or use a known field)"),
    ("on", "key `on` is read as a boolean by YAML (hint: quote it or use a known field)"),
    ("No", "key `No` is read as a boolean by YAML (hint: quote it or use a known field)"),
    ("12", "key `12` is read as a number by YAML (hint: quote it or use a known field)"),
    ("~", "key `~` is read as null by YAML (hint: quote it or use a known field)"),
], ids=["float", "list", "mapping", "yes", "on", "No", "int", "null"])
def test_mapping_key_that_is_not_a_string(cli, project: Path, key: str, shown: str) -> None:
    """A key YAML does not read as a string is reported at the key itself, named as written,
    not as pydantic's "keys should be strings" at the entry, nor as an unhashable-type error."""
    edit_catalogue(project, "papers.yaml", "  venue: NeurIPS\n", f"  venue: NeurIPS\n  {key}: x\n")
    assert _problems_of_failed_check(cli, project) == [f"catalog/papers.yaml:6:3: pcgrad: -: {shown}"]


def test_venue_problems_name_the_venue_key(cli, project: Path) -> None:
    edit_catalogue(project, "venues.yaml", "kind: journal}", "kind: blog}")
    assert _problems_of_failed_check(cli, project) == [
        "catalog/venues.yaml:3:85: TPAMI: kind: input should be 'conference', 'journal', 'workshop' or 'preprint'"]


def test_unreadable_file(cli, project: Path) -> None:
    (project / "catalog" / "venues.yaml").unlink()
    (project / "catalog" / "venues.yaml").mkdir()
    assert _problems_of_failed_check(cli, project) == ["catalog/venues.yaml:1:1: -: -: cannot read file: Is a directory"]


def test_loaded_data_is_what_pyyaml_reads(tmp_path: Path) -> None:
    """Anchors, merge keys, a byte-order mark and typed scalars load as the safe loader reads them."""
    text = ("\ufeff- &base {year: 2020, ok: true, none: null}\n"
            "- <<: *base\n  id: b\n  tags: [x, 'y']\n  when: 2020-01-02\n")
    path = tmp_path / "f.yaml"
    path.write_text(text, encoding="utf-8")
    problems = Problems()
    doc = load_yaml(path, "f.yaml", problems)
    assert problems.items == [] and doc is not None
    assert doc.data == yaml.safe_load(text.lstrip("\ufeff"))
    assert doc.data[1]["year"] == 2020 and doc.data[1]["id"] == "b"
    assert (doc.where((1, "tags", 1)).line, doc.where((1, "tags", 1)).col) == (4, 13)


@pytest.mark.parametrize("text", [
    "- &base {id: a, year: 2020, venue: X}\n- <<: *base\n  id: b\n  year: 2021\n",
    "- &base {id: a, year: 2020}\n- id: b\n  <<: *base\n",
    "- &a {id: a, year: 2020}\n- &b {id: b, year: 2021}\n- <<: [*a, *b]\n  venue: X\n",
], ids=["override-after", "override-before", "two-merges"])
def test_a_key_may_override_what_a_merge_key_brings(tmp_path: Path, text: str) -> None:
    """YAML merge keys are defaults: the mapping's own keys win, and so does the first of several merges."""
    path = tmp_path / "f.yaml"
    path.write_text(text, encoding="utf-8")
    problems = Problems()
    doc = load_yaml(path, "f.yaml", problems)
    assert problems.items == [] and doc is not None
    assert doc.data == yaml.safe_load(text)


def test_an_overriding_key_is_where_its_value_is_reported(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "  year: 2020\n", "  <<: {year: 2020}\n  year: 1850\n")
    code, lines = _check(cli, project)
    assert code == 1
    [problem] = _problem_lines(lines)
    assert problem.startswith("catalog/papers.yaml:7:9: pcgrad: year: implausible year")  # the override's line


def test_a_tab_indenting_the_first_line_after_a_byte_order_mark_is_reported_as_a_tab(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("\ufeff\t- id: a\n", encoding="utf-8")
    problems = Problems()
    assert load_yaml(path, "f.yaml", problems) is None
    assert [p.format() for p in problems.items] == ["f.yaml:1:1: -: -: tab character in indentation (hint: indent with spaces)"]


def test_scalar_text_and_key_positions_only_for_a_path_that_exists_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("- {id: a, year: 02020}\n", encoding="utf-8")
    doc = load_yaml(path, "f.yaml", Problems())
    assert doc.scalar_text((0, "year")) == "02020"
    assert doc.scalar_text((0, "year", 0)) is None  # nothing below a scalar: not the scalar's own text
    assert (doc.key_where((0, "year")).col, doc.key_where((0, "year", "x")).col) == (11, 17)  # the key, else the value


def test_a_recursive_alias_is_located_past_the_aliases_that_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("- &b {id: b}\n- *b\n- notes: &n [*n]\n", encoding="utf-8")
    problems = Problems()
    assert load_yaml(path, "f.yaml", problems) is None
    assert [p.format() for p in problems.items] == [
        "f.yaml:3:14: -: -: YAML error: alias *n is used inside the node it names "
        "(hint: an alias may only repeat a node that is already complete)"]


def test_a_key_written_twice_beside_a_merge_key_is_still_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("- &base {id: a}\n- <<: *base\n  id: b\n  id: c\n", encoding="utf-8")
    problems = Problems()
    load_yaml(path, "f.yaml", problems)
    assert [p.format() for p in problems.items] == [
        "f.yaml:4:3: b: id: duplicate key 'id' (first defined on line 3) (hint: remove one of the two)"]


@pytest.mark.parametrize("text, expected", [
    ("- arXiv\n", "catalog/venues.yaml:1:1: -: -: expected a mapping of venue keys, got a list "
                  "(hint: write 'NeurIPS: {name: ..., kind: conference}')"),
    ("arXiv: preprint\n", "catalog/venues.yaml:1:8: arXiv: -: expected a mapping, got a string "
                          "(hint: write '{name: ..., kind: conference}')"),
    ("arXiv: {name: arXiv, kind: preprint, zzz: 1}\n", "catalog/venues.yaml:1:38: arXiv: zzz: unknown field "
                                                       "(hint: allowed fields: name, kind)"),
], ids=["list", "string-entry", "unknown-field"])
def test_bad_venues_file(cli, project: Path, text: str, expected: str) -> None:
    (project / "catalog" / "venues.yaml").write_text(text, encoding="utf-8")
    code, lines = _check(cli, project)
    assert code == 1
    assert [p for p in _problem_lines(lines) if p.startswith("catalog/venues.yaml")] == [expected]


def test_tabs_in_comments_and_flow_lists_are_fine(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "  year: 2020\n", "  year: 2020\n  # a\tcomment\n")
    edit_catalogue(project, "papers.yaml", "  topics: [", "  topics: [\t")
    assert _check(cli, project) == (0, ["0 error(s), 2 warning(s)"])


@pytest.mark.parametrize("old, new, col", [("  year: 2020\n", "  year: 2020\t# tab before a comment\n", 13),
                                          ("  year: 2020\n", "  year:\t2020\n", 8)])
def test_a_tab_where_add_cannot_read_it_is_an_error(cli, project: Path, old: str, new: str, col: int) -> None:
    """PyYAML reads these tabs, ruamel.yaml (add's editor) does not: check refuses what add would refuse."""
    edit_catalogue(project, "papers.yaml", old, new)
    code, lines = _check(cli, project)
    assert code == 1
    assert _problem_lines(lines) == [f"catalog/papers.yaml:6:{col}: -: -: tab character where YAML needs spaces "
                                     "(hint: replace the tab with a space)"]


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("  year: 2020\n", "  year: twenty\n", "catalog/papers.yaml:6:9: pcgrad: year: must be a whole number"),
        ("  year: 2020\n", "  year: 1850\n", "catalog/papers.yaml:6:9: pcgrad: year: implausible year"),
        ('  arxiv: "2001.06782"\n', "  arxiv: 1810.04650\n",
         'catalog/papers.yaml:7:10: pcgrad: arxiv: must be a string (hint: quote it in YAML, e.g. arxiv: "1810.04650" '
         "(unquoted, trailing zeros are lost))"),
        ('  arxiv: "2001.06782"\n', '  arxiv: "2001.06782v2"\n',
         "catalog/papers.yaml:7:10: pcgrad: arxiv: drop the version suffix (e.g. 'v2'): the id names all versions"),
        ('  arxiv: "2001.06782"\n', '  arxiv: "arXiv:2001.06782"\n',
         "catalog/papers.yaml:7:10: pcgrad: arxiv: write the bare arXiv id, e.g. '2001.06782', without prefix or URL"),
        ('  arxiv: "2001.06782"\n', '  arxiv: "20011.06782"\n',
         "catalog/papers.yaml:7:10: pcgrad: arxiv: not an arXiv id (expected e.g. '2001.06782' or 'cs/0701001')"),
        ("  venue: NeurIPS\n", "  venue: NeurIPS\n  autors: [x]\n",
         "catalog/papers.yaml:6:3: pcgrad: autors: unknown field (hint: did you mean 'authors'?)"),
        ("Karol Hausman, Chelsea Finn]", "Karol Hausman, et al.]",
         "catalog/papers.yaml:4:85: pcgrad: authors.5: truncated author list: give every author by name"),
        ("Karol Hausman, Chelsea Finn]", "Karol Hausman, Finn]",
         "catalog/papers.yaml:4:85: pcgrad: authors.5: one-word author name 'Finn': write 'Given Family', quote "
         "'Family, Given' names in [...] lists (\"Van Gool, Luc\"), and brace a team or organisation (\"{OpenAI}\")"),
        ("Karol Hausman, Chelsea Finn]", "Karol Hausman, {Brain Team}]",
         "catalog/papers.yaml:4:85: pcgrad: authors.5: YAML read {Brain Team} as a mapping: quote a team or "
         "organisation author, '\"{Brain Team}\"'"),
        ("Karol Hausman, Chelsea Finn]", "Karol Hausman, \"{Brain} Team\"]",
         "catalog/papers.yaml:4:85: pcgrad: authors.5: braces mark a team or organisation author: put its whole "
         "name in one pair, e.g. '{Gemini Team}'"),
        ("  authors: [Tianhe Yu,", "  authors: [...,",
         "catalog/papers.yaml:4:13: pcgrad: authors.0: truncated author list: give every author by name"),
        ("code: [https://github.com/tianheyu927/PCGrad]", "code: [javascript:alert(1)]",
         "catalog/papers.yaml:8:10: pcgrad: code.0: only http(s) URLs are allowed, got scheme 'javascript'"),
        ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['data:text/html,<b>x</b>']",
         "catalog/papers.yaml:8:10: pcgrad: code.0: only http(s) URLs are allowed, got scheme 'data'"),
        ("  impl: reference_impls/weighting/pcgrad.py:PCGrad\n", "  impl: weighting/pcgrad.py\n",
         "catalog/papers.yaml:11:9: pcgrad: impl: not an implementation link "
         "(hint: write 'reference_impls/<folder>/<file>.py:<ClassOrFunction>')"),
        ("- id: ruder2017overview\n", "- id: Ruder_2017\n",
         "catalog/papers.yaml:24:7: Ruder_2017: id: not a valid id (hint: use lowercase letters, digits and single hyphens, e.g. 'nash-mtl')"),
        ("  doi: 10.1109/TPAMI.2021.3054719\n", "  doi: https://doi.org/10.1109/TPAMI.2021.3054719\n",
         "catalog/papers.yaml:21:8: vandenhende2021multi: doi: write the bare DOI, e.g. '10.1109/CVPR.2019.00197', without prefix or URL"),
        ('  arxiv: "1706.05098"\n', "",
         "catalog/papers.yaml:24:3: ruder2017overview: -: a paper needs at least one of arxiv, doi or url"),
        ("  topics: [survey]\n\n- id: ruder", "\n- id: ruder",
         "catalog/papers.yaml:14:3: vandenhende2021multi: topics: required field is missing"),
        ("- id: ruder2017overview\n  title:", "- title:", "catalog/papers.yaml:24:3: #3: id: required field is missing"),
        ("  url: https://example.org/paper?id=7\n", "  url: https:example.org/paper\n",
         "catalog/papers.yaml:39:8: uw: url: not a valid absolute URL"),
        ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://github.com/tianheyu927/PC Grad']",
         "catalog/papers.yaml:8:10: pcgrad: code.0: not a valid absolute URL"),
        ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://github.com/tianheyu927/\"PCGrad\"']",
         "catalog/papers.yaml:8:10: pcgrad: code.0: not a valid absolute URL"),
        ("Karol Hausman, Chelsea Finn]", 'Karol Hausman, "Finn, Chelsea, Levine"]',
         "catalog/papers.yaml:4:85: pcgrad: authors.5: one author per list item ('Given Family' or 'Family, Given')"),
        ("Karol Hausman, Chelsea Finn]", "Karol Hausman, and others]",
         "catalog/papers.yaml:4:85: pcgrad: authors.5: truncated author list: give every author by name"),
        ("Karol Hausman, Chelsea Finn]", "Karol Hausman, Chelsea Finn \u2026]",
         "catalog/papers.yaml:4:85: pcgrad: authors.5: truncated author list: give every author by name"),
        ("  year: 2020\n", f"  year: {NEXT_YEAR + 1}\n",
         f"catalog/papers.yaml:6:9: pcgrad: year: implausible year (expected 1950..{NEXT_YEAR})"),
        ("  year: 2020\n", '  year: "2020"\n',
         "catalog/papers.yaml:6:9: pcgrad: year: must be a whole number (hint: write it without quotes: year: 2020)"),
        ("title: Gradient Surgery for Multi-Task Learning", 'title: "Gradient Surgery\\nfor Multi-Task Learning"',
         "catalog/papers.yaml:3:10: pcgrad: title: must be a single line"),
        ("- id: ruder2017overview\n", "- id: 2017\n", "catalog/papers.yaml:24:7: #3: id: must be a string"),
        ("  doi: 10.1109/TPAMI.2021.3054719\n", "  doi: doi:10.1109/TPAMI.2021.3054719\n",
         "catalog/papers.yaml:21:8: vandenhende2021multi: doi: write the bare DOI, e.g. '10.1109/CVPR.2019.00197', without prefix or URL"),
    ],
    ids=["year-type", "year-range", "arxiv-float", "arxiv-version", "arxiv-prefix", "arxiv-format",
         "unknown-field", "et-al", "unquoted-family-given", "unquoted-group", "half-braced-group", "ellipsis", "javascript-url", "data-url", "impl-format", "slug",
         "doi-url", "no-identifier", "missing-field", "no-id", "url-no-host", "url-space", "url-quote", "two-commas", "others", "unicode-ellipsis", "year-next-but-one", "year-quoted",
         "two-lines", "id-not-text", "doi-prefix"],
)
def test_schema_errors(cli, project: Path, old: str, new: str, expected: str) -> None:
    edit_catalogue(project, "papers.yaml", old, new)
    code, lines = _check(cli, project)
    assert code == 1
    problems = _problem_lines(lines)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


def test_all_problems_reported_in_one_run(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "  year: 2017\n", "  year: 1850\n")
    edit_catalogue(project, "papers.yaml", "  venue: TPAMI\n", "  venue: TPAM\n")
    (project / "catalog" / "datasets.yaml").write_text("- id: nyuv2\n  name: NYUv2\n", encoding="utf-8")
    code, lines = _check(cli, project)
    assert code == 1
    assert lines[-1].startswith("5 error(s)")
    # Sorted by file, line, column, then entry, field: not in the order found, nor by entry first (ruder < vandenhende).
    assert [line.split(": ", 3)[:3] for line in _problem_lines(lines)] == [
        ["catalog/datasets.yaml:1:3", "nyuv2", "description"], ["catalog/datasets.yaml:1:3", "nyuv2", "domain"],
        ["catalog/datasets.yaml:1:3", "nyuv2", "tasks"],
        ["catalog/papers.yaml:17:10", "vandenhende2021multi", "venue"], ["catalog/papers.yaml:28:9", "ruder2017overview", "year"]]


def test_unquoted_family_given_in_flow_list_is_caught(cli, project: Path) -> None:
    """YAML reads [.., Van Gool, Luc] as two authors; the one-word half gives it away."""
    edit_catalogue(project, "papers.yaml", '"Van Gool, Luc"', "Van Gool, Luc")
    code, lines = _check(cli, project)
    assert code == 1
    problems = _problem_lines(lines)
    assert [p.split(": one-word")[0] for p in problems] == ["catalog/papers.yaml:16:117: vandenhende2021multi: authors.6"]


@pytest.mark.parametrize("args, message", [
    (("add", "arxiv:2001.06782", "--timeout", "-1"), "argument --timeout: must be > 0, got -1"),
    (("add", "arxiv:2001.06782", "--attempts", "0"), "argument --attempts: must be >= 1, got 0"),
    (("add", "arxiv:2001.06782", "--backoff", "soon"), "argument --backoff: 'soon' is not a number"),
    (("add", "arxiv:2001.06782", "--attempts", "2.5"), "argument --attempts: '2.5' is not an integer"),
    (("links", "--workers", "0"), "argument --workers: must be >= 1, got 0"),
    (("links", "--timeout", "0"), "argument --timeout: must be > 0, got 0"),
])
def test_out_of_range_numbers_are_usage_errors_before_any_request(cli, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli(*args)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


# --- values that used to pass check and broke the outputs -------------------------------------

@pytest.mark.parametrize("new, expected", [
    ("Karol Hausman and Chelsea Finn, X Y]",
     "authors.4: one author per list item ('Given Family' or 'Family, Given')"),
    ("Karol Hausman, Chelsea Finn AND Sergey Brin]",
     "authors.5: one author per list item ('Given Family' or 'Family, Given')"),
    ("Karol Hausman, Chelsea\u00a0Finn]",
     "authors.5: author name contains U+00A0 (NO-BREAK SPACE): write names with plain spaces only"),
    ("Karol Hausman, Chelsea\u200bFinn Z]",
     "authors.5: author name contains U+200B (ZERO WIDTH SPACE): write names with plain spaces only"),
    ("Karol Hausman, Chelsea\u2009Finn]",
     "authors.5: author name contains U+2009 (THIN SPACE): write names with plain spaces only"),
    ('Karol Hausman, "Chelsea\\tFinn"]',
     "authors.5: author name contains U+0009 (control character): write names with plain spaces only"),
    ("Karol Hausman, 'Chelsea  Finn']", "authors.5: two spaces in a row in an author name"),
    ("Karol Hausman, 'Van Gool,']", "authors.5: 'Van Gool,' lacks a family or a given name: write "
     "'Family, Given', or brace a name that has only one part (\"{Van Gool}\")"),
    ("Karol Hausman, ', Luc']", "authors.5: ', Luc' lacks a family or a given name: write "
     "'Family, Given', or brace a name that has only one part (\"{Van Gool}\")"),
], ids=["and", "AND", "nbsp", "zero-width", "thin-space", "tab", "double-space", "no-given", "no-family"])
def test_author_items_that_would_break_the_bibtex_name_split(cli, project: Path, new: str, expected: str) -> None:
    """BibTeX splits author lists at ' and ' and names at spaces: one person per item, plain spaces."""
    edit_catalogue(project, "papers.yaml", "Karol Hausman, Chelsea Finn]", new)
    [problem] = _problems_of_failed_check(cli, project)
    assert problem.startswith("catalog/papers.yaml:4:") and problem.endswith(f"pcgrad: {expected}"), problem


def test_a_name_containing_and_as_letters_is_fine(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "Chelsea Finn]", "Chelsea Anderson, Sandra Landers]")
    assert _check(cli, project)[0] == 0


@pytest.mark.parametrize("old, new, expected", [
    ('arxiv: "2001.06782"', 'arxiv: "\uff12\uff10\uff10\uff11.\uff10\uff16\uff17\uff18\uff12"',
     "arxiv: not an arXiv id"),                                                       # full-width digits
    ('arxiv: "2001.06782"', 'arxiv: "2013.06782"', "arxiv: not an arXiv id"),          # month 13
    ('arxiv: "2001.06782"', 'arxiv: "2000.06782"', "arxiv: not an arXiv id"),          # month 00
    ('arxiv: "2001.06782"', 'arxiv: "cs/0713001"', "arxiv: not an arXiv id"),          # old style, month 13
    ('arxiv: "2001.06782"', 'arxiv: "cs/\u0660\u0667\u0660\u0661\u0660\u0660\u0661"', "arxiv: not an arXiv id"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://example.com:99999/']",
     "code.0: not a valid port (expected a number from 1 to 65535)"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://example.com:0/']",
     "code.0: not a valid port (expected a number from 1 to 65535)"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://example.com:http/']",
     "code.0: not a valid port (expected a number from 1 to 65535)"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://example.com\\evil']",
     "code.0: not a valid absolute URL"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: ['HTTPS://github.com/x/y']",
     "code.0: write the scheme in lowercase: 'https://...'"),
    ("  doi: 10.1109/TPAMI.2021.3054719\n", "  doi: 10.\uff11\uff11\uff10\uff19/TPAMI.2021.3054719\n",
     "doi: not a DOI"),
    ("  doi: 10.1109/TPAMI.2021.3054719\n", "  doi: '10.1109/TPAMI{2021}'\n",
     "doi: a DOI with braces, a backslash, % or a double quote cannot be written into BibTeX safely"),
    ("  doi: 10.1109/TPAMI.2021.3054719\n", "  doi: '10.1109/TPAMI%2021'\n",
     "doi: a DOI with braces, a backslash, % or a double quote cannot be written into BibTeX safely"),
    ("  doi: 10.1109/TPAMI.2021.3054719\n", "  doi: '10.1109/TPAMI\\2021'\n",
     "doi: a DOI with braces, a backslash, % or a double quote cannot be written into BibTeX safely"),
], ids=["arxiv-full-width", "arxiv-month-13", "arxiv-month-00", "arxiv-old-month-13", "arxiv-old-arabic-indic",
        "port-too-big", "port-zero", "port-not-a-number", "url-backslash", "url-uppercase-scheme",
        "doi-full-width", "doi-braces", "doi-percent", "doi-backslash"])
def test_identifiers_are_ascii_and_well_formed(cli, project: Path, old: str, new: str, expected: str) -> None:
    edit_catalogue(project, "papers.yaml", old, new)
    [problem] = _problems_of_failed_check(cli, project)
    assert f": {expected}" in problem, problem


@pytest.mark.parametrize("text, where", [
    ("- id: a\n  notes: &a [*a]\n", "2:14"),
    ("- id: a\n  notes: &a\n    - x\n    - *a\n", "4:7"),
    ("- &a {id: a, notes: [x, {b: *a}]}\n", "1:29"),
], ids=["flow-list", "block-list", "nested"])
def test_an_alias_inside_the_node_it_names_is_reported_at_the_alias(cli, project: Path, text: str, where: str) -> None:
    """A recursive alias makes the node tree a cycle: a located error, not a RecursionError."""
    (project / "catalog" / "papers.yaml").write_text(text, encoding="utf-8")
    for command in ("check", "build"):
        code, _, err = cli(command, "--catalog", str(project / "catalog"), "--no-sync") if command == "check" \
            else cli(command, "--catalog", str(project / "catalog"))
        assert code == 1 and "Traceback" not in err
        problems = [p for p in _problem_lines(err.splitlines()) if p.startswith("catalog/papers.yaml")]
        assert problems == [f"catalog/papers.yaml:{where}: -: -: YAML error: alias *a "
                            "is used inside the node it names (hint: an alias may only repeat a node that is "
                            "already complete)"]
    assert not (project / "README.md").exists() or "notes" not in (project / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("old, new, expected", [
    ("title: Gradient Surgery for Multi-Task Learning", "title: 1984",
     'title: must be a string (hint: quote it in YAML, e.g. title: "1984" (unquoted, YAML reads a number))'),
    ("  year: 2020\n", "  year: 2020\n  pages: true\n",
     'pages: must be a string (hint: quote it in YAML, e.g. pages: "true" (unquoted, YAML reads a boolean))'),
    ("  year: 2020\n", "  year: 2020\n  volume: 12.5\n",
     'volume: must be a string (hint: quote it in YAML, e.g. volume: "12.5" (unquoted, YAML reads a number))'),
    ("  year: 2020\n", "  year: 2020\n  pages: yes\n",
     'pages: must be a string (hint: quote it in YAML, e.g. pages: "yes" (unquoted, YAML reads a boolean))'),
    ("Karol Hausman, Chelsea Finn]", "Karol Hausman, 1984]",
     'authors.5: must be a string (hint: quote it in YAML, e.g. authors: [..., "1984"] (unquoted, YAML reads a number))'),
], ids=["title-number", "pages-bool", "volume-float", "pages-yes", "author-item"])
def test_a_value_that_yaml_reads_as_no_string_gets_a_hint_for_its_own_field(cli, project: Path, old: str, new: str,
                                                                            expected: str) -> None:
    edit_catalogue(project, "papers.yaml", old, new)
    [problem] = _problems_of_failed_check(cli, project)
    assert problem.endswith(f"pcgrad: {expected}"), problem
    assert "arxiv" not in problem


# --- loading: every entry of every file is checked, and each problem names its place ------------

@pytest.mark.parametrize("file, old, new, expected", [
    ("codebases.yaml", "  framework: PyTorch\n", "  framework: PyTorch\n  frame: x\n",
     "catalog/codebases.yaml:5:3: toolkit: frame: unknown field (hint: did you mean 'framework'?)"),
    ("taxonomy.yaml", "  description: Overviews of the field.\n", "",
     "catalog/taxonomy.yaml:1:3: survey: description: required field is missing"),
    ("datasets.yaml", "  name: NYUv2\n", "  name: NYUv2\n  nmae: x\n",
     "catalog/datasets.yaml:3:3: nyuv2: nmae: unknown field (hint: did you mean 'name'?)"),
], ids=["codebases", "taxonomy", "datasets"])
def test_schema_errors_in_every_catalogue_file_are_located(cli, project: Path, file: str, old: str, new: str,
                                                           expected: str) -> None:
    """Not only papers.yaml: a bad codebase, section or dataset gets its own located message, not a crash.
    (Papers may then refer to an entry that no longer loads; that is reported in papers.yaml.)"""
    edit_catalogue(project, file, old, new)
    problems = _problems_of_failed_check(cli, project)
    assert [p for p in problems if p.startswith(f"catalog/{file}")] == [expected]


def test_entries_after_one_that_is_not_a_mapping_are_still_checked(cli, project: Path) -> None:
    """One stray item does not hide the rest of the file: the entries after it load (no dangling
    references to them) and their own mistakes are reported in the same run."""
    edit_catalogue(project, "papers.yaml", "- id: pcgrad\n", "- just a string\n- id: pcgrad\n")
    edit_catalogue(project, "papers.yaml", "  year: 2017\n", "  year: 1850\n")
    problems = _problems_of_failed_check(cli, project)
    assert [p.split(": ", 3)[:3] for p in problems] == [
        ["catalog/papers.yaml:1:3", "#1", "-"], ["catalog/papers.yaml:29:9", "ruder2017overview", "year"]]
    assert problems[0].endswith("expected a mapping, got a string")


def test_venues_after_one_that_is_not_a_mapping_are_still_checked(cli, project: Path) -> None:
    edit_catalogue(project, "venues.yaml", "arXiv: {name: arXiv, kind: preprint}", "arXiv: preprint")
    edit_catalogue(project, "venues.yaml", "kind: journal}", "kind: blog}")
    assert [p.split(": ", 3)[:3] for p in _problems_of_failed_check(cli, project)] == [
        ["catalog/venues.yaml:1:8", "arXiv", "-"], ["catalog/venues.yaml:3:85", "TPAMI", "kind"]]


@pytest.mark.parametrize("item, value", [("42", 42), ("4.5", 4.5), ("true", True)], ids=["int", "float", "bool"])
def test_an_item_that_is_not_a_mapping_is_named_by_what_yaml_read(cli, project: Path, item: str, value) -> None:
    """A scalar that is no string is named by its Python type (what YAML read), never as 'None' or 'nothing'."""
    (project / "catalog" / "papers.yaml").write_text(f"- {item}\n", encoding="utf-8")
    code, lines = _check(cli, project)
    assert code == 1
    problems = [p for p in _problem_lines(lines) if p.startswith("catalog/papers.yaml")]
    assert problems == [f"catalog/papers.yaml:1:3: #1: -: expected a mapping, got {type(value).__name__}"]


def test_an_unknown_field_with_a_bracket_in_its_name_is_reported_as_that_field(cli, project: Path) -> None:
    """'tags[0]' is a key of the file, not one of pydantic's names for a union member: it used to be
    dropped from the error's path, and the check crashed with an IndexError instead of reporting it."""
    edit_catalogue(project, "papers.yaml", "  venue: NeurIPS\n", '  venue: NeurIPS\n  "tags[0]": x\n')
    [problem] = _problems_of_failed_check(cli, project)
    assert problem.startswith("catalog/papers.yaml:6:3: pcgrad: tags[0]: unknown field"), problem


def test_pydantic_names_for_union_members_are_not_part_of_the_reported_field() -> None:
    """pydantic puts 'function-after[...]' or 'list[str]' in an error's path for a union member; the
    path shown, and located in the file, is that of the data, so those names are left out."""
    from site_gen.catalogue import _data_loc

    raw = {"code": [5], "a[b]": 1}
    assert _data_loc(raw, ("code", "function-after[_url(), str]", 0)) == ("code", 0)
    assert _data_loc(raw, ("code", "list[str]", 0, "str")) == ("code", 0, "str")
    assert _data_loc(raw, ("a[b]",)) == ("a[b]",)
    assert _data_loc(raw, ("title",)) == ("title",)  # a missing field is named though absent


def test_summary_warnings_point_at_the_first_paper_they_name(cli, project: Path) -> None:
    """A warning that names several papers (no notes yet, implementation wanted) is located at
    the first of them, so a contributor whose new paper is the only one lands on it; a comment
    header above the entries moves the lines with it."""
    path = project / "catalog" / "papers.yaml"
    path.write_text("# The papers.\n\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
    code, _, err = cli("check", "--catalog", str(project / "catalog"), "--no-sync", "--list-wanted")
    warnings = [line.split("/project/", 1)[-1] for line in err.splitlines() if ": warning: " in line]
    assert code == 0 and len(warnings) == 2, err
    lines = path.read_text(encoding="utf-8").splitlines()
    for warning in warnings:
        first = warning.rsplit(": ", 1)[-1].split(", ")[0]
        assert warning.startswith(f"catalog/papers.yaml:{lines.index(f'- id: {first}') + 1}:3: -: "), warning


@pytest.mark.parametrize("old, new, expected", [
    ('arxiv: "2001.06782"', 'arxiv: "2001.0678"',
     "arxiv: an arXiv id from 2001 (YYMM) has 5 digits after the dot, not 4"),
    ('arxiv: "2001.06782"', 'arxiv: "1412.12345"',
     "arxiv: an arXiv id from 1412 (YYMM) has 4 digits after the dot, not 5"),
    ('arxiv: "2001.06782"', 'arxiv: "0612.1234"', "arxiv: ids of this form began in April 2007 (0704.xxxx)"),
    ('arxiv: "2001.06782"', 'arxiv: "9912.06782"', "arxiv: the id's month 9912 (YYMM) has not come yet"),
    ('arxiv: "2001.06782"', 'arxiv: "2001.06782"\n  arxiv_class: cs.lg',
     "arxiv_class: cs's subject classes are two capitals: write 'cs.LG'"),
    ('arxiv: "2001.06782"', 'arxiv: "2001.06782"\n  arxiv_class: machine learning',
     "arxiv_class: not an arXiv category (hint: write the primary category as arXiv lists it, e.g. 'cs.LG'"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: [github.com/tianheyu927/PCGrad]",
     "code.0: the URL has no scheme: write 'https://github.com/tianheyu927/PCGrad'"),
    ("title: Gradient Surgery for", 'title: "Gradient\\a Surgery for',
     "title: contains the invisible character U+0007 (control character): delete it"),
    ("title: Gradient Surgery for", 'title: "Gradient\\u200b Surgery for',
     "title: contains the invisible character U+200B (ZERO WIDTH SPACE): delete it"),
    ("  venue: NeurIPS\n", "  venue: neurips\n", "venue: unknown venue 'neurips' (hint: did you mean 'NeurIPS'?)"),
    ("  year: 2020\n", "  year: 2020-05-01\n", "year: must be a whole number (hint: write the year alone: year: 2020)"),
    ("  topics: [optimization/gradient-balancing]\n", "  topics: []\n", "topics: must not be empty"),
    ("Karol Hausman, Chelsea Finn]", 'Karol Hausman, ""]', "authors.5: empty list item (hint: delete it)"),
    ("  short: [PCGrad]\n", "  short: 12\n",
     """short: must be a text or a list of texts (hint: write short: "..." or short: ["...", "..."])"""),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: https://github.com/tianheyu927/PCGrad",
     "code: must be a list (hint: write code: [a, b], or one '- item' per line)"),
], ids=["arxiv-4-digits-after-2015", "arxiv-5-digits-before-2015", "arxiv-before-0704", "arxiv-future",
        "arxiv-class-case", "arxiv-class-words", "url-no-scheme", "title-bell", "title-zero-width",
        "venue-case", "year-date", "empty-topics", "empty-author", "short-number", "code-not-a-list"])
def test_a_mistake_gets_a_message_that_says_what_to_write(cli, project: Path, old: str, new: str,
                                                          expected: str) -> None:
    edit_catalogue(project, "papers.yaml", old, new)
    if '"Gradient' in new:  # the title became a double-quoted YAML string: close it
        edit_catalogue(project, "papers.yaml", "Multi-Task Learning\n  authors", 'Multi-Task Learning"\n  authors')
    [problem] = _problems_of_failed_check(cli, project)
    assert f"pcgrad: {expected}" in problem, problem


def test_one_wrong_field_does_not_hide_the_entrys_other_mistakes(cli, project: Path) -> None:
    """A field of the wrong type makes the entry invalid; its other fields are still checked
    against the catalogue (venue, topics, datasets, repeats, duplicates), in one run."""
    edit_catalogue(project, "papers.yaml", "  venue: NeurIPS\n  year: 2020\n",
                   '  venue: NeurIps\n  year: "2020"\n')
    edit_catalogue(project, "papers.yaml", "  topics: [optimization/gradient-balancing]\n  datasets: [nyuv2]\n",
                   "  topics: [optimization/gradient-balancin]\n  datasets: [nyuv2, nope]\n")
    edit_catalogue(project, "papers.yaml", "code: [https://github.com/tianheyu927/PCGrad]",
                   "code: [https://github.com/tianheyu927/PCGrad, https://github.com/tianheyu927/PCGrad]")
    problems = _problems_of_failed_check(cli, project)
    assert [p.split(": ", 2)[1:] for p in problems] == [
        ["pcgrad", "venue: unknown venue 'NeurIps' (hint: did you mean 'NeurIPS'?)"],
        ["pcgrad", "year: must be a whole number (hint: write it without quotes: year: 2020)"],
        ["pcgrad", "code.1: 'https://github.com/tianheyu927/PCGrad' is listed twice (also item 0) "
                   "(hint: remove the repeat)"],
        ["pcgrad", "topics.0: unknown topic 'optimization/gradient-balancin' (hint: did you mean "
                   "'optimization/gradient-balancing'?)"],
        ["pcgrad", "datasets.1: unknown dataset 'nope'"]], problems


def test_an_invalid_entry_still_counts_for_duplicates_and_references_in_every_file(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "- id: ruder2017overview\n", "- id: ruder2017overview\n  extrs: [uw]\n")
    edit_catalogue(project, "papers.yaml", '  arxiv: "1706.05098"\n', '  arxiv: "2001.06782"\n')
    edit_catalogue(project, "codebases.yaml", "  url: https://github.com/example/toolkit\n  framework: PyTorch\n",
                   "  url: github.com/example/toolkit\n  framework: PyTorch\n  datasets: [nope]\n")
    problems = [p.split(": ", 1)[1] for p in _problems_of_failed_check(cli, project)]
    assert problems == [
        "toolkit: url: the URL has no scheme: write 'https://github.com/example/toolkit'",
        "toolkit: datasets.0: unknown dataset 'nope'",
        "ruder2017overview: extrs: unknown field (hint: did you mean 'extends'?)",
        "ruder2017overview: arxiv: duplicate arXiv id: same as entry 'pcgrad' (line 7)"], problems
