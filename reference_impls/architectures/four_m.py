"""4M: predict a random subset of every modality's tokens from another, disjoint random subset.

Mizrahi, Bachmann, Kar, Yeo, Gao, Dehghan, Zamir. "4M: Massively Multimodal Masked
Modeling", NeurIPS 2023 (arXiv:2312.06647). Structure and sampling follow the authors' code
(github.com/apple/ml-4m, ``fourm/models/fm.py`` and ``fourm/data/masking.py``); the paper
describes the method in prose, so the steps below are named rather than numbered.

Every modality is first turned into a set of discrete tokens by its own frozen tokenizer.
One transformer encoder-decoder is then trained on all modalities at once:

    budgets    for each sample, shares p ~ Dir(alpha, ..., alpha) over the modalities split a
               fixed number of *input* tokens, and an independent draw splits a fixed number
               of *target* tokens (a modality never gives more tokens than it has)
    subsets    inside each modality a random set of positions of that size becomes input and
               a disjoint random set becomes target; everything else is dropped
    encoder    input token = embedding of its id + its position + its modality's embedding
    decoder    one query per target token = a shared mask token + position + modality
               embedding (no content); queries cross-attend to the encoder's context (its
               normalised output, linearly projected, with each input token's position and
               modality embeddings added back, as ``fm.py`` does, and layer-normalised again in
               every decoder block before it gives keys and values, as ``fm_utils.py``'s
               decoder blocks do) and self-attend only to
               queries of their own modality; each modality has its own logit layer
    loss       cross-entropy per target token, averaged within and then across modalities
               (the code's per-modality loss: a modality with no target token in the batch
               counts as 0 in the second mean; the code also offers a plain per-token mean,
               and the released configurations use the per-modality one, ``loss_type: mod``)

Because the decoder queries carry no token content, a target's prediction depends on the
*input* tokens only (tested), and the same weights serve any input-to-output combination.

Here the repository's tasks are 4M's output modalities. The problem's input x plays the
role of 4M's RGB pixels: an input-only modality read by a learned patch (or feature-chunk)
projection, as 4M does for transfer. Each task t is a tokenised modality: a dense map is cut
into p x p patches, each replaced by the nearest entry of a fixed random codebook (the
frozen VQ-VAE's stand-in); a vector task's values are binned. :meth:`FourM.masked_modeling_loss`
is the 4M objective over all of them (it needs the labels, which are inputs too).
``forward(x)`` is the x -> all-tasks query the repository trains: every pixel token is
input, every task token a target, decoded in one parallel pass; the token distribution is
read *softly* (expected bin value / codebook patch) so that MSE training works as well.
The training harness trains that query only, on the task losses: the 4M objective needs the
labels as inputs, which a model's forward pass does not get (:attr:`FourM.training_procedure`
says so).

Left out: the pretrained tokenizers (VQ-VAEs with diffusion decoders, WordPiece), every real
modality and the CC12M pseudo-labelled data, sequence modalities with span masking and
autoregressive decoding (all task modalities here are decoded in parallel, like 4M's
image-like ones), MaskGIT-style iterative generation with classifier-free guidance, the
RGB -> all half of the official masking mixture (``forward`` trains that direction directly),
fixed sine-cosine positions (learned ones are used), and the model scale. The official code
(apple/ml-4m at cda590f) also shares each modality's embedding between encoder and decoder,
hands out leftover tokens with extra random Dirichlet draws (largest fractional parts here),
and uses bias-free SwiGLU MLPs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer
from .registry import Problem
from .unified_io import Attention


# ----- token budgets and subsets ---------------------------------------------------------


def symmetric_dirichlet(n: int, k: int, alphas: Sequence[float], generator: torch.Generator,
                        component: Tensor | None = None) -> Tensor:
    """(n, k) shares, each row from Dir(alpha, ..., alpha) with alpha drawn uniformly from ``alphas``.

    A list of several alphas is a mixture of symmetric Dirichlets (4M-21's masking mix);
    ``component`` (n,) fixes which alpha each row uses instead of drawing it.

    The shares are normalised Gamma(alpha) draws, taken in log space: a Gamma(alpha) draw is
    Gamma(alpha + 1) * U^(1/alpha) with U uniform, and for tiny alphas U^(1/alpha) underflows
    to 0 in every coordinate, where normalising would give 0/0. Its logarithm stays finite.
    """
    if component is None:
        component = torch.randint(len(alphas), (n,), generator=generator)
    concentration = torch.tensor(alphas, dtype=torch.float64)[component, None].expand(n, k)
    uniform = torch.rand(n, k, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # Gamma takes no generator: seed a private stream
        torch.manual_seed(seed)
        shifted = torch.distributions.Gamma(concentration + 1, 1.0).sample()
    log_gamma = shifted.log() + uniform.log() / concentration
    return log_gamma.softmax(-1).float()


def allocate(shares: Tensor, total: int, capacity: Tensor) -> Tensor:
    """Integer budgets (B, M) summing to ``total`` in proportion to ``shares``, capped by ``capacity``.

    Floors first, then the leftover tokens go to the largest fractional parts; a modality
    never gives more tokens than it has left (the cap can leave the sum below ``total``).
    """
    raw = shares * total
    counts = raw.floor().long()
    leftover = total - counts.sum(-1, keepdim=True)
    rank = (raw - counts).argsort(-1, descending=True).argsort(-1)
    counts = counts + (rank < leftover).long()
    return torch.minimum(counts, capacity)


@dataclass
class TokenSample:
    """One draw of 4M's masking: which pool positions are input / target, and the budgets."""

    inputs: Tensor  # (B, P) bool
    targets: Tensor  # (B, P) bool, disjoint from inputs
    input_budget: Tensor  # (B, M) tokens per modality
    target_budget: Tensor  # (B, M)


def gather_selected(tokens: Tensor, selected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Selected rows of (B, P, D) packed to the front: tokens (B, n, D), valid (B, n), pool index (B, n)."""
    n = max(int(selected.sum(1).max()), 1)
    index = torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)[:, :n]
    packed = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    return packed, selected.gather(1, index), index


# ----- transformer ---------------------------------------------------------------------------


class MaskedBlock(nn.Module):
    """Pre-LN block: masked self-attention, optional masked cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, cross: bool):
        super().__init__()
        self.norm1, self.self_attention = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.norm_context = nn.LayerNorm(dim) if cross else None  # keys/values, as fm_utils.py's blocks
        self.cross_attention = Attention(dim, num_heads) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, self_mask: Tensor, memory: Tensor | None = None,
                cross_mask: Tensor | None = None) -> Tensor:
        normed = self.norm1(h)
        h = h + self.self_attention(normed, normed, self_mask)
        if self.cross_attention is not None:
            h = h + self.cross_attention(self.norm_cross(h), self.norm_context(memory), cross_mask)
        return h + self.mlp(self.norm2(h))


