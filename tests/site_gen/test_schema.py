"""The editor schema and the field reference: generated from the models, agreeing with them, kept current."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from site_gen.fieldref import BEGIN, END, HELP, replace_section
from site_gen.jsonschema import SHAPES, ensure_schema_header, model_outputs, schemas
from site_gen.models import Codebase, Dataset, Paper, Section, Venue, name_parts, particles, person
from site_gen.pipeline import run

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"Paper": Paper, "Dataset": Dataset, "Codebase": Codebase, "Section": Section, "Venue": Venue}
PAPER = {"id": "pcgrad", "title": "Gradient Surgery for Multi-Task Learning", "authors": ["Tianhe Yu"],
         "venue": "NeurIPS", "year": 2020, "arxiv": "2001.06782", "topics": ["optimization/gradient-balancing"]}
DATASET = {"id": "celeba", "name": "CelebA", "domain": "benchmarks/vision", "tasks": ["attributes"], "description": "d"}


def _validator(stem: str):
    jsonschema = pytest.importorskip("jsonschema")
    schema = schemas()[stem]
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    for stem in SHAPES:
        _validator(stem)


@pytest.mark.parametrize("stem", list(SHAPES))
def test_the_real_catalogue_validates_against_its_schema(stem: str) -> None:
    data = yaml.safe_load((ROOT / "catalog" / f"{stem}.yaml").read_text(encoding="utf-8"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator(stem).iter_errors(data)]
    assert errors == []


@pytest.mark.parametrize("change", [
    {"autors": ["Tianhe Yu"]},                 # unknown field
    {"arxiv": 2001.06782},                     # unquoted arXiv id: a number
    {"arxiv": "arXiv:2001.06782"},
    {"doi": "https://doi.org/10.1109/X.1"},
    {"url": "javascript:alert(1)"},
    {"code": ["ftp://example.org/code"]},
    {"year": 1900},
    {"id": "PCGrad"},
    {"topics": []},
    {"arxiv": None},                           # no identifier left at all
    {"arxiv": "2001.067821"},                  # six digits after the dot
    {"arxiv": "2001.06782x"},
    {"doi": "10.1109/X 1"},
    {"doi": "10.110/X.1"},                     # registrant codes have at least four digits
    {"authors": []},
    {"id": "nash--mtl"},
    {"topics": ["/optimization"]},
    {"impl": "reference_impls/weighting/pcgrad.py"},   # no symbol
    {"arxiv_class": "cs LG"},
    {"title": "   "},                                  # blank once stripped
    {"title": "Two\nlines"},
    {"impl": "reference_impls/weighting/pcgrad.py:PCGrad", "no_impl": "a theory paper"},
    {"also_impl": ["reference_impls/weighting/pcgrad.py:PCGrad"]},   # also_impl without impl
    {"url": "HTTPS://example.org/paper"},              # uppercase scheme
    {"code": ["https://example.org\\evil"]},           # backslash
    {"arxiv": "2013.06782"},                           # month 13
    {"arxiv": "\uff12\uff10\uff10\uff11.\uff10\uff16\uff17\uff18\uff12"},  # full-width digits
    {"arxiv": "cs/0700001"},                           # old style, month 00
    {"doi": "10.1109/X{1}"},                           # would break the BibTeX field
])
def test_schema_rejects_what_the_model_rejects(change: dict) -> None:
    entry = {k: v for k, v in {**PAPER, **change}.items() if v is not None}
    with pytest.raises(ValidationError):
        Paper.model_validate(entry)
    assert not _validator("papers").is_valid([entry])


@pytest.mark.parametrize("change", [{"short": "PCGrad"}, {"short": ["PCGrad", "Gradient surgery"]},
                                    {"volume": 44, "number": "7", "pages": "1-10"}, {"notes": "One note."},
                                    {"doi": "10.1109/TPAMI.2021.3054719", "arxiv": None},
                                    {"arxiv": "cs/0701001"}, {"arxiv": "math.GT/0309136"},
                                    {"doi": "10.1007/978-3-030-01270-0_17"}, {"doi": "10.1023/A:1007379606734"},
                                    {"url": "https://example.org:8443/p"}, {"title": "  Padded title  "},
                                    {"authors": ["{OpenAI}", "{Gemini Team, Google}", "Tianhe Yu"]},
                                    {"impl": "reference_impls/weighting/pcgrad.py:PCGrad",
                                     "also_impl": ["reference_impls/weighting/cagrad.py:CAGrad"]}])
def test_schema_accepts_what_the_model_accepts(change: dict) -> None:
    entry = {k: v for k, v in {**PAPER, **change}.items() if v is not None}
    Paper.model_validate(entry)
    assert _validator("papers").is_valid([entry])


def test_venues_and_taxonomy_shapes() -> None:
    venues = _validator("venues")
    assert venues.is_valid({"NeurIPS": {"name": "Advances in Neural Information Processing Systems",
                                        "kind": "conference"}})
    assert not venues.is_valid({"X": {"name": "X", "kind": "blog"}})
    assert not venues.is_valid([{"name": "X", "kind": "journal"}])
    tree = [{"id": "a", "title": "A", "description": "d", "children": [{"id": "a/b", "title": "B", "description": "d"}]}]
    assert _validator("taxonomy").is_valid(tree)
    TypeAdapter(list[Section]).validate_python(tree)
    assert not _validator("taxonomy").is_valid([{"id": "a", "title": "A"}])


def test_every_field_of_every_model_is_documented() -> None:
    for name, model in MODELS.items():
        assert set(model.model_fields) == set(HELP[name]), name


# --- what the models derive from an entry --------------------------------------------------------

def test_author_display_form() -> None:
    assert [person(a) for a in ("Van Gool, Luc", "de Freitas,Nando", "Tianhe Yu")] == [
        "Luc Van Gool", "Nando de Freitas", "Tianhe Yu"]
    assert [name_parts(a) for a in ("Van Gool, Luc", "de Freitas,Nando", "Tianhe Yu", "Søgaard")] == [
        ("Van Gool", "Luc"), ("de Freitas", "Nando"), ("Yu", "Tianhe"), ("Søgaard", "")]
    # a team is printed and cited whole, braces off: "Gemini Team et al.", never "Team, G."
    assert (person("{Gemini Team}"), name_parts("{Gemini Team, Google}")) == ("Gemini Team", ("Gemini Team, Google", ""))


def test_given_names_are_every_word_before_the_particles_of_the_family_name() -> None:
    """Lowercase particles join the family name; all the words before them are given names."""
    assert name_parts("Anne Marie van der Berg") == ("van der Berg", "Anne Marie")
    assert name_parts("Anne Marie Berg") == ("Berg", "Anne Marie")


def test_an_unchecked_name_with_two_commas_splits_at_the_first() -> None:
    """add looks up family names in arXiv's author list before the model checks it: a name such as
    'Smith, Jr., John' must not crash it, and the family name is what comes before the first comma."""
    family, given = name_parts("Smith, Jr., John")
    assert family == "Smith" and f"{family}, {given}" == "Smith, Jr., John"


@pytest.mark.parametrize("family, split", [
    ("van der Berg", ("van der", "Berg")),
    ("de Berg Smith", ("de", "Berg Smith")),    # one particle, then a family name of two words
    ("Berg", ("", "Berg")),
    # As in BibTeX the last word is the family name even when it is a particle: 'van der, Jeroen' and
    # 'Jeroen van der' are valid authors whose family name is all particles.
    ("van der", ("van", "der")),
    ("van", ("", "van")),
])
def test_particles_are_the_leading_lowercase_words_but_never_the_last(family: str, split: tuple[str, str]) -> None:
    assert particles(family) == split


@pytest.mark.parametrize("char", ["\t", "\x85", "\u2028", "\u00a0"])
def test_an_odd_space_in_an_author_name_is_named_by_its_code_point(char: str) -> None:
    """A tab or NEL has no Unicode character name: the error still says which character to replace."""
    with pytest.raises(ValidationError, match=rf"author name contains U\+{ord(char):04X} \("):
        Paper.model_validate({**PAPER, "authors": [f"Chelsea{char}Finn"]})


@pytest.mark.parametrize("url, fault", [
    ("HTTP://example.org/p", "write the scheme in lowercase"),
    ("Http://example.org/p", "write the scheme in lowercase"),
    ("http://", "not a valid absolute URL"),                   # no host at all
    ("https:///p", "not a valid absolute URL"),
    ("https://:8443/p", "not a valid absolute URL"),
    ("https://[::1]:x]/p", "not a valid port"),                 # a port that is not a number, after an IPv6 host
    ("https://[::1]:8]0/p", "not a valid port"),
    ("https://user:pw@[::1]:0/p", "not a valid port"),
])
def test_a_bad_url_is_refused_with_its_own_fault(url: str, fault: str) -> None:
    """Each fault gets the message that says what to fix; a port that is not a number is refused wherever
    a ']' stands (an IPv6 host's closing bracket once hid it)."""
    with pytest.raises(ValidationError, match=re.escape(fault)):
        Paper.model_validate({**PAPER, "url": url})


@pytest.mark.parametrize("arxiv", ["https://arxiv.org/abs/2001.06782", "HTTP://arxiv.org/abs/2001.06782",
                                   "ARXIV:2001.06782"])
def test_an_arxiv_url_or_prefix_gets_the_bare_id_hint(arxiv: str) -> None:
    """A pasted abstract URL is the common mistake: the error says to keep only the id."""
    with pytest.raises(ValidationError, match="write the bare arXiv id"):
        Paper.model_validate({**PAPER, "arxiv": arxiv})


@pytest.mark.parametrize("author", ["{Gemini Team", "Gemini Team}", "{ Gemini Team}", "{Gemini Team }", "{}",
                                    "{{Gemini Team}}", "{Gemini}{Team}", "{Gemini {Team}", "{Gemini} Team}"])
def test_a_team_author_is_one_pair_of_braces_around_a_trimmed_name(author: str) -> None:
    with pytest.raises(ValidationError, match="braces mark a team or organisation author"):
        Paper.model_validate({**PAPER, "authors": [author]})


@pytest.mark.parametrize("author", ["Tianhe Yu et al.", "Tianhe Yu Et Al.", "ET AL", "Others", "And Others",
                                    "Tianhe Yu\u2026", "Tianhe Yu ..."])
def test_a_truncated_author_list_is_refused_whatever_its_case(author: str) -> None:
    with pytest.raises(ValidationError, match="truncated author list: give every author by name"):
        Paper.model_validate({**PAPER, "authors": ["Chelsea Finn", author]})


def test_the_first_and_last_plausible_years_are_both_accepted() -> None:
    last = datetime.date.today().year + 1
    assert [Paper.model_validate({**PAPER, "year": y}).year for y in (1950, last)] == [1950, last]
    for year in (1949, last + 1):
        with pytest.raises(ValidationError, match=rf"implausible year \(expected 1950\.\.{last}\)"):
            Paper.model_validate({**PAPER, "year": year})


@pytest.mark.parametrize("mapping", [{"Brain Team": None, "Google": None}, {"Karol": "Hausman"}])
def test_a_yaml_mapping_other_than_one_bare_key_is_not_taken_for_a_braced_team(mapping: dict) -> None:
    """[{Brain Team}] is one unquoted team; [{Brain Team, Google}] and [Karol: Hausman] are only not strings."""
    with pytest.raises(ValidationError) as exc:
        Paper.model_validate({**PAPER, "authors": [mapping]})
    assert [(e["loc"], e["type"]) for e in exc.value.errors()] == [(("authors", 0), "string_type")]


def test_text_is_stripped_before_it_is_checked() -> None:
    paper = Paper.model_validate({**PAPER, "id": " pcgrad ", "arxiv": "2001.06782 ", "title": " Gradient Surgery "})
    assert (paper.id, paper.arxiv, paper.title) == ("pcgrad", "2001.06782", "Gradient Surgery")


@pytest.mark.parametrize("ids, link", [
    ({"url": "https://example.org/p", "doi": "10.1109/X.1"}, "https://example.org/p"),
    ({"doi": "10.1109/X.1"}, "https://doi.org/10.1109/X.1"),
    ({}, "https://arxiv.org/abs/2001.06782"),
])
def test_best_link_is_the_official_page_then_doi_then_arxiv(ids: dict, link: str) -> None:
    assert Paper.model_validate({**PAPER, **ids}).link == link


def test_implementation_links_main_first_and_taken_apart() -> None:
    paper = Paper.model_validate({**PAPER, "impl": "reference_impls/weighting/pcgrad.py:PCGrad",
                                  "also_impl": ["reference_impls/arch/mtan.py:DWA"]})
    assert paper.impls == ["reference_impls/weighting/pcgrad.py:PCGrad", "reference_impls/arch/mtan.py:DWA"]
    ref = paper.impl_refs[1]
    assert (ref.path, ref.symbol, ref.module) == ("reference_impls/arch/mtan.py", "DWA", "reference_impls.arch.mtan")


@pytest.mark.parametrize("change", [{"num_tasks": 0}, {"tasks": []}])
def test_dataset_needs_a_task(change: dict) -> None:
    with pytest.raises(ValidationError):
        Dataset.model_validate({**DATASET, **change})
    assert not _validator("datasets").is_valid([{**DATASET, **change}])


def test_task_count_prefers_num_tasks() -> None:
    assert Dataset.model_validate(DATASET).task_count == 1
    assert Dataset.model_validate({**DATASET, "num_tasks": 40}).task_count == 40


# --- staleness is a check error -----------------------------------------------------------------

def _schema_problems(catalog: Path) -> list[str]:
    return [p.format() for p in run(catalog, check_sync=True).problems.errors
            if "schema" in p.where.file or p.where.file.endswith("CONTRIBUTING.md")]


def test_stale_missing_and_current_schema_files(project: Path, cli, monkeypatch) -> None:
    monkeypatch.chdir(project)
    catalog = Path("catalog")
    assert _schema_problems(catalog) == []            # no schema/ folder: the project opted out
    assert cli("schema", "--catalog", "catalog")[0] == 0
    assert _schema_problems(catalog) == []
    path = catalog / "schema" / "papers.schema.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    del doc["$defs"]["Paper"]["properties"]["doi"]    # as if the model had gained a field since
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    (catalog / "schema" / "venues.schema.json").unlink()
    assert _schema_problems(catalog) == [
        "catalog/schema/papers.schema.json:1:1: -: -: out of date, run python -m site_gen schema",
        "catalog/schema/venues.schema.json:1:1: -: -: missing, run python -m site_gen schema",
    ]
    code, out, _ = cli("schema", "--catalog", "catalog")
    assert code == 0 and "catalog/schema/papers.schema.json: written" in out
    assert "catalog/schema/datasets.schema.json: unchanged" in out
    assert _schema_problems(catalog) == []


def test_stale_field_reference_is_a_check_error(project: Path, cli, monkeypatch) -> None:
    monkeypatch.chdir(project)
    (project / "catalog" / "schema").mkdir()
    guide = project / "CONTRIBUTING.md"
    guide.write_text(f"# Guide\n\nIntro.\n\n{BEGIN}\n| old table |\n{END}\n\nOutro.\n", encoding="utf-8")
    cli("schema", "--catalog", "catalog")
    text = guide.read_text(encoding="utf-8")
    assert text.startswith("# Guide\n\nIntro.\n\n") and text.endswith("\n\nOutro.\n")
    assert "| `arxiv` |  | text | Bare arXiv id" in text and "| old table |" not in text
    guide.write_text(text.replace("Permanent slug: the URL anchor", "Old wording"), encoding="utf-8")
    assert _schema_problems(Path("catalog")) == [
        "CONTRIBUTING.md:5:1: -: -: out of date, run python -m site_gen schema"]


def test_field_reference_markers_out_of_order_are_not_replaced() -> None:
    assert replace_section(f"a {END} b {BEGIN} c", "new") is None
    assert replace_section(f"a {BEGIN} old {END} c", "new") == "a new c"


def test_committed_schema_and_field_reference_are_current() -> None:
    for path, text in model_outputs(ROOT / "catalog").items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name}: run python -m site_gen schema"
    assert (ROOT / "CONTRIBUTING.md") in model_outputs(ROOT / "catalog")


