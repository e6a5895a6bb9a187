"""One failing fixture per catalogue-wide check, with the exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_gen.catalogue import load_catalogue
from site_gen.checks import wants_impl
from site_gen.models import Paper
from site_gen.pipeline import run
from site_gen.problems import Problems

from .conftest import edit_catalogue


def _errors(cli, project: Path, *extra: str) -> tuple[int, list[str]]:
    code, _, err = cli("check", "--catalog", str(project / "catalog"), "--no-sync", *extra)
    lines = [line.split("/project/", 1)[-1] for line in err.splitlines()[:-1]]
    return code, lines


def test_fixture_is_valid(cli, project: Path) -> None:
    code, lines = _errors(cli, project)
    assert code == 0
    assert lines == ["catalog/papers.yaml:14:3: -: notes: warning: 3 paper(s) have no notes or no open questions yet: "
                     "vandenhende2021multi, ruder2017overview, uw",  # at the first paper named, as the next
                     "catalog/papers.yaml:33:3: -: impl: warning: 1 architecture/optimization paper(s) have no "
                     "reference implementation yet (implementation wanted) (hint: run with --list-wanted to name them)"]


def test_list_wanted_names_the_papers(cli, project: Path) -> None:
    code, lines = _errors(cli, project, "--list-wanted")
    assert code == 0
    assert lines[1].endswith("(implementation wanted): uw")


def test_surveys_are_not_wanted(cli, project: Path) -> None:
    """A survey under an optimization topic collects methods; it is not one (codebases likewise)."""
    edit_catalogue(project, "papers.yaml", "  topics: [optimization/loss-balancing, optimization/gradient-balancing]\n",
          "  topics: [optimization/loss-balancing, optimization/gradient-balancing, survey]\n")
    code, lines = _errors(cli, project, "--list-wanted")
    assert code == 0
    assert not any("implementation wanted" in line for line in lines)


def test_papers_with_nothing_to_implement_are_not_wanted(cli, project: Path) -> None:
    """An empirical or theory paper says why in ``no_impl`` and leaves the wanted list."""
    edit_catalogue(project, "papers.yaml", "  topics: [optimization/loss-balancing, optimization/gradient-balancing]\n",
          "  topics: [optimization/loss-balancing, optimization/gradient-balancing]\n"
          "  no_impl: An empirical comparison of loss weightings.\n")
    code, lines = _errors(cli, project)
    assert code == 0
    assert not any("implementation wanted" in line for line in lines)


def test_impl_and_no_impl_together_are_an_error_at_the_entry(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "  topics: [optimization/gradient-balancing]\n",
          "  topics: [optimization/gradient-balancing]\n  no_impl: Nothing to implement.\n")
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line for line in lines if ": warning: " not in line] == [
        "catalog/papers.yaml:1:3: pcgrad: -: a paper has either impl or no_impl, not both: "
        "drop no_impl if the implementation is real"]


@pytest.mark.parametrize(
    "file, old, new, expected",
    [
        ("papers.yaml", "  venue: NeurIPS\n", "  venue: NeurIP\n",
         "catalog/papers.yaml:5:10: pcgrad: venue: unknown venue 'NeurIP' (hint: did you mean 'NeurIPS'?)"),
        ("papers.yaml", "  datasets: [nyuv2]\n", "  datasets: [nyu-v2]\n",
         "catalog/papers.yaml:10:14: pcgrad: datasets.0: unknown dataset 'nyu-v2' (hint: did you mean 'nyuv2'?)"),
        ("papers.yaml", "  topics: [optimization/gradient-balancing]\n", "  topics: [optimization/gradient-balance]\n",
         "catalog/papers.yaml:9:12: pcgrad: topics.0: unknown topic 'optimization/gradient-balance' "
         "(hint: did you mean 'optimization/gradient-balancing'?)"),
        ("papers.yaml", "  topics: [optimization/gradient-balancing]\n", "  topics: [optimization]\n",
         "catalog/papers.yaml:9:12: pcgrad: topics.0: 'optimization' has subsections; use one of them "
         "(hint: one of: optimization/gradient-balancing, optimization/loss-balancing)"),
        ("papers.yaml", "  topics: [survey]\n\n- id: ruder", "  topics: [survey]\n  extends: [ruder2017]\n\n- id: ruder",
         "catalog/papers.yaml:23:13: vandenhende2021multi: extends.0: unknown paper 'ruder2017' "
         "(hint: did you mean 'ruder2017overview'?)"),
        ("papers.yaml", "  topics: [survey]\n\n- id: ruder",
         "  topics: [survey]\n  similar_to: [vandenhende2021multi]\n\n- id: ruder",
         "catalog/papers.yaml:23:16: vandenhende2021multi: similar_to.0: a paper cannot refer to itself"),
        ("datasets.yaml", "  domain: benchmarks/vision\n", "  domain: survey\n",
         "catalog/datasets.yaml:3:11: nyuv2: domain: unknown benchmark domain 'survey'"),
        ("codebases.yaml", "  papers: [pcgrad]\n", "  papers: [pc-grad]\n",
         "catalog/codebases.yaml:7:12: toolkit: papers.0: unknown paper 'pc-grad' (hint: did you mean 'pcgrad'?)"),
        ("papers.yaml", '  arxiv: "1706.05098"\n', '  arxiv: "2001.06782"\n',
         "catalog/papers.yaml:29:10: ruder2017overview: arxiv: duplicate arXiv id: same as entry 'pcgrad' (line 7)"),
        ("papers.yaml", "- id: ruder2017overview\n", "- id: pcgrad\n",
         "catalog/papers.yaml:24:7: pcgrad: id: duplicate id (first used on line 1) "
         "(hint: ids are permanent anchors; choose a new one)"),
        ("papers.yaml", "title: An Overview of Multi-Task Learning in Deep Neural Networks",
         "title: 'Gradient surgery for multi-task learning.'",
         "catalog/papers.yaml:25:10: ruder2017overview: title: duplicate title: same as entry 'pcgrad' (line 3)"),
        ("papers.yaml", '  arxiv: "1706.05098"\n', '  arxiv: "1706.05098"\n  doi: 10.1109/tpami.2021.3054719\n',
         "catalog/papers.yaml:30:8: ruder2017overview: doi: duplicate DOI: same as entry 'vandenhende2021multi' (line 21)"),
        ("papers.yaml", '  arxiv: "1706.05098"\n', '  arxiv: "1706.05098"\n  url: https://example.org/paper?id=7\n',
         "catalog/papers.yaml:40:8: uw: url: duplicate URL: same as entry 'ruder2017overview' (line 30)"),
        ("papers.yaml", "  url: https://example.org/paper?id=7\n", "  url: https://example.org/paper?id=7&utm_source=x\n",
         "catalog/papers.yaml:39:8: uw: url: tracking parameter(s) in URL: utm_source (hint: remove them)"),
        ("taxonomy.yaml", "    - id: benchmarks/vision\n", "    - id: vision\n",
         "catalog/taxonomy.yaml:18:11: vision: id: a subsection id must start with 'benchmarks/'"),
        ("datasets.yaml", "  description: Indoor RGB-D scenes.\n", "  description: Indoor RGB-D scenes.\n  paper: pcgrd\n",
         "catalog/datasets.yaml:8:10: nyuv2: paper: unknown paper 'pcgrd' (hint: did you mean 'pcgrad'?)"),
        ("codebases.yaml", "  papers: [pcgrad]\n", "  papers: [pcgrad]\n  datasets: [nyu]\n",
         "catalog/codebases.yaml:8:14: toolkit: datasets.0: unknown dataset 'nyu' (hint: did you mean 'nyuv2'?)"),
        ("papers.yaml", '  arxiv: "1706.05098"\n', '  arxiv: "1706.05098"\n  url: https://EXAMPLE.org/paper?id=7/\n',
         "catalog/papers.yaml:40:8: uw: url: duplicate URL: same as entry 'ruder2017overview' (line 30)"),
        ("datasets.yaml", "  description: Indoor RGB-D scenes.\n", "  description: Indoor RGB-D scenes.\n- id: nyu2\n"
         "  name: NYU v2\n  domain: benchmarks/vision\n  tasks: [depth]\n  description: Again.\n",
         "catalog/datasets.yaml:9:9: nyu2: name: duplicate name: same as entry 'nyuv2' (line 2)"),
        ("codebases.yaml", "  license: MIT\n", "  license: MIT\n- id: toolkit2\n  name: Toolkit 2\n"
         "  url: https://github.com/example/toolkit/\n  framework: JAX\n  description: Another.\n",
         "catalog/codebases.yaml:11:8: toolkit2: url: duplicate URL: same as entry 'toolkit' (line 3)"),
        ("papers.yaml", "code: [https://github.com/tianheyu927/PCGrad]", "code: ['https://github.com/tianheyu927/PCGrad?fbclid=1']",
         "catalog/papers.yaml:8:10: pcgrad: code.0: tracking parameter(s) in URL: fbclid (hint: remove them)"),
        ("taxonomy.yaml", "      description: Image benchmarks.\n",
         "      description: Image benchmarks.\n- id: survey\n  title: Again\n  description: d\n",
         "catalog/taxonomy.yaml:21:7: survey: id: duplicate section id"),
        ("taxonomy.yaml", "      description: Image benchmarks.\n", "      description: Image benchmarks.\n      children:\n"
         "        - id: benchmarks/dense\n          title: Dense\n          description: d\n",
         "catalog/taxonomy.yaml:22:15: benchmarks/dense: id: a subsection id must start with 'benchmarks/vision/'"),
        ("datasets.yaml", "  description: Indoor RGB-D scenes.\n", "  description: Indoor RGB-D scenes.\n- id: nyuv2\n"
         "  name: Other\n  domain: benchmarks/vision\n  tasks: [depth]\n  description: Again.\n",
         "catalog/datasets.yaml:8:7: nyuv2: id: duplicate id (first used on line 1) "
         "(hint: ids are permanent anchors; choose a new one)"),
        ("papers.yaml", "  questions: [\"Does the projection order matter when more than two gradients conflict?\"]\n",
         "",
         "catalog/papers.yaml:11:9: pcgrad: questions: a paper with a reference implementation needs questions "
         "(hint: add questions: what the paper leaves open, in your own words)"),
        ("papers.yaml", "  notes: [Projects conflicting gradients onto each other's normal plane.]\n", "",
         "catalog/papers.yaml:11:9: pcgrad: notes: a paper with a reference implementation needs notes "
         "(hint: add notes: what the method does and why, in your own words)"),
        ("codebases.yaml", "  url: https://github.com/example/toolkit\n",
         "  url: https://github.com/example/toolkit?utm_source=x\n",
         "catalog/codebases.yaml:3:8: toolkit: url: tracking parameter(s) in URL: utm_source (hint: remove them)"),
        ("codebases.yaml", "  license: MIT\n", "  license: MIT\n- id: toolkit\n  name: Other Toolkit\n"
         "  url: https://github.com/example/other\n  framework: JAX\n  description: Another.\n",
         "catalog/codebases.yaml:9:7: toolkit: id: duplicate id (first used on line 1) "
         "(hint: ids are permanent anchors; choose a new one)"),
    ],
    ids=["venue", "dataset", "topic", "topic-not-leaf", "extends", "self-reference", "domain", "codebase-paper",
         "dup-arxiv", "dup-id", "dup-title", "dup-doi", "dup-url", "tracking", "taxonomy-prefix", "dataset-paper",
         "codebase-dataset", "dup-url-case-slash", "dup-dataset-name", "dup-codebase-url", "tracking-in-code", "dup-section", "grandchild-prefix",
         "dup-dataset-id", "impl-without-questions", "impl-without-notes", "tracking-in-codebase-url",
         "dup-codebase-id"],
)
def test_catalogue_checks(cli, project: Path, file: str, old: str, new: str, expected: str) -> None:
    edit_catalogue(project, file, old, new)
    code, lines = _errors(cli, project)
    errors = [line for line in lines if ": warning: " not in line]
    assert code == 1
    assert expected in errors, errors
    assert len(errors) == 1 or (file == "taxonomy.yaml"), errors


def test_a_copied_entry_is_reported_at_the_copy(cli, project: Path) -> None:
    """An entry pasted as a template, id and all: every error names the copy's lines, the
    first entry's only as 'first used on'. Before, the duplicate-title and unknown-venue errors
    pointed at the original (line 3, 'same as entry pcgrad (line 3)')."""
    path = project / "catalog" / "papers.yaml"
    text = path.read_text(encoding="utf-8")
    first = text[:text.index("- id: vandenhende2021multi")]
    path.write_text(text + "\n" + first.replace("venue: NeurIPS", "venue: NeurIP"), encoding="utf-8")
    start = text.count("\n") + 2  # the copy's first line
    code, lines = _errors(cli, project)
    errors = [line for line in lines if ": warning: " not in line]
    assert code == 1
    assert errors == [
        f"catalog/papers.yaml:{start}:7: pcgrad: id: duplicate id (first used on line 1) "
        "(hint: ids are permanent anchors; choose a new one)",
        f"catalog/papers.yaml:{start + 2}:10: pcgrad: title: duplicate title: same as entry 'pcgrad' (line 3)",
        f"catalog/papers.yaml:{start + 4}:10: pcgrad: venue: unknown venue 'NeurIP' (hint: did you mean 'NeurIPS'?)",
        f"catalog/papers.yaml:{start + 6}:10: pcgrad: arxiv: duplicate arXiv id: same as entry 'pcgrad' (line 7)",
    ], errors


@pytest.mark.parametrize(
    "change, expected",
    [
        ("missing-file", "catalog/papers.yaml:11:9: pcgrad: impl: file not found: reference_impls/weighting/pcgrad.py"),
        ("missing-symbol", "catalog/papers.yaml:11:9: pcgrad: impl: reference_impls/weighting/pcgrad.py defines no "
                           "'PCGrad' (hint: did you mean 'PCGrad2'?)"),
        ("untested", "catalog/papers.yaml:11:9: pcgrad: impl: no test imports reference_impls.weighting.pcgrad.PCGrad "
                     "(hint: add a test under tests/ with 'from reference_impls.weighting.pcgrad import PCGrad')"),
        ("broken-python", "catalog/papers.yaml:11:9: pcgrad: impl: reference_impls/weighting/pcgrad.py is not valid Python"),
    ],
)
def test_impl_links(cli, project: Path, change: str, expected: str) -> None:
    impl = project / "reference_impls" / "weighting" / "pcgrad.py"
    if change == "missing-file":
        impl.unlink()
    elif change == "missing-symbol":
        impl.write_text("class PCGrad2:\n    pass\n", encoding="utf-8")
    elif change == "untested":
        (project / "tests" / "test_pcgrad.py").write_text("import os\n", encoding="utf-8")
    else:
        impl.write_text("class PCGrad(\n", encoding="utf-8")
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line for line in lines if ": warning: " not in line] == [expected]


ALSO = "  impl: reference_impls/weighting/pcgrad.py:PCGrad\n"


def _also_impl(project: Path, *links: str) -> None:
    edit_catalogue(project, "papers.yaml", ALSO, ALSO + "  also_impl:\n" + "".join(f"    - {link}\n" for link in links))


def test_also_impl_links_are_checked_like_impl_at_their_own_line(cli, project: Path) -> None:
    _also_impl(project, "reference_impls/weighting/pcgrad.py:PCGradFast")
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line for line in lines if ": warning: " not in line] == [
        "catalog/papers.yaml:13:7: pcgrad: also_impl: reference_impls/weighting/pcgrad.py defines no 'PCGradFast' "
        "(hint: did you mean 'PCGrad'?)"]
    impl = project / "reference_impls" / "weighting" / "pcgrad.py"
    impl.write_text(impl.read_text(encoding="utf-8") + "\n\nclass PCGradFast:\n    pass\n", encoding="utf-8")
    code, lines = _errors(cli, project)
    assert [line for line in lines if ": warning: " not in line] == [
        "catalog/papers.yaml:13:7: pcgrad: also_impl: no test imports reference_impls.weighting.pcgrad.PCGradFast "
        "(hint: add a test under tests/ with 'from reference_impls.weighting.pcgrad import PCGradFast')"]
    (project / "tests" / "test_fast.py").write_text("from reference_impls.weighting.pcgrad import PCGradFast\n")
    assert _errors(cli, project)[0] == 0


@pytest.mark.parametrize("links, message", [
    (("reference_impls/weighting/pcgrad.py:PCGrad",), "implementation linked twice: reference_impls/weighting/pcgrad.py:PCGrad"),
    (("not/a/link",), "also_impl.0: "),
])
def test_bad_also_impl_is_an_error_at_the_entry(cli, project: Path, links: tuple[str, ...], message: str) -> None:
    _also_impl(project, *links)
    code, lines = _errors(cli, project)
    assert code == 1
    assert any(message in line and line.startswith("catalog/papers.yaml:") for line in lines), lines


def test_also_impl_needs_impl(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", ALSO, "  also_impl: [reference_impls/weighting/pcgrad.py:PCGrad]\n")
    code, lines = _errors(cli, project)
    assert code == 1
    assert "catalog/papers.yaml:1:3: pcgrad: -: also_impl lists a paper's further implementations: put the main " \
           "one in impl first" in lines, lines


def test_impl_found_through_module_import(cli, project: Path) -> None:
    (project / "tests" / "test_pcgrad.py").write_text(
        "from reference_impls.weighting import pcgrad\n\ndef test_x():\n    assert pcgrad.PCGrad\n", encoding="utf-8")
    code, _ = _errors(cli, project)
    assert code == 0


def test_generated_files_must_be_in_sync(cli, project: Path) -> None:
    catalog = str(project / "catalog")
    code, _, err = cli("check", "--catalog", catalog)
    assert code == 1
    assert "README.md:1:1: -: -: generated file is missing (hint: run `python -m site_gen build`)" in err
    assert cli("build", "--catalog", catalog)[0] == 0
    assert cli("check", "--catalog", catalog)[0] == 0
    edit_catalogue(project, "papers.yaml", "  year: 2020\n", "  year: 2021\n")
    code, _, err = cli("check", "--catalog", catalog)
    assert code == 1
    assert "README.md:1:1: -: -: out of date with the catalogue" in err
    assert "catalog.bib:1:1: -: -: out of date with the catalogue" in err


def test_sync_check_is_byte_exact_and_says_how_to_fix(cli, project: Path) -> None:
    catalog = str(project / "catalog")
    assert cli("build", "--catalog", catalog)[0] == 0
    readme = project / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # one trailing newline more
    code, _, err = cli("check", "--catalog", catalog)
    assert code == 1
    assert "README.md:1:1: -: -: out of date with the catalogue (hint: run `python -m site_gen build` and commit " \
           "the result)" in err
    assert "catalog.bib:" not in err


def test_sync_check_renders_even_when_rendering_is_off(project: Path) -> None:
    problems = run(project / "catalog", check_sync=True, render=False).problems
    assert any(p.format().endswith("README.md:1:1: -: -: generated file is missing (hint: run `python -m site_gen "
                                   "build`)") for p in problems.errors), [p.format() for p in problems.errors]


def test_no_sync_also_skips_the_schema_files(cli, project: Path) -> None:
    (project / "catalog" / "schema").mkdir()  # the project keeps schema files, and every one is missing
    code, lines = _errors(cli, project)
    assert code == 0 and not [line for line in lines if "schema" in line], lines
    code, _, err = cli("check", "--catalog", str(project / "catalog"))
    assert code == 1 and "catalog/schema/papers.schema.json:1:1: -: -: missing, run python -m site_gen schema" in err


def test_to_verify_is_counted_as_a_warning(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "  topics: [survey]\n\n- id: ruder", "  topics: [survey]\n  to_verify: given names\n\n- id: ruder")
    code, lines = _errors(cli, project)
    assert code == 0
    assert "catalog/papers.yaml:23:14: -: to_verify: warning: 1 paper(s) have metadata that still needs confirming: " \
           "vandenhende2021multi" in lines, lines  # at that paper's to_verify


def test_plain_http_is_a_warning_at_the_url(cli, project: Path) -> None:
    edit_catalogue(project, "datasets.yaml", "  homepage: https://", "  homepage: http://")
    code, lines = _errors(cli, project)
    assert code == 0
    assert "catalog/datasets.yaml:6:13: nyuv2: homepage: warning: plain http URL (hint: use https if the site supports it)" \
        in lines, lines


def test_missing_taxonomy_is_one_error_not_one_per_topic(cli, project: Path) -> None:
    (project / "catalog" / "taxonomy.yaml").unlink()
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line.split(" (hint")[0] for line in lines if ": warning: " not in line] == [
        "catalog/taxonomy.yaml:1:1: -: -: file not found"]


@pytest.mark.parametrize("topics, fields, wanted", [
    (["architecture/soft-sharing"], {}, True),
    (["optimization/loss-balancing", "benchmarks/vision"], {}, True),   # one method topic is enough
    (["benchmarks/vision"], {}, False),
    (["optimization/loss-balancing", "codebases"], {}, False),
    (["optimization/loss-balancing", "survey"], {}, False),
    (["optimization/loss-balancing"], {"no_impl": "An empirical study."}, False),
    (["optimization/loss-balancing"], {"impl": "reference_impls/weighting/uw.py:UW"}, False),
])
def test_which_papers_want_an_implementation(topics: list[str], fields: dict, wanted: bool) -> None:
    paper = Paper.model_validate({"id": "p", "title": "T", "authors": ["A B"], "venue": "arXiv", "year": 2020,
                                  "arxiv": "2001.06782", "topics": topics, **fields})
    assert wants_impl(paper) is wanted


def test_leaves_and_papers_by_topic(project: Path) -> None:
    """Only leaves group papers; a topic written twice lists its paper once; newest first."""
    edit_catalogue(project, "papers.yaml", "  topics: [optimization/loss-balancing, optimization/gradient-balancing]\n",
          "  topics: [optimization/loss-balancing, optimization/gradient-balancing, optimization/loss-balancing]\n")
    problems = Problems()
    cat = load_catalogue(project / "catalog", problems)
    assert cat.leaf_ids() == ["survey", "optimization/gradient-balancing", "optimization/loss-balancing",
                              "benchmarks/vision"]
    groups = {topic: [p.id for p in papers] for topic, papers in cat.papers_by_topic().items()}
    assert groups == {"survey": ["vandenhende2021multi", "ruder2017overview"],
                      "optimization/gradient-balancing": ["pcgrad", "uw"], "optimization/loss-balancing": ["uw"],
                      "benchmarks/vision": []}


def test_titles_in_other_scripts_are_not_duplicates_of_each_other(cli, project: Path) -> None:
    """Two different Chinese / Japanese titles used to reduce to the same empty key."""
    edit_catalogue(project, "papers.yaml", "title: An Overview of Multi-Task Learning in Deep Neural Networks",
                   "title: 多任务学习综述")
    edit_catalogue(project, "papers.yaml", 'title: "Søgaard & Friends: 50% <b>Bold</b> Weights_{k}"',
                   "title: マルチタスク学習の研究")
    assert _errors(cli, project)[0] == 0


@pytest.mark.parametrize("first, second", [
    ("多任务学习综述", "多任务学习 综述!"),
    ("Gradient Surgery", "GRADIENT  surgery."),
    ("Straße der Aufgaben", "STRASSE DER AUFGABEN"),        # case folding, not lowercasing
    ("ＭＴＬ in Practice", "MTL in practice"),               # full-width letters (NFKC)
], ids=["chinese", "latin", "sharp-s", "full-width"])
def test_titles_that_differ_in_case_spacing_or_width_are_duplicates(first: str, second: str) -> None:
    from site_gen.add import find_duplicate
    from site_gen.checks import normalise_title

    assert normalise_title(first) == normalise_title(second)
    assert find_duplicate({"title": second}, [{"id": "a", "title": first}]) == "same title as existing entry 'a'"


def test_distinct_non_latin_titles_are_not_duplicates_for_add_either() -> None:
    from site_gen.add import find_duplicate

    assert find_duplicate({"title": "マルチタスク学習の研究"}, [{"id": "a", "title": "多任务学习综述"}]) is None


@pytest.mark.parametrize("old, new, expected", [
    ("topics: [optimization/gradient-balancing]", "topics: [optimization/gradient-balancing, optimization/gradient-balancing]",
     "catalog/papers.yaml:9:45: pcgrad: topics.1: 'optimization/gradient-balancing' is listed twice (also item 0) "
     "(hint: remove the repeat)"),
    ("  datasets: [nyuv2]\n", "  datasets: [nyuv2, nyuv2]\n",
     "catalog/papers.yaml:10:21: pcgrad: datasets.1: 'nyuv2' is listed twice (also item 0) (hint: remove the repeat)"),
    ("code: [https://github.com/tianheyu927/PCGrad]", "code: [https://github.com/tianheyu927/PCGrad, https://github.com/tianheyu927/PCGrad]",
     "catalog/papers.yaml:8:49: pcgrad: code.1: 'https://github.com/tianheyu927/PCGrad' is listed twice (also item 0) "
     "(hint: remove the repeat)"),
], ids=["topics", "datasets", "code"])
def test_an_item_listed_twice_in_one_entry_is_an_error(cli, project: Path, old: str, new: str, expected: str) -> None:
    edit_catalogue(project, "papers.yaml", old, new)
    code, lines = _errors(cli, project)
    assert code == 1 and expected in lines, lines


def test_an_author_listed_twice_is_a_warning(cli, project: Path) -> None:
    """Two co-authors can share a name, so a repeated author warns instead of failing."""
    edit_catalogue(project, "papers.yaml", "Karol Hausman, Chelsea Finn]", "Karol Hausman, Chelsea Finn, Karol Hausman]")
    code, lines = _errors(cli, project)
    assert code == 0
    assert ("catalog/papers.yaml:4:99: pcgrad: authors.6: warning: author 'Karol Hausman' is listed twice "
            "(hint: remove the repeat, unless two co-authors share the name)") in lines


def test_tracking_parameters_are_found_and_stripped() -> None:
    from site_gen.checks import strip_tracking, tracking_parameters

    url = "https://x.org/p?utm_source=feed&id=7&fbclid=abc&utm_medium=#top"
    assert tracking_parameters(url) == ["utm_source", "fbclid", "utm_medium"]
    assert strip_tracking(url) == "https://x.org/p?id=7#top"
    assert strip_tracking("https://x.org/p?utm_source=a") == "https://x.org/p"
    assert strip_tracking("https://x.org/p?a=1&b=2") == "https://x.org/p?a=1&b=2"
    encoded = "https://x.org/p?utm%5Fsource=a&b=1"  # a name found decoded is stripped as written
    assert tracking_parameters(encoded) == ["utm_source"]
    assert strip_tracking(encoded) == "https://x.org/p?b=1"


def test_a_tracking_name_ends_at_the_first_equals_sign() -> None:
    """A value may itself hold '=' (base64 click ids do), and a name may come with no value at all:
    the name is what stands before the first '=', so both are still found and stripped."""
    from site_gen.checks import strip_tracking, tracking_parameters

    url = "https://x.org/p?fbclid=IwAR0abc==&id=a=b&gclid"
    assert tracking_parameters(url) == ["fbclid", "gclid"]
    assert strip_tracking(url) == "https://x.org/p?id=a=b"


def test_stripping_keeps_the_other_parameters_as_written() -> None:
    """Only tracking pairs go: the pairs around them keep their order and their '&', and a URL with
    nothing to strip comes back exactly as written (down to an empty query or fragment)."""
    from site_gen.checks import strip_tracking

    assert strip_tracking("https://x.org/p?a=1&utm_source=x&b=2&c=3#top") == "https://x.org/p?a=1&b=2&c=3#top"
    for url in ("https://x.org/p?", "https://x.org/p?a=1#", "https://x.org/p?b=2&a=1"):
        assert strip_tracking(url) == url


def _listed(line: str) -> list[str]:
    """The ids a summary warning names after its last ': ', as a list."""
    return line.rsplit(": ", 1)[1].split(", ")


def test_summary_warnings_name_exactly_the_papers_concerned(cli, project: Path) -> None:
    """Each summary warning ends with the list of ids a contributor works through: with two papers
    concerned, it names those two, one by one, in file order, and says how many they are."""
    edit_catalogue(project, "papers.yaml", "  topics: [survey]\n\n- id: ruder",
                   "  topics: [survey]\n  to_verify: given names\n\n- id: ruder")
    edit_catalogue(project, "papers.yaml", "  topics: [survey]\n\n- id: uw",
                   "  topics: [optimization/loss-balancing]\n  to_verify: year\n\n- id: uw")
    code, lines = _errors(cli, project, "--list-wanted")
    assert code == 0
    summaries = {line.split(": ")[2]: line for line in lines}  # field -> its warning
    assert _listed(summaries["to_verify"]) == ["vandenhende2021multi", "ruder2017overview"]
    assert _listed(summaries["impl"]) == ["ruder2017overview", "uw"]
    assert ": warning: 2 architecture/optimization paper(s)" in summaries["impl"]


def test_a_paper_with_notes_but_no_questions_is_still_unannotated(cli, project: Path) -> None:
    """Unannotated means 'no notes or no open questions': one of the two is not enough."""
    edit_catalogue(project, "papers.yaml", "  topics: [survey]\n\n- id: ruder",
                   "  topics: [survey]\n  notes: [Sorts the field by what is shared.]\n\n- id: ruder")
    edit_catalogue(project, "papers.yaml", "  topics: [survey]\n\n- id: uw",
                   "  topics: [survey]\n  questions: [When does sharing hurt?]\n\n- id: uw")
    code, lines = _errors(cli, project)
    assert code == 0
    notes = [line for line in lines if ": notes: warning: " in line]
    assert len(notes) == 1 and _listed(notes[0]) == ["vandenhende2021multi", "ruder2017overview", "uw"], lines


def test_a_url_with_several_tracking_parameters_names_each(cli, project: Path) -> None:
    edit_catalogue(project, "papers.yaml", "  url: https://example.org/paper?id=7\n",
                   "  url: https://example.org/paper?utm_source=x&id=7&fbclid=1\n")
    code, lines = _errors(cli, project)
    assert code == 1
    [error] = [line for line in lines if ": warning: " not in line]
    assert error.startswith("catalog/papers.yaml:39:8: uw: url: tracking parameter(s) in URL: "), error
    assert error.removesuffix(" (hint: remove them)").rsplit(": ", 1)[1].split(", ") == ["utm_source", "fbclid"]


def test_a_duplicate_id_names_the_line_of_the_first_id_even_when_it_is_not_the_first_key(cli, project: Path) -> None:
    """'first used on line N' points at the line that holds the first ``id:``, not at the entry's start."""
    edit_catalogue(project, "datasets.yaml", "- id: nyuv2\n  name: NYUv2\n", "- name: NYUv2\n  id: nyuv2\n")
    edit_catalogue(project, "datasets.yaml", "  description: Indoor RGB-D scenes.\n",
                   "  description: Indoor RGB-D scenes.\n- id: nyuv2\n  name: Other\n  domain: benchmarks/vision\n"
                   "  tasks: [depth]\n  description: Again.\n")
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line for line in lines if ": warning: " not in line] == [
        "catalog/datasets.yaml:8:7: nyuv2: id: duplicate id (first used on line 2) "
        "(hint: ids are permanent anchors; choose a new one)"]