# ----- the model ---------------------------------------------------------------------------


class FourM(MultiTaskModel):
    """Input x (pixels) plus one tokenised modality per task; one masked encoder-decoder."""

    name = "four_m"
    training_procedure = ("the network is trained by masked_modeling_loss(): random disjoint input and target token "
                          "subsets of every modality, the task labels included, with Dirichlet-drawn budgets")
    default_alphas: tuple[float, ...] = (0.5,)

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = False,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        num_bins: int = 32,
        value_range: float = 4.0,
        codebook_size: int = 64,
        num_tokens: int = 10,
        alphas: Sequence[float] | None = None,
        input_tokens: int | None = None,
        target_tokens: int | None = None,
        seed: int = 0,
    ):
        super().__init__(tasks)
        require_positive(codebook_size=codebook_size, num_bins=num_bins)
        self.out_dims = {t: out_dims.get(t, 1) for t in self.tasks}
        self.dense = dense and len(input_shape) == 3
        self.alphas = tuple(alphas or self.default_alphas)
        self.pixels = Tokenizer(input_shape, dim, num_tokens)  # 4M's RGB-pixel input projection
        self.patch, self.grid = self.pixels.patch, self.pixels.grid
        self._build_tokenizers(num_bins, value_range, codebook_size, seed)
        lengths = self.modality_lengths()
        self.register_buffer("lengths", torch.tensor(lengths))
        self.register_buffer("modality_of", torch.repeat_interleave(torch.arange(len(lengths)), self.lengths))
        pool, task_pool = sum(lengths), sum(lengths[1:])
        self.input_tokens = max(1, pool // 2) if input_tokens is None else input_tokens
        self.target_tokens = max(1, task_pool // 2) if target_tokens is None else target_tokens
        require_positive(input_tokens=self.input_tokens, target_tokens=self.target_tokens)

        def small(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * 0.02)

        self.token_embedding = nn.ModuleDict({t: nn.Embedding(len(self.table(t)), dim) for t in self.tasks})
        self.positions = nn.ParameterDict({t: small(self.token_length(t), dim) for t in self.tasks})
        self.pixel_modality = small(dim)
        self.input_modality = nn.ParameterDict({t: small(dim) for t in self.tasks})
        self.query_modality = nn.ParameterDict({t: small(dim) for t in self.tasks})
        self.mask_token = small(dim)
        self.encoder = nn.ModuleList(MaskedBlock(dim, num_heads, cross=False) for _ in range(depth))
        self.decoder = nn.ModuleList(MaskedBlock(dim, num_heads, cross=True) for _ in range(depth))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.context_projection = nn.Linear(dim, dim)  # encoder output -> decoder context
        self.to_logits = nn.ModuleDict({t: nn.Linear(dim, len(self.table(t))) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "FourM":
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, problem.dense, dim=width, **kw)

    # ----- frozen tokenizers: values <-> token ids -----------------------------------------

    def _build_tokenizers(self, num_bins: int, value_range: float, codebook_size: int, seed: int) -> None:
        """Value bins (vector tasks) or a fixed random codebook of p x p patches per dense task."""
        g = torch.Generator().manual_seed(seed)
        for t in self.tasks:
            if self.dense:
                table = torch.randn(codebook_size, self.out_dims[t] * self.patch**2, generator=g)
            else:
                table = torch.linspace(-value_range, value_range, num_bins)[:, None]
            self.register_buffer(f"table_{t}", table)

    def table(self, task: str) -> Tensor:
        """(vocabulary, values per token): what each of ``task``'s token ids stands for."""
        return getattr(self, f"table_{task}")

    def token_length(self, task: str) -> int:
        return self.pixels.length if self.dense else self.out_dims[task]

    def modality_lengths(self) -> list[int]:
        """Tokens per modality (pixels, then each task), as Python ints: meta models can read them too."""
        return [self.pixels.length] + [self.token_length(t) for t in self.tasks]

    def tokenize(self, task: str, y: Tensor) -> Tensor:
        """Label -> token ids (B, L): nearest bin per value, nearest codebook entry per patch."""
        values = F.pixel_unshuffle(y, self.patch).flatten(2).transpose(1, 2) if self.dense else y[..., None]
        return torch.cdist(values, self.table(task).expand(y.shape[0], -1, -1)).argmin(-1)

    def detokenize(self, task: str, values: Tensor) -> Tensor:
        """(B, L, values per token) -> the task's output shape."""
        if not self.dense:
            return values[..., 0]
        grid = values.transpose(1, 2).reshape(values.shape[0], -1, *self.grid)
        return F.pixel_shuffle(grid, self.patch)

    # ----- masking -----------------------------------------------------------------------

    def sample_tokens(self, batch: int, generator: torch.Generator) -> TokenSample:
        """Dirichlet budgets per sample, then disjoint random input / target positions per modality.

        A sample draws one alpha of the mixture for both of its budgets, as 4M's masking does.
        """
        modalities = len(self.lengths)
        capacity = self.lengths.cpu().expand(batch, -1)
        component = torch.randint(len(self.alphas), (batch,), generator=generator)
        input_budget = allocate(symmetric_dirichlet(batch, modalities, self.alphas, generator, component),
                                self.input_tokens, capacity)
        target_shares = torch.zeros(batch, modalities)  # x is input-only, like 4M's RGB pixels
        target_shares[:, 1:] = symmetric_dirichlet(batch, modalities - 1, self.alphas, generator, component)
        target_budget = allocate(target_shares, self.target_tokens, capacity - input_budget)
        scores = torch.rand(batch, int(self.lengths.sum()), generator=generator)
        inputs, targets = torch.zeros_like(scores, dtype=torch.bool), torch.zeros_like(scores, dtype=torch.bool)
        start = 0
        for m, length in enumerate(self.lengths.tolist()):
            rank = scores[:, start:start + length].argsort(-1).argsort(-1)  # a random order per sample
            lo, hi = input_budget[:, m:m + 1], input_budget[:, m:m + 1] + target_budget[:, m:m + 1]
            inputs[:, start:start + length] = rank < lo
            targets[:, start:start + length] = (rank >= lo) & (rank < hi)
            start += length
        device = self.lengths.device
        return TokenSample(inputs.to(device), targets.to(device), input_budget, target_budget)

    # ----- encoder and decoder --------------------------------------------------------------

    def embed_pool(self, x: Tensor, ids: Mapping[str, Tensor] | None) -> Tensor:
        """Every possible encoder token (B, P, dim): pixels, then each task's tokens (ids 0 if unknown)."""
        parts = [self.pixels(x) + self.pixel_modality]
        for t in self.tasks:
            tokens = ids[t] if ids is not None else x.new_zeros(x.shape[0], self.token_length(t), dtype=torch.long)
            parts.append(self.token_embedding[t](tokens) + self.positions[t] + self.input_modality[t])
        return torch.cat(parts, dim=1)

    def pool_embeddings(self) -> Tensor:
        """Position + modality embedding of every encoder token (P, dim), without its content."""
        parts = [self.pixels.positions + self.pixel_modality]
        parts += [self.positions[t] + self.input_modality[t] for t in self.tasks]
        return torch.cat(parts, dim=0)

    def query_pool(self, batch: int) -> Tensor:
        """Every possible decoder query (B, P, dim): mask token + position + modality, no content."""
        first = self.mask_token.expand(self.pixels.length, -1)  # x is never a target
        parts = [first] + [self.mask_token + self.positions[t] + self.query_modality[t] for t in self.tasks]
        return torch.cat(parts, dim=0).expand(batch, -1, -1)

    def encode_inputs(self, pool: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder over the selected input tokens only: the decoder's context (B, N, dim), validity.

        The context is the projected encoder output plus each token's position and modality
        embedding once more, so queries can find inputs by where and what they are.
        """
        h, valid, index = gather_selected(pool, inputs)
        mask = valid[:, None, None, :] | torch.eye(h.shape[1], dtype=torch.bool, device=h.device)
        for block in self.encoder:
            h = block(h, mask)
        return self.context_projection(self.encoder_norm(h)) + self.pool_embeddings()[index], valid

    def decode_targets(self, memory: Tensor, memory_valid: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder states (B, n, dim) of the target queries, their validity and pool positions."""
        h, valid, index = gather_selected(self.query_pool(memory.shape[0]), targets)
        modality = self.modality_of[index]
        same = (modality[:, :, None] == modality[:, None, :]) & valid[:, None, :]  # within a modality only
        self_mask = (same | torch.eye(h.shape[1], dtype=torch.bool, device=h.device))[:, None]
        cross_mask = memory_valid[:, None, None, :]
        for block in self.decoder:
            h = block(h, self_mask, memory, cross_mask)
        return self.decoder_norm(h), valid, index

    def target_logits(self, x: Tensor, ids: Mapping[str, Tensor] | None, sample: TokenSample) -> dict[str, Tensor]:
        """Logits of every valid target token, per task, in pool order: {task: (n_t, vocab_t)}."""
        memory, memory_valid = self.encode_inputs(self.embed_pool(x, ids), sample.inputs)
        h, valid, index = self.decode_targets(memory, memory_valid, sample.targets)
        modality = self.modality_of[index]
        return {t: self.to_logits[t](h[valid & (modality == m)]) for m, t in enumerate(self.tasks, start=1)}

    def masked_modeling_loss(self, x: Tensor, labels: Mapping[str, Tensor], generator: torch.Generator) -> Tensor:
        """The 4M objective: CE on sampled target tokens given sampled input tokens of all modalities."""
        ids = {t: self.tokenize(t, labels[t]) for t in self.tasks}
        sample = self.sample_tokens(x.shape[0], generator)
        logits = self.target_logits(x, ids, sample)
        pool_ids = torch.cat([x.new_zeros(x.shape[0], self.pixels.length, dtype=torch.long)] + [ids[t] for t in self.tasks], 1)
        total = x.new_zeros(())
        for m, t in enumerate(self.tasks, start=1):
            chosen = sample.targets & (self.modality_of == m)
            if chosen.any():  # a modality without targets adds 0
                total = total + F.cross_entropy(logits[t], pool_ids[chosen])  # mean within a modality
        return total / len(self.tasks)  # mean across every target modality

    # ----- x -> every task --------------------------------------------------------------

    def all_tasks_sample(self, batch: int) -> TokenSample:
        """The query forward() answers: every pixel token in, every task token out."""
        is_pixel = (self.modality_of == 0).expand(batch, -1)
        lengths = torch.tensor(self.modality_lengths()).expand(batch, -1)  # budgets on the CPU, as sample_tokens'
        pixel_only = torch.zeros_like(lengths)
        pixel_only[:, 0] = lengths[:, 0]
        return TokenSample(is_pixel, ~is_pixel, pixel_only, lengths - pixel_only)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.target_logits(x, None, self.all_tasks_sample(x.shape[0]))
        outputs = {}
        for t in self.tasks:
            probabilities = torch.softmax(logits[t], -1).view(x.shape[0], self.token_length(t), -1)
            outputs[t] = self.detokenize(t, probabilities @ self.table(t))  # expected value per token
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's query modality embedding and logit layer; its input embeddings feed everyone."""
        yield self.query_modality[task]
        yield from self.to_logits[task].parameters()
