"""SameDraws: every entry starts from one random state, and leaves every generator as it was."""

import pytest
import torch
from torch import nn

from reference_impls.affinity.same_draws import SameDraws, module_generators

from ..conftest import DEVICES


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(1)
        self.inner = nn.Module()
        self.inner.generator = torch.Generator().manual_seed(2)
        self.inner.alias = self.generator  # the same generator twice is restored once

    def forward(self) -> torch.Tensor:
        return torch.cat([torch.rand(2, generator=self.generator), torch.rand(2, generator=self.inner.generator),
                          torch.rand(2), torch.nn.functional.dropout(torch.ones(4), 0.5)])


def test_every_entry_draws_the_same_numbers_from_every_generator():
    model = Sampler()
    same = SameDraws(model, seed=3)
    with same():
        first = model()
    with same():
        second = model()
    assert torch.equal(first, second)
    with SameDraws(model, seed=4)():
        other = model()
    assert torch.equal(first[:4], other[:4]) and not torch.equal(first[4:], other[4:])


def test_leaving_restores_the_models_and_the_default_generators():
    model = Sampler()
    torch.manual_seed(0)
    states = [g.get_state() for g in module_generators(model)], torch.get_rng_state()
    same = SameDraws(model)
    assert torch.equal(torch.get_rng_state(), states[1])  # drawing the seed did not advance it
    with same():
        model()
    assert [torch.equal(g.get_state(), s) for g, s in zip(module_generators(model), states[0])] == [True, True]
    assert torch.equal(torch.get_rng_state(), states[1])


def test_generators_are_found_once_in_every_submodule():
    model = Sampler()
    assert [id(g) for g in module_generators(model)] == [id(model.generator), id(model.inner.generator)]
    assert module_generators(nn.Linear(2, 2)) == []


def test_entries_start_from_the_generators_states_when_it_was_made_not_when_entered():
    model = Sampler()
    same = SameDraws(model, seed=0)
    with same():
        first = model()
    model()  # training draws in between advance the model's generators
    with same():
        assert torch.equal(model(), first)


def test_without_a_seed_different_caller_states_give_different_seeds():
    """The drawn seed spans a wide range: 64 different caller states never give the same one
    (drawing from only ~100 values would collide almost surely, and repeat the noise)."""
    model = Sampler()
    seeds = set()
    with torch.random.fork_rng(devices=[]):
        for state in range(64):
            torch.manual_seed(state)
            seeds.add(SameDraws(model).seed)
    assert len(seeds) == 64


def _default_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", DEVICES)
def test_draws_on_the_device_repeat_and_leave_its_default_generator_as_it_was(device):
    """On a GPU, dropout draws from that device's generator, which is seeded on entry and restored."""
    model, x = nn.Dropout(0.5), torch.ones(64, device=device)
    torch.manual_seed(0)
    before = _default_state(device)
    same = SameDraws(model, seed=3)
    with same():
        first = model(x)
    with same():
        second = model(x)
    with SameDraws(model, seed=4)():
        other = model(x)
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(_default_state(device), before)
