"""Reading class ancestry from source: what the site shows for subclasses it never imports."""

from pathlib import Path

from site_gen.pysource import class_lineage


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
