"""Page URLs, relative links and a paper's outbound links (site_gen/site/links.py), and what the
Reference implementations page reads from the source with ``ast`` (site_gen/site/impls.py).

Each test names the property a reader of the site, or a caller, relies on."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil

import pytest

from site_gen.pipeline import run
from site_gen.site import SiteOptions, render_site
from site_gen.site import impls  # tests_by_symbol through the module: pytest would collect the bare name
from site_gen.site.impls import (CoveringTests, _is_model, _signature, _snippet, class_string, docstring_html,
                                 impl_infos)
from site_gen.site.links import Link, page_url, paper_links, relative, safe_url

from .conftest import SMALL



def _paper(small, pid: str):
    return next(p for p in small.papers if p.id == pid)


def _classes(source: str) -> dict[str, ast.ClassDef]:
    """The top-level classes of a piece of source, by name."""
    return {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}


# --- safe_url -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://web.archive.org/web/2019/https://example.org/paper",  # a second '://' later in the URL
    "https://XKCD.com/927/",  # a host that starts with X
    "http://example.org",
])
def test_safe_url_keeps_absolute_http_urls_as_written(url):
    """Only the scheme before the first '://' counts, and any host is fine: archived copies of a
    page carry the original URL in their path, and hosts may be written in capitals."""
    assert safe_url(url) == url


@pytest.mark.parametrize("url", ["https://", "http://", "https://ex\x7fample.org/\x1f"])
def test_safe_url_refuses_with_a_value_error_that_names_the_url(url):
    """A URL with nothing after the scheme (or a control character) is refused the documented way,
    ValueError, and the message quotes the URL so the maintainer can find the entry."""
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        safe_url(url)


# --- page_url and relative ----------------------------------------------------------------------------


@pytest.mark.parametrize("src, directory_urls, expected", [
    ("papers/theory.md", True, "papers/theory/"),
    ("index.md", True, ""),
    ("papers/index.md", True, "papers/"),  # a folder's index page is served at the folder
    ("reindex.md", True, "reindex/"),
    ("papers/theory.md", False, "papers/theory.html"),
    ("index.md", False, "index.html"),
])
def test_page_url_follows_mkdocs_use_directory_urls(src, directory_urls, expected):
    """Where MkDocs serves a page, with use_directory_urls on (its default) and off."""
    assert page_url(src, directory_urls) == expected


def test_page_url_and_relative_default_to_directory_urls_and_no_anchor():
    """Called without the optional arguments, both follow MkDocs' default (directory URLs) and add no '#'."""
    assert page_url("papers/theory.md") == "papers/theory/"
    assert relative("index.md", "papers/theory.md") == "papers/theory/"
    assert relative("papers/a.md", "catalog.bib") == "../../catalog.bib"


def test_rendered_entries_link_to_html_files_when_directory_urls_are_off(small):
    """The entry's 'Reference implementation' link, written into raw HTML, must name the .html file."""
    files, _ = render_site(small, SiteOptions(directory_urls=False))
    section = files["papers/optimization.md"]
    assert ('<a class="mtl-link mtl-link--impl" href="../implementations.html#impl-pcgrad">'
            'Reference implementation</a>') in section
    assert '<a class="mtl-link mtl-link--paper" href="https://example.org/paper?id=7">Paper</a>' in section


# --- paper_links --------------------------------------------------------------------------------------


def test_paper_links_give_every_link_its_label_url_and_css_kind_in_reading_order(small):
    """A paper with every kind of link: the exact list the entry renders (label = link text, kind = CSS hook).
    A DOI keeps the characters DOIs are written with ( ) : ; and percent-encodes only the rest."""
    paper = _paper(small, "pcgrad").model_copy(update={
        "url": "https://proceedings.neurips.cc/paper/2020/hash/3fe7-Abstract.html",
        "doi": "10.1002/(SICI)1097-4571(199806)49:8<693::AID-ASI4>3.0.CO;2-O"})
    assert paper_links(paper, "../../implementations/#impl-pcgrad") == [
        Link("Paper", "https://proceedings.neurips.cc/paper/2020/hash/3fe7-Abstract.html", "paper"),
        Link("arXiv", "https://arxiv.org/abs/2001.06782", "arxiv"),
        Link("DOI", "https://doi.org/10.1002/(SICI)1097-4571(199806)49:8%3C693::AID-ASI4%3E3.0.CO;2-O", "doi"),
        Link("Code", "https://github.com/tianheyu927/PCGrad", "code"),  # one repository: no number
        Link("Hugging Face", "https://huggingface.co/papers/2001.06782", "hf"),
        Link("Reference implementation", "../../implementations/#impl-pcgrad", "impl"),
    ]


# --- tests_by_symbol ----------------------------------------------------------------------------------


