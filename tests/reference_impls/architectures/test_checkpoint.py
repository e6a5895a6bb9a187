"""An architecture's state_dict is its whole state: a differently initialised model that
loads it computes the same outputs (in eval mode).

Users save and reload models; state kept outside parameters and buffers (a fixed mask in a
plain attribute, exported prompts in a dict) would silently be lost. The fresh model is built
with another ``seed`` too, so models that draw masks, routes or pathways from a generator of
their own draw other ones (with the same seed PathNet's pathways, then plain attributes,
matched by chance and passed).
"""

import io

import pytest
import torch

from reference_impls import train
from reference_impls.architectures.registry import Problem, available, build

from .conftest import accepted, assert_same_outputs

PROBLEMS = {
    "vector": (Problem(("a", "b"), (12,), {"a": 2, "b": 1}), (3, 12)),
    "dense": (Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), (3, 3, 8, 8)),
}


def reloaded(model: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    return fresh


@pytest.mark.parametrize("name", available())
def test_a_reloaded_model_computes_what_the_saved_one_did(name):
    for problem, shape in accepted(name, PROBLEMS).values():
        torch.manual_seed(0)
        saved = build(name, problem, **train.seeded(name, {}, 0)).eval()
        torch.manual_seed(1)
        restored = reloaded(saved, build(name, problem, **train.seeded(name, {}, 1)).eval())
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        assert_same_outputs(saved, restored, x, name)
