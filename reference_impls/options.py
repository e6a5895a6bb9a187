"""Command-line options, read as the type the function that takes them declares.

``--arch-kw per_example=false`` reaches the harness as the text ``false``: it is no Python
literal, so it stays a string, and a non-empty string is true. Passed on as it is, the option
would silently mean the opposite of what was typed. So each value is checked against the
annotation of the parameter it goes to, with pydantic's lax mode: ``false``/``no``/``0`` become
``False``, ``[1, 2]`` becomes a tuple where a tuple is declared and a tensor where a Tensor is,
and a value that cannot be what is declared (``num_experts=zero``, or ``True``, which lax mode
would read as 1) is refused before anything is built.

Pydantic is a dependency of the catalogue already; its coercion rules are documented and
tested, which a hand-written converter for unions, sequences and literals would not be.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated

import torch
from pydantic import AfterValidator, BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

# Annotations such as Tensor or nn.Module are checked with isinstance.
_ANY_CLASS = ConfigDict(arbitrary_types_allowed=True)


def parameter_types(function: Callable) -> dict[str, object]:
    """``{parameter: annotation}`` of ``function``'s named parameters (not ``*args``/``**kw``);
    a parameter without an annotation is left out."""
    hints = typing.get_type_hints(function)
    return {name: hints[name] for name, param in inspect.signature(function).parameters.items()
            if name in hints and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)}


def _holds_bool(value: object) -> bool:
    """Whether ``value`` is, or a (nested) list of it holds, a boolean: torch would read it as 0 or 1."""
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(map(_holds_bool, value)))


def _as_tensor(value: object) -> object:
    """A number or a (nested) list of numbers, as a tensor of the default float dtype; anything
    else (a boolean in it too) as it is, for the isinstance check to judge."""
    if isinstance(value, (int, float, list, tuple)) and not _holds_bool(value):
        try:
            return torch.tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError):  # ragged or non-numeric: not a tensor
            return value
    return value


def _no_bool(kind: type) -> Callable[[object], object]:
    """A validator refusing ``True``/``False`` where ``kind`` (int or float) is declared: lax mode
    would read ``num_experts=True`` as 1 without a word."""
    def check(value: object) -> object:
        if isinstance(value, bool):
            raise PydanticCustomError("bool_is_no_number", "Input should be {kind}, not a boolean ({value})",
                                      {"kind": "an integer" if kind is int else "a number", "value": str(value)})
        return value
    return check


def _not_nan(value: float) -> float:
    """NaN is never a setting (pydantic reads the text 'nan' as one): it would only surface as a
    diverged run blamed on the learning rate. Infinity stays allowed: it can mean 'no limit'."""
    if math.isnan(value):
        raise PydanticCustomError("nan_is_no_number", "Input should be a number, not nan")
    return value


# Generic containers whose arguments are types, rebuilt with each argument read as a command line writes it.
_CONTAINERS = (list, tuple, set, frozenset, dict, abc.Sequence, abc.Mapping, abc.Collection)


def command_line_type(annotation: object) -> object:
    """``annotation`` with each ``Tensor`` in it (alone, in a union or a container) also accepting
    the numbers and lists a command line can write (``preference=[1,3]`` for a Tensor option),
    and each ``int`` and ``float`` in it refusing a boolean."""
    if annotation is torch.Tensor:
        return Annotated[torch.Tensor, BeforeValidator(_as_tensor)]
    if annotation is int:
        return Annotated[int, BeforeValidator(_no_bool(int))]
    if annotation is float:
        return Annotated[float, BeforeValidator(_no_bool(float)), AfterValidator(_not_nan)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(command_line_type(arm) for arm in typing.get_args(annotation))]
    if origin in _CONTAINERS:
        return origin[tuple(arg if arg is Ellipsis else command_line_type(arg) for arg in typing.get_args(annotation))]
    return annotation


@functools.lru_cache(maxsize=None)
def adapter(annotation: object) -> TypeAdapter:
    """pydantic's validator for ``annotation`` as a command line writes it; built once per type."""
    annotation = command_line_type(annotation)
    if dataclasses.is_dataclass(annotation):  # pydantic reads it by its own fields, refusing a config
        return TypeAdapter(annotation)
    return TypeAdapter(annotation, config=_ANY_CLASS)


def typed(options: Mapping[str, object], functions: Sequence[Callable]) -> dict[str, object]:
    """``options`` with each value validated against, and converted to, the annotation of the
    first of ``functions`` that names it. An option no function names is kept as it is: the
    call reports it as an unexpected keyword. Raises ValueError naming the option, the
    declared type and why the value is not of it."""
    declared = {}
    for function in reversed(functions):  # the first function that names an option wins
        declared.update({name: (hint, function) for name, hint in parameter_types(function).items()})
    out = dict(options)
    for name, value in options.items():
        if name not in declared:
            continue
        hint, function = declared[name]
        try:
            out[name] = adapter(hint).validate_python(value)
        except ValidationError as error:
            reasons = unreadable(value, hint) or "; ".join(dict.fromkeys(e["msg"] for e in error.errors()))
            raise ValueError(f"{name} must be {type_name(hint)} (as {where(function)} declares it): "
                             f"{reasons}") from None
    return out


# Text made only of what numbers are written with: had it been a number, it would not be text.
_NUMBER_LIKE = re.compile(r"[-+]?[\d.][\d._eE+-]*")


def unreadable(value: object, annotation: object) -> str | None:
    """Why a value that was typed as a list, a mapping or a number is none: the command line
    keeps text that is no Python literal (``[1,2`` lacks its bracket) as text, and pydantic
    would then only say that text is not a Tensor or a Sequence. None for any other value."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.startswith(("[", "(")):
        if "str" in type_name(annotation):
            return f"{value!r} could not be read as a list: check its brackets, commas and quotes (e.g. ['a', 'b'])"
        return f"{value!r} could not be read as a list of numbers: check its brackets and commas (e.g. [1, 2])"
    if text.startswith("{"):
        return f"{value!r} could not be read as a mapping (a Python literal, e.g. {{'a': 1}})"
    if _NUMBER_LIKE.fullmatch(text):
        return f"{value!r} could not be read as a number"
    return None


def type_name(annotation: object) -> str:
    """``torch.Tensor | collections.abc.Sequence[float]`` -> ``Tensor | Sequence[float]``."""
    return re.sub(r"\b(?:\w+\.)+(?=\w)", "", inspect.formatannotation(annotation))


def where(function: Callable) -> str:
    """``dselect_k.DSelectK.from_problem``, ``synthetic.benchmark``: the module keeps a bare
    function name such as ``benchmark`` from being ambiguous."""
    return f"{function.__module__.rpartition('.')[2]}.{function.__qualname__}"