def test_tests_by_symbol_reads_past_a_test_file_that_does_not_parse(tmp_path):
    """One broken test file (sorted first) must not hide the tests after it from the page."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a_broken.py").write_text("def test_(:\n", encoding="utf-8")
    (tmp_path / "tests" / "test_b.py").write_text(
        "from reference_impls.w import PCGrad\n\ndef test_one():\n    pass\n", encoding="utf-8")
    assert impls.tests_by_symbol(tmp_path) == {("reference_impls.w", "PCGrad"): [CoveringTests("tests/test_b.py", 1)]}


# --- _signature, class_string, _is_model, _snippet ----------------------------------------------------


@pytest.mark.parametrize("source, expected", [
    ("class K:\n    def __init__(self, a, *args, k=1, **options): pass", "K(a, *args, k=1, **options)"),
    ("class C:\n    def __init__(cls, a: int = 2): pass", "C(a: int=2)"),
])
def test_signature_drops_only_the_instance_parameter(source, expected):
    """The signature a reader copies: the first parameter (self, or cls) goes, everything else stays,
    **kwargs included."""
    node = next(iter(_classes(source).values()))
    assert _signature(node) == expected


@pytest.mark.parametrize("line", ['training_hook = "update"', 'training_hook: ClassVar[str] = "update"'])
def test_class_string_reads_plain_and_annotated_assignments(line):
    """``training_hook: ClassVar[str] = "update"`` is as much a class attribute as the plain form."""
    (node,) = _classes(f"class M:\n    other = 'x'\n    def f(self): pass\n    {line}\n").values()
    assert class_string(node, "training_hook") == "update"
    assert class_string(node, "other") == "x"
    assert class_string(node, "missing") is None


DOTTED = "class Net(base.MultiTaskModel):\n    pass\nclass W(weighting.LossWeighting):\n    pass\n"


def test_bases_written_with_their_module_are_recognised():
    """``class Net(base.MultiTaskModel)`` is a model, and a dotted weighting base still gives its usage lines."""
    classes = _classes(DOTTED)
    assert _is_model([classes["Net"]])
    assert not _is_model([classes["W"]])
    net = _snippet(classes["Net"], "m", "Net", "Net()").splitlines()
    assert net[3:] == ["model = Net(...)", "outputs = model(x)  # {task name: prediction}"]
    w = _snippet(classes["W"], "m", "W", "W()").splitlines()
    assert w[3:] == ["method = W(...)", "# losses: 1-D tensor of the K task losses of this step",
                     "loss = method.combine(losses)", "loss.backward()"]


HOOKED = ("class LossWeighting:\n    pass\n"
          "class EW(LossWeighting):\n    pass\n"
          "class GN(LossWeighting):\n    training_hook = 'balance_step'\n")


@pytest.mark.parametrize("symbol, driven, tail", [
    ("EW", frozenset(), []),
    ("GN", frozenset({"balance_step"}), ["# each step also needs method.balance_step(...): see the docstring;",
                                         "# python -m reference_impls.train makes this call"]),
])
def test_snippet_of_a_method_is_exactly_import_blank_signature_call_and_usage(symbol, driven, tail):
    """The copyable snippet, line for line: the import, a blank line, the signature, ``method = ...``,
    the base's usage, then (for a hooked method) the extra call, added after the rest, not instead of it."""
    classes = _classes(HOOKED)
    lineage = [classes[symbol], classes["LossWeighting"]]
    snippet = _snippet(classes[symbol], "reference_impls.weighting.x", symbol, f"{symbol}()", driven, lineage)
    assert snippet.split("\n") == [f"from reference_impls.weighting.x import {symbol}", "", f"# {symbol}()",
                                   f"method = {symbol}(...)", "# losses: 1-D tensor of the K task losses of this step",
                                   "loss = method.combine(losses)", "loss.backward()", *tail]


# --- impl_infos ---------------------------------------------------------------------------------------


def test_impl_infos_leave_the_summary_empty_without_a_docstring_or_a_definition(tmp_path):
    """No docstring, or no such symbol in the file: the page writes no summary sentence at all."""
    root = tmp_path / "project"
    shutil.copytree(SMALL.parent, root, ignore=shutil.ignore_patterns("README.golden.md"))
    (root / "reference_impls" / "weighting" / "pcgrad.py").write_text(
        "class PCGrad:\n    def __init__(self, b=1):\n        pass\n", encoding="utf-8")
    catalogue = run(root / "catalog").catalogue
    papers = [p.model_copy(update={"also_impl": ["reference_impls/weighting/pcgrad.py:Gone"]})
              if p.id == "pcgrad" else p for p in catalogue.papers]
    info, gone = impl_infos(dataclasses.replace(catalogue, papers=papers))
    assert (info.symbol, info.signature, info.summary) == ("PCGrad", "PCGrad(b=1)", "")
    assert (gone.symbol, gone.signature, gone.summary) == ("Gone", "Gone(...)", "")


