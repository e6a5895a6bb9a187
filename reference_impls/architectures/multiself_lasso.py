"""Lasso over shared layers: each task reads its own sparse mix of the trunk's units.

Doersch, Zisserman, "Multi-task Self-Supervised Visual Learning", ICCV 2017,
arXiv:1708.07860.

The paper trains one ResNet on four self-supervised tasks at once. Its plain version is a
multi-head network: every task's head reads the same last layer of the trunk. Different
tasks, though, may want features from different depths, and forcing them all through the
last layer mixes their information together. The paper's remedy, which this module implements,
lets each task n choose the layers it reads: the trunk's residual units m = 1..M all have
the same shape, and task n's head reads the linear combination

    r_n = Σ_m α_{n,m} · Unit_m(x)

with one learned scalar α_{n,m} per task and unit, and an L1 (lasso) penalty
λ Σ_{n,m} |α_{n,m}| added to the training loss, so that each task ends up reading only
a few units, and the representation factorises by task. α = one-hot on the last unit for
every task is exactly the multi-head network (tested).

Sources: the official repository (github.com/deepmind/multiself) releases only a trained
checkpoint, its best model on the four tasks (RP+Col+Ex+MS, a ResNet-v2-101 trained through
block 3; its README does not say whether the lasso was used), not training code, so the
rule above is the paper's, from its abstract ("lasso regularization to encourage the network to
factorize the information in its representation") and its lasso section as we know it:
one scalar weight per task and ResNet unit, an L1 penalty on those weights, and a figure
of the learned |α| per task (rows) and unit (columns), evaluation tasks included.

Left out: the ResNet-v2-101 trunk (here a stem layer and M small residual units of one
width, so any two unit outputs can be added), the four pretext tasks and their heads, the
α the paper also learns for each evaluation task when transferring, and the paper's
second device, "harmonizing" the inputs (relative position is fed the same colour-dropped
input as colorization, so the network cannot tell the task from the input): that is
preprocessing of the data, not part of the network, and every task here reads the same
input anyway. Our choices, which the paper may set otherwise: α starts one-hot on the last
unit (the multi-head network), the penalty weight ``lasso_weight`` defaults to 1e-3, and
the unit outputs are not normalised, so nothing stops the trunk from growing a unit's
scale while α shrinks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_at_least, require_positive
from .base import MultiTaskModel
from .encoders import conv_block, heads_for, mlp_block


class ResidualUnit(nn.Module):
    """``x + block(x)``: a unit whose output has the shape of its input, as in a ResNet block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def lasso_penalty(alphas: Sequence[Tensor]) -> Tensor:
    """Σ_n Σ_m |α_{n,m}| over every task's combination weights."""
    return torch.stack([a.abs().sum() for a in alphas]).sum()


class MultiSelfLasso(MultiTaskModel):
    """A stem and ``num_units`` same-shaped units; task n's head reads ``Σ_m α_{n,m} unit_m``."""

    name = "multiself_lasso"

    def __init__(
        self,
        tasks: Sequence[str],
        stem: nn.Module,
        units: Sequence[nn.Module],
        heads: Mapping[str, nn.Module],
        lasso_weight: float = 1e-3,
    ):
        super().__init__(tasks)
        require_positive(num_units=len(units))
        require_at_least(0, lasso_weight=lasso_weight)
        self.lasso_weight = lasso_weight
        self.stem = stem
        self.units = nn.ModuleList(units)
        last_unit = torch.zeros(len(units))
        last_unit[-1] = 1.0  # start as the multi-head network: every task reads the last unit
        self.alphas = nn.ParameterDict({t: nn.Parameter(last_unit.clone()) for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, num_units: int = 3, **kw) -> "MultiSelfLasso":
        require_positive(width=width, num_units=num_units)
        if problem.is_image:
            stem = conv_block(problem.input_shape[0], width)
            units = [ResidualUnit(conv_block(width, width)) for _ in range(num_units)]
        else:
            stem = mlp_block(problem.input_shape[0], width)
            units = [ResidualUnit(mlp_block(width, width)) for _ in range(num_units)]
        return cls(problem.tasks, stem, units, heads_for(problem, width), **kw)

    def unit_outputs(self, x: Tensor) -> list[Tensor]:
        """``Unit_1(x), ..., Unit_M(x)``: the outputs every task may read."""
        h = self.stem(x)
        outputs = []
        for unit in self.units:
            h = unit(h)
            outputs.append(h)
        return outputs

    def combine(self, task: str, outputs: Sequence[Tensor]) -> Tensor:
        """``r_n = Σ_m α_{n,m} Unit_m``, the representation task ``task``'s head reads."""
        alpha = self.alphas[task]
        return sum(alpha[m] * u for m, u in enumerate(outputs))

    def encode(self, x: Tensor) -> Tensor:
        """All unit outputs, concatenated along the feature dimension (dim 1)."""
        return torch.cat(self.unit_outputs(x), dim=1)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        outputs = z.chunk(len(self.units), dim=1)
        return {t: self.heads[t](self.combine(t, outputs)) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def auxiliary_loss(self) -> Tensor:
        """The lasso term ``lasso_weight · Σ_{n,m} |α_{n,m}|`` (depends on α only, not on a batch)."""
        return self.lasso_weight * lasso_penalty(list(self.alphas.values()))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.alphas[task]
        yield from self.heads[task].parameters()
