"""Make a registry's module discovery see one more module, for tests of what it registers.

Both registries (architectures, optimization methods) walk their package with
``pkgutil.iter_modules`` and import each module by name; this adds one module to that walk
for the length of a test, without writing a file into the package.
"""

import pkgutil
import sys
import types


def add_package_module(monkeypatch, package: str, short: str, *classes: type, imported=()) -> None:
    """Add module ``package.short`` defining ``classes`` (their ``__module__`` is set to it) and
    holding ``imported``, classes it imports from elsewhere (their ``__module__`` is kept)."""
    full = f"{package}.{short}"
    module = types.ModuleType(full)
    for cls in classes:
        cls.__module__ = full
    for cls in (*classes, *imported):
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, full, module)
    real = pkgutil.iter_modules
    monkeypatch.setattr(pkgutil, "iter_modules", lambda path: [*real(path), pkgutil.ModuleInfo(None, short, False)])


class ClaimsToBeAType:
    """Stands in for a module-level alias such as ``Pair = tuple[str, str]`` on Python 3.10, where
    ``isinstance(tuple[str, str], type)`` is True (the alias forwards ``__class__``) but
    ``issubclass`` refuses it. A registry must skip it, on any Python version."""

    __class__ = type  # what isinstance consults after the real type
    __name__ = "Pair"
