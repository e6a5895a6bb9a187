"""Unified-IO: every task is sequence-to-sequence over one shared token vocabulary.

Lu, Clark, Zellers, Mottaghi, Kembhavi. "Unified-IO: A Unified Model for Vision,
Language, and Multi-Modal Tasks", ICLR 2023 (arXiv:2206.08916).

Unified-IO has no task-specific module at all. Every input and every output is turned
into a sequence of discrete tokens from one vocabulary that holds text word pieces,
quantised location tokens (coordinates binned into 1000 values) and the codes of a frozen
VQ-GAN image tokeniser (dense outputs such as depth or segmentation are written as
images). One T5-style encoder-decoder transformer reads the input image (as patch
features) together with a text prompt that names the task, and writes the answer token by
token, each token conditioned on the ones before it (causal decoding, trained with
teacher forcing and cross-entropy). Which task is performed is decided only by the
prompt's tokens: the weights are the same for every task. The paper's formulas are not
numbered.

Our small version keeps exactly that split:

    vocabulary   [pad, bos] + prompt words + ``num_bins`` value/location bins
                 + ``codebook_size`` image codes (dense problems only)
    encoder      [embedded prompt words; input tokens]  (the input is cut into tokens by
                 :class:`.houlsby_adapters.Tokenizer`: linear patches or feature chunks)
    decoder      causal transformer with cross-attention; logits over the whole vocabulary
    outputs      a vector task's d values are d bin tokens; a dense task's map is one image
                 code per patch, decoded by a fixed codebook of p x p x C pixel patches
                 (the frozen VQ-GAN's stand-in); a task with fewer than C channels reads
                 its first channels, so even the detokeniser is shared.

:meth:`teacher_forced_logits` and :meth:`loss` give the paper's training objective;
:meth:`generate` is greedy decoding. ``forward`` decodes *softly*: each step's distribution,
restricted to the token range of the expected output, yields the expected bin centre or
codebook patch, and the expected token embedding is fed back as the next decoder input.
Restricting decoding to the output's token range follows the official code, which masks the
logits to the output type's vocabulary in decoding and in its training pass (allenai/
unified-io-inference at ee0bd9d, model.py and network.py; :meth:`teacher_forced_logits` here
does not mask); the soft feedback is our choice, made so the model can also be trained
through ``forward`` with the task losses (MSE, say),
which is what the repository's training loop does; that is not the paper's training, and
``training_procedure`` says so (Unified-IO 2 inherits it: it is trained the same way).

Both decodings keep a key-value cache: each decoder block stores the keys and values of the
earlier positions, so a step runs the decoder over the new position only, with the numbers of
rerunning it over the whole prefix (``cache=False``; tested). The rerun costs O(L²) position
passes for L answer tokens, which mattered on images no patch size above 1 tiles (17 x 23:
391 tokens); ``benchmarks/decoding_cache.py`` times both.

Left out: the pretrained T5 weights and tokenizer, the pretrained VQ-GAN (here a fixed
random codebook and nearest-neighbour encoding), the 2-stage pre-training (denoising) and
the 95-dataset multi-task mixture, image inputs beyond one resolution, dropout, and T5's
relative position biases (learned absolute positions are used instead). The official model
also ties its output layer to the token embedding (scaled by 1/sqrt(d)), adds segment
embeddings and learned absolute-position attention biases in the encoder, normalises the
embedded inputs, and uses T5's RMSNorm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .houlsby_adapters import Tokenizer
from .registry import Problem

PAD, BOS = 0, 1


def rotate_pairs(t: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive feature pairs of ``t`` (..., N, D) by ``angles`` (N, D/2).

    Angles come in float32 whatever the model's dtype (large positions need it); their
    cosines and sines take ``t``'s dtype so a float64 or half model stays in its dtype.
    """
    pairs = t.reshape(*t.shape[:-1], -1, 2)
    cos, sin = angles.cos().to(t.dtype), angles.sin().to(t.dtype)
    x, y = pairs[..., 0], pairs[..., 1]
    return torch.stack([x * cos - y * sin, x * sin + y * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    """Multi-head attention with optional LayerNorm on queries/keys and rotary angles."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, split_width(dim, num_heads)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()

    def _split(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, x: Tensor, memory: Tensor, q_angles: Tensor | None = None,
                k_angles: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, heads, Nq, head_dim) from ``x``, keys and values from ``memory``."""
        k, v = self.key_value(memory).chunk(2, dim=-1)
        q, k, v = self.q_norm(self._split(self.query(x))), self.k_norm(self._split(k)), self._split(v)
        if q_angles is not None:
            q, k = rotate_pairs(q, q_angles), rotate_pairs(k, k_angles)
        return q, k, v

    def logits(self, x: Tensor, memory: Tensor, q_angles: Tensor | None = None,
               k_angles: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Attention logits (B, heads, Nq, Nk) and the values they weight."""
        q, k, v = self.project(x, memory, q_angles, k_angles)
        return q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), v

    def extend(self, x: Tensor, past: list[Tensor], angles: Tensor | None = None) -> Tensor:
        """Causal self-attention of one new position ``x`` (B, 1, dim) over itself and the
        earlier positions whose keys and values ``past`` holds; ``past`` is extended in place.

        A causal layer never lets an earlier position see a later one, so the earlier keys and
        values do not change as positions are added: this gives the last row of
        ``forward(h, h, causal mask)`` over the whole prefix, at the cost of one position.
        """
        q, k, v = self.project(x, x, angles, angles)
        if past:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        past[:] = [k, v]
        mixed = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(x.shape))

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor | None = None,
                q_angles: Tensor | None = None, k_angles: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
        logits, v = self.logits(x, memory, q_angles, k_angles)
        if bias is not None:  # added to every head's logits (VTAGML's task-adapted attention)
            logits = logits + bias
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        mixed = torch.softmax(logits, dim=-1) @ v
        return self.out(mixed.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(self, dim: int, num_heads: int, cross: bool, qk_norm: bool = False):
        super().__init__()
        self.norm1, self.self_attention = nn.LayerNorm(dim), Attention(dim, num_heads, qk_norm)
        self.cross_attention = Attention(dim, num_heads, qk_norm) if cross else None
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, memory: Tensor | None = None, mask: Tensor | None = None,
                angles: Tensor | None = None, memory_angles: Tensor | None = None) -> Tensor:
        """``memory_angles``: the memory's rotary angles; with them, cross-attention turns the
        queries by ``angles`` and the keys by ``memory_angles``."""
        normed = self.norm1(h)
        h = h + self.self_attention(normed, normed, mask, angles, angles)
        if self.cross_attention is not None:
            cross_angles = (angles, memory_angles) if memory_angles is not None else (None, None)
            h = h + self.cross_attention(self.norm_cross(h), memory, None, *cross_angles)
        return h + self.mlp(self.norm2(h))

    def step(self, h: Tensor, past: list[Tensor], memory: Tensor | None = None,
             angles: Tensor | None = None, memory_angles: Tensor | None = None) -> Tensor:
        """:meth:`forward` of a causal block for one new position ``h`` (B, 1, dim), its
        self-attention reading the earlier positions' keys and values from ``past``
        (:meth:`Attention.extend`); ``angles`` are the new position's alone."""
        normed = self.norm1(h)
        h = h + self.self_attention.extend(normed, past, angles)
        if self.cross_attention is not None:
            cross_angles = (angles, memory_angles) if memory_angles is not None else (None, None)
            h = h + self.cross_attention(self.norm_cross(h), memory, None, *cross_angles)
        return h + self.mlp(self.norm2(h))


class UnifiedIO(MultiTaskModel):
    """One encoder-decoder over a shared vocabulary; the task is a text prompt."""

    name = "unified_io"
    training_procedure = ("every answer is tokenised and trained by loss(x, targets), teacher-forced token "
                          "cross-entropy, and generate() decodes greedily at test time")
    qk_norm = False  # Unified-IO 2 switches these on (see :mod:`.unified_io_2`)

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = False,
        prompts: Mapping[str, str] | None = None,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        num_bins: int = 32,
        value_range: float = 4.0,
        codebook_size: int = 64,
        num_tokens: int = 10,
        seed: int = 0,
    ):
        super().__init__(tasks)
        require_positive(codebook_size=codebook_size, num_bins=num_bins)
        self.out_dims = {t: out_dims.get(t, 1) for t in self.tasks}
        self.dense = dense and len(input_shape) == 3
        prompts = dict(prompts or {t: f"predict {t}" for t in self.tasks})
        words = sorted({w for t in self.tasks for w in prompts[t].split()})
        self.words = {w: 2 + i for i, w in enumerate(words)}  # text tokens
        self.bin_start = 2 + len(words)
        self.image_start = self.bin_start + num_bins
        self.vocab_size = self.image_start + (codebook_size if self.dense else 0)
        for t in self.tasks:
            self.register_buffer(f"prompt_{t}", torch.tensor([self.words[w] for w in prompts[t].split()]))
        self.register_buffer("bin_centres", torch.linspace(-value_range, value_range, num_bins))

        self.inputs = Tokenizer(input_shape, dim, num_tokens)
        self.embedding = nn.Embedding(self.vocab_size, dim)  # one table for every modality
        self.prompt_positions = nn.Parameter(torch.randn(max(len(p.split()) for p in prompts.values()), dim) * 0.02)
        self.channels = max(self.out_dims.values())
        if self.dense:
            g = torch.Generator().manual_seed(seed)
            patch = self.inputs.patch
            self.register_buffer("codebook", torch.randn(codebook_size, self.channels * patch * patch, generator=g))
        self.max_len = self.inputs.length if self.dense else max(self.out_dims.values())
        self.target_positions = nn.Parameter(torch.randn(self.max_len, dim) * 0.02)
        self.encoder = nn.ModuleList(Block(dim, num_heads, False, self.qk_norm) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(dim)  # a pre-LN stack ends in a norm, as T5's encoder does
        self.decoder = nn.ModuleList(Block(dim, num_heads, True, self.qk_norm) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, self.vocab_size)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "UnifiedIO":
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, problem.dense, dim=width, **kw)

    def prompt(self, task: str) -> Tensor:
        """The token ids of ``task``'s text prompt."""
        return getattr(self, f"prompt_{task}")

    # ----- encoder -------------------------------------------------------------------

    def encode_prompted(self, x: Tensor, prompt: Tensor) -> Tensor:
        """Layer-normalised encoder states of [prompt words; input tokens]: (B, P + N, dim)."""
        words = self.embedding(prompt) + self.prompt_positions[: len(prompt)]
        h = torch.cat([words.expand(x.shape[0], -1, -1), self.embed_input(x)], dim=1)
        angles = self.encoder_angles(len(prompt))
        for block in self.encoder:
            h = block(h, angles=angles)
        return self.encoder_norm(h)

    def embed_input(self, x: Tensor) -> Tensor:
        """Input tokens (B, N, dim): linear patches or feature chunks, as in Unified-IO."""
        return self.inputs(x)

    def encoder_angles(self, prompt_length: int) -> Tensor | None:
        return None  # rotary positions: Unified-IO 2 only

    def decoder_angles(self, length: int) -> Tensor | None:
        return None

    # ----- decoder -------------------------------------------------------------------

    def target_range(self) -> tuple[int, int]:
        """Token ids a task's answer is drawn from: image codes (dense) or value bins."""
        if self.dense:
            return self.image_start, self.vocab_size
        return self.bin_start, self.image_start

    def run_decoder(self, inputs: Tensor, memory: Tensor, memory_angles: Tensor | None = None) -> Tensor:
        """Causal decoder over embedded inputs (B, L, dim): logits (B, L, vocab).

        ``memory_angles``: the encoder's rotary angles (``encoder_angles``), if it has any.
        """
        length = inputs.shape[1]
        h = inputs + self.target_positions[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        angles = self.decoder_angles(length)
        for block in self.decoder:
            h = block(h, memory, causal, angles, memory_angles)
        return self.lm_head(self.final_norm(h))

    def decode_step(self, token: Tensor, position: int, angles: Tensor | None, memory: Tensor,
                    memory_angles: Tensor | None, past: list[list[Tensor]]) -> Tensor:
        """Next-token logits (B, vocab) after the embedded ``token`` (B, dim) at ``position``,
        whose rotary angles (1, head_dim / 2) are ``angles`` (None without rotary positions).

        Equal to ``run_decoder(all inputs so far)[:, -1]`` (tested), but each block reads the
        earlier positions' keys and values from ``past`` (one list per block, filled by the
        earlier steps) instead of recomputing them: decoding L tokens runs the decoder over
        L positions, not L (L + 1) / 2, and attention costs O(L²) instead of O(L³).
        """
        h = (token + self.target_positions[position])[:, None]
        for block, block_past in zip(self.decoder, past):
            h = block.step(h, block_past, memory, angles, memory_angles)
        return self.lm_head(self.final_norm(h))[:, 0]

    def target_length(self, task: str) -> int:
        return self.inputs.length if self.dense else self.out_dims[task]

    def teacher_forced_logits(self, x: Tensor, task: str, targets: Tensor) -> Tensor:
        """Logits (B, L, vocab) for target tokens (B, L); position i sees targets[:, :i] only."""
        prompt = self.prompt(task)
        bos = torch.full_like(targets[:, :1], BOS)
        inputs = self.embedding(torch.cat([bos, targets[:, :-1]], dim=1))
        return self.run_decoder(inputs, self.encode_prompted(x, prompt), self.encoder_angles(len(prompt)))

    def loss(self, x: Tensor, targets: Mapping[str, Tensor]) -> Tensor:
        """The training objective: summed token cross-entropy of every task's answer."""
        total = x.new_zeros(())
        for t in self.tasks:
            tokens = self.tokenize_targets(t, targets[t])
            logits = self.teacher_forced_logits(x, t, tokens)
            total = total + F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        return total

    def decoder_stream(self, memory: Tensor, memory_angles: Tensor | None,
                       cache: bool = True) -> Callable[[Tensor], Tensor]:
        """A function from each next embedded decoder input (B, dim), in order, to the logits
        (B, vocab) of the token that follows it.

        With ``cache`` each block keeps the earlier positions' keys and values
        (:meth:`decode_step`); without, every call reruns :meth:`run_decoder` over all the
        inputs so far and reads the last position: the plain definition, kept to test and to
        benchmark the cache against (``benchmarks/decoding_cache.py``).
        """
        past: list[list[Tensor]] = [[] for _ in self.decoder]
        inputs: list[Tensor] = []
        angles = self.decoder_angles(self.max_len)  # every answer position's, computed once

        def next_logits(token: Tensor) -> Tensor:
            inputs.append(token)
            if cache:
                p = len(inputs) - 1
                here = None if angles is None else angles[p:p + 1]
                return self.decode_step(token, p, here, memory, memory_angles, past)
            return self.run_decoder(torch.stack(inputs, dim=1), memory, memory_angles)[:, -1]

        return next_logits

    @torch.no_grad()
    def generate(self, x: Tensor, task: str, cache: bool = True) -> tuple[Tensor, Tensor]:
        """Greedy decoding within the answer's token range: tokens (B, L), step logits (B, L, V)."""
        prompt = self.prompt(task)
        (lo, hi), memory = self.target_range(), self.encode_prompted(x, prompt)
        next_logits = self.decoder_stream(memory, self.encoder_angles(len(prompt)), cache)
        tokens = torch.full((x.shape[0], 1), BOS, dtype=torch.long, device=x.device)
        steps = []
        for _ in range(self.target_length(task)):
            logits = next_logits(self.embedding(tokens[:, -1]))
            steps.append(logits)
            tokens = torch.cat([tokens, lo + logits[:, lo:hi].argmax(-1, keepdim=True)], dim=1)
        return tokens[:, 1:], torch.stack(steps, dim=1)

    def soft_decode(self, x: Tensor, task: str, cache: bool = True) -> Tensor:
        """Differentiable decoding: expected bin value / codebook patch at every step."""
        prompt = self.prompt(task)
        (lo, hi), memory = self.target_range(), self.encode_prompted(x, prompt)
        next_logits = self.decoder_stream(memory, self.encoder_angles(len(prompt)), cache)
        table = self.codebook if self.dense else self.bin_centres[:, None]
        token = self.embedding.weight[BOS].expand(x.shape[0], -1)
        expected = []
        for _ in range(self.target_length(task)):
            p = torch.softmax(next_logits(token)[:, lo:hi], dim=-1)
            expected.append(p @ table)
            token = p @ self.embedding.weight[lo:hi]
        return torch.stack(expected, dim=1)  # (B, L, 1) or (B, L, C p p)

    # ----- tokenising and detokenising answers ------------------------------------------

    def tokenize_targets(self, task: str, y: Tensor) -> Tensor:
        """Answer -> token ids: nearest bin per value, nearest codebook patch per patch."""
        if not self.dense:
            return self.bin_start + (y[..., None] - self.bin_centres).abs().argmin(-1)
        y = F.pad(y, (0, 0, 0, 0, 0, self.channels - y.shape[1]))  # missing channels read as 0
        patches = F.pixel_unshuffle(y, self.inputs.patch).flatten(2).transpose(1, 2)
        distances = torch.cdist(patches, self.codebook.expand(y.shape[0], -1, -1))
        return self.image_start + distances.argmin(-1)

    def detokenize(self, task: str, values: Tensor) -> Tensor:
        """(B, L, 1) values or (B, L, C p p) patches -> the task's output shape."""
        if not self.dense:
            return values[..., 0]
        b, n, _ = values.shape
        grid = values.transpose(1, 2).reshape(b, -1, *self.inputs.grid)
        return F.pixel_shuffle(grid, self.inputs.patch)[:, : self.out_dims[task]]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.detokenize(t, self.soft_decode(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """None: a task is named only by its prompt tokens; every weight is shared."""
        return iter(())
