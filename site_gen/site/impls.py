"""What the Reference implementations page says about each implementation, read with ``ast``.

Like ``checks.py``, nothing is imported: the site builds without PyTorch. For each
``impl`` we find the symbol's signature and docstring summary, the test files that
import it, and a usage snippet matching the interface its class follows.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup, escape

from ..catalogue import Catalogue
from ..models import Paper
from ..pysource import class_lineage, class_string, parse, read_test_file, test_files

# Usage lines by base class (see reference_impls/weighting/base.py, architectures/base.py).
USAGE = {
    "LossWeighting": ["# losses: 1-D tensor of the K task losses of this step",
                      "loss = method.combine(losses)", "loss.backward()"],
    "GradientMethod": ["# grads: K x d matrix of per-task gradients of the shared parameters",
                       "update = method(grads).update  # use like a gradient"],
    "MultiTaskModel": ["outputs = model(x)  # {task name: prediction}"],
}
USAGE["Merging"] = ["# task_vectors: one fine-tuned minus pre-trained parameter set per task",
                    "merged = method(pretrained, task_vectors)  # same form as pretrained"]
USAGE["GramianWeighting"] = USAGE["GradientMethod"]
USAGE["MGDA"] = USAGE["GradientMethod"]


# Inline code as docstrings write it: a reST literal (``x``), a Sphinx role (:func:`x`, :py:meth:`~a.b.x`,
# :class:`title <target>`) or a Markdown code span (`x`). The literal comes first so that its
# double backticks are never read as two empty spans.
_DOC_CODE = re.compile(r"``(?P<literal>.+?)``(?!`)"
                       r"|(?<![\w:]):[A-Za-z][\w.+-]*(?::[A-Za-z][\w.+-]*)?:`(?P<role>[^`]+)`"
                       r"|(?<!`)`(?P<span>[^`]+)`(?!`)")


def _role_text(target: str) -> str:
    """What Sphinx shows for a role's target: the title of 'title <target>', the last name of
    '~a.b.x', the target itself otherwise ('!' only turns the link off)."""
    titled = re.fullmatch(r"(.+?)\s*<[^<>]+>", target, flags=re.S)
    if titled:
        return titled.group(1)
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target.removeprefix("!")


def docstring_html(text: str) -> Markup:
    """Docstring text for an HTML block of the site, escaped, its inline code as <code>: the page
    showed reST's ``x`` and :func:`x` raw, and Markdown is not read inside HTML blocks."""
    out, last = [], 0
    for m in _DOC_CODE.finditer(text):
        code = _role_text(m["role"]) if m["role"] is not None else m["literal"] or m["span"]
        out += [escape(text[last:m.start()]), Markup("<code>%s</code>") % code]
        last = m.end()
    out.append(escape(text[last:]))
    return Markup("").join(out)


@dataclass(frozen=True)
class CoveringTests:
    path: str  # relative to the project root
    tests: int  # test functions in the file


@dataclass(frozen=True)
class ImplInfo:
    paper: Paper
    anchor: str  # impl-<paper id>, or impl-<paper id>--<symbol> for an also_impl link
    path: str
    symbol: str
    module: str
    signature: str
    summary: str
    snippet: str
    tests: list[CoveringTests]
    is_model: bool = False  # an architecture (a MultiTaskModel)
    equations_checked_in: str | None = None  # the paper text a model's equation numbers were checked in
    unverified_reading: str | None = None  # what is our reading, the paper's method text not at hand


def tests_by_symbol(root: Path) -> dict[tuple[str, str], list[CoveringTests]]:
    """(module, symbol) -> the test files importing it, scanning tests/ once."""
    index: dict[tuple[str, str], list[CoveringTests]] = {}
    for path in test_files(root):
        if path.name == "conftest.py":
            continue
        facts = read_test_file(path)
        if facts is None:
            continue
        entry = CoveringTests(path.relative_to(root).as_posix(), facts.tests)
        for key in facts.imports:
            index.setdefault(key, []).append(entry)
    return index


def _definition(tree: ast.Module, symbol: str) -> ast.ClassDef | ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == symbol:
            return node
    return None


