"""Find architectures by name and build a small default instance for a problem.

Discovery: every module of this package is imported and every concrete subclass of
:class:`MultiTaskModel` that sets a class attribute ``name`` (a string) is registered
under it. Adding an architecture therefore needs no edit here.

Building: architectures have different constructors, so the training harness and the
benchmarks describe the data with a :class:`Problem` and ask the class for a small
default model. An architecture opts in with a classmethod

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32) -> "MyModel": ...

Classes without it are built by matching constructor argument names against the
problem (``tasks``, ``in_dim``/``input_dim``, ``in_channels``, ``out_dims``/
``output_dims``); when that is not enough, :func:`build` says so instead of guessing.
"""

from __future__ import annotations

import importlib
import inspect
import operator
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..checks import did_you_mean, require_positive
from .base import MultiTaskModel

_SKIP_MODULES = {"base", "encoders", "registry"}


@dataclass(frozen=True)
class Problem:
    """What an architecture must map: inputs of ``input_shape`` to one output per task.

    ``input_shape`` is per example: ``(d,)`` for vectors, ``(C, H, W)`` for images.
    ``out_dims[task]`` is the width of the task's output (classes, regression targets,
    or channels of a dense per-pixel map when the input is an image and ``dense``); a task
    left out gets width 1, filled in here so that every architecture sees every task.
    """

    tasks: tuple[str, ...]
    input_shape: tuple[int, ...]
    out_dims: dict[str, int] = field(default_factory=dict)
    dense: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.out_dims) - set(self.tasks))
        if unknown:
            raise ValueError(f"out_dims names tasks that are not in the problem: {unknown}")
        widths = {t: _positive_int(self.out_dims.get(t, 1), f"out_dims[{t!r}]") for t in self.tasks}
        object.__setattr__(self, "out_dims", widths)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def task_out_dims(self) -> dict[str, int]:
        """``out_dims`` (kept for the architectures that name it; already complete)."""
        return dict(self.out_dims)


def _positive_int(value: object, what: str) -> int:
    """``value`` as an int (NumPy and torch integers included) if it is one and positive."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return number


def _discover() -> dict[str, type[MultiTaskModel]]:
    package = importlib.import_module(__package__)
    found: dict[str, type[MultiTaskModel]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _SKIP_MODULES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for obj in vars(module).values():
            # type(obj), not isinstance: on Python 3.10 an alias like tuple[int, int] claims to be a type
            if not (issubclass(type(obj), type) and issubclass(obj, MultiTaskModel)):
                continue
            if inspect.isabstract(obj) or obj.__module__ != module.__name__:
                continue
            name = obj.__dict__.get("name")
            if not isinstance(name, str):
                continue
            if name in found and found[name] is not obj:
                raise RuntimeError(
                    f"architecture name {name!r} is used by both "
                    f"{found[name].__module__}.{found[name].__qualname__} and "
                    f"{obj.__module__}.{obj.__qualname__}"
                )
            found[name] = obj
    return found


def available() -> list[str]:
    """Sorted names of every registered architecture."""
    return sorted(_discover())


def get(name: str) -> type[MultiTaskModel]:
    """The architecture class registered as ``name``."""
    registry = _discover()
    if name not in registry:
        raise KeyError(f"unknown architecture {name!r}{did_you_mean(name, registry)}; "
                       f"available: {', '.join(sorted(registry))}")
    return registry[name]


def builders(name: str) -> list[Callable]:
    """The functions :func:`build` passes options to: ``from_problem``, and the constructor
    when there is no ``from_problem`` or it forwards its ``**keywords``."""
    cls = get(name)
    make = getattr(cls, "from_problem", None)
    if make is None:
        return [cls.__init__]
    forwards = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(make).parameters.values())
    return [make, cls.__init__] if forwards else [make]


def takes_option(name: str, option: str) -> bool:
    """Whether ``build(name, problem, option=...)`` passes ``option`` on (to from_problem or the
    constructor), e.g. ``seed`` for the architectures that draw masks or routes from a generator
    of their own."""
    return any(option in inspect.signature(f).parameters for f in builders(name))


def _constructor_kwargs(cls: type, problem: Problem) -> dict[str, object]:
    offered: dict[str, object] = {"tasks": problem.tasks, "out_dims": dict(problem.out_dims)}
    offered["output_dims"] = offered["out_dims"]
    if problem.is_image:
        offered["in_channels"] = problem.input_shape[0]
    else:
        offered["in_dim"] = offered["input_dim"] = problem.input_shape[0]
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, object] = {}
    for pname, param in list(params.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if pname in offered:
            kwargs[pname] = offered[pname]
        elif param.default is inspect.Parameter.empty:
            raise TypeError(
                f"cannot build {cls.__qualname__} for {problem}: constructor argument "
                f"{pname!r} has no default and the class defines no from_problem()"
            )
    return kwargs


def build(name: str, problem: Problem, **overrides: object) -> MultiTaskModel:
    """A small default instance of architecture ``name`` for ``problem``.

    ``width``, the one option every small default takes, must be at least 1: 0 or less would
    build empty layers that fail, or divide by zero, somewhere inside the first forward pass.
    """
    cls = get(name)
    if "width" in overrides:
        require_positive(width=overrides["width"])
    if not hasattr(cls, "from_problem"):
        return cls(**{**_constructor_kwargs(cls, problem), **overrides})
    try:
        return cls.from_problem(problem, **overrides)
    except TypeError as error:
        taken = re.search(r"got multiple values for (?:keyword )?argument '(\w+)'", str(error))
        if taken and taken.group(1) in overrides:  # e.g. channels, which the small default derives
            raise ValueError(f"{name} sets {taken.group(1)} itself, from the problem and width; "
                             f"it cannot be given (width can)") from error
        raise
