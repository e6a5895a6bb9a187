"""Reading class ancestry from source: what the site shows for subclasses it never imports."""

import ast
import os
from pathlib import Path

from site_gen import pysource
from site_gen.pysource import class_lineage, defined_names, module_path


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_lineage_follows_same_module_relative_and_aliased_bases(tmp_path):
    root = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "class Root(object):\n    hook = 'r'\n",
        "pkg/mid.py": "from .base import Root as Renamed\nclass Mid(Renamed):\n    pass\n",
        "pkg/leaf.py": ("from pkg.mid import Mid\nimport torch.nn as nn\n"
                        "class Helper(nn.Module):\n    pass\n"
                        "class Leaf(Helper, Mid):\n    pass\n"),
    })
    names = [c.name for c in class_lineage(root, "pkg.leaf", "Leaf")]
    assert names == ["Leaf", "Helper", "Mid", "Root"]  # depth first, first base first; nn.Module is outside root


def test_lineage_of_a_missing_class_or_file_is_empty_and_cycles_end(tmp_path):
    root = write(tmp_path, {"a.py": "from b import B\nclass A(B):\n    pass\n",
                            "b.py": "from a import A\nclass B(A):\n    pass\n"})
    assert class_lineage(root, "a", "Nope") == []
    assert class_lineage(root, "missing", "A") == []
    assert [c.name for c in class_lineage(root, "a", "A")] == ["A", "B"]  # the cycle back to A is dropped


def test_defined_names_are_top_level_classes_functions_and_assignments():
    tree = ast.parse("class C:\n    inner = 1\ndef f():\n    local = 2\nasync def g():\n    pass\n"
                     "X = Y = 3\nimport os\nfrom m import Z\n")
    assert defined_names(tree) == {"C", "f", "g", "X", "Y"}  # no nested or imported names


def test_test_files_are_every_test_and_conftest_at_any_depth(tmp_path):
    root = write(tmp_path, {name: "" for name in ("tests/test_a.py", "tests/conftest.py", "tests/helper.py",
                                                  "tests/sub/deeper/test_b.py", "tests/sub/conftest.py")})
    assert [p.relative_to(root).as_posix() for p in pysource.test_files(root)] == [
        "tests/sub/deeper/test_b.py", "tests/test_a.py", "tests/conftest.py", "tests/sub/conftest.py"]
    assert pysource.test_files(tmp_path / "nowhere") == []


def test_module_path_falls_back_to_the_package_init(tmp_path):
    root = write(tmp_path, {"pkg/__init__.py": "class Base:\n    pass\n",
                            "pkg/leaf.py": "from pkg import Base\nclass Leaf(Base):\n    pass\n"})
    assert module_path(root, "pkg") == root / "pkg" / "__init__.py"
    assert module_path(root, "pkg.leaf") == root / "pkg" / "leaf.py"
    assert [c.name for c in class_lineage(root, "pkg.leaf", "Leaf")] == ["Leaf", "Base"]


def test_parse_gives_none_for_missing_invalid_or_non_utf8_files(tmp_path):
    root = write(tmp_path, {"bad.py": "class A(\n", "good.py": "A = 1\n"})
    (root / "latin1.py").write_bytes("NAME = 'Gómez'\n".encode("latin-1"))
    assert [pysource.parse(root / name) for name in ("missing.py", "bad.py", "latin1.py")] == [None, None, None]
    assert defined_names(pysource.parse(root / "good.py")) == {"A"}


def test_sample_projects_under_a_fixtures_folder_are_not_tests_of_the_real_code(tmp_path):
    """The site listed tests/site_gen/fixtures/small/tests/test_pcgrad.py (0 tests) as a test of PCGrad."""
    root = write(tmp_path, {name: "" for name in ("tests/test_a.py", "tests/site_gen/fixtures/small/tests/test_p.py",
                                                  "tests/site_gen/fixtures/conftest.py")})
    assert [p.relative_to(root).as_posix() for p in pysource.test_files(root)] == ["tests/test_a.py"]
    sample = root / "tests" / "site_gen" / "fixtures" / "small"  # used as a root of its own, it has its tests
    assert [p.relative_to(sample).as_posix() for p in pysource.test_files(sample)] == ["tests/test_p.py"]