# --- the editor header --------------------------------------------------------------------------

def test_ensure_schema_header_adds_replaces_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "papers.yaml"
    body = "# The papers.\n- id: a\n  title: A\n"
    path.write_text(body, encoding="utf-8")
    assert ensure_schema_header(path) is True
    assert path.read_text(encoding="utf-8") == "# yaml-language-server: $schema=schema/papers.schema.json\n" + body
    assert ensure_schema_header(path) is False
    path.write_text("# yaml-language-server: $schema=old/papers.json\n" + body, encoding="utf-8")
    assert ensure_schema_header(path) is True
    assert path.read_text(encoding="utf-8").splitlines()[:2] == [
        "# yaml-language-server: $schema=schema/papers.schema.json", "# The papers."]
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == yaml.safe_load(body)


def test_schema_headers_option_keeps_the_catalogue_valid(project: Path, cli) -> None:
    catalog = project / "catalog"
    before = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in catalog.glob("*.yaml")}
    code, out, _ = cli("schema", "--catalog", str(catalog), "--headers")
    assert code == 0 and out.count("schema header added") == 5
    for p in catalog.glob("*.yaml"):
        assert p.read_text(encoding="utf-8").startswith(f"# yaml-language-server: $schema=schema/{p.stem}.schema.json\n")
        assert yaml.safe_load(p.read_text(encoding="utf-8")) == before[p.name]
    assert cli("check", "--catalog", str(catalog), "--no-sync")[0] == 0
    shutil.rmtree(catalog / "schema")


@pytest.mark.parametrize("field, value", [("topics", ["survey", "survey"]), ("datasets", ["nyuv2", "nyuv2"]),
                                          ("code", ["https://github.com/x/y"] * 2)])
def test_schema_refuses_an_item_listed_twice_as_check_does(field: str, value: list) -> None:
    assert not _validator("papers").is_valid([{**PAPER, field: value}])
    assert _validator("papers").is_valid([{**PAPER, field: value[:1]}])