@pytest.mark.parametrize("first, second", [
    ("https://example.org/strasse", "https://example.org/straße"),  # 'ß' upper-cases to 'SS', but is not 'ss'
    ("https://example.org/tool", "https://example.org/toolX"),
    ("https://example.org/tool", "https://example.org/tool/X"),
], ids=["sharp-s", "trailing-x", "trailing-segment"])
def test_urls_that_differ_in_more_than_case_and_a_trailing_slash_are_not_duplicates(
        cli, project: Path, first: str, second: str) -> None:
    """Duplicate URLs are compared lower-cased and without trailing '/'; nothing else is dropped or merged."""
    edit_catalogue(project, "papers.yaml", "  url: https://example.org/paper?id=7\n", f"  url: {first}\n")
    edit_catalogue(project, "papers.yaml", '  arxiv: "1706.05098"\n', f'  arxiv: "1706.05098"\n  url: {second}\n')
    edit_catalogue(project, "codebases.yaml", "  url: https://github.com/example/toolkit\n", f"  url: {first}\n")
    edit_catalogue(project, "codebases.yaml", "  license: MIT\n", f"  license: MIT\n- id: toolkit2\n  name: Toolkit 2\n"
                   f"  url: {second}\n  framework: JAX\n  description: Another.\n")
    code, lines = _errors(cli, project)
    assert code == 0, lines


