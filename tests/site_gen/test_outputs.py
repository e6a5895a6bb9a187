"""README and BibTeX output: golden README, BibTeX round trip and validity, safe escaping, atomic writes."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import subprocess
from pathlib import Path

import bibtexparser
import pytest
from bibtexparser.model import Entry, Field

from site_gen import cli as cli_module
from site_gen.bibtex import entry_for, escape, family_given, protect_title, render_bibtex, render_library
from site_gen.catalogue import load_catalogue
from site_gen.markdown import github_anchor, md, md_url
from site_gen.output import write_atomic
from site_gen.pipeline import run
from site_gen.problems import Location, Problems
from site_gen.readme import MainLinks, appended_sections, heading_anchors, link, render_readme

from .conftest import main_links, repeated

GOLDEN = Path(__file__).parent / "fixtures" / "small" / "README.golden.md"


def _catalogue(project: Path):
    problems = Problems()
    cat = load_catalogue(project / "catalog", problems)
    assert not problems.errors
    return cat


def test_readme_matches_golden(cli, project: Path) -> None:
    """If the README layout changes on purpose, regenerate the golden file with
    `python -m site_gen build --catalog tests/site_gen/fixtures/small/catalog` and review the diff."""
    assert cli("build", "--catalog", str(project / "catalog"))[0] == 0
    assert (project / "README.md").read_text(encoding="utf-8") == GOLDEN.read_text(encoding="utf-8")


def test_readme_structure(cli, project: Path) -> None:
    cli("build", "--catalog", str(project / "catalog"))
    text = (project / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("# Awesome Multi-Task Learning [![Awesome](https://awesome.re/badge.svg)]")
    headings = [line for line in lines if line.startswith("## ")]
    assert headings == ["## Contents", "## Surveys", "## Optimization", "## Benchmarks", "## Codebases",
                        "## Contributing"]
    # the Quick start (two commands) comes before the first section
    quick = text[text.index("**Quick start**"):text.index("## Contents")]
    assert [line.split("#")[0].strip() for line in quick.splitlines() if line.startswith("./dev")] == \
        ["./dev serve", "./dev test"]
    survey = text[text.index("## Surveys"):text.index("## Optimization")]
    # newest first inside a section
    assert survey.index("Dense Prediction Tasks") < survey.index("An Overview of Multi-Task")
    # a paper with two topics is listed in full once, and by name (no repeated links) in the other section
    assert text.count("(UW) - Anders Søgaard, Nando de Freitas.") == 1
    assert "(UW) - Anders Søgaard and others, CVPRW 2019. Links under Gradient Balancing." in text
    assert repeated(main_links(text)) == {}, "no URL is the main (first) link of two items"
    # raw HTML in a title never reaches the README
    assert "<b>" not in text and "&lt;b&gt;Bold&lt;/b&gt;" in text


def test_readme_links_every_implementation_of_a_paper(cli, project: Path) -> None:
    """A paper's also_impl classes get a link each, named by class, and count as implementations."""
    papers = project / "catalog" / "papers.yaml"
    impl = "  impl: reference_impls/weighting/pcgrad.py:PCGrad\n"
    papers.write_text(papers.read_text(encoding="utf-8").replace(
        impl, impl + "  also_impl: [reference_impls/weighting/fast.py:FastPCGrad]\n", 1), encoding="utf-8")
    (project / "reference_impls" / "weighting" / "fast.py").write_text("class FastPCGrad:\n    pass\n")
    (project / "tests" / "test_fast.py").write_text("from reference_impls.weighting.fast import FastPCGrad\n")
    assert cli("build", "--catalog", str(project / "catalog"))[0] == 0
    text = (project / "README.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if "(PCGrad) - " in line)
    assert "[Reference implementation](reference_impls/weighting/pcgrad.py) [Reference implementation (FastPCGrad)]" \
           "(reference_impls/weighting/fast.py)" in line
    assert "and 2 tested PyTorch reference implementations" in text


def test_main_links_lead_each_item_with_a_url_not_yet_leading_another() -> None:
    main = MainLinks()
    assert main.item([("PCGrad", "https://x.org/a (b)"), ("Code", "https://c.org")]) == \
        ["[PCGrad](https://x.org/a%20%28b%29)", "[Code](https://c.org)"]
    # the title repeats a main link, so it is plain and the next link leads; later links may repeat
    assert main.item([("Again", "https://x.org/a (b)"), ("arXiv", "https://a.org"), ("Code", "https://c.org"),
                      ("Code", "https://x.org/a (b)")]) == \
        ["Again", "[arXiv](https://a.org)", "[Code](https://c.org)", "[Code](https://x.org/a%20%28b%29)"]
    assert main.item([("No link", None), ("Code", "https://c.org")]) == ["No link", "[Code](https://c.org)"]
    # from may_lead on, a link may follow a main link but never become one
    assert main.item([("Data", None), ("Paper", "https://p.org")], may_lead=1) == ["Data", "Paper"]
    assert main.item([("Data", "https://d.org"), ("Paper", "https://p.org")], may_lead=1) == \
        ["[Data](https://d.org)", "[Paper](https://p.org)"]
    assert main.item([("Paper", "https://p.org")]) == ["[Paper](https://p.org)"], "p.org never led an item"
    assert main.seen == {"https://x.org/a (b)", "https://a.org", "https://c.org", "https://d.org", "https://p.org"}
    assert link("Code", "https://x.org/a (b)") == "[Code](https://x.org/a%20%28b%29)"
    assert link("No link", None) == "No link"


def test_appended_sections_are_in_the_contents_with_their_own_anchors(project: Path) -> None:
    """Datasets and codebases without a taxonomy section get headings after it, listed in the
    Contents (awesome-lint's toc rule); a taxonomy title 'Codebases' pushes theirs to -1."""
    cat = _catalogue(project)
    assert appended_sections(cat) == ("Codebases",)
    assert appended_sections(dataclasses.replace(cat, codebases=[])) == ()
    assert appended_sections(dataclasses.replace(cat, sections=cat.sections[:2])) == ("Datasets", "Codebases")
    renamed = dataclasses.replace(cat, sections=[cat.sections[0].model_copy(update={"title": "Codebases"}),
                                                 *cat.sections[1:]])
    assert heading_anchors(renamed, appended_sections(renamed))["Codebases"] == "codebases-1"
    text = render_readme(cat, render_bibtex(cat))
    contents = text[text.index("## Contents"):text.index("## Surveys")]
    assert contents.splitlines()[-2] == "- [Codebases](#codebases)" and "\n## Codebases\n" in text


def test_repeated_section_titles_get_numbered_anchors(project: Path) -> None:
    cat = _catalogue(project)
    renamed = dataclasses.replace(cat, sections=[cat.sections[0].model_copy(update={"title": "Vision"}),
                                                 *cat.sections[1:]])
    anchors = heading_anchors(renamed)
    assert (anchors["survey"], anchors["benchmarks/vision"]) == ("vision", "vision-1")


def test_readme_escapes_authors_and_counts_each_kind(project: Path) -> None:
    cat = _catalogue(project)
    papers = [p.model_copy(update={"authors": ["Ana *Star* Gómez_Ruiz"]}) if p.id == "ruder2017overview" else p
              for p in cat.papers]
    changed = dataclasses.replace(cat, papers=papers, codebases=[])
    text = render_readme(changed, render_bibtex(changed))
    assert r"- Ana \*Star\* Gómez\_Ruiz. *arXiv 2017*." in text
    assert f"{len(cat.papers)} papers, {len(cat.datasets)} datasets and 0 codebases" in text


def test_bibtex_round_trip_and_types(project: Path) -> None:
    cat = _catalogue(project)
    bib = render_bibtex(cat)
    library = bibtexparser.parse_string(bib)
    assert library.failed_blocks == []
    entries = {e.key: e for e in library.entries}
    assert set(entries) == {p.id for p in cat.papers}
    for paper in cat.papers:
        expected = entry_for(paper, cat.venues[paper.venue])
        parsed = entries[paper.id]
        assert parsed.entry_type == expected.entry_type
        assert {f.key: f.value for f in parsed.fields} == {f.key: f.value for f in expected.fields}
        assert parsed["year"] == str(paper.year)
    assert entries["pcgrad"].entry_type == "inproceedings"
    assert entries["pcgrad"]["booktitle"] == "Advances in Neural Information Processing Systems"
    assert entries["vandenhende2021multi"].entry_type == "article"
    assert entries["vandenhende2021multi"]["journal"] == "IEEE Transactions on Pattern Analysis and Machine Intelligence"
    assert entries["vandenhende2021multi"]["volume"] == "44"
    assert entries["ruder2017overview"].entry_type == "misc"
    assert (entries["ruder2017overview"]["eprint"], entries["ruder2017overview"]["archivePrefix"],
            entries["ruder2017overview"]["primaryClass"]) == ("1706.05098", "arXiv", "cs.LG")
    assert entries["uw"].entry_type == "inproceedings"  # workshop
    assert entries["uw"]["pages"] == "10--20"
    assert entries["vandenhende2021multi"]["author"].startswith("Vandenhende, Simon and Georgoulis, Stamatios and "
                                                                "{Van Gansbeke}, Wouter")


def test_bibtex_escaping_and_protection() -> None:
    assert protect_title("PCGrad on NYUv2 & M3ViT: 50% of MTL_x") == r"{PCGrad} on {NYUv2} \& {M3ViT}: 50\% of {MTL\_x}"
    assert protect_title("Multi-Task Learning") == "Multi-Task Learning"
    assert family_given("Tianhe Yu") == "Yu, Tianhe"
    assert family_given("Van Gool, Luc") == "{Van Gool}, Luc"
    assert family_given("Søgaard") == "Søgaard"


def test_bibtex_escapes_every_tex_special_character() -> None:
    assert escape(r"a\b{c}d&e%f$g#h_i~j^k") == \
        r"a\textbackslash{}b\{c\}d\&e\%f\$g\#h\_i\textasciitilde{}j\textasciicircum{}k"
    assert protect_title("T5 and V2 for #1") == r"{T5} and {V2} for \#1"  # a capital then a digit is protected
    assert family_given("Ana_María Gómez") == r"Gómez, Ana\_María"  # given names are escaped too


def test_bibtex_entry_keeps_page_ranges_and_escapes_the_venue(project: Path) -> None:
    """'10--20' stays one en dash (not '10----20'); a venue name with '&' is escaped in booktitle."""
    cat = _catalogue(project)
    uw = next(p for p in cat.papers if p.id == "uw").model_copy(update={"pages": "10--20"})
    venue = cat.venues["CVPRW"].model_copy(update={"name": "Vision & Language Workshop"})
    library = bibtexparser.parse_string(render_library([entry_for(uw, venue)]))
    assert library.failed_blocks == []
    (entry,) = library.entries
    assert (entry["pages"], entry["booktitle"]) == ("10--20", r"Vision \& Language Workshop")


@pytest.mark.skipif(shutil.which("biber") is None and not os.environ.get("CI"),
                    reason="biber missing: ./dev test installs it when run as root; CI always has it")
def test_biber_validates_without_warnings(project: Path, tmp_path: Path) -> None:
    bib = tmp_path / "catalog.bib"
    bib.write_text(render_bibtex(_catalogue(project)), encoding="utf-8")
    run = subprocess.run(["biber", "--tool", "--validate-datamodel", str(bib)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    warnings = [line for line in run.stdout.splitlines() if "WARN" in line or "ERROR" in line]
    assert warnings == []


def test_markdown_escaping_neutralises_markup() -> None:
    assert md("<script>alert(1)</script>") == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert md("[click](javascript:x)") == r"\[click\](javascript:x)"
    assert md("&amp; & AT&T") == "&amp;amp; & AT&T"
    assert md(r"\ ` * _ [ ] | # !") == r"\\ \` \* \_ \[ \] \| \# \!"  # every inline-syntax character
    assert md_url("https://x.org/a (b)") == "https://x.org/a%20%28b%29"
    assert md_url("https://x.org/a<b>") == "https://x.org/a%3Cb%3E"
    with pytest.raises(ValueError):
        md_url("javascript:alert(1)")


@pytest.mark.parametrize("url", ["JavaScript:alert(1)", "data:text/html,x", "vbscript:msgbox(1)", "mailto:a@b.org"])
def test_markdown_refuses_unsafe_urls(url: str) -> None:
    with pytest.raises(ValueError, match="refusing to render unsafe URL"):
        md_url(url)


@pytest.mark.parametrize("url", ["HTTPS://x.org/a", "papers/architecture.md#mmoe", "#mmoe", "../catalog.bib"])
def test_markdown_keeps_http_and_relative_urls(url: str) -> None:
    assert md_url(url) == url


def test_github_anchor_drops_punctuation_but_keeps_hyphens() -> None:
    assert github_anchor("Loss & Gradient: (Balancing), v2.0 Multi-Task") == "loss--gradient-balancing-v20-multi-task"


def test_build_writes_nothing_when_invalid(cli, project: Path) -> None:
    catalog = str(project / "catalog")
    assert cli("build", "--catalog", catalog)[0] == 0
    before = {p: p.read_bytes() for p in (project / "README.md", project / "catalog.bib")}
    papers = project / "catalog" / "papers.yaml"
    papers.write_text(papers.read_text(encoding="utf-8").replace("  year: 2020\n", "  year: 3020\n"), encoding="utf-8")
    code, out, err = cli("build", "--catalog", catalog)
    assert code == 1
    assert "nothing written" in err
    assert {p: p.read_bytes() for p in before} == before
    assert not list(project.glob(".*.tmp")), "no temp files left behind"


def test_build_is_idempotent(cli, project: Path) -> None:
    catalog = str(project / "catalog")
    assert cli("build", "--catalog", catalog)[1].count(": written") == 2
    code, out, _ = cli("build", "--catalog", catalog)
    assert code == 0 and out.count(": unchanged") == 2


def test_cli_exit_codes(cli, project: Path) -> None:
    catalog = str(project / "catalog")
    assert cli("build", "--catalog", catalog)[0] == 0
    assert cli("check", "--catalog", catalog)[0] == 0  # warnings only
    (project / "catalog" / "venues.yaml").write_text("arXiv: {name: arXiv, kind: blog}\n", encoding="utf-8")
    code, _, err = cli("check", "--catalog", catalog)
    assert code == 1 and "kind: input should be 'conference', 'journal', 'workshop' or 'preprint'" in err
    for usage_error in (("frobnicate",), ()):  # an unknown command, or none at all
        with pytest.raises(SystemExit) as exc:
            cli(*usage_error)
        assert exc.value.code == 2


def test_build_reports_its_warnings_and_passes_list_wanted(cli, project: Path) -> None:
    code, out, err = cli("build", "--catalog", str(project / "catalog"), "--list-wanted")
    assert code == 0 and out.count(": written") == 2
    assert err.splitlines()[1].endswith("papers.yaml:33:3: -: impl: warning: 1 architecture/optimization paper(s) "
                                        "have no reference implementation yet (implementation wanted): uw")
    assert err.splitlines()[-1] == "0 error(s), 2 warning(s)"  # and the notes warning


def test_cli_reports_problems_sorted_by_location_on_stderr(capsys) -> None:
    problems = Problems()
    problems.error(Location("b.yaml", 2), "x", "f", "late")
    problems.warning(Location("a.yaml", 5), "y", "f", "mid")
    problems.error(Location("a.yaml", 1), "z", "f", "early")
    cli_module._report(problems)
    out = capsys.readouterr()
    assert out.out == ""
    assert [line.split(":")[:2] for line in out.err.splitlines()[:-1]] == [["a.yaml", "1"], ["a.yaml", "5"],
                                                                           ["b.yaml", "2"]]
    assert out.err.splitlines()[-1] == "2 error(s), 1 warning(s)"


def test_cli_defaults_are_the_documented_ones() -> None:
    parser = cli_module.build_parser()
    for command in ("check", "build", "links"):
        assert parser.parse_args([command]).catalog == Path("catalog")
    add = parser.parse_args(["add", "arxiv:2001.06782"])
    assert (add.catalog, add.timeout, add.attempts, add.backoff) == (Path("catalog"), 15.0, 4, 2.0)


def test_write_atomic_fsyncs_then_renames_and_a_failure_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "README.md"
    path.write_text("old\n", encoding="utf-8")
    calls: list[str] = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), fsync(fd))[1])

    def replace_on_a_full_disk(src, dst):
        calls.append("replace")
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", replace_on_a_full_disk)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new\n")
    assert calls == ["fsync", "replace"]  # the data is on disk before the rename makes it visible
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"], "no temp file left behind"


