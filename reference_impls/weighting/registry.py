"""Find every optimization method in ``reference_impls.weighting`` by its ``name``.

A method is a class defined in one of this package's modules that subclasses
``LossWeighting`` or ``GradientMethod``, is not abstract, and has a string class
attribute ``name``. Modules are discovered with ``pkgutil``, so a new method file is
picked up without editing this one. Import errors are not hidden: a broken method file
should fail loudly, not vanish from the registry.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import reference_impls.weighting as package
from reference_impls.checks import did_you_mean
from reference_impls.weighting.base import GradientMethod, LossWeighting

MethodClass = type[LossWeighting] | type[GradientMethod]
_NOT_METHOD_MODULES = {"base", "registry"}


def _is_method(obj: object, module_name: str) -> bool:
    return (
        issubclass(type(obj), type)  # not isinstance: on Python 3.10 tuple[int, int] claims to be a type
        and obj.__module__ == module_name
        and issubclass(obj, (LossWeighting, GradientMethod))
        and not inspect.isabstract(obj)
        and isinstance(getattr(obj, "name", None), str)
    )


def methods() -> dict[str, MethodClass]:
    """Return name -> class for every method class in the package, sorted by name."""
    found: dict[str, MethodClass] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_METHOD_MODULES or info.name.startswith("_"):
            continue
        module_name = f"{package.__name__}.{info.name}"
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, lambda obj: _is_method(obj, module_name)):
            if cls.name in found and found[cls.name] is not cls:
                raise ValueError(f"method name {cls.name!r} used by {found[cls.name]} and {cls}")
            found[cls.name] = cls
    return dict(sorted(found.items()))


def loss_weightings() -> dict[str, type[LossWeighting]]:
    return {n: c for n, c in methods().items() if issubclass(c, LossWeighting)}


def gradient_methods() -> dict[str, type[GradientMethod]]:
    return {n: c for n, c in methods().items() if issubclass(c, GradientMethod)}


def make(name: str, **kwargs: Any) -> LossWeighting | GradientMethod:
    """Instantiate the method called ``name`` with ``kwargs``."""
    registry = methods()
    if name not in registry:
        raise KeyError(f"unknown method {name!r}{did_you_mean(name, registry)}; known: {', '.join(registry)}")
    return registry[name](**kwargs)
