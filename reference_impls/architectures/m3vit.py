"""M³ViT: a ViT whose MLP blocks are sparse mixtures of experts with one router per task.

Liang, Fan, Sarkar, Jiang, Chen, Zou, Cheng, Hao, Wang, "M³ViT: Mixture-of-Experts Vision
Transformer for Efficient Multi-task Learning with Model-Accelerator Co-design",
NeurIPS 2022, arXiv:2210.14793.

Every other transformer block (the odd-numbered ones, as in the official code) replaces
its MLP by N expert MLPs and a *task-dependent* router. For task t and token x the router
scores the experts with a softmax over all of them and keeps the k largest probabilities
without renormalising (Eq. 3):

    g_t(x) = TopK(softmax(x W_g,t), k)      zero outside the k chosen experts
    MoE_t(x) = Σ_{i in TopK} g_t(x)_i E_i(x)          (one router per task: Eq. 5)

The experts, attention and embeddings are shared; only the routers (and the output heads)
belong to a task. Routing depends on the task, so the tokens differ per task after the
first MoE block and the network is run once per task: at inference a task activates only
its own sparse path, k of N experts per token. Here each expert runs only on the tokens
dispatched to it, so experts no token chose do no work and get no gradient (tested).
Exactly k experts carry weight per token (tested), and with one expert the MoE block is
the plain ViT MLP (tested). Since the kept probabilities are not renormalised, the task loss
trains the router even with k = 1 (tested).

Inputs are tokenised as in :mod:`.houlsby_adapters` (patches for images, chunks for
vectors), and outputs come from the token heads there (per-patch pixels for dense tasks).

Left out: the ImageNet-pretrained ViT-S/B weights, the gate noise during training and the
load/importance balancing loss, the task-embedding gate variant (Eqs. 6-7), dropout and
drop-path, and the whole FPGA accelerator co-design (computation reordering). The gate is the
paper's Eq. 3 and the one the official README's training command selects (``noisy_vmoe``,
models/gate_funs/noisy_gate_vmoe.py of VITA-Group/M3ViT at d448b6f); the repository's other
gate, top-k then a softmax over the kept scores (noisy_gate.py), cannot be built by its MoE
layer (its constructor lacks arguments the layer passes). This file used that other gate
until an audit against the code found it.

Equation numbers checked in a text dump of arXiv:2210.14793, found in the public GitHub index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel, split_width
from .houlsby_adapters import Tokenizer, feed_forward, token_heads
from .registry import Problem


def top_k_gate(logits: Tensor, k: int) -> Tensor:
    """Eq. 3: the softmax over all experts, kept at each row's k largest entries (not
    renormalised), zero elsewhere."""
    top, index = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, top)


class TaskMoE(nn.Module):
    """N shared expert MLPs; one bias-free router per task picks k of them per token."""

    def __init__(self, width: int, tasks: Sequence[str], num_experts: int, k: int):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
        self.k = k
        self.experts = nn.ModuleList(feed_forward(width) for _ in range(num_experts))
        self.routers = nn.ModuleDict({t: nn.Linear(width, num_experts, bias=False) for t in tasks})

    def gates(self, x: Tensor, task: str) -> Tensor:
        """g_t(x): (..., N), k non-zero entries per token: the softmax's k largest, summing to at most 1."""
        return top_k_gate(self.routers[task](x), self.k)

    def forward(self, x: Tensor, task: str) -> Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        gates = self.gates(tokens, task)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            chosen = gates[:, i].nonzero().squeeze(1)  # tokens dispatched to expert i
            if chosen.numel():
                out = out.index_add(0, chosen, gates[chosen, i, None] * expert(tokens[chosen]))
        return out.view_as(x)


class Block(nn.Module):
    """Pre-LN transformer block; its MLP is either dense or a task-routed MoE."""

    def __init__(self, width: int, num_heads: int, moe: nn.Module | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        split_width(width, num_heads)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.moe = moe
        self.mlp = feed_forward(width) if moe is None else None

    def forward(self, h: Tensor, task: str) -> Tensor:
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        m = self.norm2(h)
        return h + (self.mlp(m) if self.moe is None else self.moe(m, task))


class M3ViT(MultiTaskModel):
    """Tokenizer, blocks alternating dense MLP / task-routed MoE, one token head per task."""

    name = "m3vit"
    equations_checked_in = "a text dump of arXiv:2210.14793"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        heads: Mapping[str, nn.Module],
        width: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        num_experts: int = 4,
        k: int = 2,
    ):
        super().__init__(tasks)
        self.tokenizer = tokenizer
        self.blocks = nn.ModuleList(
            Block(width, num_heads, TaskMoE(width, self.tasks, num_experts, k) if i % 2 else None)
            for i in range(depth)
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_tokens: int = 10,
                     **kw: object) -> "M3ViT":
        tokenizer = Tokenizer(problem.input_shape, width, num_tokens)
        return cls(problem.tasks, tokenizer, token_heads(problem, width, tokenizer), width, depth, **kw)

    def task_forward(self, x: Tensor, task: str) -> Tensor:
        """Only ``task``'s path: its routers choose the experts in every MoE block."""
        h = self.tokenizer(x)
        for block in self.blocks:
            h = block(h, task)
        return self.heads[task](h)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.task_forward(x, t) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            if block.moe is not None:
                yield from block.moe.routers[task].parameters()
        yield from self.heads[task].parameters()
