"""Mod-Squad: task-routed top-k mixtures of experts in a transformer, plus a task-expert MI loss.

Chen, Shen, Ding, Chen, Zhao, Learned-Miller, Gan, "Mod-Squad: Designing Mixtures of Experts
As Modular Multi-Task Learners", CVPR 2023, arXiv:2212.08066.

The feed-forward layer of every transformer block is a mixture of E experts. Each task owns
its own router in every such layer, so the same token can be sent to different experts for
different tasks (tested). A router scores the experts with a softmax and keeps the k best
probabilities as they are (not renormalised, so they sum to less than 1 when k < E, as in the
official code's TaskMoE, github.com/UMass-Foundation-Model/Mod-Squad); only those k experts
contribute to the token's output (tested):

    q_t(x) = softmax(W_t x),    G_t(x) = q_t(x) off its top k set to 0,    y = sum_e G_t(x)_e f_e(x)

Experts are shared, so they can cooperate across tasks, but the model is pushed to specialise:
a loss maximises the mutual information between the task T and the expert E in each MoE layer,

    P(E = e | T = t) = mean of q_t(x)_e over the task's tokens,    P(T = t) = 1 / K,
    P(t, e) = P(t) P(e | t),    P(e) = sum_t P(t, e),
    I(T; E) = sum_{t, e} P(t, e) log( P(t, e) / (P(t) P(e)) ),

which is 0 when all tasks use experts alike and log K when they use disjoint experts (both
tested). :meth:`ModSquad.auxiliary_loss` returns ``mi_weight`` times -sum_l I_l(T; E) of the
last forward pass; the training harness adds it (default 0: opt in with e.g.
``--arch-kw mi_weight=0.01``). Every batch is run once per task, so every task's term comes
from the same batch.

Inputs become tokens: an image is cut into patches (a strided convolution; smaller patches
for small images, so the grid is at least 4 x 4), a vector is mapped
to ``num_tokens`` tokens by one linear layer; both get learned position embeddings. Dense heads
read the patch grid and upsample it; other heads read the mean token.

The paper's equations are not cited by number: its text was not available to check them.

Left out: the ViT backbone and its pre-training, mixtures of attention heads (attention is a
shared ordinary multi-head attention here), the paper's momentum estimate of P(T, E) across
batches (the official code estimates from one forward pass, as here), the router's
load-balancing and entropy terms (the official mutual-information configurations switch them
off too), noisy gating (off in those configurations), the per-task embedding the official
model adds to the tokens before every block, and extracting a small per-task model after
training. Official routers start from a truncated normal of std 0.02 (the model's weight
initialisation overwrites their zero start); here they keep PyTorch's default initialisation.
Checked against UMass-Foundation-Model/Mod-Squad at 1d17e81.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .encoders import conv_head, mlp_head, pooled_head
from .registry import Problem


def top_k_gates(probs: Tensor, k: int, renormalise: bool = True) -> Tensor:
    """Keep the k largest probabilities of the last dimension, renormalised if asked; zeros elsewhere."""
    values, indices = probs.topk(k, dim=-1)
    if renormalise:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, indices, values)


def mutual_information(p_expert_given_task: Tensor, p_task: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """I(T; E) from a (K, E) matrix of rows P(E | T = t); P(T) uniform unless given."""
    num_tasks = p_expert_given_task.shape[0]
    if p_task is None:
        p_task = p_expert_given_task.new_full((num_tasks,), 1.0 / num_tasks)
    joint = p_task[:, None] * p_expert_given_task  # P(t, e)
    p_expert = joint.sum(0, keepdim=True)  # P(e)
    ratio = (joint + eps) / (p_task[:, None] * p_expert + eps)
    return (joint * ratio.log()).sum()


class TaskMoE(nn.Module):
    """E shared two-layer MLP experts and one top-k softmax router per task."""

    def __init__(self, width: int, hidden: int, num_experts: int, k: int, tasks: Sequence[str]):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
        self.k = k
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(num_experts)
        )
        self.routers = nn.ModuleDict({t: nn.Linear(width, num_experts, bias=False) for t in tasks})

    def probabilities(self, h: Tensor, task: str) -> Tensor:
        """q_t(x) for every token: (B, N, E)."""
        return torch.softmax(self.routers[task](h), dim=-1)

    def forward(self, h: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """Mixed expert output (B, N, width) and the router probabilities (B, N, E)."""
        probs = self.probabilities(h, task)
        gates = top_k_gates(probs, self.k, renormalise=False)
        # dense evaluation of all experts keeps the code short; only k gates per token are non-zero
        expert_out = torch.stack([f(h) for f in self.experts], dim=-1)  # (B, N, width, E)
        return torch.einsum("bne,bnwe->bnw", gates, expert_out), probs


class MoEBlock(nn.Module):
    """Pre-norm transformer block: shared self-attention, then a task-routed MoE feed-forward layer."""

    def __init__(self, width: int, num_heads: int, moe: TaskMoE):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        split_width(width, num_heads)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.moe = moe

    def forward(self, h: Tensor, task: str) -> tuple[Tensor, Tensor]:
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        out, probs = self.moe(self.norm2(h), task)
        return h + out, probs


class TokenStem(nn.Module):
    """Input tokens for a small transformer, and the matching task heads and read-out.

    An image becomes a grid of patch tokens (``patch``, or the largest of 2 and 1 that tiles
    it into at least 4 x 4); a vector becomes ``num_tokens`` tokens from one linear layer.
    Both get learned position embeddings.
    """

    def __init__(self, problem: Problem, width: int, num_tokens: int = 4, patch: int = 4):
        super().__init__()
        require_positive(num_tokens=num_tokens, patch=patch)
        self.problem, self.width = problem, width
        if problem.is_image:
            c, height, w = problem.input_shape
            patch = max(p for p in (patch, 2, 1) if p == 1 or (height % p == w % p == 0 and min(height, w) // p >= 4))
            self.grid = (height // patch, w // patch)
            self.tokenise: nn.Module = nn.Conv2d(c, width, patch, stride=patch)
            num_tokens = self.grid[0] * self.grid[1]
        else:
            self.tokenise = nn.Linear(problem.input_shape[0], num_tokens * width)
        self.patch, self.num_tokens = patch, num_tokens
        self.position = nn.Parameter(torch.randn(num_tokens, width) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, width) input tokens with position embeddings."""
        if self.problem.is_image:
            t = self.tokenise(x).flatten(2).transpose(1, 2)
        else:
            t = self.tokenise(x).view(x.shape[0], self.num_tokens, self.width)
        return t + self.position

    def read_out(self, h: Tensor) -> Tensor:
        """Final tokens to a head's input: the patch grid as a feature map, or the mean token."""
        if self.problem.is_image:
            return h.transpose(1, 2).reshape(h.shape[0], self.width, *self.grid)
        return h.mean(1)

    def head(self, out_dim: int) -> nn.Module:
        """A task head on ``read_out``: linear, per-pixel (upsampled by the patch) or pooled."""
        if not self.problem.is_image:
            return mlp_head(self.width, out_dim)
        if self.problem.dense:
            return conv_head(self.width, out_dim, upsample=self.patch)
        return pooled_head(self.width, out_dim)


