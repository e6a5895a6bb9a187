"""Soft layer ordering: every task learns its own mixture of the shared layers at each depth.

Meyerson, Miikkulainen, "Beyond Shared Hierarchies: Deep Multitask Learning through Soft
Layer Ordering", ICLR 2018 (arXiv:1711.00108). Usual deep MTL applies shared
layers in the same order for every task (the parallel ordering assumption, Eq. 1; with
every layer hard-shared, Eq. 2); the paper shows that even fixed *permuted* orders per task
(Eq. 3) share well, and generalises both: D shared layers F_1..F_D are all applied at every
depth, weighted per task and depth,

    y_t^0 = E_t(x),   y_t^k = sum_j s_(t,j,k) F_j(y_t^{k-1}),   out_t = D_t(y_t^D)    Eq. (7)

with s_(t,.,k) = softmax of learned logits, so each depth is a distribution over layers
(tested); the tasks' D x D tables of scales together are the tensor S of Eq. (7). One-hot
weights recover any fixed ordering exactly (tested), and the shared layers become building
blocks that tasks assemble differently. E_t and D_t are the task's own encoder and decoder;
the F_j (a weight layer and its nonlinearity) need one common width. Logits start at zero:
every depth starts as the average of all layers.

Left out: dropout inside the shared layers, tasks with different input spaces (each task
has its own encoder here too, all reading the same input) and the paper's experiments.

Equation numbers are those of a Markdown transcript of the ICLR 2018 double-blind submission
(OpenReview, "Anonymous authors"), found in an index of public GitHub files whose repository
we could not name; the camera-ready and arXiv copies were not available to compare numbering.
In that text Eq. (7) writes the nonlinearity as phi_k, one per depth k, applied after W_j;
here it is part of F_j, one per layer. The two agree whenever every depth uses the same
nonlinearity, as here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import conv_block, head_for, mlp_block, trunk_for


class SoftOrder(MultiTaskModel):
    """Per task an encoder, a (depth x layer) logit table and a decoder; D shared layers."""

    name = "soft_order"
    equations_checked_in = "a Markdown transcript of the ICLR 2018 double-blind submission"

    def __init__(self, tasks: Sequence[str], encoders: Mapping[str, nn.Module],
                 make_layer: Callable[[], nn.Module], num_layers: int, decoders: Mapping[str, nn.Module]):
        super().__init__(tasks)
        require_positive(num_layers=num_layers)
        self.encoders = nn.ModuleDict({t: encoders[t] for t in self.tasks})
        self.layers = nn.ModuleList(make_layer() for _ in range(num_layers))  # F_1..F_D
        self.logits = nn.ParameterDict(  # row k: scores of F_1..F_D at depth k
            {t: nn.Parameter(torch.zeros(num_layers, num_layers)) for t in self.tasks}
        )
        self.decoders = nn.ModuleDict({t: decoders[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, num_layers: int = 3) -> "SoftOrder":
        shape = tuple(problem.input_shape)
        block = conv_block if problem.is_image else mlp_block
        encoders = {t: trunk_for(shape, width, 1) for t in problem.tasks}
        decoders = {t: head_for(shape, width, d, problem.dense) for t, d in problem.task_out_dims.items()}
        return cls(problem.tasks, encoders, lambda: block(width, width), num_layers, decoders)

    def mixing_weights(self) -> dict[str, Tensor]:
        """s_(t, j, k) as a (depth k, layer j) matrix per task; each row sums to one."""
        return {t: torch.softmax(self.logits[t], dim=-1) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        weights = self.mixing_weights()
        outputs = {}
        for t in self.tasks:
            y = self.encoders[t](x)
            for s in weights[t]:  # depth k = 1..D
                y = torch.einsum("j,jb...->b...", s, torch.stack([f(y) for f in self.layers]))  # Eq. (7)
            outputs[t] = self.decoders[t](y)
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.encoders[task].parameters()
        yield self.logits[task]
        yield from self.decoders[task].parameters()
