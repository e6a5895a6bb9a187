"""Unit tests of the site renderer on the small fixture catalogue (no MkDocs, no browser)."""

from __future__ import annotations

import dataclasses
import html
import re
from collections import Counter
from pathlib import Path

import bibtexparser
import pytest
import yaml

from site_gen.bibtex import bibtex_entries
from site_gen.pipeline import run
from site_gen.site import SiteOptions, expand_nav, render_site
from site_gen.site.chart import nice_step, papers_per_year_chart
from site_gen.site.impls import impl_infos
from site_gen.site.links import paper_links, relative, safe_url
from site_gen.site.pages import meta_text, rewrite_links, split_bib

SMALL = Path(__file__).parents[1] / "site_gen" / "fixtures" / "small" / "catalog"


@pytest.fixture(scope="module")
def small():
    result = run(SMALL)
    assert not result.problems.errors
    return result.catalogue


@pytest.fixture(scope="module")
def rendered(small):
    return render_site(small, SiteOptions(contributing="# Contributing\n\nSee [the schema](docs/schema.md)."))


def test_catalogue_text_is_escaped_everywhere(small, rendered):
    files, home = rendered
    hostile = next(p for p in small.papers if "<b>" in p.title)
    pages = "\n".join(files.values()) + "\n".join(home.values())
    assert "<b>Bold</b>" not in pages
    section = files["papers/optimization.md"]
    assert "50% &lt;b&gt;Bold&lt;/b&gt; Weights_{k}" in section  # autoescaped, not dropped
    assert f'id="{hostile.id}"' in section


def test_every_paper_rendered_once_in_full(small, rendered):
    files, _ = rendered
    anchors = Counter()
    for path, text in files.items():
        if path.startswith("papers/"):
            for p in small.papers:
                anchors[p.id] += text.count(f' id="{p.id}" class="mtl-paper__title"')
    assert anchors == Counter({p.id: 1 for p in small.papers})


def test_paper_in_two_topics_is_cross_referenced(small, rendered):
    files, _ = rendered
    uw = next(p for p in small.papers if p.id == "uw")
    assert uw.topics == ["optimization/loss-balancing", "optimization/gradient-balancing"]
    section = files["papers/optimization.md"]
    grad = section.index("## Gradient Balancing")
    assert section.index('id="uw"') > section.index("## Loss Balancing")  # full entry under its first topic
    assert 'href="./#uw"' in section[grad:]  # and a link back from the second one


def test_unsafe_urls_are_refused():
    for bad in ("javascript:alert(1)", "data:text/html,x", "//example.org/x", "https://ex ample.org", "ftp://x.org"):
        with pytest.raises(ValueError):
            safe_url(bad)
    assert safe_url("https://example.org/a?b=1") == "https://example.org/a?b=1"


def test_paper_links(small):
    pcgrad = next(p for p in small.papers if p.id == "pcgrad")
    links = {link.kind: link.url for link in paper_links(pcgrad, "../../implementations/#impl-pcgrad")}
    assert links["arxiv"] == "https://arxiv.org/abs/2001.06782"
    assert links["hf"] == "https://huggingface.co/papers/2001.06782"
    assert links["code"] == "https://github.com/tianheyu927/PCGrad"
    assert links["impl"] == "../../implementations/#impl-pcgrad"
    old_style = pcgrad.model_copy(update={"arxiv": "cs/0701001"})
    assert "hf" not in {link.kind for link in paper_links(old_style, None)}  # no HF page for old ids


@pytest.mark.parametrize("here, there, anchor, expected", [
    ("browse.md", "papers/theory.md", "x", "../papers/theory/#x"),
    ("index.md", "papers/theory.md", "", "papers/theory/"),
    ("papers/a.md", "papers/a.md", "p", "./#p"),
    ("papers/a.md", "papers/b.md", "p", "../b/#p"),
    ("papers/a.md", "catalog.bib", "", "../../catalog.bib"),
    ("cite.md", "index.md", "", "../"),
])
def test_relative_urls(here, there, anchor, expected):
    assert relative(here, there, anchor) == expected


def test_split_bib_matches_per_entry_rendering(small, rendered):
    files, _ = rendered
    assert split_bib(files["catalog.bib"]) == bibtex_entries(small)


def test_chart_has_one_bar_per_year(small):
    chart = papers_per_year_chart(small)
    years = [p.year for p in small.papers]
    assert [b.year for b in chart.bars] == list(range(min(years), max(years) + 1))
    per_year = Counter(years)
    for bar in chart.bars:
        assert bar.total == per_year.get(bar.year, 0) == sum(s.count for s in bar.segments)
        heights = [s.height for s in bar.segments]
        assert all(h > 0 for h in heights)
    tallest = max(chart.bars, key=lambda b: b.total)
    assert sum(s.height for s in tallest.segments) <= chart.plot_bottom - chart.plot_top + 1e-6