def test_write_atomic_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / ".cache" / "links" / "links.json"
    write_atomic(path, "{}\n")
    assert path.read_text(encoding="utf-8") == "{}\n"


def test_pipeline_turns_the_garbage_collector_back_on(project: Path) -> None:
    assert gc.isenabled()
    assert not run(project / "catalog").problems.errors
    assert gc.isenabled()


# --- BibTeX: DOIs, name particles, TeX math --------------------------------------------------------

def _audited_papers(cat):
    """Fixture papers changed to carry what used to come out wrong in catalog.bib."""
    changes = {"vandenhende2021multi": {"doi": "10.1007/978-3-030-01270-0_17",
                                        "authors": ["René van der Berg", "van der Laak, Jeroen", "Van Gool, Luc",
                                                    "Peres da Silva, Rafael", "{Gemini Team & Co}"]},
               "ruder2017overview": {"title": r"Sparse $\ell_1$ Multi-Task Learning in $O(n \log n)$ Time"}}
    return [p.model_copy(update=changes[p.id]) if p.id in changes else p for p in cat.papers]


def test_bibtex_writes_the_doi_verbatim(project: Path) -> None:
    """biblatex reads doi verbatim (like url): an escaped '\\_' would be part of the DOI."""
    cat = _catalogue(project)
    cat = dataclasses.replace(cat, papers=_audited_papers(cat))
    bib = render_bibtex(cat)
    assert "  doi = {10.1007/978-3-030-01270-0_17},\n" in bib and r"\_17" not in bib
    entries = {e.key: e for e in bibtexparser.parse_string(bib).entries}
    assert entries["vandenhende2021multi"]["doi"] == "10.1007/978-3-030-01270-0_17"


