"""AdaMTL: task-aware, input-dependent policies that skip blocks of the shared encoder.

Neseem, Agiza, Reda, "AdaMTL: Adaptive Input-dependent Inference for Efficient Multi-Task
Learning", CVPR 2023 Workshops, arXiv:2304.08594 (official code: github.com/scale-lab/AdaMTL).

A shared encoder of residual blocks feeds one decoder per task. Next to it sits a light policy
network per task that reads the (stem) features of the current input and decides, per block,
whether that block is needed for its task. The encoder runs once for all tasks, so a block is
executed when any task's policy asks for it (the union of the task decisions), and a skipped
block is the identity: x_out = m (x_in + f(x_in)) + (1 - m) x_in with m in {0, 1} (tested).
Decisions are per input, so easy inputs can take fewer blocks. Because the union feeds the
shared encoder, every policy shapes every task's features: policies count as shared
parameters, only the decoders are task-specific.

The binary decisions are trained with the Gumbel-sigmoid straight-through estimator: in the
forward pass m = 1[sigmoid((logit + g1 - g2) / tau) > 1/2] with Gumbel noise g1, g2, in the
backward pass the gradient of the relaxed sigmoid (tested against that derivative by hand). At
evaluation the noise is dropped (m = 1[logit > 0]). An efficiency loss, the squared gap between
an input's fraction of executed blocks and a target fraction, averaged over the batch as in the
official code's MSE (:meth:`AdaMTL.efficiency_loss`), lets the target set the computational
budget. The policies are trained jointly with the network on the task losses plus that term:
:meth:`AdaMTL.auxiliary_loss` gives ``efficiency_weight`` times the efficiency loss of the last
forward pass, which the training harness adds every step (``efficiency_weight`` = 1 and
``target`` = 0.9 are the official code's defaults, config.py, used by every configuration of
scale-lab/AdaMTL at 5875898).

The paper's equations are not cited by number: its text was not available to check them.

Left out: the Swin-Transformer backbone, token-level (within-block) skipping, per-stage policy
placement, the knowledge-distillation and per-task overlap terms, the pretrain-then-finetune
schedule, and the batch-size-1 inference path that really skips computation (here skipped
blocks are masked, which gives the same outputs). The official controllers also draw
Gumbel noise at evaluation (their sampler is called without its training flag); the
deterministic evaluation rule above is our choice. Their policy network keeps every token's
position (a per-token linear layer, flattened, then a linear layer; hidden size 64 in the
configurations), where ours averages over space first; they clamp the union of task
decisions after each task is added (once here: the same value, other gradients for three or
more tasks); and their per-task run has an alternating phase (one task per epoch gating the
encoder) before the joint fine-tuning.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_non_negative, require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .gumbel_matrix_routing import gumbel_sigmoid
from .registry import Problem


class AdaMTL(MultiTaskModel):
    """Stem, ``num_blocks`` skippable residual blocks, a block policy and a decoder per task."""

    name = "adamtl"

    def __init__(self, tasks: Sequence[str], stem: nn.Module, block: nn.Module, num_blocks: int, width: int,
                 heads: Mapping[str, nn.Module], target: float = 0.9, tau: float = 5.0, seed: int = 0,
                 efficiency_weight: float = 1.0):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_non_negative(efficiency_weight=efficiency_weight)
        require_positive(num_blocks=num_blocks)
        self.stem = stem
        self.blocks = nn.ModuleList(copy.deepcopy(block) for _ in range(num_blocks))
        self.policies = nn.ModuleDict({
            t: nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_blocks)) for t in self.tasks
        })
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.target, self.tau = target, tau
        self.efficiency_weight = efficiency_weight
        self.generator = torch.Generator().manual_seed(seed)
        self._last_mask: Tensor | None = None

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, num_blocks: int = 3, **kwargs: object) -> "AdaMTL":
        trunk = trunk_for(problem.input_shape, width, depth=2)
        return cls(problem.tasks, trunk.blocks[0], trunk.blocks[1], num_blocks, width,
                   heads_for(problem, width), **kwargs)

    def policy_logits(self, z: Tensor) -> dict[str, Tensor]:
        """Each task's (B, num_blocks) logits, from the stem features (pooled over space for images)."""
        pooled = z.flatten(2).mean(-1) if z.ndim > 2 else z
        return {t: self.policies[t](pooled) for t in self.tasks}

    def block_mask(self, z: Tensor) -> Tensor:
        """(B, num_blocks) 0/1 decisions: the union over tasks of each task's straight-through sample."""
        logits = self.policy_logits(z)
        if self.training:
            masks = [gumbel_sigmoid(logits[t], self.tau, self.generator, hard=True) for t in self.tasks]
        else:
            masks = [(logits[t] > 0).to(z) for t in self.tasks]
        return torch.stack(masks).sum(0).clamp(max=1.0)

    def encode(self, x: Tensor) -> Tensor:
        z = self.stem(x)
        mask = self.block_mask(z)
        self._last_mask = mask
        for i, block in enumerate(self.blocks):
            m = mask[:, i].view(-1, *([1] * (z.ndim - 1)))
            z = m * (z + block(z)) + (1 - m) * z  # executed residual block, or the identity
        return z

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def efficiency_loss(self) -> Tensor:
        """Mean over the last forward pass's inputs of (that input's fraction of executed blocks - target)^2."""
        if self._last_mask is None:
            raise RuntimeError("efficiency_loss() needs a forward pass first")
        return (self._last_mask.mean(dim=1) - self.target).square().mean()

    def auxiliary_loss(self) -> Tensor:
        """``efficiency_weight`` x the efficiency loss of the last forward pass."""
        return self.efficiency_weight * self.efficiency_loss()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_last_mask": None}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
