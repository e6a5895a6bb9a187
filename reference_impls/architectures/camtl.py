"""CA-MTL: one transformer whose layers are modulated by a learned task embedding.

Pilault, Elhattami, Pal. "Conditionally Adaptive Multi-Task Learning: Improving Transfer
Learning in NLP Using Fewer Parameters & Less Data", ICLR 2021 (arXiv:2009.09139).

Every weight is shared; a task changes the network only through its embedding z_t, which
feeds FiLM generators (Perez et al.): FiLM(x | z) = (1 + gamma(z)) * x + beta(z), with
gamma and beta linear in z and no bias, so z = 0 is the neutral, unconditioned network.
The conditional modules:

  conditional alignment      x' = x R(z)^T,  R(z) = FiLM(R | z), R initialised to identity:
                             a task-specific rotation of the input embeddings
  conditional attention      softmax(Q K^T / sqrt(d) + M(z)) V, M(z) = block-diagonal of
                             FiLM-ed learned blocks A_n: a task-dependent bias on which
                             positions attend to which
  conditional layer norm     CLN(h | z) = gamma_0 (1 + W_g z) * (h - mu) / sigma + beta_0 + W_b z
  conditional bottleneck     h + FF(h) + Up(Down(FiLM(h | z))) before the second CLN: an adapter
                             beside the feed-forward, reading the same h

Left out: the pretrained BERT/RoBERTa weights and the freezing of its lower half, the
uncertainty-based multi-task data sampling, the paper's exact placement of the bottleneck
adapter, the shared linear map the official code applies to z before the layers (and the
adapter's own extra map of z), and the official sharing of one FiLM scale/shift across the
N blocks of M(z) (here every column has its own). Sequences have a fixed length (M(z) is
L x L); position 0 is read as the [CLS] summary by every task head.

Compared with the authors' code, github.com/CAMTL/CA-MTL (src/model/encoders/conditional_modules.py,
src/model/encoders/ca_mtl_base.py, src/model/ca_mtl.py). Further differences: there the FiLM
generators have a bias (zero at the start, then trained); conditional alignment FiLMs the
embedding vector elementwise instead of multiplying it by a matrix R(z); the conditional layer
norm modulates only the scale, as (1 + gamma(z)) gamma_0 + beta(z), with beta_0 trained but
not conditioned; only the upper half of its layers use the conditional layer norm, the lower
half a plain one; its bottleneck sits in the top layer only, in series after the feed-forward
block (replacing its output, followed by a third conditional layer norm), here in every layer
beside it, d/3 wide there (here d/4); its task embedding is d wide from N(0, 0.02), here 8 wide
from N(0, 1); and heads read [CLS] through BERT's tanh pooler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width


class FiLM(nn.Module):
    """(1 + gamma(z)) * x + beta(z) over the last dimension of x; identity at z = 0."""

    def __init__(self, cond_dim: int, size: int):
        super().__init__()
        self.generator = nn.Linear(cond_dim, 2 * size, bias=False)
        nn.init.normal_(self.generator.weight, std=0.02)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        gamma, beta = self.generator(z).chunk(2, dim=-1)
        return (1 + gamma) * x + beta


class ConditionalLayerNorm(nn.Module):
    """CLN(h | z) = gamma(z) * (h - mean) / std + beta(z), gamma(z) = gamma_0 (1 + W_g z)."""

    def __init__(self, size: int, cond_dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.film = FiLM(cond_dim, size)
        self.eps = eps

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        gamma_shift, beta_shift = self.film.generator(z).chunk(2, dim=-1)
        normed = F.layer_norm(h, h.shape[-1:], eps=self.eps)
        return self.weight * (1 + gamma_shift) * normed + self.bias + beta_shift


class ConditionalAttention(nn.Module):
    """Multi-head self-attention with a task-conditioned block-diagonal score bias M(z)."""

    def __init__(self, d_model: int, num_heads: int, seq_len: int, blocks: int, cond_dim: int):
        super().__init__()
        split_width(d_model, num_heads)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.num_heads = num_heads
        self.bias_base = nn.Parameter(torch.zeros(seq_len, seq_len))
        self.bias_film = FiLM(cond_dim, seq_len)
        # Positions split into `blocks` contiguous groups; M(z) is zero between groups.
        group = torch.cat([torch.full((len(c),), i) for i, c in
                           enumerate(torch.arange(seq_len).tensor_split(blocks))])
        self.register_buffer("block_mask", group[:, None] == group[None, :], persistent=False)

    def score_bias(self, z: Tensor) -> Tensor:
        """M(z) = block_diag(FiLM(A_1 | z), ..., FiLM(A_N | z)), (L, L)."""
        return self.bias_film(self.bias_base, z) * self.block_mask

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d_h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + self.score_bias(z)
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(b, n, d))


class CALayer(nn.Module):
    """Post-LN transformer layer with conditional attention, CLN and a conditional adapter."""

    def __init__(self, d_model: int, num_heads: int, seq_len: int, blocks: int, cond_dim: int,
                 bottleneck: bool):
        super().__init__()
        self.attention = ConditionalAttention(d_model, num_heads, seq_len, blocks, cond_dim)
        self.norm1 = ConditionalLayerNorm(d_model, cond_dim)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.norm2 = ConditionalLayerNorm(d_model, cond_dim)
        self.adapter = None
        if bottleneck:
            self.adapter_film = FiLM(cond_dim, d_model)
            # Down then Up with no activation between, as in the official ConditionalBottleNeck
            self.adapter = nn.Sequential(nn.Linear(d_model, d_model // 4), nn.Linear(d_model // 4, d_model))

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        h = self.norm1(h + self.attention(h, z), z)
        update = self.ff(h)
        if self.adapter is not None:
            update = update + self.adapter(self.adapter_film(h, z))
        return self.norm2(h + update, z)


class CAMTL(MultiTaskModel):
    """Task-embedding-conditioned transformer; tasks differ only in z_t and their heads."""

    name = "camtl"

    def __init__(
        self,
        tasks: Sequence[str],
        out_dims: Mapping[str, int],
        seq_len: int,
        vocab_size: int | None = None,
        in_features: int | None = None,
        d_model: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        task_embedding_dim: int = 8,
        attention_blocks: int = 2,
        bottleneck: bool = True,
    ):
        super().__init__(tasks)
        require_positive(attention_blocks=attention_blocks, d_model=d_model, task_embedding_dim=task_embedding_dim)
        if (vocab_size is None) == (in_features is None):
            raise ValueError("give exactly one of vocab_size (token ids) or in_features")
        self.seq_len = seq_len
        self.tokens = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(in_features, d_model)
        self.positions = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(task_embedding_dim)) for t in self.tasks}
        )
        self.alignment = nn.Parameter(torch.eye(d_model))
        self.alignment_film = FiLM(task_embedding_dim, d_model)
        self.layers = nn.ModuleList(
            CALayer(d_model, num_heads, seq_len, attention_blocks, task_embedding_dim, bottleneck)
            for _ in range(num_layers)
        )
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, out_dims[t]) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs):  # noqa: ANN001, ANN206
        if len(problem.input_shape) != 1:
            raise ValueError("CAMTL.from_problem reads vector inputs as sequences of scalars")
        return cls(problem.tasks, problem.out_dims, seq_len=problem.input_shape[0],
                   in_features=1, d_model=width, **kwargs)

    def aligned_embeddings(self, x: Tensor, z: Tensor) -> Tensor:
        """Conditional alignment: x R(z)^T with R(z) = FiLM(R | z)."""
        if x.dtype.is_floating_point and x.dim() == 2:
            x = x.unsqueeze(-1)
        if x.shape[1] != self.seq_len:
            raise ValueError(f"CA-MTL is built for sequences of length {self.seq_len}, got {x.shape[1]}")
        h = self.tokens(x) + self.positions
        return h @ self.alignment_film(self.alignment, z).T

    def encode_task(self, x: Tensor, z: Tensor) -> Tensor:
        """The [CLS] (position 0) representation of x under task embedding z."""
        h = self.aligned_embeddings(x, z)
        for layer in self.layers:
            h = layer(h, z)
        return h[:, 0]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.encode_task(x, self.task_embeddings[t])) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.task_embeddings[task]
        yield from self.heads[task].parameters()