@pytest.mark.parametrize("author, bibtex", [
    ("René van der Berg", "van der Berg, René"),       # arXiv gives the name in this order
    ("van der Berg, René", "van der Berg, René"),
    ("Ludwig von Mises", "von Mises, Ludwig"),
    ("Anne-Marie de la Cruz", "de la Cruz, Anne-Marie"),
    ("de Freitas, Nando", "de Freitas, Nando"),
    ("Van Gool, Luc", "{Van Gool}, Luc"),              # a capitalised family name of two words stays one unit
    ("Peres da Silva, Rafael", "{Peres da Silva}, Rafael"),
    ("van der Berg Smith, René", "van der {Berg Smith}, René"),  # particles kept before a braced two-word name
    ("Tianhe Yu", "Yu, Tianhe"),
    ("van Tianhe", "Tianhe, van"),                     # the first word is always a given name
    ("{Gemini Team}", "{Gemini Team}"),                # a team: one braced name, never "Team, Gemini"
    ("{de Gruyter Lab}", "{de Gruyter Lab}"),          # not split at a particle either
])
def test_lowercase_name_particles_belong_to_the_family_name(author: str, bibtex: str) -> None:
    assert family_given(author) == bibtex


def test_tex_math_in_titles_is_kept_and_the_rest_escaped() -> None:
    assert protect_title(r"Sparse $\ell_1$ MTL") == r"Sparse {$\ell_1$} {MTL}"
    assert protect_title(r"$O(n \log n)$-time PCGrad") == r"{$O(n \log n)$}-time {PCGrad}"
    assert protect_title("Pay $100 or $200") == r"Pay \$100 or \$200"                  # prices are not math
    assert protect_title(r"Bad $\ell_{1$ x") == r"Bad \$\textbackslash{}ell\_\{1\$ x"  # unbalanced: escaped
    assert protect_title("Cut $50%$ off") == r"Cut \$50\%\$ off"                          # % would end the field
    assert protect_title("Cut $a}{b$ off") == r"Cut \$a\}\{b\$ off"       # a } before its { is unbalanced
    assert protect_title(r"Sets $\{x$ here") == r"Sets {$\{x$} here"       # \{ is a literal brace, not an opening one
    assert protect_title("Pay $5 or 6$7 later") == r"Pay \$5 or 6\$7 later"   # a closing $ is never followed by a digit


