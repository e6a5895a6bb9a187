"""Write generated files atomically: a reader never sees a half-written file."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, newline: str = "\n") -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, then rename over ``path``; each
    line ends with ``newline``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp's 0600 would hide README.md from a web server or a co-worker
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The mode ``path`` has now, or for a new file what ``open()`` would give it (0666 less the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def read_generated(path: Path) -> str | None:
    """A generated file's text, or None when it is missing or not UTF-8: either way it is out of date."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def write_all(files: dict[Path, str]) -> list[Path]:
    """Write several generated files; returns those whose content changed."""
    changed = []
    for path, text in files.items():
        if read_generated(path) != text:
            write_atomic(path, text)
            changed.append(path)
    return changed
