"""GPV-1: one vision-language model answers every task from an image and a text description.

Gupta, Kamath, Kembhavi, Hoiem. "Towards General Purpose Vision Systems", arXiv 2021
(arXiv:2104.00743). The structure follows the authors' official code (github.com/allenai/gpv-1:
``exp/gpv/models/gpv.py``, ``answer_head.py``, ``vilbert.py``, ``detr.py``, ``configs/exp/gpv.yaml``);
no equation numbers are cited.

GPV-1 has no task-specific head. The task is given as text (a question, "describe the
image", "find the dog") and every task is answered through the same three outputs:

    boxes      a DETR detector proposes R regions with their features and boxes (the boxes
               depend on the image only)
    relevance  the text query is encoded (a frozen BERT), then co-attention layers (ViLBERT's
               connection layer) let the text features attend to the region features and the
               region features to the text, each a residual + LayerNorm update followed by a
               feed-forward block; a linear map of each co-attended region adds 2 logits
               (relevant / not) to DETR's own 2 logits for that region
    text       the region features are conditioned on their relevance,
                   v_r <- v_r + sum_c softmax(relevance_r)_c * rho_c
               with two learned relevance tokens rho, and a transformer decoder reads
               [regions; text] as its memory and writes the answer word by word, starting
               from a __cls__ token. Word scores are dot products with a linear map of
               *frozen* word embeddings, h . (W e_w + b), and the decoder's input words are
               another linear map of the same embeddings, so one vocabulary serves every
               task; a subset of it can be masked in (``vocab_mask``).

Here each repository task t is a text description ("predict t") and a set of out_dims[t]
answer words of its own in the shared vocabulary. ``forward`` answers every task with one
decoding step from __cls__ and returns the scores of that task's words (the vocabulary
mask of the official code), as GPV-1 answers a classification task with one word; scores
serve as regression outputs too. :meth:`GPV.answer` also returns the boxes and relevance
logits (a localisation task's output) and takes teacher-forced answers of several words.
An image is cut into patch tokens for the detector; a vector's feature chunks play the
image features' role.

Left out: the pretrained DETR (ResNet-50 backbone, COCO weights, ROI-pooled backbone features
concatenated to each region's feature), the pretrained BERT and the BERT embeddings of the
answer vocabulary (here fixed random word vectors, frozen as in the code), the losses (Hungarian-
matched box and relevance losses for localisation, word cross-entropy for the others, and
their weights), DETR's positional encodings at every layer (learned input positions and
object queries fed as the decoder's input instead), padding masks, dropout, and beam search.
Choice of ours: the co-attention key maps have no bias (a key bias adds the same amount to all
of a query's scores, which the softmax removes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .houlsby_adapters import Tokenizer
from .registry import Problem

CLS = 0  # the vocabulary's first word starts every answer


class Detector(nn.Module):
    """A small DETR: transformer encoder over input tokens, decoder (with DETR's final LayerNorm)
    over learned object queries.

    Returns region features (B, R, dim), boxes (B, R, 4) in [0, 1] and 2 relevance logits per region.
    """

    def __init__(self, input_shape: Sequence[int], dim: int, num_heads: int, depth: int, num_regions: int,
                 num_tokens: int):
        super().__init__()
        split_width(dim, num_heads)
        self.tokens = Tokenizer(input_shape, dim, num_tokens)
        layer = dict(d_model=dim, nhead=num_heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), depth, enable_nested_tensor=False)
        # DETR's decoder ends with a LayerNorm of its own, after the last post-LN layer
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), depth, norm=nn.LayerNorm(dim))
        self.queries = nn.Parameter(torch.randn(num_regions, dim) * 0.1)
        self.class_embed = nn.Linear(dim, 2)
        self.box_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(),
                                       nn.Linear(dim, 4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        memory = self.encoder(self.tokens(x))
        regions = self.decoder(self.queries.expand(x.shape[0], -1, -1), memory)
        return regions, self.box_embed(regions).sigmoid(), self.class_embed(regions)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over ``memory``, before any output map."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, split_width(dim, num_heads)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(memory)), self._heads(self.value(memory))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return (weights @ v).transpose(1, 2).reshape(x.shape)


class StreamUpdate(nn.Module):
    """One stream's half of a co-attention layer: LN(h + W a), then LN(h + W_2 GELU(W_1 h))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention = CrossAttention(dim, num_heads)
        self.attention_out, self.attention_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, own: Tensor, other: Tensor) -> Tensor:
        h = self.attention_norm(own + self.attention_out(self.attention(own, other)))
        return self.norm(h + self.feed_forward(h))


