"""Autograd's gradient is the derivative of what the model computes, unless the model says otherwise.

For every architecture and problem kind, the training step's objective (``step_objective``: task
losses, intermediate predictions, auxiliary loss) is differentiated two ways in float64 along one
random direction v over all trainable parameters: autograd's ⟨∇f, v⟩, and the central difference
(f(θ + εv) − f(θ − εv)) / 2ε. A stray ``detach``, a path through ``.data`` or a hand-written
backward that drops a term makes them differ: a survey of hand-made mutants found four such
detaches (MTAN's attended features, PLE's shared gate, PAD-Net's gates, CA-MTL's conditional
bias) that no other test noticed, because the parameters behind them still got some gradient.

Each evaluation starts from the same random state (torch's, and any generator a model keeps), the
same buffers, so sampled routes and dropout masks agree. ε = 1e-8: small enough that no ReLU or
max-pool kink lies between the two points in any model here (1e-6 put one in about a tenth of
them), large enough that rounding stays near 1e-8 of f.

Some models are built to train with a gradient that is not the derivative of their forward pass:
straight-through estimators, stop-gradients, targets held fixed. ``NOT_THE_DERIVATIVE`` names
them with the reason; the test checks that each still differs, so an entry no model needs fails.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import Tensor, nn

from reference_impls.architectures.registry import available

from .test_every_parameter_trains import built, step_objective

EPS = 1e-8
# |autograd − difference| within this share of the directional derivative's scale, Σ|∂f/∂θ_i v_i|.
# Measured: at most 1.6e-9 of it over the models not listed below; the listed ones differ by 9e-6
# (MRN) to 0.5, the mutants above by 1e-3 and more.
TOLERANCE = 1e-6

# name -> why its training gradient is not the derivative of its forward pass (by design)
NOT_THE_DERIVATIVE: dict[str, str] = {
    "adamtl": "the block decisions are straight-through Gumbel-sigmoid samples",
    "diffusionmtl": "the condition map is built from the detached initial predictions, as in the official code",
    "ecmt": "CI-KD's target, the widest encoder, is computed without gradient",
    "hmoe": "each scenario's label-space mixture reads the other scenarios' predictions through a stop-gradient",
    "mlore": "the generic convolution reads a detached feature map",
    "mrn": "the covariances are refreshed from the detached weights each step (alternating minimisation)",
    "pepnet": "the gates read stop-gradient copies of the embeddings",
    "piggyback": "the binary masks train by the straight-through estimator",
    "progressive_nets": "lateral inputs from earlier columns are detached (those columns are frozen in the paper)",
    "stem": "each task reads the other tasks' embeddings through a stop-gradient",
    "weight_masking": "the binary masks train by the straight-through estimator",
}


def random_states(model: nn.Module) -> list:
    """The generators a model keeps for itself (sampled routes, angles, noise)."""
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, (torch.Generator, random.Random))]


class Objective:
    """f(θ) of the training step, evaluated each time from the same buffers and random states."""

    def __init__(self, model: nn.Module, x: Tensor):
        self.model, self.x = model, x
        names = {n for n, _ in model.named_parameters()}
        self.buffers = {k: copy.deepcopy(v) for k, v in model.state_dict().items() if k not in names}
        self.attributes = {id(m): {k: copy.deepcopy(v) for k, v in vars(m).items() if isinstance(v, (int, float))}
                           for m in model.modules()}
        self.generators = [(g, g.get_state() if isinstance(g, torch.Generator) else g.getstate())
                           for g in random_states(model)]

    def __call__(self) -> Tensor:
        self.model.load_state_dict(self.buffers, strict=False)
        for m in self.model.modules():  # step counters and the like
            vars(m).update(self.attributes[id(m)])
        for g, state in self.generators:
            g.set_state(state) if isinstance(g, torch.Generator) else g.setstate(state)
        torch.manual_seed(2)
        return step_objective(self.model, self.x)


def autograd_and_difference(model: nn.Module, x: Tensor) -> tuple[float, float, float]:
    """(⟨∇f, v⟩ by autograd, the same by central difference, Σ|∂f/∂θ_i v_i|) for a random v."""
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    generator = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    f = Objective(model, x)
    grads = torch.autograd.grad(f(), params, allow_unused=True)
    pairs = [(g * v) for g, v in zip(grads, direction) if g is not None]
    exact, scale = sum(float(p.sum()) for p in pairs), sum(float(p.abs().sum()) for p in pairs)
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(sign * EPS * v)
        values.append(float(f().detach()))
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(sign * EPS * v)
    return exact, (values[0] - values[1]) / (2 * EPS), scale


@pytest.mark.parametrize("name", available())
def test_training_gradient_is_the_derivative_of_the_forward_pass(name):
    differs = []
    for kind, model, x in built(name):
        exact, difference, scale = autograd_and_difference(model, x)
        assert scale > 0, f"{name} [{kind}]: the step's objective does not depend on the parameters"
        if abs(exact - difference) > TOLERANCE * scale:
            differs.append(f"[{kind}] autograd {exact:.6g}, finite difference {difference:.6g}")
    if name in NOT_THE_DERIVATIVE:
        assert differs, f"{name}: autograd now matches the finite difference; drop it from NOT_THE_DERIVATIVE"
    else:
        assert not differs, f"{name}: " + "; ".join(differs)
