"""A real-valued argument set to 0 or -1 is refused when built, or trains without NaN.

Every float argument with a positive default (a temperature, a loss weight, an init scale)
reaches users through ``--arch-kw``. With 0 or -1 the model must either refuse it with a
ValueError that names it, or run a forward and backward pass with finite outputs and
gradients. Temperatures must be refused: at 0 they divide by zero, and a negative one
still gives finite numbers while turning the softmax upside down. At 753c522 this failed
in 13 architectures: every Gumbel or softmax temperature at 0 gave NaN and at -1 was taken,
and the Houlsby adapters' init_scale of 0 divided by zero while building (SFG's temperature
could not be set through ``registry.build`` at all).
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
VALUES = (0.0, -1.0)
TEMPERATURES = {"tau", "temperature"}


def float_arguments(name: str) -> list[str]:
    """Float arguments with a positive default, of ``from_problem`` and ``__init__``."""
    cls = get(name)
    found: list[str] = []
    for function in (getattr(cls, "from_problem", None), cls.__init__):
        for argument, spec in inspect.signature(function).parameters.items() if function else ():
            if type(spec.default) is float and spec.default > 0 and argument not in found:
                found.append(argument)
    return found


def outcome(name: str, problem: Problem, shape: tuple[int, ...], argument: str, value: float) -> str:
    """'refused', 'finite', 'not taken' (not an argument of this route), or what went wrong."""
    torch.manual_seed(0)
    try:
        model = build(name, problem, **{argument: value})
    except ValueError as error:
        return "refused" if names_the_refusal(error, argument, value) else f"refused without naming {argument} or {value}: {error!r}"
    except TypeError as error:
        if "unexpected keyword" in str(error):
            return "not taken"
        return f"build: {error!r}"
    except Exception as error:  # noqa: BLE001 - any other error is what this test looks for
        return f"build: {error!r}"
    try:
        outputs = model.train()(torch.randn(shape))
        sum(o.float().square().mean() for o in outputs.values()).backward()
    except Exception as error:  # noqa: BLE001
        return f"forward or backward: {error!r}"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not all(torch.isfinite(t).all() for t in [*outputs.values(), *grads]):
        return "non-finite outputs or gradients"
    return "finite"


def outcomes(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, (problem, shape) in accepted(name, PROBLEMS).items():
            for argument in float_arguments(name):
                for value in VALUES:
                    yield f"{argument}={value} ({kind})", argument, outcome(name, problem, shape, argument, value)


@pytest.mark.parametrize("name", [n for n in available() if float_arguments(n)])
def test_a_float_argument_is_refused_or_stays_finite(name):
    failures = [f"{case}: {result}" for case, argument, result in outcomes(name)
                if result not in ("refused", "finite", "not taken")
                or (argument in TEMPERATURES and result == "finite")]
    assert not failures, "\n".join(failures)


def test_the_sweep_sees_the_temperatures():
    """Nine Gumbel temperatures and three softmax ones, or the sweep passes vacuously."""
    arguments = [a for n in available() for a in float_arguments(n)]
    assert arguments.count("tau") >= 9 and arguments.count("temperature") >= 3
    assert len(arguments) > 50


def test_an_optional_temperature_is_refused_when_not_positive():
    problem = PROBLEMS["vector"][0]
    build("knowledge_factorization", problem, temperature=2.0)
    for value in VALUES:
        with pytest.raises(ValueError, match=f"temperature must be above 0, got {value}"):
            build("knowledge_factorization", problem, temperature=value)