# --- bugs found while reading, fixed -------------------------------------------------------------------


def test_implementation_anchors_stay_unique_when_a_paper_id_has_a_hyphen(small):
    """Paper 'pcgrad' with also_impl class Project, and paper 'pcgrad-project' with an impl: two headings
    of the page must not share an id, or the second paper's 'Reference implementation' link opens the first."""
    pcgrad = _paper(small, "pcgrad").model_copy(update={"also_impl": ["reference_impls/weighting/pcgrad.py:Project"]})
    other = _paper(small, "uw").model_copy(update={"id": "pcgrad-project", "impl": "reference_impls/other.py:UW"})
    anchors = [i.anchor for i in impl_infos(dataclasses.replace(small, papers=[pcgrad, other]))]
    assert len(set(anchors)) == len(anchors) == 3, anchors
    assert "impl-pcgrad--Project" in anchors  # the symbol as written: Project and PROJECT differ


def test_also_impl_symbols_differing_only_in_case_get_different_anchors(small):
    """Two classes of one paper whose names differ only in case are two headings with two ids."""
    pcgrad = _paper(small, "pcgrad").model_copy(update={"also_impl": ["reference_impls/weighting/pcgrad.py:Project",
                                                                      "reference_impls/weighting/pcgrad.py:PROJECT"]})
    anchors = [i.anchor for i in impl_infos(dataclasses.replace(small, papers=[pcgrad]))]
    assert anchors == ["impl-pcgrad", "impl-pcgrad--Project", "impl-pcgrad--PROJECT"]


def test_a_subclass_that_switches_the_hook_off_has_no_hook_line():
    """``training_hook = None`` in the class itself wins over its parent's hook, as it does at run time."""
    classes = _classes(HOOKED + "class Plain(GN):\n    training_hook = None\n")
    lineage = [classes["Plain"], classes["GN"], classes["LossWeighting"]]
    snippet = _snippet(classes["Plain"], "m", "Plain", "Plain()", frozenset(), lineage)
    assert "each step also needs" not in snippet
    inherited = _snippet(classes["GN"], "m", "GN", "GN()", frozenset(), lineage[1:])
    assert "each step also needs method." in inherited  # the parent, which sets it, keeps its line


def test_signature_drops_self_before_positional_only_parameters():
    """``def __init__(self, a, /, b=2)`` puts self in posonlyargs; the reader still must not see it."""
    (node,) = _classes("class P:\n    def __init__(self, a, /, b=2): pass\n").values()
    assert _signature(node) == "P(a, /, b=2)"


@pytest.mark.parametrize("doc, expected", [
    ("Within ``budget`` tasks.", "Within <code>budget</code> tasks."),
    ("See :func:`ahp_priorities` and :meth:`widen`.", "See <code>ahp_priorities</code> and <code>widen</code>."),
    (":class:`~reference_impls.architectures.mmoe.MMoE` experts", "<code>MMoE</code> experts"),
    (":py:class:`the model <reference_impls.MMoE>`", "<code>the model</code>"),
    ("only its name matters to `check`.", "only its name matters to <code>check</code>."),
    ("``forward(x) -> {task: y}`` & <b>", "<code>forward(x) -&gt; {task: y}</code> &amp; &lt;b&gt;"),
    ("``a`b`` and a lone ` tick", "<code>a`b</code> and a lone ` tick"),
])
def test_docstring_code_is_shown_as_code_without_its_markup(doc, expected):
    """The page showed reST's ``x`` and Sphinx's :func:`x` as written; a Markdown `x` is code too."""
    assert docstring_html(doc) == expected


def test_implementations_page_renders_docstring_markup_as_code(tmp_path):
    """The summary sits in an HTML block, where Markdown is not read: its code must arrive as <code>."""
    root = tmp_path / "project"
    shutil.copytree(SMALL.parent, root, ignore=shutil.ignore_patterns("README.golden.md"))
    (root / "reference_impls" / "weighting" / "pcgrad.py").write_text(
        'class PCGrad:\n    """Projects with :func:`~reference_impls.weighting.pcgrad.project` when\n'
        '    ``random_order`` is set, as :class:`MMoE` does not.\n\n    Details.\n    """\n', encoding="utf-8")
    files, _ = render_site(run(root / "catalog").catalogue)
    (summary,) = re.findall(r"<p>Implements .*</p>", files["implementations.md"])
    assert summary.endswith(". Projects with <code>project</code> when <code>random_order</code> is set, "
                            "as <code>MMoE</code> does not.</p>")
