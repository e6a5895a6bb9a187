"""write_atomic and write_all: where the temp file lives, what a failure leaves, and the bytes written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import site_gen.output
from site_gen.output import write_all, write_atomic

ROOT = Path(__file__).resolve().parents[2]


def run_in_ascii_locale(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh Python whose locale encoding is ASCII (as a non-UTF-8 locale would be);
    returns its stdout. site_gen must read and write UTF-8 itself, never through the locale default."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": "utf-8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if env.get("MUTANT_UNDER_TEST") == "stats":  # mutmut's first pass: a child elsewhere cannot find its config
        env["MUTANT_UNDER_TEST"] = ""            # and need not record hits (only the parent's count); run clean
    prelude = "import locale\nassert locale.getpreferredencoding(False).lower() in ('ascii', 'ansi_x3.4-1968')\n"
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_temp_file_sits_beside_the_target_with_a_hidden_name(tmp_path: Path, monkeypatch) -> None:
    """The rename is atomic only within one filesystem, so the temp file must be in the target's folder;
    a leftover after a hard crash is a hidden `.NAME.<random>.tmp`, plainly a temporary copy of NAME."""
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str, dst: Path) -> None:
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(site_gen.output.os, "replace", spy)
    path = tmp_path / "out" / "README.md"
    write_atomic(path, "text\n")
    [(tmp, target)] = renames
    assert target == path and tmp.parent == path.parent
    assert tmp.name.startswith(".README.md.") and tmp.name.endswith(".tmp") and len(tmp.name) > len(".README.md..tmp")
    assert sorted(p.name for p in path.parent.iterdir()) == ["README.md"]


def test_a_failure_after_the_rename_surfaces_as_itself(tmp_path: Path, monkeypatch) -> None:
    """An interrupt that lands once the rename is done finds no temp file to remove: the interrupt, not a
    FileNotFoundError from the clean-up, reaches the caller, and the new content is in place."""
    real_replace = os.replace

    def replace_then_interrupt(src: str, dst: Path) -> None:
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(site_gen.output.os, "replace", replace_then_interrupt)
    path = tmp_path / "catalog.bib"
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n" and [p.name for p in tmp_path.iterdir()] == ["catalog.bib"]


def test_files_are_written_and_compared_as_utf8_with_lf_whatever_the_locale(tmp_path: Path) -> None:
    """README.md and catalog.bib hold names such as Søgaard: under a non-UTF-8 locale they are still
    written as UTF-8 with LF endings, and an unchanged file is recognised as unchanged."""
    (tmp_path / "same.md").write_bytes("Anders S\u00f8gaard\n".encode("utf-8"))
    out = run_in_ascii_locale("""
        from pathlib import Path
        from site_gen.output import write_all, write_atomic
        write_atomic(Path("new.md"), "Jos\\u00e9\\nline 2\\n")
        changed = write_all({Path("same.md"): "Anders S\\u00f8gaard\\n", Path("other.md"): "\\u00c5\\n"})
        print(sorted(p.name for p in changed))
    """, tmp_path)
    assert out == "['other.md']\n"
    assert (tmp_path / "new.md").read_bytes() == "Jos\u00e9\nline 2\n".encode("utf-8")
    assert (tmp_path / "other.md").read_bytes() == "\u00c5\n".encode("utf-8")


def test_a_written_file_keeps_the_usual_permissions(tmp_path: Path) -> None:
    """A new file gets the mode plain open() gives it (0666 less the umask); a replaced file keeps its
    mode. mkstemp creates 0600 files, so README.md, catalog.bib, papers.yaml (add) and the site's search
    index become unreadable to anyone but the owner (a web server, a second user of the checkout)."""
    old = os.umask(0o022)
    try:
        existing = tmp_path / "papers.yaml"
        existing.write_text("old\n", encoding="utf-8")
        existing.chmod(0o664)
        write_atomic(existing, "new\n")
        write_atomic(tmp_path / "README.md", "new\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "README.md").stat().st_mode) == 0o644


def test_a_generated_file_that_is_not_utf8_is_simply_rewritten(tmp_path: Path) -> None:
    """build and schema own README.md, catalog.bib and catalog/schema/*.json: one saved in another
    encoding is out of date and gets rewritten, instead of a UnicodeDecodeError traceback."""
    path = tmp_path / "README.md"
    path.write_bytes("Anders S\u00f8gaard\n".encode("latin-1"))
    assert write_all({path: "Anders S\u00f8gaard\n"}) == [path]
    assert path.read_text(encoding="utf-8") == "Anders S\u00f8gaard\n"