@pytest.mark.parametrize("maximum, step", [(1, 1), (4, 1), (12, 5), (47, 10), (230, 50), (999, 200)])
def test_nice_step(maximum, step):
    assert nice_step(maximum) == step


def test_impl_info_finds_tests_and_signature(small):
    (info,) = impl_infos(small)
    assert (info.paper.id, info.symbol, info.module) == ("pcgrad", "PCGrad", "reference_impls.weighting.pcgrad")
    assert [t.path for t in info.tests] == ["tests/test_pcgrad.py"]
    assert info.snippet.startswith("from reference_impls.weighting.pcgrad import PCGrad\n")


def test_implementation_wanted_lists_methods_without_impl(small, rendered):
    files, _ = rendered
    wanted = files["implementations.md"].split("## Implementation wanted", 1)[1]
    expected = [p for p in small.papers
                if not p.impl and any(t.startswith(("architecture/", "optimization/")) for t in p.topics)
                and not {"survey", "codebases"} & set(p.topics)]
    assert wanted.count("<li>") == len(expected) > 0


def test_implementations_page_lists_papers_with_nothing_to_implement_and_why(small):
    papers = [p.model_copy(update={"no_impl": "A <b>study</b>, no method."}) if p.id == "uw" else p
              for p in small.papers]
    files, _ = render_site(dataclasses.replace(small, papers=papers))
    page = files["implementations.md"]
    wanted, studies = page.split("## Implementation wanted", 1)[1].split("## Nothing to implement", 1)
    assert ">UW: " not in wanted
    (item,) = [line for line in studies.splitlines() if line.startswith("<li>")]
    assert ">UW: " in item and item.endswith("): A &lt;b&gt;study&lt;/b&gt;, no method.</li>")


def test_questions_page_lists_every_question_under_its_topic(small):
    asked = {"pcgrad": ["Does the order of projections matter?", "What about <K> tasks?"],
             "ruder2017overview": ["Which claims still hold?"]}
    papers = [p.model_copy(update={"questions": asked.get(p.id, [])}) for p in small.papers]
    files, _ = render_site(dataclasses.replace(small, papers=papers))
    page = files["questions.md"]
    assert page.count("<li class=\"mtl-question\">") == 3
    assert page.index("Which claims still hold?") < page.index("## Optimization") < page.index("What about &lt;K&gt;")
    assert page.index("### Gradient Balancing") < page.index("Does the order")


def test_contributing_links_point_outside_the_site():
    assert rewrite_links("[schema](docs/schema.md) and [web](https://x.org)", None) == \
        "schema (`docs/schema.md`) and [web](https://x.org)"
    assert rewrite_links("[schema](./docs/schema.md)", "https://github.com/o/r/blob/main/") == \
        "[schema](https://github.com/o/r/blob/main/docs/schema.md)"


def test_front_matter_text_cannot_break_out():
    assert meta_text('a "quoted" <script> & b') == "a 'quoted' script and b"


def test_expand_nav_globs_and_drops_missing_pages():
    nav = [{"Home": "index.md"}, {"Papers": ["papers/*.md"]}, {"Browse": "browse.md"},
           {"Benchmarks": ["benchmarks-*.md", "toy-problem.md"]}, {"Gone": "missing.md"}]
    pages = ["index.md", "browse.md", "papers/b.md", "papers/a.md", "benchmarks-site.md"]
    assert expand_nav(nav, pages, order=["papers/b.md", "papers/a.md"]) == [
        {"Home": "index.md"}, {"Papers": ["papers/b.md", "papers/a.md"]}, {"Browse": "browse.md"},
        {"Benchmarks": ["benchmarks-site.md"]}]
    assert expand_nav([{"Benchmarks": ["toy-problem.md"]}], pages, []) == []


def test_expand_nav_places_unlisted_pages_at_the_rest_marker():
    nav = [{"Home": "index.md"}, {"Papers": ["papers/*.md"]}, {"More": ["..."]}, {"About": "about.md"}]
    pages = ["index.md", "about.md", "papers/a.md", "policy.md", "notes/z.md"]
    assert expand_nav(nav, pages, []) == [{"Home": "index.md"}, {"Papers": ["papers/a.md"]},
                                          {"More": ["notes/z.md", "policy.md"]}, {"About": "about.md"}]
    assert expand_nav(nav, ["index.md", "about.md"], []) == [{"Home": "index.md"}, {"About": "about.md"}]


