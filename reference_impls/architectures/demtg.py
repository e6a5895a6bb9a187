"""DeMTG: DeMT whose task query block ends in a gating layer shared by all tasks.

Xu, Yang, Ghanem, Zhang, Du & Tao, "Deformable Mixer Transformer with Gating for Multi-Task
Learning of Dense Prediction", arXiv 2023, arXiv:2308.05721 (later versions retitled "DeGMix:
Efficient Multi-Task Dense Prediction with Deformable and Gating Mixer").

DeMTG is the journal extension of DeMT (:mod:`.demt`): the same deformable mixer encoder (one
mixer per task on shared features) and the same task interaction block (self-attention over
all tasks' tokens). What changes is the *task query block* of the decoder: after each task's
deformed tokens have queried the task-interacted tokens by cross-attention, a **gating layer**
(gMLP-style) refines them, and this layer is **shared** by every task:

    u = GELU(W_1 LN(x)),  split u = [r, g] along channels,
    x' = x + W_2 (r * (W_g LN(g) + b_g))

The gate ``W_g LN(g) + b_g`` is computed from the token itself and multiplies the other half
element-wise, so each token decides which of its features pass. As in gMLP, ``W_g`` starts at
zero and ``b_g`` at one: at initialisation the gate is all ones and the layer is a plain
feed-forward block on the first half (tested), and learning opens or closes channels from there.
Closing the gate (``W_g = 0, b_g = 0``) leaves only W_2's bias; with that also zero the layer is
the identity and the model is DeMT (tested).

The official code (yangyangxu0/DeMTG, ``demt_head.py``) applies ``W_g`` as a 1x1 convolution
over the gate's channels at each token; we follow the code (the paper calls it a spatial gating
layer, but its projection in the code does not mix tokens, and a token-mixing one would tie
the model to one image size). Equation numbers are not quoted: we could not check them.

The gating layer is shared (it reaches every task); each task's query block and head stay
task-specific, as in DeMT.

Left out: everything :mod:`.demt` leaves out (Swin backbone, BatchNorm, modulation masks,
mixer depth) and the differences from the official code it lists, which DeMTG's code shares.
DeMTG's released mixer (yangyangxu0/DeMTG at b3be4ef) is DeMT's later one: two mixer layers,
each applying the 1x1 channel mixing before the residual deformable step; ours keeps the order
and single layer of DeMT's first release. The query block ends in a LayerNorm'd linear map in
both official repositories; the MLP there is our DeMT module's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import require_image_side
from .demt import DeMT, _tokens
from .registry import Problem


class GatingLayer(nn.Module):
    """Residual gMLP-style block: ``x + W_2(r * (W_g LN(g) + b_g))`` with ``[r, g] = GELU(W_1 LN x)``."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = 2 * dim if hidden is None else hidden
        if hidden < 2 or hidden % 2:
            raise ValueError(f"hidden width must be even (split into value and gate), got {hidden}")
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.gate_norm = nn.LayerNorm(hidden // 2)
        self.gate_proj = nn.Linear(hidden // 2, hidden // 2)
        nn.init.zeros_(self.gate_proj.weight)  # gate = 1 at the start: a plain FFN
        nn.init.ones_(self.gate_proj.bias)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(value half r, gate W_g LN(g) + b_g)`` for tokens ``(..., dim)``."""
        r, g = F.gelu(self.fc1(self.norm(x))).chunk(2, dim=-1)
        return r, self.gate_proj(self.gate_norm(g))

    def forward(self, x: Tensor) -> Tensor:
        r, gate = self.gate(x)
        return x + self.fc2(r * gate)


class DeMTG(DeMT):
    """DeMT with one gating layer, shared by all tasks, after every task query block."""

    name = "demtg"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int],
                 channels: int = 16, num_heads: int = 1, dense: bool = True):
        super().__init__(tasks, in_channels, out_dims, channels, num_heads, dense)
        self.gating = GatingLayer(channels)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> DeMTG:
        if not problem.is_image:
            raise ValueError("DeMTG's deformable mixers sample image locations; it needs image inputs")
        require_image_side(problem.input_shape, 2, "its encoder halves the feature map")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def decode_tasks(self, deformed: dict[str, Tensor], size: Sequence[int]) -> dict[str, Tensor]:
        """Task interaction, then per task: cross-attention query, shared gating, head."""
        b, c, h, w = next(iter(deformed.values())).shape
        joint = torch.cat([_tokens(deformed[t]) for t in self.tasks], dim=1)
        interacted = self.interaction(joint, joint)
        outputs = {}
        for t in self.tasks:
            task_tokens = self.gating(self.task_query[t](_tokens(deformed[t]), interacted))
            out = self.heads[t](task_tokens.transpose(1, 2).reshape(b, c, h, w))
            outputs[t] = (F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
                          if self.dense else out.mean(dim=(2, 3)))
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """As DeMT: the task's query block and head; the gating layer is shared."""
        yield from super().task_specific_parameters(task)
