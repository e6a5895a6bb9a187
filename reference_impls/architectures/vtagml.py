"""Vision transformer adapters with task-adapted attention (VTAGML).

Bhattacharjee, Süsstrunk, Salzmann, "Vision Transformer Adapters for Generalizable
Multitask Learning", ICCV 2023, arXiv:2308.12372. Official code: github.com/IVRL/VTAGML.

A frozen transformer encoder computes a representation shared by all tasks; its last
blocks are turned into *vision adapter layers*, trained and conditioned on a task
embedding, and their output feeds one decoder per task. Source of this file: the paper's
figures (on its project page) and the released code (``script/model/swin_transformer.py``,
``conditional_modules.py``); no numbered equations were available to cite, so the
formulas below are written in our notation.

Task embedding, weighted by task affinity (the paper's FiLM figure). Every task t owns an
embedding θ_t; the embedding that conditions the adapters is the affinity-weighted average

    ω̂_t = Σ_j R[j, t] θ_j / Σ_j R[j, t]

where R is the K x K task-affinity matrix of TROA, the paper's gradient-based task
similarity (R[j, t]: how much task j helps task t). A task never seen in training can be
conditioned through its affinities alone (zero-shot task transfer).

FiLM (code: ``FiLM``): from a condition c, one linear map gives a scale and a shift,

    FiLM(c, h) = (1 + γ(c)) ⊙ h + β(c),   [γ; β] = W c  (bias initialised to 0)

Task-adapted attention, TAA (code: ``TAA`` in ``WindowAttention``): a learned matrix
A ∈ R^{N x m}, m = ⌈N / k⌉ for N tokens and k blocks (initialised to 0), is FiLM-modulated
by ω̂_t and laid out block-diagonally into an N x N bias added to every head's logits:

    B_t = blockdiag_k(FiLM(ω̂_t, A))[:N, :N]       (row block i fills columns i·m .. i·m+m)
    TAA(h) = softmax(q k^T / sqrt(d_head) + B_t) v

Task-scaled norm, TSN (code: ``TaskScaledNorm``): a layer norm whose learned scale w is
FiLM-modulated by the task, TSN(h) = LN(h; weight = (1 + γ(ω̂_t)) ⊙ w + β(ω̂_t), bias = b).

Vision adapter layer l (a conditioned transformer block followed by a conditioned
bottleneck, code: ``SwinTransformerBlock`` with ``task_configs`` + ``ConditionalBottleNeck``):

    x ← x + TAA(TSN_1(x))
    x ← x + FFN(TSN_2(x))
    s_l = W_up W_down FiLM_l(W_e ω̂_t, x + s_{l-1}),   s_0 = 0     (skip connection between
                                                               consecutive adapter layers)

The representation handed to the task decoders is the last bottleneck state s_L (in the code
``x = hidden`` when adapters are on), after a final layer norm. The bottleneck width is
width // 3 and has no nonlinearity between its two projections, both as in the code.

Small-scale version here: tokens from a patch (image) or chunk (vector) embedding,
``frozen_depth`` frozen pre-norm transformer blocks (the "pretrained" encoder, random here)
run once for all tasks, then ``adapter_depth`` adapter layers and a final norm run once per
task, then a task head (linear on the mean token, or per-patch pixels for dense tasks).
As in the released training script, the adapter layers' own attention and feed-forward
weights train along with the FiLM generators, TAA matrices and task embeddings.

Where the sources are silent or differ, choices made here: the averaging over affinities is
normalised by the column sum (the figure says "weighted averaging"); R is identity unless
set with :meth:`set_task_affinity`; the task embeddings are counted as shared parameters,
because R mixes them across tasks.

Left out: TROA itself (its formula was not available; R is taken as given, e.g. from
:mod:`reference_impls.affinity.transference`; the training loop never sets it, so a run trains
with R = identity, each task conditioned by its own embedding alone, and ``training_procedure``
says so), the pretrained Swin-B V2 backbone with its
stages, patch merging and shifted windows (attention here is global over all N tokens, so
B_t is N x N rather than per window), the per-task Swin decoders with encoder skips (a
linear head per task instead), training the patch embedding (the released script does), the
released code's conditioned bottleneck after every block of every stage, the frozen ones
included (its skip state starts at the first block and is patch-merged between stages; here
it starts at the first adapter layer and the frozen blocks carry no bottleneck),
unsupervised domain adaptation, datasets and schedules. In the released code (IVRL/VTAGML at
d7834ba) each task looks up its own embedding (there is no affinity mixing R), TSN is never
switched on (the NYU script's keyword for it is misspelled and silently ignored; the
Taskonomy model has no switch), the backbone is Swin-S V1 with 22k weights (the paper names
Swin-B V2), and linear layers start from a truncated normal (std 0.02).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .houlsby_adapters import Tokenizer, feed_forward, token_heads
from .registry import Problem
from .unified_io import Attention


class FiLM(nn.Module):
    """FiLM(c, h) = (1 + γ(c)) ⊙ h + β(c), with [γ; β] = W c + b, b initialised to 0."""

    def __init__(self, cond_dim: int, features: int):
        super().__init__()
        self.to_gamma_beta = nn.Linear(cond_dim, 2 * features)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, cond: Tensor, h: Tensor) -> Tensor:
        gamma, beta = self.to_gamma_beta(cond).chunk(2, dim=-1)
        return (1 + gamma) * h + beta


class TaskScaledNorm(nn.Module):
    """Layer norm with scale (1 + γ(ω)) ⊙ w + β(ω) and a plain learned shift."""

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.modulation = FiLM(cond_dim, width)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        weight = self.modulation(cond, self.weight)
        return F.layer_norm(h, (h.shape[-1],), weight, self.bias)


class FrozenBlock(nn.Module):
    """A pre-norm transformer block of the frozen encoder."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = Attention(width, num_heads)
        self.feed_forward = feed_forward(width)

    def forward(self, x: Tensor) -> Tensor:
        a = self.norm1(x)
        x = x + self.attention(a, a)
        return x + self.feed_forward(self.norm2(x))