def test_cite_page_gives_a_parseable_entry_for_the_catalogue(small):
    citation = yaml.safe_load((Path(__file__).parents[2] / "CITATION.cff").read_text(encoding="utf-8"))
    files, _ = render_site(small, SiteOptions(citation=citation))
    code = re.search(r'<code id="cite-catalogue">(.*?)</code>', files["cite.md"], re.S).group(1)
    library = bibtexparser.parse_string(html.unescape(code))
    (entry,) = library.entries
    assert entry.fields_dict["title"].value == citation["title"]
    assert entry.fields_dict["year"].value == str(citation["date-released"])[:4]
    assert entry.fields_dict["author"].value.startswith("{")  # an organisation, not "Family, Given"
    assert "](catalog.bib)" in files["cite.md"]  # MkDocs checks this link in the strict build


def test_merging_impls_get_the_merging_usage_line():
    """Model-merging classes follow reference_impls/merging/base.py's call, not a model's or a weighting's."""
    catalogue = run(Path(__file__).parents[2] / "catalog").catalogue
    info = next(i for i in impl_infos(catalogue) if i.symbol == "TiesMerging")
    assert info.snippet.splitlines()[-1].startswith("merged = method(pretrained, task_vectors)")


@pytest.mark.parametrize("extra, wanted", [((), True), (("survey",), False), (("codebases",), False)])
def test_wants_impl_skips_surveys_and_codebases(small, extra, wanted):
    from site_gen.checks import wants_impl

    uw = next(p for p in small.papers if p.id == "uw")
    assert not uw.impl
    assert wants_impl(uw.model_copy(update={"topics": [*uw.topics, *extra]})) is wanted


@pytest.mark.parametrize("symbol, hook, harness", [("GradNorm", "balance_step", "makes this call"),
                                                   ("PBTScalarization", "exploit_and_explore", "refuses this method")])
def test_snippets_of_hooked_methods_name_the_extra_call_and_what_the_harness_does(symbol, hook, harness):
    """A method with a training hook is not used by combine() alone; its snippet must say so."""
    catalogue = run(Path(__file__).parents[2] / "catalog").catalogue
    info = next(i for i in impl_infos(catalogue) if i.symbol == symbol)
    assert f"# each step also needs method.{hook}(...)" in info.snippet
    assert info.snippet.endswith(f"# python -m reference_impls.train {harness}")
    plain = next(i for i in impl_infos(catalogue) if i.symbol == "PCGrad")
    assert "each step also needs" not in plain.snippet


@pytest.mark.parametrize("symbol, signature, usage", [
    ("UWPositive", "UWPositive(num_tasks: int, init_log_variance: float=0.0)", "loss = method.combine(losses)"),
    ("PSD", "PSD(*args, window: int=3", "outputs = model(x)  # {task name: prediction}"),
    ("FourM21", "FourM21(tasks: Sequence[str]", "outputs = model(x)  # {task name: prediction}"),
])
def test_snippets_of_subclasses_show_what_they_inherit(symbol, signature, usage):
    """A subclass of UW or of another architecture is called like its base, and takes its base's arguments."""
    catalogue = run(Path(__file__).parents[2] / "catalog").catalogue
    info = next(i for i in impl_infos(catalogue) if i.symbol == symbol)
    assert info.signature.startswith(signature)
    assert usage in info.snippet.splitlines()


def test_every_linked_architecture_class_is_shown_as_a_model():
    """However deep its bases (TaskAdaptedBackbone, another architecture), a model is called as one."""
    catalogue = run(Path(__file__).parents[2] / "catalog").catalogue
    infos = [i for i in impl_infos(catalogue) if i.module.startswith("reference_impls.architectures.")]
    assert len(infos) > 100
    wrong = [i.symbol for i in infos if f"model = {i.symbol}(...)" not in i.snippet
             or "outputs = model(x)  # {task name: prediction}" not in i.snippet]
    assert wrong == []


def test_snippets_of_architectures_with_a_training_procedure_say_the_harness_trains_the_network_only():
    catalogue = run(Path(__file__).parents[2] / "catalog").catalogue
    infos = {i.symbol: i for i in impl_infos(catalogue)}
    assert "# in the paper, tasks are trained one after another" in infos["PackNet"].snippet
    assert infos["PackNet"].snippet.endswith("# python -m reference_impls.train trains the network only")
    assert "trains the network only" not in infos["MMoE"].snippet