def test_a_test_file_is_read_as_its_imports_and_test_count_and_reread_when_it_changes(tmp_path):
    root = write(tmp_path, {"tests/test_x.py": (
        "import os\nfrom pkg.mod import Thing\nimport pkg.other as other\n"
        "def test_a():\n    other.Helper()\n"
        "class TestB:\n    def test_c(self): pass\n    def helper(self): pass\n"
        "def helper(): pass\n")})
    path = root / "tests" / "test_x.py"
    facts = pysource.read_test_file(path)
    assert facts.tests == 2  # test_a and TestB.test_c, not the helpers
    assert {("pkg.mod", "Thing"), ("pkg.other", "Helper")} <= facts.imports
    assert not isinstance(facts, ast.AST)  # a summary, not the tree
    path.write_text("def test_only(): pass\n", encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert pysource.read_test_file(path).tests == 1 and not pysource.read_test_file(path).imports
    path.write_text("def test_(:\n", encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2 * 10**9))
    assert pysource.read_test_file(path) is None and pysource.read_test_file(root / "missing.py") is None


def test_only_test_functions_at_module_level_or_in_test_classes_are_counted(tmp_path):
    root = write(tmp_path, {"tests/test_y.py": (
        "class TestA:\n    def test_1(self): pass\n"
        "class Helpers:\n    def test_not_collected(self): pass\n"
        "class TestB:\n    async def test_2(self): pass\n"
        "async def test_3(): pass\n")})
    assert pysource.read_test_file(root / "tests" / "test_y.py").tests == 3


def test_lineage_stops_after_depth_ancestors(tmp_path):
    chain = "".join(f"class C{i}(C{i + 1}):\n    pass\n" for i in range(11)) + "class C11:\n    pass\n"
    root = write(tmp_path, {"chain.py": chain})
    assert [c.name for c in class_lineage(root, "chain", "C0")] == [f"C{i}" for i in range(9)]  # depth 8
    assert [c.name for c in class_lineage(root, "chain", "C0", depth=0)] == ["C0"]
    assert [c.name for c in class_lineage(root, "chain", "C3", depth=2)] == ["C3", "C4", "C5"]


def test_imports_are_absolute_from_imports_and_module_attributes_but_not_relative_imports():
    tree = ast.parse(
        "from reference_impls.weighting.pcgrad import PCGrad\n"
        "import reference_impls.weighting.mgda as mgda\n"
        "from .helpers import build\n"
        "x = mgda.MGDA\n"
    )
    found = pysource.imported_symbols(tree)
    assert {("reference_impls.weighting.pcgrad", "PCGrad"), ("reference_impls.weighting.mgda", "MGDA")} <= found
    assert not any(module.split(".")[0] == "helpers" for module, _ in found)  # the relative import


def test_every_imported_module_is_kept_when_several_are_imported_without_aliases():
    """Each `from pkg import module` and `import pkg.module` counts, not only the last of them: a test
    importing two implementation modules tests the classes it reaches through either."""
    tree = ast.parse("from reference_impls import weighting\nfrom reference_impls import arch\n"
                     "import pkg.one\nimport pkg.two\n"
                     "weighting.PCGrad()\npkg.one.Thing()\n")
    found = pysource.imported_symbols(tree)
    assert {("reference_impls.weighting", "PCGrad"), ("reference_impls.arch", "PCGrad"),
            ("pkg.one", "Thing"), ("pkg.two", "Thing")} <= found


def test_lineage_follows_relative_imports_at_any_depth_and_past_other_statements(tmp_path):
    """A base imported after a plain `import`, one level up from a sub-package, or by `from . import`
    (a name of the package's __init__) is still found."""
    root = write(tmp_path, {
        "pkg/__init__.py": "class Root:\n    pass\n",
        "pkg/base.py": "import os\nfrom . import Root\nclass Base(Root):\n    pass\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "import typing\nfrom ..base import Base\nclass Leaf(Base):\n    pass\n",
    })
    assert [c.name for c in class_lineage(root, "pkg.sub.leaf", "Leaf")] == ["Leaf", "Base", "Root"]


def test_lineage_walks_past_a_base_it_cannot_follow(tmp_path):
    """`nn.Module` or `Generic[T]` (not plain names) end nothing: the bases after them are still walked."""
    root = write(tmp_path, {"m.py": ("import torch.nn as nn\nfrom typing import Generic, TypeVar\nT = TypeVar('T')\n"
                                     "class Local:\n    pass\n"
                                     "class Leaf(nn.Module, Generic[T], Local):\n    pass\n")})
    assert [c.name for c in class_lineage(root, "m", "Leaf")] == ["Leaf", "Local"]


def test_source_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Implementation files may hold non-ASCII (an author's name in a docstring): they are parsed as
    UTF-8 under any locale, not dropped as unreadable."""
    from .test_write_atomic import run_in_ascii_locale

    (tmp_path / "impl.py").write_text('"""After Søgaard (2016)."""\nclass Impl:\n    pass\n', encoding="utf-8")
    out = run_in_ascii_locale("""
        from pathlib import Path
        from site_gen.pysource import defined_names, parse
        print(sorted(defined_names(parse(Path("impl.py")))))
    """, tmp_path)
    assert out == "['Impl']\n"
