"""Whether the methods and functions a ``training_procedure`` line names exist where it says."""

from __future__ import annotations

import importlib
import re


def unresolved_names(cls: type) -> list[str]:
    """Names written ``name()`` in ``cls.training_procedure`` that are not attributes of the
    class, and names written ``module.name()`` that are not functions of
    ``reference_impls.architectures.module``."""
    missing = []
    for name in re.findall(r"([A-Za-z_][\w.]*)\(", cls.training_procedure or ""):
        module, _, function = name.rpartition(".")
        if not module:
            if not hasattr(cls, name):
                missing.append(name)
            continue
        try:
            found = getattr(importlib.import_module(f"reference_impls.architectures.{module}"), function, None)
        except ImportError:
            found = None
        if not callable(found):
            missing.append(name)
    return missing