def test_tex_math_with_braces_is_kept_exactly_when_its_braces_balance() -> None:
    """Math is braced into the title as written only if every '{' has its '}' (a literal \\{ or \\} counts
    for neither); otherwise the field's own braces would be unbalanced, so it is escaped as text."""
    assert protect_title(r"Sparse $\ell_{1}$ MTL") == r"Sparse {$\ell_{1}$} {MTL}"
    assert protect_title(r"On $\hat{\mathbf{x}}$ here") == r"On {$\hat{\mathbf{x}}$} here"  # nested pairs
    assert protect_title(r"Set $\{x\}_{i}$ now") == r"Set {$\{x\}_{i}$} now"
    # a literal \{ first does not end the count: the '{' after it still lacks its '}'
    assert protect_title(r"Sets $\{x{$ here") == r"Sets \$\textbackslash{}\{x\{\$ here"
    assert protect_title(r"Sets $\}x}$ here") == r"Sets \$\textbackslash{}\}x\}\$ here"
    library = bibtexparser.parse_string(render_library([Entry("misc", f"k{i}", [Field("title", protect_title(t))])
                                                        for i, t in enumerate((r"$\{x{$", r"$a_{1}$"))]))
    assert library.failed_blocks == [] and len(library.entries) == 2


def test_bibtex_with_dois_particles_and_math_parses_back(project: Path) -> None:
    cat = _catalogue(project)
    cat = dataclasses.replace(cat, papers=_audited_papers(cat))
    library = bibtexparser.parse_string(render_bibtex(cat))
    assert library.failed_blocks == []
    entries = {e.key: e for e in library.entries}
    assert entries["ruder2017overview"]["title"] == r"Sparse {$\ell_1$} Multi-Task Learning in {$O(n \log n)$} Time"
    assert entries["vandenhende2021multi"]["author"] == \
        "van der Berg, René and van der Laak, Jeroen and {Van Gool}, Luc and {Peres da Silva}, Rafael and " \
        r"{Gemini Team \& Co}"


