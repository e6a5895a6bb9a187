"""HyperGrid: a task-conditioned gate over blocks of a feed-forward weight matrix.

Tay, Zhao, Bahri, Metzler, Juan. "HyperGrid Transformers: Towards A Single Model for
Multiple Tasks", ICLR 2021 (earlier arXiv title "HyperGrid: Efficient Multi-Task
Transformers with Grid-wise Decomposable Hyper Projections", arXiv:2007.05891).

A hypernetwork would generate a d_out x d_in weight per task; HyperGrid instead generates
only a d_r x d_c *grid* as the outer product of a row vector and a column vector, and
expands every grid cell into a block of the weight:

    H   = sigmoid(r ⊗ c)                                   (d_r x d_c grid)
    W_x = W ⊙ expand(H),  expand: each cell -> a (d_out/d_r) x (d_in/d_c) block of copies

Each of r, c is either *local* (a linear function of the task state: the representation
of the task-prefix token at this layer, which makes the gate task- and input-dependent)
or *global* (a learned, task-agnostic vector). The paper compares compositions; this file
offers ``LG`` (local rows x global columns), ``GL``, ``LL`` and ``LG+GL`` (sum of the two
outer products before the sigmoid).

Tasks are distinguished the way T5 does it, by a task prefix: a learned prefix token per
task is prepended, and all weights are shared. The gate modulates the second (d_ff ->
d_model) projection of every feed-forward block.

Left out: the pretrained T5 encoder-decoder (here a tiny encoder with a [prefix] summary
read by per-task heads), and the paper's choice of which layers and projections are
gated in each configuration.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width

MODES = ("LG", "GL", "LL", "LG+GL")


class HyperGridLinear(nn.Module):
    """y = (W ⊙ expand(sigmoid(r ⊗ c))) a + b, with r, c local (from the task state) or global."""

    def __init__(self, in_dim: int, out_dim: int, state_dim: int, grid_rows: int, grid_cols: int,
                 mode: str = "LG"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if out_dim % grid_rows or in_dim % grid_cols:
            raise ValueError("grid rows/cols must divide the weight's output/input sizes")
        self.base = nn.Linear(in_dim, out_dim)  # W, b: shared by every task
        self.mode = mode
        self.block = (out_dim // grid_rows, in_dim // grid_cols)
        # Only the generators the mode multiplies exist: an unused one would never train.
        pairs = {"LG": [("L", "G")], "GL": [("G", "L")], "LL": [("L", "L")], "LG+GL": [("L", "G"), ("G", "L")]}
        self.pairs = pairs[mode]
        rows, cols = {r for r, _ in self.pairs}, {c for _, c in self.pairs}
        self.local_rows = nn.Linear(state_dim, grid_rows) if "L" in rows else None
        self.global_rows = nn.Parameter(torch.randn(grid_rows)) if "G" in rows else None
        self.local_cols = nn.Linear(state_dim, grid_cols) if "L" in cols else None
        self.global_cols = nn.Parameter(torch.randn(grid_cols)) if "G" in cols else None

    def grid(self, state: Tensor) -> Tensor:
        """H = sigmoid(sum over the mode's pairs of r ⊗ c) per example: (B, d_r, d_c)."""
        rows = {"L": self.local_rows(state) if self.local_rows is not None else None,
                "G": None if self.global_rows is None else self.global_rows.expand(state.shape[0], -1)}
        cols = {"L": self.local_cols(state) if self.local_cols is not None else None,
                "G": None if self.global_cols is None else self.global_cols.expand(state.shape[0], -1)}
        outer = sum(rows[r][:, :, None] * cols[c][:, None, :] for r, c in self.pairs)
        return torch.sigmoid(outer)

    def weight(self, state: Tensor) -> Tensor:
        """W_x = W ⊙ expand(H): (B, d_out, d_in), one gated weight per example."""
        gate = self.grid(state)
        gate = gate.repeat_interleave(self.block[0], dim=1).repeat_interleave(self.block[1], dim=2)
        return self.base.weight * gate

    def forward(self, a: Tensor, state: Tensor) -> Tensor:
        """a: (B, L, d_in), state: (B, state_dim)."""
        return torch.einsum("boi,bli->blo", self.weight(state), a) + self.base.bias


class HyperGridLayer(nn.Module):
    """Post-LN transformer layer whose FFN output projection is a HyperGridLinear."""

    def __init__(self, d_model: int, d_ff: int, num_heads: int, grid_rows: int, grid_cols: int, mode: str):
        super().__init__()
        split_width(d_model, num_heads)
        self.attention = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = HyperGridLinear(d_ff, d_model, d_model, grid_rows, grid_cols, mode)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm1(h + self.attention(h, h, h, need_weights=False)[0])
        task_state = h[:, 0]  # the task-prefix token's representation
        return self.norm2(h + self.ff_out(torch.relu(self.ff_in(h)), task_state))


class HyperGrid(MultiTaskModel):
    """Shared transformer with HyperGrid-gated FFNs; tasks differ only by their prefix token."""

    name = "hypergrid"

    def __init__(
        self,
        tasks: Sequence[str],
        out_dims: Mapping[str, int],
        vocab_size: int | None = None,
        in_features: int | None = None,
        d_model: int = 32,
        d_ff: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        grid_rows: int = 4,
        grid_cols: int = 8,
        mode: str = "LG",
        max_len: int = 128,
    ):
        super().__init__(tasks)
        require_positive(d_ff=d_ff, d_model=d_model, grid_cols=grid_cols, grid_rows=grid_rows, max_len=max_len)
        if (vocab_size is None) == (in_features is None):
            raise ValueError("give exactly one of vocab_size (token ids) or in_features")
        self.tokens = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(in_features, d_model)
        self.positions = nn.Embedding(max_len + 1, d_model)
        self.prefixes = nn.ParameterDict({t: nn.Parameter(torch.randn(d_model)) for t in self.tasks})
        self.layers = nn.ModuleList(
            HyperGridLayer(d_model, d_ff, num_heads, grid_rows, grid_cols, mode) for _ in range(num_layers)
        )
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, out_dims[t]) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs):  # noqa: ANN001, ANN206
        if len(problem.input_shape) != 1:
            raise ValueError("HyperGrid.from_problem reads vector inputs as sequences of scalars")
        return cls(problem.tasks, problem.out_dims, in_features=1, d_model=width, d_ff=2 * width,
                   max_len=problem.input_shape[0], **kwargs)

    def encode_task(self, x: Tensor, task: str) -> Tensor:
        """Run the shared encoder on [prefix_t; x]; return the prefix position's output."""
        if x.dtype.is_floating_point and x.dim() == 2:
            x = x.unsqueeze(-1)
        h = self.tokens(x)
        h = torch.cat([self.prefixes[task].expand(h.shape[0], 1, -1), h], dim=1)
        h = h + self.positions(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h)
        return h[:, 0]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.encode_task(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.prefixes[task]
        yield from self.heads[task].parameters()