class CoAttentionLayer(nn.Module):
    """ViLBERT's connection layer: each stream queries the other one (and not itself)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.text, self.vision = StreamUpdate(dim, num_heads), StreamUpdate(dim, num_heads)

    def forward(self, text: Tensor, vision: Tensor) -> tuple[Tensor, Tensor]:
        return self.text(text, vision), self.vision(vision, text)


class GPV(MultiTaskModel):
    """Detector + text query -> co-attention -> boxes, relevance and text from one vocabulary."""

    name = "gpv"
    training_procedure = ("each task is trained by its own loss on answer() outputs: word cross-entropy on "
                          "teacher-forced text, hungarian-matched box and relevance losses for localisation")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        prompts: Mapping[str, str] | None = None,
        dim: int = 32,
        num_heads: int = 4,
        detector_depth: int = 1,
        co_attention_depth: int = 2,
        decoder_depth: int = 2,
        num_regions: int = 6,
        num_tokens: int = 8,
        max_answer_length: int = 8,
        seed: int = 0,
    ):
        super().__init__(tasks)
        require_positive(dim=dim, detector_depth=detector_depth, co_attention_depth=co_attention_depth,
                         decoder_depth=decoder_depth, num_regions=num_regions, max_answer_length=max_answer_length)
        self.out_dims = {t: out_dims.get(t, 1) for t in self.tasks}
        g = torch.Generator().manual_seed(seed)
        # The text side: prompt words, embedded by a frozen table (the frozen BERT's stand-in).
        prompts = dict(prompts or {t: f"predict {t}" for t in self.tasks})
        words = sorted({w for t in self.tasks for w in prompts[t].split()})
        self.query_words = {w: i for i, w in enumerate(words)}
        self.register_buffer("query_table", torch.randn(len(words), dim, generator=g))
        for t in self.tasks:
            self.register_buffer(f"prompt_{t}", torch.tensor([self.query_words[w] for w in prompts[t].split()]))
        # The answer vocabulary: __cls__, then each task's answer words; frozen word vectors.
        self.answer_start, start = {}, 1
        for t in self.tasks:
            self.answer_start[t], start = start, start + self.out_dims[t]
        self.register_buffer("vocab_embed", torch.randn(start, dim, generator=g))

        self.detector = Detector(input_shape, dim, num_heads, detector_depth, num_regions, num_tokens)
        self.detector_joiner, self.query_joiner = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.co_attention = nn.ModuleList(CoAttentionLayer(dim, num_heads) for _ in range(co_attention_depth))
        self.relevance_predictor = nn.Linear(dim, 2)
        self.relevance_tokens = nn.Parameter(0.1 * torch.randn(2, dim))
        layer = nn.TransformerDecoderLayer(dim, num_heads, 2 * dim, dropout=0.0, batch_first=True)
        self.text_decoder = nn.TransformerDecoder(layer, decoder_depth)
        self.answer_transform = nn.Linear(dim, dim)  # vocabulary vectors -> word classifiers
        self.answer_input_transform = nn.Linear(dim, dim)  # vocabulary vectors -> decoder inputs
        self.max_answer_length = max_answer_length

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "GPV":
        if problem.dense:
            raise ValueError("GPV-1 answers with boxes, relevance scores and words: dense problems are not supported")
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dim=width, **kw)

    def prompt(self, task: str) -> Tensor:
        return getattr(self, f"prompt_{task}")

    def task_words(self, task: str) -> slice:
        """The vocabulary ids of ``task``'s answer words."""
        return slice(self.answer_start[task], self.answer_start[task] + self.out_dims[task])

    # ----- the pipeline -------------------------------------------------------------------

    def co_attend(self, regions: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """Co-attended (text, region) features for ``task``'s description."""
        query = self.query_table[self.prompt(task)].expand(regions.shape[0], -1, -1)
        text, vision = self.query_joiner(query), self.detector_joiner(regions)
        for layer in self.co_attention:
            text, vision = layer(text, vision)
        return text, vision

    def condition_on_relevance(self, vision: Tensor, relevance_logits: Tensor) -> Tensor:
        """v_r + sum_c p_rc rho_c: each region carries its relevance into the text decoder."""
        return vision + torch.softmax(relevance_logits, dim=-1) @ self.relevance_tokens

    def word_scores(self, states: Tensor) -> Tensor:
        """h . (W e_w + b) for every word w of the shared vocabulary."""
        return states @ self.answer_transform(self.vocab_embed).T

    def decode(self, memory: Tensor, answer: Tensor) -> Tensor:
        """Causal decoding of answer word ids (B, L) over ``memory``: word scores (B, L, V)."""
        length = answer.shape[1]
        if length > self.max_answer_length:
            raise ValueError(f"answers are at most max_answer_length={self.max_answer_length} words")
        inputs = self.answer_input_transform(self.vocab_embed[answer])
        causal = torch.ones(length, length, dtype=torch.bool, device=answer.device).triu(1)  # True: masked
        return self.word_scores(self.text_decoder(inputs, memory, tgt_mask=causal, tgt_is_causal=True))

    def answer(self, x: Tensor, task: str, answer: Tensor | None = None,
               regions: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Boxes (B, R, 4), relevance logits (B, R, 2) and word scores (B, L, V) for the answer
        [__cls__; answer] (teacher forcing; without ``answer``, one step from __cls__)."""
        features, boxes, detector_logits = regions if regions is not None else self.detector(x)
        text, vision = self.co_attend(features, task)
        relevance = detector_logits + self.relevance_predictor(vision)
        memory = torch.cat([self.condition_on_relevance(vision, relevance), text], dim=1)
        words = torch.full((x.shape[0], 1), CLS, dtype=torch.long, device=x.device)
        if answer is not None:
            words = torch.cat([words, answer], dim=1)
        return {"boxes": boxes, "relevance": relevance, "word_scores": self.decode(memory, words)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        regions = self.detector(x)  # the detector does not read the task: computed once
        return {t: self.answer(x, t, regions=regions)["word_scores"][:, 0, self.task_words(t)] for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """None: a task is its description and its answer words; every weight is shared."""
        return iter(())
