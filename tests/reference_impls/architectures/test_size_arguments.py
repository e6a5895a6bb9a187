"""A size or count an architecture cannot use is refused when the model is built.

Every integer argument whose default is at least 1 (a number of experts, layers, tokens or
bins, a rank, a kernel or patch size) reaches users through ``--arch-kw``. Set to 0 or a
negative number, each must either be refused with a ValueError by ``registry.build`` or give
a model whose first forward pass runs with finite outputs (no prompts, or no task experts,
can be a real model). At e923cbd, 0 failed later in 29 architectures (62 cases); once
those were guarded (9fcbc18), -1 and -5 still failed in 36: an error while building that was
not a ValueError (a negative tensor dimension, a division by zero), an error in the first
forward pass, NaN outputs, or a refusal that named neither argument nor value. -5 also
catches counts that are only checked as a sum. Optional sizes (``bottleneck=None`` means a
default derived from the width) and per-stage lists (``ranks=(2, 2, 4, 4)``, every entry set)
get the same values: at bd51324 they failed in 15 architectures, and an optional size of 0
silently meant its default (``bottleneck or width // 4``). ``width`` has its own checks in
``test_widths.py``.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build, get

from .conftest import accepted, names_the_refusal

PROBLEMS = {
    "vector": (Problem(("a", "b"), (12,), {"a": 2, "b": 1}), (2, 12)),
    "dense": (Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), (2, 3, 8, 8)),
}
VALUES = (0, -1, -5)


def size_arguments(name: str) -> dict[str, str]:
    """Size arguments of ``from_problem`` and ``__init__``, each with its kind: 'int' (a
    default of at least 1), 'optional' (an ``int | None`` defaulting to None, a size derived
    from the others unless given) or 'list' (a tuple of ints, one size per stage or layer)."""
    cls = get(name)
    found: dict[str, str] = {}
    for function in (getattr(cls, "from_problem", None), cls.__init__):
        for argument, spec in inspect.signature(function).parameters.items() if function else ():
            default, annotation = spec.default, str(spec.annotation)
            if argument in found or argument == "width":
                continue
            if type(default) is int and default >= 1:
                found[argument] = "int"
            elif default is None and annotation.startswith("int |"):
                found[argument] = "optional"
            elif isinstance(default, tuple) and default and all(type(d) is int for d in default):
                found[argument] = "list"
    return found


def setting(name: str, argument: str, kind: str, value: int) -> int | tuple[int, ...]:
    """``value`` as ``argument`` takes it: a list argument gets it in every entry."""
    if kind != "list":
        return value
    default = inspect.signature(get(name).from_problem).parameters.get(argument)
    if default is None:
        default = inspect.signature(get(name).__init__).parameters[argument]
    return (value,) * len(default.default)


def late_failure(name: str, problem: Problem, shape: tuple[int, ...], argument: str,
                 value: int | tuple[int, ...]) -> str | None:
    """What went wrong with ``argument=value`` after building started, or None if it was fine."""
    torch.manual_seed(0)
    try:
        model = build(name, problem, **{argument: value})
    except ValueError as error:  # refused: what the CLI reports as a bad flag, if it says why
        return None if names_the_refusal(error, argument, value) else f"refused without naming {argument} or {value}: {error!r}"
    except TypeError as error:
        if "unexpected keyword" in str(error):
            return None  # not an argument of this route
        return f"build: {error!r}"
    except Exception as error:  # noqa: BLE001 - any other error is the failure this test looks for
        return f"build: {error!r}"
    try:
        outputs = model(torch.randn(shape))
    except Exception as error:  # noqa: BLE001
        return f"forward: {error!r}"
    if not all(torch.isfinite(o).all() for o in outputs.values()):
        return "non-finite outputs"
    return None


@pytest.mark.parametrize("name", available())
def test_a_size_argument_is_used_or_refused_when_building(name):
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-size layers warn while they are initialised
        for kind, (problem, shape) in accepted(name, PROBLEMS).items():
            for argument, kind in size_arguments(name).items():
                for value in VALUES:
                    failure = late_failure(name, problem, shape, argument, setting(name, argument, kind, value))
                    if failure:
                        failures.append(f"{argument}={value} ({kind}): {failure}")
    assert not failures, "\n".join(failures)


def test_size_arguments_are_found():
    """The sweep must see the arguments it is meant to check, or it passes vacuously."""
    assert size_arguments("mmoe")["num_experts"] == "int"
    assert {"num_layers", "num_components"} <= set(size_arguments("gumbel_matrix_routing"))
    assert size_arguments("houlsby_adapters")["bottleneck"] == "optional"
    assert size_arguments("mlore")["ranks"] == "list"
    kinds = [kind for n in available() for kind in size_arguments(n).values()]
    assert kinds.count("int") > 200 and kinds.count("optional") > 10 and kinds.count("list") >= 5


@pytest.mark.parametrize("name", ["cgc", "ple", "stem"])
def test_a_task_gate_with_no_expert_to_weigh_is_refused(name):
    """Shared or task experts may each be 0, not both: the gates would weigh nothing."""
    problem, shape = PROBLEMS["vector"]
    for shared, own in ((0, 1), (1, 0)):
        build(name, problem, shared_experts=shared, task_experts=own)(torch.randn(shape))
    with pytest.raises(ValueError, match="shared_experts \\+ task_experts must be at least 1"):
        build(name, problem, shared_experts=0, task_experts=0)


# Optional sizes that used to be read as ``size or default``, so 0 silently meant the default.
OPTIONAL_ZERO = [("adapterfusion", "bottleneck"), ("ciat", "inner"), ("four_m", "input_tokens"),
                 ("four_m", "target_tokens"), ("houlsby_adapters", "bottleneck"), ("mad_x", "bottleneck"),
                 ("muir", "pool_size"), ("pals", "pal_dim"), ("pham2020study", "bottleneck"),
                 ("prefix_tuning", "small"), ("prefix_tuning", "hidden"), ("sharma2023lossless", "bottleneck"),
                 ("unified_peft", "bottleneck")]


@pytest.mark.parametrize("name, argument", OPTIONAL_ZERO)
def test_an_optional_size_of_zero_is_refused_not_read_as_its_default(name, argument):
    problem, _ = PROBLEMS["vector"]
    assert size_arguments(name)[argument] == "optional"
    with pytest.raises(ValueError, match=f"{argument} must be at least 1, got 0"):
        build(name, problem, **{argument: 0})
