"""The home page's papers-per-year chart (exact numbers of the SVG) and the nav expansion of mkdocs.yml."""

from __future__ import annotations

import dataclasses

import pytest

from site_gen.site import expand_nav, render_site
from site_gen.site.chart import PALETTE, area_of, nice_step, papers_per_year_chart

# The fixture's top-level sections, in taxonomy order: survey (Surveys), optimization (Optimization),
# benchmarks (Benchmarks). "Other" comes after them, so it takes the fourth colour.

# Three years; the tallest bar holds 3 papers, so the axis runs 0..3 in steps of 1 over 280 px of plot.
KNOWN = [("a", 2018, "survey"), ("b", 2018, "optimization/loss-balancing"),
         ("c", 2018, "optimization/gradient-balancing"), ("d", 2020, "optimization/loss-balancing")]


def _with_papers(small, spec, sections=None):
    """The fixture catalogue holding only the papers (id, year, first topic) of ``spec``."""
    base = small.papers[0]
    papers = [base.model_copy(update={"id": pid, "year": year, "topics": [topic]}) for pid, year, topic in spec]
    return dataclasses.replace(small, papers=papers, sections=sections or small.sections)


# ---------------------------------------------------------------------------------------------- chart


def test_chart_frame_bars_segments_and_ticks_of_a_known_catalogue(small):
    """Every coordinate of a 3-year chart: slot 704/3 px with a 10 % margin each side, 280/3 px per paper,
    segments stacked bottom-up in taxonomy order, one tick per paper, an empty bar for the empty year."""
    chart = papers_per_year_chart(_with_papers(small, KNOWN))
    assert (chart.width, chart.height) == (760, 340)
    assert (chart.plot_left, chart.plot_right, chart.plot_top, chart.plot_bottom) == (44, 748, 12, 292)
    assert [(b.year, b.total, b.x, b.width, b.label) for b in chart.bars] == [
        (2018, 3, 67.47, 187.73, True), (2019, 0, 302.13, 187.73, True), (2020, 1, 536.8, 187.73, True)]
    assert [[(s.area, s.count, s.y, s.height, s.colour) for s in b.segments] for b in chart.bars] == [
        [("Surveys", 1, 198.67, 93.33, PALETTE[0]), ("Optimization", 2, 12.0, 186.67, PALETTE[1])],
        [],
        [("Optimization", 1, 198.67, 93.33, PALETTE[1])]]
    assert chart.ticks == [(0, 292.0), (1, 198.67), (2, 105.33), (3, 12.0)]
    assert chart.legend == [("Surveys", PALETTE[0], 1), ("Optimization", PALETTE[1], 3)]


def test_chart_svg_and_its_text_alternative_carry_the_numbers(small):
    """What the reader gets: the viewBox, gridlines across the plot, rectangles at their coordinates with
    their counts, year labels under the plot, and a table (for screen readers) with the same counts."""
    _, home = render_site(_with_papers(small, KNOWN))
    svg = home["chart"]
    assert 'viewBox="0 0 760 340"' in svg
    assert '<line class="mtl-grid" x1="44" x2="748" y1="198.67" y2="198.67"/>' in svg
    assert '<text class="mtl-axis" x="38" y="202.67" text-anchor="end">1</text>' in svg
    assert svg.count('<line class="mtl-grid"') == 4
    assert ('<rect x="67.47" y="198.67" width="187.73" height="93.33" fill="#0072B2" data-area="Surveys" '
            'data-count="1"><title>2018, Surveys: 1</title></rect>') in svg
    assert ('<rect x="536.8" y="198.67" width="187.73" height="93.33" fill="#E69F00" data-area="Optimization" '
            'data-count="1"><title>2020, Optimization: 1</title></rect>') in svg
    assert svg.count('y="306" text-anchor="end" transform="rotate(-45 ') == 3  # plot_bottom + 14
    assert "one per year from 2018 to 2020;" in svg
    assert "<tr><td>2018</td> <td>3</td> <td>Surveys: 1; Optimization: 2</td></tr>" in svg  # spaced for search
    assert "<tr><td>2019</td>" not in svg  # the empty year has a bar but no table row
    assert '"></span>Optimization (3)</li>' in svg


@pytest.mark.parametrize("first, last, labelled", [
    (2018, 2020, [2018, 2019, 2020]),  # up to 15 years: every year
    (2000, 2015, [*range(2000, 2015, 2), 2015]),  # 16 years: every other year, and the last
    (1981, 2011, list(range(1981, 2012, 3))),  # 31 years: every third year, counted from the first
])
def test_chart_labels_at_most_about_fifteen_years(small, first, last, labelled):
    """Year labels thin out so that about 15 fit under the axis; the first and last year are always named."""
    chart = papers_per_year_chart(_with_papers(small, [("a", first, "survey"), ("b", last, "survey")]))
    assert [b.year for b in chart.bars if b.label] == labelled


