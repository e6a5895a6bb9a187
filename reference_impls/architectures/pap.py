"""PAP and PSD: tasks exchange *pixel affinities*, not features.

PAP — Zhang, Cui, Xu, Yan, Sebe, Yang. "Pattern-Affinitive Propagation across Depth,
Surface Normal and Semantic Segmentation", CVPR 2019 (arXiv:1906.03525).
PSD — Zhou, Cui, Xu, Zhang, Wang, Zhang, Yang. "Pattern-Structure Diffusion for
Multi-Task Learning", CVPR 2020, pp. 4513-4522.

Both start from the observation that pairs of pixels that are similar for one task (same
depth, same normal, same label) tend to be similar for the others. So each task learns a
pixel-to-pixel affinity matrix from its own features, the matrices of all tasks are mixed,
and every task diffuses its features with its mixture:

    A_t   = row-softmax( phi_t(F_t)^T phi_t(F_t) / sqrt(e) )      affinity learning layer
    Â_t   = sum_j alpha_tj A_j,   alpha_t = softmax(w_t)            cross-task propagation
    F^k+1 = beta_t Â_t F^k + (1 - beta_t) F^0                     task-specific propagation

Every A_t is row-stochastic (rows sum to 1) and so is the convex mixture Â_t, so a
diffusion step is a weighted average of features over pixels.

:class:`PAP` uses *global* (non-local, HW x HW) affinities. :class:`PSD` is implemented as a
variant in this file: its affinities are *local* graphlets (each pixel links to its k x k
neighbourhood), another task's graphlet is borrowed in proportion to how well it matches
the task's own graphlet at that pixel (inter-task PSD), and repeated local diffusion
spreads patterns beyond the window (intra-task PSD).

Left out (both): the ResNet backbone and multi-scale decoders, the supervised *initial*
predictions the papers compute before propagation, the exact number and schedule of
diffusion steps, and PSD's specific high-order aggregation schedule (here: plain repeated
local steps). The beta-restart form of the diffusion step is also the one two third-party
re-implementations use (Armanfard-Lab/EMA-Net and VITA-Group/M3ViT, models/papnet.py), with
beta fixed at 0.05 and 3 steps; beta is learned per task here, starting at 0.5, and the
affinity normalisation (a row softmax scaled by 1/sqrt(e)) is ours (EMA-Net divides cosine
similarities by column sums, M3ViT takes an unscaled row softmax). The paper's text was not
available to settle which is the paper's. Feature maps must be small: PAP's affinity is
(HW)^2 per image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .base import MultiTaskModel
from .encoders import ConvEncoder, conv_block, conv_head


class _AffinityPropagation(MultiTaskModel):
    """Shared skeleton: encoder -> task branches -> affinity mixing -> diffusion -> heads.

    Subclasses define how affinities are built (:meth:`affinities`) and applied
    (:meth:`propagate`). No ``name``: not registered itself.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: Mapping[str, int],
        channels: int = 16,
        embed_channels: int = 8,
        diffusion_steps: int = 3,
        dense: bool = True,
    ):
        super().__init__(tasks)
        require_positive(channels=channels, embed_channels=embed_channels)
        self.encoder = ConvEncoder(in_channels, (channels, channels))
        # Task-specific feature branches F_t; their affinities are read by *every* task.
        self.branches = nn.ModuleDict({t: conv_block(channels, channels) for t in self.tasks})
        # phi_t: 1x1 embedding in which pixel similarities are measured.
        self.embeds = nn.ModuleDict({t: nn.Conv2d(channels, embed_channels, 1) for t in self.tasks})
        # w_t: logits of how much task t borrows from each task's affinity (start uniform).
        self.mix_logits = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(len(self.tasks))) for t in self.tasks}
        )
        # beta_t = sigmoid(.) in (0, 1): weight of the propagated term in each step.
        self.beta_logits = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})
        self.heads = nn.ModuleDict(
            {t: conv_head(channels, out_dims[t], hidden_channels=channels) for t in self.tasks}
        )
        self.diffusion_steps = diffusion_steps
        self.dense = dense

    @classmethod
    def from_problem(cls, problem, width: int = 16, **kwargs):  # noqa: ANN001, ANN206
        if not problem.is_image:
            raise ValueError(f"{cls.__name__} propagates pixel affinities: it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.out_dims, channels=width,
                   dense=problem.dense, **kwargs)

    def mixing_weights(self, task: str) -> Tensor:
        """alpha_t: convex weights over the tasks' affinities (cross-task propagation)."""
        return torch.softmax(self.mix_logits[task], dim=0)

    def beta(self, task: str) -> Tensor:
        return torch.sigmoid(self.beta_logits[task])

    def task_features(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.encoder(x)
        return {t: self.branches[t](shared) for t in self.tasks}

    def affinities(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def propagate(self, affinity: Tensor, features: Tensor, beta: Tensor) -> Tensor:
        raise NotImplementedError

    def mixed_affinity(self, task: str, affinities: Mapping[str, Tensor]) -> Tensor:
        """Â_t = sum_j alpha_tj A_j: a convex mix keeps rows summing to one."""
        alpha = self.mixing_weights(task)
        return sum(alpha[j] * affinities[s] for j, s in enumerate(self.tasks))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.task_features(x)
        affinities = self.affinities(features)
        outputs = {}
        for t in self.tasks:
            diffused = self.propagate(self.mixed_affinity(t, affinities), features[t], self.beta(t))
            out = self.heads[t](diffused)
            outputs[t] = out if self.dense else out.mean(dim=(2, 3))
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Branches and embeddings feed every task's mixture, so they are shared.
        yield self.mix_logits[task]
        yield self.beta_logits[task]
        yield from self.heads[task].parameters()


class PAP(_AffinityPropagation):
    """Pattern-Affinitive Propagation with global (HW x HW) affinity matrices."""

    name = "pap"

    def affinity(self, task: str, features: Tensor) -> Tensor:
        """Affinity learning layer: A_t[p, q] = softmax_q(<phi(F)_p, phi(F)_q> / sqrt(e))."""
        emb = self.embeds[task](features).flatten(2)  # (B, e, HW)
        scores = emb.transpose(1, 2) @ emb / math.sqrt(emb.shape[1])  # (B, HW, HW)
        return torch.softmax(scores, dim=-1)

    def affinities(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: self.affinity(t, features[t]) for t in self.tasks}

    def propagate(self, affinity: Tensor, features: Tensor, beta: Tensor) -> Tensor:
        """Task-specific propagation, iterated: F^{k+1} = beta Â F^k + (1 - beta) F^0 over pixels."""
        b, c, h, w = features.shape
        start = features.flatten(2).transpose(1, 2)  # (B, HW, C): one row per pixel
        state = start
        for _ in range(self.diffusion_steps):
            state = beta * (affinity @ state) + (1 - beta) * start
        return state.transpose(1, 2).reshape(b, c, h, w)


class PSD(_AffinityPropagation):
    """Pattern-Structure Diffusion: local graphlet affinities matched across tasks.

    A graphlet is pixel p with its k x k window; its affinity row a_t(p, .) has k*k entries
    (zero for neighbours outside the image) summing to one. Inter-task PSD: task t takes
    sum_j w_tj(p) a_j(p, .), where w_t(p) = softmax_j(cos(a_t(p, .), a_j(p, .)) / tau), so a
    task borrows the structures that agree with its own at that position. The learned
    task-level weights alpha_t act as a prior on top of the per-pixel match.
    """

    name = "psd"

    def __init__(self, *args, window: int = 3, temperature: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        require_above(0, temperature=temperature)
        if window < 1 or window % 2 != 1:
            raise ValueError(f"the graphlet window must have a positive odd size, got {window}")
        self.window = window
        self.temperature = temperature

    def _neighbours(self, maps: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, k*k, H*W): the k x k window around every pixel (zero-padded)."""
        b, c = maps.shape[:2]
        cols = F.unfold(maps, self.window, padding=self.window // 2)
        return cols.reshape(b, c, self.window**2, -1)

    def local_affinity(self, task: str, features: Tensor) -> Tensor:
        """a_t(p, q) for q in the window of p: (B, HW, k*k), rows sum to one."""
        emb = self.embeds[task](features)
        centre = emb.flatten(2).unsqueeze(2)  # (B, e, 1, HW)
        scores = (self._neighbours(emb) * centre).sum(1) / math.sqrt(emb.shape[1])  # (B, kk, HW)
        inside = self._neighbours(torch.ones_like(emb[:, :1])) > 0  # (B, 1, kk, HW)
        scores = scores.masked_fill(~inside[:, 0], float("-inf"))
        return torch.softmax(scores, dim=1).transpose(1, 2)

    def affinities(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {t: self.local_affinity(t, features[t]) for t in self.tasks}

    def matching_weights(self, task: str, affinities: Mapping[str, Tensor]) -> Tensor:
        """w_t(p): (B, HW, T), softmax over tasks of graphlet agreement at each pixel."""
        own = F.normalize(affinities[task], dim=-1)
        cosines = torch.stack(
            [(own * F.normalize(affinities[s], dim=-1)).sum(-1) for s in self.tasks], dim=-1
        )
        return torch.softmax(cosines / self.temperature, dim=-1)

    def mixed_affinity(self, task: str, affinities: Mapping[str, Tensor]) -> Tensor:
        """Inter-task PSD: weight_tj(p) ∝ alpha_tj * w_tj(p), a learned task-level prior times
        the per-pixel match; renormalised over j, so the mix stays convex."""
        weights = self.mixing_weights(task) * self.matching_weights(task, affinities)
        weights = weights / weights.sum(-1, keepdim=True)
        return sum(weights[..., j : j + 1] * affinities[s] for j, s in enumerate(self.tasks))

    def propagate(self, affinity: Tensor, features: Tensor, beta: Tensor) -> Tensor:
        """Intra-task PSD: repeated local steps, each reaching one window further."""
        b, c, h, w = features.shape
        start = features
        state = features
        weights = affinity.transpose(1, 2).unsqueeze(1)  # (B, 1, kk, HW)
        for _ in range(self.diffusion_steps):
            spread = (self._neighbours(state) * weights).sum(2).reshape(b, c, h, w)
            state = beta * spread + (1 - beta) * start
        return state