class TaskAdaptedAttentionBias(nn.Module):
    """B_t = blockdiag_k(FiLM(ω̂_t, A))[:N, :N], with A (N x ⌈N/k⌉) learned from zero."""

    def __init__(self, tokens: int, blocks: int, cond_dim: int):
        super().__init__()
        self.tokens = tokens
        self.block = math.ceil(tokens / blocks)  # m: the width of one diagonal block
        self.matrix = nn.Parameter(torch.zeros(tokens, self.block))  # A
        self.film = FiLM(cond_dim, self.block)

    def forward(self, cond: Tensor) -> Tensor:
        filmed = self.film(cond, self.matrix)  # (N, m): γ, β scale and shift A column-wise
        n, m = self.tokens, self.block
        index = torch.arange(n, device=filmed.device)
        on_diagonal = (index[:, None] // m) == (index[None, :] // m)  # row block i == column block i
        # Column c of row r (inside its block) holds filmed[r, c mod m]; off-block entries are 0.
        return filmed.repeat(1, math.ceil(n / m))[:, :n] * on_diagonal


class VisionAdapterLayer(nn.Module):
    """TAA + TSN transformer block, then a FiLM-conditioned bottleneck with a skip input."""

    def __init__(self, width: int, num_heads: int, tokens: int, taa_blocks: int, embed_dim: int,
                 bottleneck: int):
        super().__init__()
        self.norm1 = TaskScaledNorm(width, embed_dim)
        self.norm2 = TaskScaledNorm(width, embed_dim)
        self.attention = Attention(width, num_heads)
        self.attention_bias = TaskAdaptedAttentionBias(tokens, taa_blocks, embed_dim)
        self.feed_forward = feed_forward(width)
        self.embed_transform = nn.Linear(embed_dim, embed_dim)  # W_e
        self.film = FiLM(embed_dim, width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)

    def forward(self, x: Tensor, skip: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        a = self.norm1(x, cond)
        x = x + self.attention(a, a, bias=self.attention_bias(cond))
        x = x + self.feed_forward(self.norm2(x, cond))
        hidden = self.film(self.embed_transform(cond), x + skip)
        return x, self.up(self.down(hidden))


class VTAGML(MultiTaskModel):
    """Frozen transformer encoder + task-conditioned vision adapter layers + task heads."""

    name = "vtagml"
    training_procedure = ("the task-affinity matrix R that mixes the task embeddings comes from TROA's gradient-based "
                          "task similarities, set with set_task_affinity() (the identity until then)")

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        heads: Mapping[str, nn.Module],
        width: int = 32,
        frozen_depth: int = 1,
        adapter_depth: int = 2,
        num_heads: int = 4,
        embed_dim: int = 16,
        taa_blocks: int = 2,
        bottleneck: int | None = None,
    ):
        super().__init__(tasks)
        bottleneck = max(1, width // 3) if bottleneck is None else bottleneck
        require_positive(frozen_depth=frozen_depth, adapter_depth=adapter_depth, num_heads=num_heads,
                         embed_dim=embed_dim, taa_blocks=taa_blocks, bottleneck=bottleneck)
        split_width(width, num_heads)
        self.tokenizer = tokenizer
        self.frozen_blocks = nn.ModuleList(FrozenBlock(width, num_heads) for _ in range(frozen_depth))
        for p in [*self.tokenizer.parameters(), *self.frozen_blocks.parameters()]:
            p.requires_grad_(False)  # the "pretrained" encoder stays fixed
        self.adapters = nn.ModuleList(
            VisionAdapterLayer(width, num_heads, tokenizer.length, taa_blocks, embed_dim, bottleneck)
            for _ in range(adapter_depth)
        )
        self.norm = nn.LayerNorm(width)
        self.task_embeddings = nn.ParameterDict({t: nn.Parameter(torch.randn(embed_dim)) for t in self.tasks})
        # R[j, t]: how much task j helps task t (TROA's output); identity until set.
        self.register_buffer("task_affinity", torch.eye(len(self.tasks)))
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, num_tokens: int = 10, **kw: object) -> "VTAGML":
        tokenizer = Tokenizer(problem.input_shape, width, num_tokens)
        return cls(problem.tasks, tokenizer, token_heads(problem, width, tokenizer), width, **kw)

    def set_task_affinity(self, affinity: Tensor) -> None:
        """Use a K x K affinity R (rows: helping task j, columns: helped task t), K = len(tasks)."""
        affinity = torch.as_tensor(affinity)
        k = len(self.tasks)
        if affinity.shape != (k, k):
            raise ValueError(f"task affinity must be {k} x {k}, got {tuple(affinity.shape)}")
        if not (torch.isfinite(affinity).all() and (affinity >= 0).all() and (affinity.sum(0) > 0).all()):
            raise ValueError("task affinity must be finite and non-negative, with a positive sum in every column")
        self.task_affinity.copy_(affinity)

    def conditioning(self, task: str) -> Tensor:
        """ω̂_t = Σ_j R[j, t] θ_j / Σ_j R[j, t]."""
        weights = self.task_affinity[:, self.tasks.index(task)]
        embeddings = torch.stack([self.task_embeddings[t] for t in self.tasks])
        return weights @ embeddings / weights.sum()

    def encode(self, x: Tensor) -> Tensor:
        """The frozen encoder's tokens, shared by every task."""
        h = self.tokenizer(x)
        for block in self.frozen_blocks:
            h = block(h)
        return h

    def adapt(self, h: Tensor, task: str) -> Tensor:
        """The adapter layers under ``task``'s conditioning: the representation its head reads."""
        cond = self.conditioning(task)
        skip = torch.zeros_like(h)
        for layer in self.adapters:
            h, skip = layer(h, skip, cond)
        return self.norm(skip)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.adapt(z, t)) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