def _signature(node: ast.ClassDef | ast.FunctionDef, lineage: list[ast.ClassDef] = ()) -> str:
    """'PCGrad(random_order: bool = True, ...)' from __init__ (classes, inherited too) or the def itself."""
    func = node
    if isinstance(node, ast.ClassDef):
        inits = (m for c in lineage or [node] for m in c.body if isinstance(m, ast.FunctionDef) and m.name == "__init__")
        func = next(inits, None)
        if func is None:
            return f"{node.name}()"
    args = func.args
    positional = [*args.posonlyargs, *args.args]  # self comes first, positional-only or not
    if positional and positional[0].arg in ("self", "cls"):
        posonly = args.posonlyargs[1:] if args.posonlyargs else []
        args = ast.arguments(posonlyargs=posonly, args=args.args if args.posonlyargs else args.args[1:],
                             vararg=args.vararg, kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults,
                             kwarg=args.kwarg, defaults=args.defaults)
    return f"{node.name}({ast.unparse(args)})"


def inherited_string(lineage: list[ast.ClassDef], attribute: str) -> str:
    """The value the class itself has: the first class of its lineage (the class, then its bases)
    that sets ``attribute`` decides, also when it sets it to None ("")."""
    return next((v for v in (class_string(c, attribute) for c in lineage) if v is not None), "")


def driven_hooks(root: Path) -> frozenset[str]:
    """The hooks ``python -m reference_impls.train`` makes (``DRIVEN_HOOKS`` in reference_impls/hooks.py)."""
    tree = parse(root / "reference_impls" / "hooks.py")
    for node in tree.body if tree else []:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "DRIVEN_HOOKS" and isinstance(node.value, ast.Set)):
            return frozenset(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return frozenset()


def _is_model(lineage: list[ast.ClassDef]) -> bool:
    return any(ast.unparse(b).split(".")[-1] == "MultiTaskModel" for c in lineage for b in c.bases)


def _snippet(node: ast.ClassDef | ast.FunctionDef | None, module: str, symbol: str, signature: str,
             driven: frozenset[str] = frozenset(), lineage: list[ast.ClassDef] = ()) -> str:
    lines = [f"from {module} import {symbol}", ""]
    if isinstance(node, ast.ClassDef):
        lineage = lineage or [node]
        bases = [ast.unparse(b).split(".")[-1] for c in lineage for b in c.bases]
        usage = next((USAGE[b] for b in bases if b in USAGE), None)
        name = "model" if _is_model(lineage) else "method"
        lines += [f"# {signature}", f"{name} = {symbol}(...)"]
        lines += usage or []
        procedure = inherited_string(lineage, "training_procedure")
        if procedure:  # the network is here; the paper's procedure around it is a separate call
            lines += [f"# in the paper, {procedure};", "# python -m reference_impls.train trains the network only"]
        hook = inherited_string(lineage, "training_hook")
        if hook:  # the plain usage above is not the whole method
            harness = "makes this call" if hook in driven else "refuses this method"
            lines += [f"# each step also needs method.{hook}(...): see the docstring;",
                      f"# python -m reference_impls.train {harness}"]
    else:
        lines += [f"# {signature}", f"result = {symbol}(...)"]
    return "\n".join(lines)


def impl_infos(cat: Catalogue) -> list[ImplInfo]:
    """One entry per implementation link, ordered by the paper's main implementation path, so
    that a paper's ``also_impl`` classes follow its ``impl``."""
    tests = tests_by_symbol(cat.root)
    driven = driven_hooks(cat.root)
    infos = []
    for paper in sorted((p for p in cat.papers if p.impl), key=lambda p: (p.impl, p.id)):
        for n, ref in enumerate(paper.impl_refs):
            path, symbol, module = *ref, ref.module
            tree = parse(cat.root / path)
            node = _definition(tree, symbol) if tree else None
            lineage = class_lineage(cat.root, module, symbol)  # what the class inherits
            signature = _signature(node, lineage) if node else f"{symbol}(...)"
            doc = (ast.get_docstring(node) or "") if node else ""
            summary = doc.split("\n\n")[0].replace("\n", " ").strip()
            # "--" as section anchors use it: no paper id has it, and symbols keep their case, so no two
            # entries share an anchor
            anchor = f"impl-{paper.id}" if n == 0 else f"impl-{paper.id}--{symbol}"
            is_model = isinstance(node, ast.ClassDef) and _is_model(lineage or [node])
            # The class's own body only: a subclass for another paper must not inherit its parent's text.
            checked_in = class_string(node, "equations_checked_in") if is_model else None
            reading = class_string(node, "unverified_reading") if isinstance(node, ast.ClassDef) else None
            infos.append(ImplInfo(paper, anchor, path, symbol, module, signature, summary,
                                  _snippet(node, module, symbol, signature, driven, lineage),
                                  tests.get((module, symbol), []), is_model, checked_in, reading or None))
    return infos