class ModSquad(MultiTaskModel):
    """Tokeniser, ``depth`` MoE transformer blocks with per-task routers, and a head per task."""

    name = "mod_squad"

    def __init__(self, tasks: Sequence[str], problem: Problem, width: int = 32, depth: int = 2,
                 num_experts: int = 4, k: int = 2, num_heads: int = 2, num_tokens: int = 4,
                 patch: int = 4, mi_weight: float = 0.0):
        super().__init__(tasks)
        self.problem, self.width, self.mi_weight = problem, width, mi_weight
        self._last_mi: list[Tensor] | None = None  # per layer I(T; E), set by forward
        self.stem = TokenStem(problem, width, num_tokens, patch)
        self.blocks = nn.ModuleList(
            MoEBlock(width, num_heads, TaskMoE(width, 2 * width, num_experts, k, self.tasks)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.heads = nn.ModuleDict({t: self.stem.head(problem.task_out_dims[t]) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kwargs: object) -> "ModSquad":
        return cls(problem.tasks, problem, width, **kwargs)

    def run_task(self, x: Tensor, task: str) -> tuple[Tensor, list[Tensor]]:
        """Task output and the router probabilities (B, N, E) of each MoE layer."""
        h, all_probs = self.stem(x), []
        for block in self.blocks:
            h, probs = block(h, task)
            all_probs.append(probs)
        return self.heads[task](self.stem.read_out(self.norm(h))), all_probs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs, probs = {}, {}
        for t in self.tasks:
            outputs[t], probs[t] = self.run_task(x, t)
        self._last_mi = [
            mutual_information(torch.stack([probs[t][layer].flatten(0, 1).mean(0) for t in self.tasks]))
            for layer in range(len(self.blocks))
        ]
        return outputs

    def mutual_information_per_layer(self) -> list[Tensor]:
        """I(T; E) of every MoE layer in the last forward pass."""
        if self._last_mi is None:
            raise RuntimeError("mutual_information_per_layer() needs a forward pass first")
        return self._last_mi

    def auxiliary_loss(self) -> Tensor:
        """``mi_weight`` x (-sum over layers of I(T; E)) of the last forward pass."""
        return -self.mi_weight * torch.stack(self.mutual_information_per_layer()).sum()

    def __getstate__(self) -> dict:
        # the cached MI belongs to one forward pass (and its graph): copies start without it
        return {**super().__getstate__(), "_last_mi": None}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            yield from block.moe.routers[task].parameters()
        yield from self.heads[task].parameters()