def test_papers_whose_first_topic_is_outside_the_taxonomy_are_drawn_as_other(small):
    """The documented fallback: such a paper is counted under "Other", stacked after every section, with
    the colour after the sections' own, and named in the legend. (The checker reports an unknown topic as
    an error, so only a catalogue built in code reaches this.)"""
    cat = _with_papers(small, [("a", 2020, "survey"), ("z", 2020, "gone/away")])
    assert area_of(cat) == {"a": "survey", "z": None}  # by section id; None is drawn as "Other"
    chart = papers_per_year_chart(cat)
    assert [(s.area, s.count, s.colour) for s in chart.bars[0].segments] == [
        ("Surveys", 1, PALETTE[0]), ("Other", 1, PALETTE[3])]
    assert chart.legend == [("Surveys", PALETTE[0], 1), ("Other", PALETTE[3], 1)]


@pytest.mark.parametrize("maximum, step", [(5, 1), (6, 2), (10, 2), (25, 5), (50, 10), (100, 20), (500, 100)])
def test_nice_step_at_exact_multiples(maximum, step):
    """A maximum that is exactly five round steps gets that step (0..5 by 1, not 0..6 by 2)."""
    assert nice_step(maximum) == step


@pytest.mark.parametrize("title", ["Other", "Surveys"])
def test_each_paper_is_drawn_once_whatever_the_section_titles(small, title):
    """Section titles are not required to be unique, and "Other" is a natural title; each paper must still
    be one segment's worth of one bar, inside the plot, and counted once in the legend (two sections
    that share a title are two areas, in two colours)."""
    sections = [s.model_copy(update={"title": title}) if s.id == "benchmarks" else s for s in small.sections]
    chart = papers_per_year_chart(_with_papers(small, [("a", 2020, "survey"), ("v", 2020, "benchmarks/vision")],
                                               sections))
    assert all(sum(s.count for s in b.segments) == b.total for b in chart.bars)
    assert all(s.y >= chart.plot_top for b in chart.bars for s in b.segments)
    assert sum(n for _, _, n in chart.legend) == 2  # each paper counted once, in one area
    assert len({colour for _, colour, _ in chart.legend}) == len(chart.legend)  # areas are told apart by colour


# ------------------------------------------------------------------------------------------------ nav


def test_glob_lists_generated_pages_in_catalogue_order_then_the_others_by_name():
    """A glob's pages follow the catalogue order given; pages it matches outside that order come after, sorted."""
    pages = ["papers/z.md", "papers/b.md", "papers/a.md", "papers/c.md", "index.md"]
    assert expand_nav([{"Papers": "papers/*.md"}], pages, ["papers/c.md", "papers/a.md"]) == [
        {"Papers": ["papers/c.md", "papers/a.md", "papers/b.md", "papers/z.md"]}]


def test_outside_links_are_kept_as_they_are_written():
    """http and https links are not pages of the site and are kept (a titled one stays a single link,
    whatever letters it holds); a missing page next to them is dropped."""
    nav = [{"Lab": "https://github.com/XLab/mtl"}, "http://example.org/old", {"Gone": "missing.md"}]
    assert expand_nav(nav, ["index.md"], []) == [{"Lab": "https://github.com/XLab/mtl"}, "http://example.org/old"]


def test_rest_marker_at_top_level_keeps_the_entries_around_it():
    """"..." between two entries puts every unplaced page there, sorted, and keeps what comes before it."""
    nav = [{"Home": "index.md"}, "...", {"About": "about.md"}]
    pages = ["index.md", "policy.md", "about.md", "notes.md"]
    assert expand_nav(nav, pages, []) == [{"Home": "index.md"}, "notes.md", "policy.md", {"About": "about.md"}]


def test_a_page_name_with_glob_characters_does_not_break_the_nav():
    """A file named with brackets, matched by a glob, must not crash the build."""
    nav = expand_nav([{"Notes": "notes/*.md"}], ["notes/[wip].md", "notes/w.md"], [])
    assert [title for item in nav for title in item] == ["Notes"]


def test_a_page_name_with_glob_characters_is_listed_as_itself():
    """'notes/[wip].md' is a page like any other, whether named in the nav or matched by a glob."""
    pages = ["notes/[wip].md", "notes/w.md"]
    assert expand_nav([{"Draft": "notes/[wip].md"}], pages, []) == [{"Draft": "notes/[wip].md"}]
    assert expand_nav([{"Notes": "notes/*.md"}], pages, []) == [{"Notes": ["notes/[wip].md", "notes/w.md"]}]


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_outside_link_with_a_query_string_is_kept(scheme):
    """'?' starts a URL's query; a link such as a filtered issue list must survive like any other link."""
    url = f"{scheme}://github.com/o/r/issues?q=is%3Aopen"
    assert expand_nav([{"Open issues": url}, url], ["index.md"], []) == [{"Open issues": url}, url]
