"""MultiMAE: a masked autoencoder over several modalities, with one shallow decoder per modality.

Bachmann, Mizrahi, Atanov, Zamir. "MultiMAE: Multi-modal Multi-task Masked Autoencoders",
ECCV 2022 (arXiv:2204.01678). Every rule below follows the authors' code
(github.com/EPFL-VILAB/MultiMAE: ``multimae/multimae.py`` for the masking and the encoder,
``multimae/output_adapters.py``'s ``SpatialOutputAdapter`` for the decoders,
``multimae/criterion.py`` and ``run_pretraining_multimae.py`` for the loss); the paper's text
and its equation numbers were not read here.

Pre-training sees several aligned modalities of each image (RGB, depth, segmentation):

    patches    every modality has its own linear patch projection (+ positions) to tokens
    masking    shares p ~ Dir(alpha, ..., alpha) split a fixed number of *visible* tokens across
               the modalities: modality m offers round(p_m * n) random positions (all it has if
               fewer); the candidates, shuffled, come first and the other tokens, shuffled, after,
               and the first n are kept, so exactly n tokens are visible whatever the rounding
    encoder    one ViT over the visible tokens only, plus a learned global token
    decoders   one per modality, shallow: the encoder's tokens are projected to the decoder's
               width and get the decoder's own position and source-modality embeddings back;
               queries are every position of the decoder's modality (the projected encoder token
               where visible, a mask token + position + modality embedding where not); one
               cross-attention from the queries to the visible tokens (no residual around it, as
               in the code), an MLP, a few self-attention blocks, a linear layer to pixel values
    loss       per modality, squared error on the *masked* positions only: a mean per example
               over its masked pixels, then over the examples that have any; summed over modalities

Here the problem's input x is the RGB modality and each task's label is one more modality,
of the task's output shape (p x p patches of a dense map, chunks of a vector). The
pre-training objective is :meth:`MultiMAE.masked_autoencoding_loss` (it needs the labels as
inputs). ``forward(x)`` is the cross-modal query MultiMAE's decoders answer after it: every
x token visible, no task token, each task's decoder predicting its whole map. The training
harness trains that query on the task losses (:attr:`MultiMAE.training_procedure` says so);
the reconstruction decoder of x and the label patch projections learn only from the
pre-training loss.

Left out: ViT-B at 224 x 224 and ImageNet with pseudo-labelled depth and segmentation;
fixed 2-D sine-cosine positions (learned ones here, one table per modality in every decoder,
where the code resizes one table to every modality's grid; its encoder adds the same fixed
positions to every modality with no modality embedding, so a learned table per modality here
also tells the encoder the modality; its decoder's mask token starts at zero and its layer
norms use epsilon 1e-6), the segmentation map's class
embedding input and its cross-entropy loss and the depth L1 loss (every modality here is a
continuous map with the squared error the code uses for RGB), the extra normalised-pixel RGB
decoder, depth standardisation, uniform pre-sampling of which modalities take part, the
uncertainty loss weighting option, and fine-tuning with DPT / linear heads. Our choices: the
default visible budget is half of x's tokens (the code's 98 of 3 x 196 is half of one
modality's); a modality of one token (a one-value task) gets no self-attention blocks in its
decoder, since attention among one query cannot learn; widths and depths are toy sizes and
MLPs are 2x wide.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above, require_non_negative, require_positive
from .base import MultiTaskModel, split_width
from .four_m import symmetric_dirichlet
from .houlsby_adapters import Tokenizer
from .registry import Problem
from .unified_io import Attention, Block


# ----- masking -------------------------------------------------------------------------------


def dirichlet_visible(lengths: Sequence[int], num_visible: int, alpha: float, batch: int,
                      generator: torch.Generator) -> Tensor:
    """Indices (B, n) of the visible tokens in the concatenated pool, sorted, n = ``num_visible``.

    Shares from Dir(alpha) ask each modality for round(share * n) tokens; those candidates are
    kept first (in random order), then random other tokens fill the budget or the surplus is
    cut at random, as the authors' code does to absorb rounding.
    """
    wanted = (symmetric_dirichlet(batch, len(lengths), (alpha,), generator) * num_visible).round().long()
    candidate = []
    for m, length in enumerate(lengths):
        rank = torch.rand(batch, length, generator=generator).argsort(-1).argsort(-1)  # a random order
        candidate.append(rank < wanted[:, m:m + 1])
    noise = torch.rand(batch, sum(lengths), generator=generator)
    order = (noise + (~torch.cat(candidate, dim=1)).float()).argsort(-1)  # candidates in [0, 1), others in [1, 2)
    return order[:, :num_visible].sort(-1).values


# ----- one decoder per modality ----------------------------------------------------------------


class CrossAttentionDecoder(nn.Module):
    """A modality's shallow decoder: queries at its positions cross-attend to the visible tokens."""

    def __init__(self, lengths: Sequence[int], modality: int, encoder_dim: int, dim: int, num_heads: int,
                 depth: int, values_per_token: int):
        super().__init__()
        self.start = sum(lengths[:modality])
        self.stop = self.start + lengths[modality]
        self.project_context = nn.Linear(encoder_dim, dim)
        self.positions = nn.ParameterList(nn.Parameter(torch.randn(n, dim) * 0.02) for n in lengths)
        self.modality_embedding = nn.Parameter(torch.randn(len(lengths), dim) * 0.02)  # one per source modality
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.query_norm, self.context_norm, self.out_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attention = Attention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        # self-attention among a single query is a fixed linear map of it, with dead query and key weights
        depth = depth if lengths[modality] > 1 else 0
        self.blocks = nn.ModuleList(Block(dim, num_heads, cross=False) for _ in range(depth))
        self.to_values = nn.Linear(dim, values_per_token)

    def embeddings(self) -> Tensor:
        """Position + source-modality embedding of every pool position (P, dim)."""
        return torch.cat([p + self.modality_embedding[m] for m, p in enumerate(self.positions)])

    def forward(self, encoded: Tensor, visible: Tensor) -> Tensor:
        """(B, n + globals, encoder_dim) encoder output, (B, n) pool indices -> (B, L_m, values)."""
        n, context = visible.shape[1], self.project_context(encoded)
        embeddings = self.embeddings()
        tokens = context[:, :n] + embeddings[visible]
        # every pool position: mask token + embeddings, or the visible token (with its embeddings)
        full = (self.mask_token + embeddings).expand(encoded.shape[0], -1, -1)
        full = full.scatter(1, visible[..., None].expand(-1, -1, full.shape[-1]), tokens)
        queries = full[:, self.start:self.stop]
        context = torch.cat([tokens, context[:, n:]], dim=1)  # the global tokens get no embedding
        h = self.cross_attention(self.query_norm(queries), self.context_norm(context))  # no residual
        h = h + self.mlp(self.out_norm(h))
        for block in self.blocks:
            h = block(h)
        return self.to_values(h)


