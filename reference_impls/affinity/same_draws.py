"""Common random numbers: every evaluation of a model's losses draws the same noise.

Lookahead measurements (transference and IT-MTL, ETAP's scores, GradTAG's linearisation)
compare a model's losses at two parameter values. Many architectures sample in their
forward pass in training mode: dropout, Gumbel noise, sampled routes or widths. Each
evaluation would then draw new noise, and the difference between two evaluations would
measure the draw as much as the step. Over the 22 architectures of ``reference_impls`` that
sample (3 tasks, float64, a lookahead step of 1e-7), the transference's distance from its
first-order term was a median 6.7e5 times that term (0.075 to 1.4e7) with a new draw per
evaluation, and 1.4e-7 with common draws (``python benchmarks/lookahead_noise.py``).

:class:`SameDraws` fixes the random state every evaluation starts from: torch's default
generators (CPU, and every CUDA device already in use) and each ``torch.Generator`` that one
of the model's modules keeps as an attribute. It restores all of them afterwards, so
measuring leaves the model's own generators, and the caller's, where they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def module_generators(model: nn.Module) -> list[torch.Generator]:
    """Every ``torch.Generator`` kept as an attribute of ``model`` or of one of its modules."""
    found: dict[int, torch.Generator] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Generator):
                found.setdefault(id(value), value)
    return list(found.values())


class SameDraws:
    """A context in which every entry starts from the same random state.

    ``seed`` seeds torch's default generators on each entry. Without one it is drawn here
    from the CPU default generator's current state, which is left unadvanced: a caller's
    ``torch.manual_seed`` still decides it, and measuring does not shift the caller's stream.
    The model's own generators restart on each entry from their states at construction.
    """

    def __init__(self, model: nn.Module, seed: int | None = None) -> None:
        self.generators = module_generators(model)
        self.starts = [g.get_state() for g in self.generators]
        if seed is None:
            with torch.random.fork_rng(devices=[]):
                seed = int(torch.randint(2**62, ()))
        self.seed = int(seed)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        saved = [g.get_state() for g in self.generators]
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.default_generator.manual_seed(self.seed)
                for device in cuda:
                    torch.cuda.default_generators[device].manual_seed(self.seed)
                for generator, start in zip(self.generators, self.starts):
                    generator.set_state(start)
                yield
        finally:
            for generator, state in zip(self.generators, saved):
                generator.set_state(state)
