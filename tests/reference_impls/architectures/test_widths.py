"""A width an architecture cannot use is refused when the model is built, with a ValueError.

``--arch-kw width=...`` reaches every registered architecture. A width that does not split
into the attention heads (or into two LSTM directions, or four rotary axes) used to surface
as torch's AssertionError, or as a reshape error in the first forward pass, mid-training;
a ValueError at build time is what the training CLI reports as a bad flag. Widths 7 (odd,
prime) and 10 (even, not a multiple of 4) hit every such split.
"""

import inspect

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build, get

PROBLEMS = {
    "vector": (Problem(("a", "b"), (12,), {"a": 1, "b": 2}), (2, 12)),
    "dense": (Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True), (2, 3, 8, 8)),
}
WITH_WIDTH = [n for n in available()
              if "width" in inspect.signature(getattr(get(n), "from_problem", get(n).__init__)).parameters]


def accepts(name: str, problem: Problem) -> bool:
    try:
        build(name, problem)
    except ValueError:
        return False  # the architecture refuses this kind of problem at its default width
    return True


@pytest.mark.parametrize("name", WITH_WIDTH)
def test_a_width_is_used_or_refused_when_building(name):
    for kind, (problem, shape) in PROBLEMS.items():
        if not accepts(name, problem):
            continue
        for width in (7, 10):
            torch.manual_seed(0)
            try:
                model = build(name, problem, width=width)
            except ValueError:
                continue
            outputs = model(torch.randn(shape))  # must not fail now: the width was accepted
            sum(o.sum() for o in outputs.values()).backward()


def test_most_architectures_take_a_width():
    assert len(WITH_WIDTH) > 0.9 * len(available())
