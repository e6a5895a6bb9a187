"""UniT: one shared transformer decoder, asked different questions by task-specific query embeddings.

Hu, Singh, "UniT: Multimodal Multitask Learning with a Unified Transformer", ICCV 2021,
arXiv:2102.10772 (code: facebookresearch/mmf, ``mmf/models/unit``).

An encoder (one per input modality; a convolutional backbone followed by a transformer encoder
for images) turns the input into a sequence of hidden states h_enc. A single transformer decoder,
shared by every task, reads h_enc through cross-attention; what distinguishes the tasks is only
the sequence of learned *query embeddings* q_task fed to the decoder and the output head that
reads its result (Sec. 3.3-3.4):

    h_enc = E(x)                     (shared encoder; tokens + learned positions)
    h_dec = D(h_enc, q_task)         (shared decoder; q_task: task-specific queries)
    y_t   = head_t(h_dec)            (task-specific output head)

Every decoder weight is used by every task (tested); giving task b the queries and head of task
a makes it compute task a's outputs (tested), and adding a task adds only its queries and head
(tested). Classification heads read the decoder output of the first query through a small
transform (dense, GELU, layer norm) and a linear layer, as the official classifier heads do.
For dense per-pixel tasks, which UniT does not have (its detection head predicts a set of
boxes), we give the task one query per output channel and read each channel as the dot
product between a linear map of that query's decoder output and the encoder feature of every
grid cell, upsampled to the input size (tested by hand); this read-out is our choice.

Images: ``trunk_for``'s resolution-keeping conv encoder, average-pooled into a grid of at least
4 x 4 cells (one token per cell). Vectors: the MLP trunk, then one linear layer to ``num_tokens``
tokens. Equation numbers are not cited: the paper text was not available to check them.

Left out: the separate image and text encoders of a multimodal input (one modality at a time
here), the pretrained DETR/BERT weights, the task-embedding token the official code puts in
front of the encoders' input sequence (and strips from their output), DETR-style detection
with Hungarian matching and its losses on every decoder layer (classification tasks use the
last layer only there too), the per-iteration task sampling schedule, and DETR's transformer
details kept by the official code: there the decoder input starts at zero and q_task is added
to the self-attention queries and keys and to the cross-attention queries of every decoder
layer (here q_task is the decoder's input), the (sine) positions are added to queries and
keys in the encoder's self-attention and to the keys of the decoder's cross-attention (here
learned positions are added once to the tokens), a residual runs around the image encoder,
and a final LayerNorm follows the decoder (here the post-norm layers' own LayerNorms end it).

Checked against facebookresearch/mmf (``mmf/models/unit``, last changed at 92629e7). Its
shipped multi-task configuration uses 25 queries per classification task (one here by
default, so the decoder's self-attention over a single query is a fixed map; pass
``num_queries``); a decoder wider than the encoder (768 vs 256, with a projection between);
FFNs of width 2048 (2x the model width here); dropout 0.1 and Xavier initialisation (none
and PyTorch's defaults here). Its default configuration gives each task its own decoder;
the shared decoder here is that of the paper's multi-task configurations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .encoders import trunk_for
from .registry import Problem


def classifier_head(width: int, out_dim: int) -> nn.Sequential:
    """Transform (dense, GELU, layer norm), then a linear output layer."""
    return nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, out_dim))


class DenseQueryHead(nn.Module):
    """Channel c at cell p: <W q_c, h_enc[p]> + b_c, for the task's decoded queries q_1..q_C."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.kernel = nn.Linear(width, width, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, decoded: Tensor, memory: Tensor) -> Tensor:
        """(B, C, width) decoded queries, (B, N, width) encoder cells -> (B, C, N)."""
        return torch.einsum("bcw,bnw->bcn", self.kernel(decoded), memory) + self.bias[:, None]


class UniT(MultiTaskModel):
    """Shared encoder and decoder; per task a set of learned queries and an output head."""

    name = "unit"

    def __init__(self, tasks: Sequence[str], problem: Problem, width: int = 32, depth: int = 2,
                 encoder_layers: int = 1, decoder_layers: int = 2, num_heads: int = 2,
                 num_tokens: int = 4, patch: int = 4, num_queries: Mapping[str, int] | None = None):
        super().__init__(tasks)
        require_positive(decoder_layers=decoder_layers, encoder_layers=encoder_layers, num_tokens=num_tokens, patch=patch)
        self.problem, self.width = problem, width
        self.trunk = trunk_for(problem.input_shape, width, depth)
        if problem.is_image:
            _, height, w = problem.input_shape
            # the largest of (patch, 2, 1) that tiles the image into a grid of at least 4 x 4
            self.patch = max(p for p in (patch, 2, 1) if p == 1 or (height % p == w % p == 0 and min(height, w) // p >= 4))
            self.grid = (height // self.patch, w // self.patch)
            num_tokens = self.grid[0] * self.grid[1]
        else:
            self.to_tokens = nn.Linear(width, num_tokens * width)
        self.num_tokens = num_tokens
        self.position = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.encoder = nn.TransformerEncoder(self._layer(nn.TransformerEncoderLayer, num_heads),
                                             encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(self._layer(nn.TransformerDecoderLayer, num_heads), decoder_layers)
        dense = problem.is_image and problem.dense
        out = problem.task_out_dims
        counts = dict(num_queries or {t: out[t] if dense else 1 for t in self.tasks})
        self.queries = nn.ParameterDict({t: nn.Parameter(torch.randn(counts[t], width)) for t in self.tasks})
        self.heads = nn.ModuleDict(
            {t: DenseQueryHead(width, out[t]) if dense else classifier_head(width, out[t]) for t in self.tasks}
        )

    def _layer(self, kind: type, num_heads: int) -> nn.Module:
        split_width(self.width, num_heads)
        return kind(self.width, num_heads, 2 * self.width, dropout=0.0, batch_first=True)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kwargs: object) -> "UniT":
        return cls(problem.tasks, problem, width, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        """h_enc: (B, N, width), shared by every task."""
        f = self.trunk(x)
        if self.problem.is_image:
            tokens = F.avg_pool2d(f, self.patch).flatten(2).transpose(1, 2)
        else:
            tokens = self.to_tokens(f).view(x.shape[0], self.num_tokens, self.width)
        return self.encoder(tokens + self.position)

    def decoded(self, memory: Tensor, task: str) -> Tensor:
        """h_dec = D(h_enc, q_task): (B, num_queries, width)."""
        queries = self.queries[task].expand(memory.shape[0], -1, -1)
        return self.decoder(queries, memory)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            h = self.decoded(z, t)
            if isinstance(self.heads[t], DenseQueryHead):
                maps = self.heads[t](h, z).unflatten(2, self.grid)
                out[t] = F.interpolate(maps, scale_factor=self.patch, mode="bilinear", align_corners=False)
            else:
                out[t] = self.heads[t](h[:, 0])  # the first query's output
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.queries[task]
        yield from self.heads[task].parameters()