# ----- the model ---------------------------------------------------------------------------


class MultiMAE(MultiTaskModel):
    """x and every task's label as modalities; Dirichlet-masked shared encoder; a decoder per modality."""

    name = "multimae"
    training_procedure = ("the network is pre-trained by masked_autoencoding_loss(): a Dirichlet-split budget of "
                          "visible tokens from x and every task label, each modality reconstructed where masked")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = False,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        decoder_depth: int = 2,
        num_tokens: int = 10,
        num_global_tokens: int = 1,
        num_visible: int | None = None,
        alpha: float = 1.0,
    ):
        super().__init__(tasks)
        require_positive(depth=depth)
        require_non_negative(decoder_depth=decoder_depth, num_global_tokens=num_global_tokens)
        require_above(0, alpha=alpha)
        split_width(dim, num_heads)
        self.dense = dense and len(input_shape) == 3
        self.alpha = alpha
        shapes = [tuple(input_shape)] + [self.label_shape(t, input_shape, out_dims) for t in self.tasks]
        self.patches = nn.ModuleList(Tokenizer(shape, dim, num_tokens) for shape in shapes)  # x first
        self.shapes = shapes
        self.lengths = [p.length for p in self.patches]
        self.num_visible = max(1, self.lengths[0] // 2) if num_visible is None else num_visible
        require_positive(num_visible=self.num_visible)
        if self.num_visible > sum(self.lengths):
            raise ValueError(f"num_visible must be at most the {sum(self.lengths)} tokens of all modalities, "
                             f"got {self.num_visible}")
        self.global_tokens = nn.Parameter(torch.randn(num_global_tokens, dim) * 0.02)
        self.encoder = nn.ModuleList(Block(dim, num_heads, cross=False) for _ in range(depth))
        self.decoders = nn.ModuleList(
            CrossAttentionDecoder(self.lengths, m, dim, dim, num_heads, decoder_depth, self.values_per_token(m))
            for m in range(len(shapes)))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "MultiMAE":
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, problem.dense, dim=width, **kw)

    def label_shape(self, task: str, input_shape: Sequence[int], out_dims: Mapping[str, int]) -> tuple[int, ...]:
        dim = out_dims.get(task, 1)
        return (dim, *input_shape[1:]) if self.dense else (dim,)

    # ----- modalities <-> tokens -------------------------------------------------------------

    def values_per_token(self, m: int) -> int:
        patches = self.patches[m]
        return self.shapes[m][0] * patches.patch**2 if patches.grid is not None else patches.chunk

    def untokenize(self, m: int, values: Tensor) -> Tensor:
        """(B, L, values per token) -> modality m's shape: patches back to pixels, chunks to a vector."""
        patches = self.patches[m]
        if patches.grid is None:
            return values.flatten(1)[:, :self.shapes[m][0]]
        grid = values.transpose(1, 2).reshape(values.shape[0], -1, *patches.grid)
        return F.pixel_shuffle(grid, patches.patch)

    def token_mask_to_values(self, m: int, mask: Tensor) -> Tensor:
        """A (B, L) token mask spread over modality m's values, in its shape."""
        values = mask[..., None].expand(-1, -1, self.values_per_token(m)).to(torch.float32)
        return self.untokenize(m, values) > 0.5

    # ----- encoder and decoders -----------------------------------------------------------

    def encode_visible(self, modalities: Sequence[Tensor], visible: Tensor) -> Tensor:
        """The shared encoder over the visible tokens plus the global tokens: (B, n + globals, dim)."""
        pool = torch.cat([patches(data) for patches, data in zip(self.patches, modalities)], dim=1)
        h = pool.gather(1, visible[..., None].expand(-1, -1, pool.shape[-1]))
        h = torch.cat([h, self.global_tokens.expand(h.shape[0], -1, -1)], dim=1)
        for block in self.encoder:
            h = block(h)
        return h

    def predict(self, encoded: Tensor, visible: Tensor, m: int) -> Tensor:
        return self.untokenize(m, self.decoders[m](encoded, visible))

    def masked_autoencoding_loss(self, x: Tensor, labels: Mapping[str, Tensor], generator: torch.Generator) -> Tensor:
        """MultiMAE's objective: reconstruct every modality where it is masked, from the visible tokens."""
        modalities = [x] + [labels[t] for t in self.tasks]
        visible = dirichlet_visible(self.lengths, self.num_visible, self.alpha, x.shape[0], generator).to(x.device)
        encoded = self.encode_visible(modalities, visible)
        is_visible = torch.zeros(x.shape[0], sum(self.lengths), dtype=torch.bool, device=x.device)
        is_visible = is_visible.scatter(1, visible, True)
        total, start = x.new_zeros(()), 0
        for m, (data, length) in enumerate(zip(modalities, self.lengths)):
            masked = self.token_mask_to_values(m, ~is_visible[:, start:start + length]).to(x.dtype)
            start += length
            error = (self.predict(encoded, visible, m) - data).square() * masked
            count = masked.flatten(1).sum(1)
            per_example = error.flatten(1).sum(1) / count.clamp(min=1)  # mean over its masked values
            has_masked = count > 0
            if has_masked.any():  # the code's nanmean over examples; a modality with nothing masked adds 0
                total = total + per_example[has_masked].mean()
        return total

    # ----- x -> every task ------------------------------------------------------------------

    def all_of_x(self, batch: int, device: torch.device) -> Tensor:
        return torch.arange(self.lengths[0], device=device).expand(batch, -1)

    def encode(self, x: Tensor) -> Tensor:
        """Every token of x visible, no task token: (B, L_x + globals, dim)."""
        return self.encode_visible([x], self.all_of_x(x.shape[0], x.device))

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        visible = self.all_of_x(z.shape[0], z.device)
        return {t: self.predict(z, visible, m) for m, t in enumerate(self.tasks, start=1)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's decoder; its label's patch projection is an input every decoder reads."""
        yield from self.decoders[1 + self.tasks.index(task)].parameters()