def test_a_venues_file_that_is_not_a_mapping_is_one_error_not_one_per_paper(cli, project: Path) -> None:
    """Its keys cannot be read, so papers' venues are not checked against a list's items."""
    (project / "catalog" / "venues.yaml").write_text("- NeurIPS\n- arXiv\n", encoding="utf-8")
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line.split(" (hint")[0] for line in lines if ": warning: " not in line] == [
        "catalog/venues.yaml:1:1: -: -: expected a mapping of venue keys, got a list"]


def test_a_taxonomy_whose_every_section_is_invalid_gives_errors_only_there(cli, project: Path) -> None:
    """No section is valid, so no topic or domain can be checked: each paper is spared an 'unknown topic'
    error that would only repeat the taxonomy's own errors."""
    path = project / "catalog" / "taxonomy.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("title:", "heading:"), encoding="utf-8")
    code, lines = _errors(cli, project)
    errors = [line for line in lines if ": warning: " not in line]
    assert code == 1 and errors
    assert all(line.startswith("catalog/taxonomy.yaml:") for line in errors), errors


def test_an_empty_taxonomy_is_one_error(cli, project: Path) -> None:
    """With no section at all, no paper's topic can be checked and the README would list no paper:
    `check` used to pass on ``[]`` and `build` wrote a README without a single paper."""
    (project / "catalog" / "taxonomy.yaml").write_text("[]\n", encoding="utf-8")
    code, lines = _errors(cli, project)
    assert code == 1
    assert [line.split(" (hint")[0] for line in lines if ": warning: " not in line] == [
        "catalog/taxonomy.yaml:1:1: -: -: the taxonomy has no sections"]