@pytest.mark.skipif(shutil.which("biber") is None and not os.environ.get("CI"),
                    reason="biber missing: ./dev test installs it when run as root; CI always has it")
def test_biber_accepts_dois_particles_and_math(project: Path, tmp_path: Path) -> None:
    cat = _catalogue(project)
    bib = tmp_path / "catalog.bib"
    bib.write_text(render_bibtex(dataclasses.replace(cat, papers=_audited_papers(cat))), encoding="utf-8")
    run = subprocess.run(["biber", "--tool", "--validate-datamodel", "--output-file", str(tmp_path / "out.bib"),
                          str(bib)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert [line for line in run.stdout.splitlines() if "WARN" in line or "ERROR" in line] == []
    out = (tmp_path / "out.bib").read_text(encoding="utf-8")
    assert "10.1007/978-3-030-01270-0_17" in out and r"$\ell_1$" in out
    assert r"{Gemini Team \& Co}" in out  # the team stays one name, not "Co, Gemini Team \&"


def test_a_section_titled_contents_links_past_the_fixed_contents_heading(project: Path) -> None:
    """The README's own '## Contents' comes first, so GitHub numbers a section of that title -1."""
    cat = _catalogue(project)
    renamed = dataclasses.replace(cat, sections=[cat.sections[0].model_copy(update={"title": "Contents"}),
                                                 *cat.sections[1:]])
    assert heading_anchors(renamed)[cat.sections[0].id] == "contents-1"
    text = render_readme(renamed, render_bibtex(renamed))
    assert "- [Contents](#contents-1)" in text
