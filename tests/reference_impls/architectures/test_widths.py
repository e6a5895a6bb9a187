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

from .conftest import accepted, builds

PROBLEMS = {
    "vector": (Problem(("a", "b"), (12,), {"a": 1, "b": 2}), (2, 12)),
    "dense": (Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True), (2, 3, 8, 8)),
}
WITH_WIDTH = [n for n in available()
              if "width" in inspect.signature(getattr(get(n), "from_problem", get(n).__init__)).parameters]


@pytest.mark.parametrize("name", WITH_WIDTH)
def test_a_width_is_used_or_refused_when_building(name):
    for kind, (problem, shape) in accepted(name, PROBLEMS).items():
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


@pytest.mark.parametrize("width", [0, -3])
def test_a_width_below_one_is_refused_for_every_architecture(width):
    """Before, width=0 built empty layers that failed mid-forward in 100 architectures."""
    for name in WITH_WIDTH:
        for problem, _ in PROBLEMS.values():
            with pytest.raises(ValueError, match=f"width must be at least 1, got {width}"):
                build(name, problem, width=width)


# Sizes and counts of the core architectures that 0 used to break (a division by zero,
# an empty expert stack, a reshape error mid-forward); each is now refused when built.
ZERO_BREAKS = [("amcnn", "reduction"), ("astmt", "reduction"), ("camtl", "attention_blocks"),
               ("hypergrid", "grid_cols"), ("hypergrid", "grid_rows"), ("mmoe", "num_experts"),
               ("mtdnn", "num_layers"), ("mult", "encoder_depth"), ("mult", "patch_size"),
               ("pap", "embed_channels"), ("polyhistor", "reduction"), ("sluice", "num_subspaces"),
               ("taskprompter", "depth"), ("taskprompter", "patch_size"), ("tsn", "encoder_depth"),
               # low-rank adapters (rank) and token models (num_tokens), guarded where they are made
               ("lora", "rank"), ("ming_moe", "rank"), ("mtlora", "rank"), ("mpt", "rank"),
               ("polytropon", "rank"), ("houlsby_adapters", "num_tokens"), ("prefix_tuning", "num_tokens"),
               ("mod_squad", "num_tokens"), ("skillnet_nlu", "num_tokens")]


@pytest.mark.parametrize("name, argument", ZERO_BREAKS)
def test_a_size_of_zero_is_refused_when_building(name, argument):
    problem = next(p for p, _ in PROBLEMS.values() if builds(name, p))
    with pytest.raises(ValueError, match=f"{argument} must be at least 1, got 0"):
        build(name, problem, **{argument: 0})
