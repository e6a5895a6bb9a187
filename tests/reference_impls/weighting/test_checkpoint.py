"""A loss weighting's state_dict is its whole state: a fresh object that loads a trained
one's checkpoint gives the same next weights.

Loss weightings are modules, so users save them with the model; state kept outside
parameters and buffers (a loss history, a lazily sized buffer) would be lost or refuse to
load. Gradient methods are plain objects and are not covered.
"""

import io

import pytest
import torch

from reference_impls.weighting.base import LossWeighting
from reference_impls.weighting.gradnorm import GradNorm
from reference_impls.weighting.registry import methods

from .test_device_and_dtype import losses_and_inputs, make

EPOCHS = [0, 0, 1, 1, 2, 2, 3, 3]  # steps within and across epochs, so epoch histories are used
LOSS_WEIGHTINGS = sorted(n for n, c in methods().items() if issubclass(c, LossWeighting))


def step(method: LossWeighting, name: str, index: int, seed: int) -> torch.Tensor:
    losses, extra = losses_and_inputs(name, torch.float64, torch.Generator().manual_seed(seed), "cpu")
    method.combine(losses, step=index, epoch=EPOCHS[index], **extra).backward()
    return method.weights(losses.detach(), index, EPOCHS[index])


def reloaded(method: LossWeighting, name: str) -> LossWeighting:
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(name)
    fresh.load_state_dict(torch.load(buffer))
    if getattr(method, "generator", None) is not None:  # randomness is the caller's generator:
        fresh.generator.set_state(method.generator.get_state())  # the caller restores it
    return fresh


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_a_reloaded_loss_weighting_continues_as_the_original(name):
    trained = make(name)
    for index in range(len(EPOCHS) - 1):
        step(trained, name, index, seed=index)
    restored = reloaded(trained, name)
    last = len(EPOCHS) - 1
    assert torch.allclose(step(restored, name, last, seed=99), step(trained, name, last, seed=99)), name


def test_gradnorm_reloads_the_initial_losses_its_balance_step_recorded():
    shared = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    losses = torch.stack([shared.square().sum(), 3 * shared.sum().abs()])
    trained = GradNorm(num_tasks=2)
    trained.balance_step(losses, shared)
    restored = GradNorm(num_tasks=2)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.initial_losses, losses.detach())
    later = losses * torch.tensor([0.5, 0.9])  # different rates: the initial losses matter
    trained.balance_step(later, shared)
    restored.balance_step(later, shared)
    assert torch.allclose(restored.task_weights, trained.task_weights)
