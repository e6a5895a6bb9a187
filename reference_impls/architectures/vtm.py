"""VTM: a query's label tokens are the support label tokens, mixed by image-token similarity.

Kim, Kim, Cho, Luo, Hong, "Universal Few-shot Learning of Dense Prediction Tasks with
Visual Token Matching", ICLR 2023, arXiv:2303.14969. The structure follows the authors'
code (github.com/GitGyun/visual_token_matching, ``model/vtm.py`` and ``attention.py``);
the paper's equation numbers could not be checked here, so equations are named.

VTM learns any dense task from a few labelled examples (the support set) by analogy:
query patches that look like support patches get the labels of those patches. With an
image encoder f_T, a label encoder g and a label decoder h, the query's label tokens are

    g(y^q)_j ≈ Σ_{i,k} σ(f_T(x^q)_j, f_T(x^i)_k) · g(y^i)_k        (token matching)

summed over the support images i and their tokens k, where σ is an attention weight:
a softmax over all support tokens of the scaled dot product between projected,
layer-normalised image tokens. The prediction is ŷ^q = h(g(y^q)). The matching itself has
no parameters that depend on the task: what adapts it to a task is a tiny set of
task-specific **bias** parameters in the otherwise shared image encoder f_T (every other
weight is shared by all tasks), which changes which patches look alike for that task.
Labels are encoded one channel at a time, so one g and h serve tasks with any number of
output channels.

Here f_T is a small shared trunk whose layer biases are replaced by per-task biases; a
patch of ``patch x patch`` pixels of its feature map is one token. Vector inputs and
image-level tasks are matched with one token per example (the same rule, without space).
The support set of each task is stored on the model (:meth:`VTM.set_support`), so that
``forward(x)`` answers every task; :meth:`VTM.predict` takes a support set explicitly.

Left out: the BEiT image encoder and ViT label encoder/decoder, matching at four feature
levels of a hierarchy (one level here), the value/output projections and layer norm after
the attention (the attention combines the label tokens directly, so the output is exactly
a convex combination of support label tokens), dropout, episodic meta-training over many
tasks and the fine-tuning protocol that trains only the biases on a new task (freeze the
other parameters to reproduce it). :meth:`VTM.from_problem` stores placeholder support sets
drawn at random; real use calls :meth:`VTM.set_support` with labelled examples. The training
loop does neither: it matches every batch against the random placeholders, which is not the
paper's episodic training (``training_procedure`` says so). The official code
(GitGyun/visual_token_matching) divides the scores by the square root of the whole token width
(here of one head's, the same at the default of one head; it uses 4), treats every label
channel as its own task with its own encoder biases (here a task's channels share them), and
passes every output but segmentation through a sigmoid (none here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .encoders import ChannelLinear, conv_geometry, run_layer, trunk_for
from .registry import Problem


class TaskBiasedEncoder(nn.Module):
    """A shared trunk (``trunk_for``) whose first layer in each block takes a per-task bias.

    The trunk's own biases are removed; each task starts from a copy of them.
    """

    def __init__(self, trunk: nn.Module, tasks: Sequence[str]):
        super().__init__()
        self.trunk = trunk
        layers = [block[0] for block in trunk.blocks]
        self.biases = nn.ModuleDict({
            t: nn.ParameterList(nn.Parameter(layer.bias.detach().clone()) for layer in layers) for t in tasks
        })
        for layer in layers:
            layer.bias = None  # only the weights are shared

    def forward(self, x: Tensor, task: str) -> Tensor:
        for block, bias in zip(self.trunk.blocks, self.biases[task]):
            layer = block[0]
            x = run_layer(conv_geometry(layer), x, layer.weight, bias)
            for rest in block[1:]:
                x = rest(x)
        return x


class TokenMatching(nn.Module):
    """Multi-head attention of query image tokens over support image tokens, on label tokens.

    ``temperature`` defaults to sqrt(head width); lower it to sharpen the matching.
    """

    def __init__(self, dim: int, num_heads: int = 1):
        super().__init__()
        split_width(dim, num_heads)
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)  # shared by queries and keys, as in the authors' code
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.temperature = math.sqrt(dim // num_heads)

    def _heads(self, z: Tensor) -> Tensor:
        return z.reshape(*z.shape[:-1], self.num_heads, -1).transpose(-3, -2)  # (..., heads, n, d_h)

    def weights(self, query_tokens: Tensor, support_tokens: Tensor) -> Tensor:
        """σ: ``(B, Nq, D)`` x ``(Ns, D)`` image tokens -> ``(B, heads, Nq, Ns)``, rows sum to one."""
        q = self._heads(self.query(self.norm(query_tokens)))
        k = self._heads(self.key(self.norm(support_tokens)))
        return torch.softmax(q @ k.transpose(-1, -2) / self.temperature, dim=-1)

    def forward(self, query_tokens: Tensor, support_tokens: Tensor, label_tokens: Tensor) -> Tensor:
        """Token matching: ``(B, Nq, D)``, ``(Ns, D)``, ``(C, Ns, D)`` -> ``(B, C, Nq, D)``.

        Every output token is a convex combination (per head) of the support label tokens.
        """
        weights = self.weights(query_tokens, support_tokens).unsqueeze(1)  # (B, 1, heads, Nq, Ns)
        mixed = weights @ self._heads(label_tokens)  # (B, C, heads, Nq, d_h)
        return mixed.transpose(-3, -2).flatten(-2)


def label_codec(dim: int) -> tuple[nn.Sequential, nn.Sequential]:
    """g and h: one label channel <-> a ``dim``-wide token, per token (1x1 for maps)."""
    encoder = nn.Sequential(ChannelLinear(1, dim), nn.ReLU(), ChannelLinear(dim, dim))
    decoder = nn.Sequential(ChannelLinear(dim, dim), nn.ReLU(), ChannelLinear(dim, 1))
    return encoder, decoder


class VTM(MultiTaskModel):
    """Task-biased image encoder, shared label encoder/decoder, non-parametric token matching.

    ``spatial``: image tokens are ``patch x patch`` regions of the feature map and the
    outputs are dense maps; otherwise every example is one token (vectors, image-level tasks).
    """

    name = "vtm"
    training_procedure = ("it is meta-trained in episodes, each matching queries against a labelled support set "
                          "drawn from the training data (predict(), set_support()), not against fixed random "
                          "placeholders like the support sets stored here")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, width: int, spatial: bool,
                 patch: int = 1, num_heads: int = 1):
        super().__init__(tasks)
        require_positive(patch=patch)
        self.spatial, self.patch = spatial, patch
        self.encoder = TaskBiasedEncoder(trunk, self.tasks)
        self.label_encoder, self.label_decoder = label_codec(width)
        self.matching = TokenMatching(width, num_heads)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 2, num_support: int = 4,
                     num_heads: int = 1, patch: int | None = None) -> VTM:
        require_positive(num_support=num_support)
        spatial = problem.is_image and problem.dense
        if patch is None:
            patch = max(1, problem.input_shape[-1] // 8) if spatial else 1
        model = cls(problem.tasks, trunk_for(problem.input_shape, width, depth), width, spatial, patch, num_heads)
        g = torch.Generator().manual_seed(0)  # placeholder support sets; see set_support
        label_space = problem.input_shape[1:] if spatial else ()
        for t, c in problem.task_out_dims.items():
            model.set_support(t, torch.randn(num_support, *problem.input_shape, generator=g),
                              torch.randn(num_support, c, *label_space, generator=g))
        return model

    def set_support(self, task: str, images: Tensor, labels: Tensor) -> None:
        """Store ``task``'s labelled examples ``(S, ...)`` and ``(S, C[, H, W])`` for forward."""
        i, like = self.tasks.index(task), next(self.parameters())  # stored where the model is now
        self.register_buffer(f"support_images_{i}", images.to(like))
        self.register_buffer(f"support_labels_{i}", labels.to(like))

    def support(self, task: str) -> tuple[Tensor, Tensor]:
        i = self.tasks.index(task)
        return getattr(self, f"support_images_{i}"), getattr(self, f"support_labels_{i}")

    def _grid(self, size: Sequence[int]) -> tuple[int, int]:
        return math.ceil(size[0] / self.patch), math.ceil(size[1] / self.patch)

    def image_tokens(self, x: Tensor, task: str) -> Tensor:
        """f_T with ``task``'s biases: ``(B, N, D)`` tokens (N = patches, or 1)."""
        features = self.encoder(x, task)
        if features.dim() == 2:
            return features.unsqueeze(1)
        if not self.spatial:
            return features.mean(dim=(2, 3)).unsqueeze(1)
        return F.adaptive_avg_pool2d(features, self._grid(x.shape[-2:])).flatten(2).transpose(1, 2)

    def label_tokens(self, labels: Tensor) -> Tensor:
        """g, one channel at a time: ``(S, C[, H, W])`` -> ``(C, S*N, D)``."""
        s, c = labels.shape[:2]
        if self.spatial:
            labels = F.adaptive_avg_pool2d(labels, self._grid(labels.shape[-2:]))
        tokens = self.label_encoder(labels.reshape(s * c, 1, *labels.shape[2:]))  # (S*C, D[, h, w])
        tokens = tokens.reshape(s, c, tokens.shape[1], -1)  # (S, C, D, N)
        return tokens.permute(1, 0, 3, 2).reshape(c, -1, tokens.shape[2])

    def decode_labels(self, tokens: Tensor, size: Sequence[int]) -> Tensor:
        """h: ``(B, C, N, D)`` query label tokens -> ``(B, C[, H, W])`` predictions."""
        b, c, n, d = tokens.shape
        if not self.spatial:
            return self.label_decoder(tokens.reshape(b * c, d)).reshape(b, c)
        grid = self._grid(size)
        maps = self.label_decoder(tokens.transpose(2, 3).reshape(b * c, d, *grid)).reshape(b, c, *grid)
        if self.patch > 1:
            maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
        return maps

    def predict(self, task: str, x: Tensor, support_images: Tensor, support_labels: Tensor) -> Tensor:
        """ŷ^q = h(Σ σ(f_T(x^q), f_T(x^i)) g(y^i)) for the query batch ``x``."""
        query = self.image_tokens(x, task)
        keys = self.image_tokens(support_images, task).flatten(0, 1)  # all support tokens, (S*N, D)
        matched = self.matching(query, keys, self.label_tokens(support_labels))
        return self.decode_labels(matched, x.shape[-2:])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.predict(t, x, *self.support(t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Only the task's encoder biases: the matching, g and h serve every task."""
        yield from self.encoder.biases[task].parameters()
