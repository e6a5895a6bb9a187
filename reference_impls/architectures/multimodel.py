"""MultiModel: modality nets around one body of separable convolutions and a sparse mixture of experts.

Kaiser, Gomez, Shazeer, Vaswani, Parmar, Jones, Uszkoreit. "One Model To Learn Them All", arXiv
2017 (arXiv:1706.05137). The structure follows the authors' code as first released in
Tensor2Tensor (github.com/tensorflow/tensor2tensor, commit 3d9c62f, June 2017:
``models/multimodel.py``, ``models/slicenet.py`` (``multi_conv_res``), ``models/common_layers.py``,
``utils/expert_utils.py``, ``utils/modality.py``); no equation numbers are cited.

Small *modality nets* map each kind of data (text, images, audio, class labels) into one
representation space and back; everything in between is one body shared by every task:

    input      the modality net's sequence of feature vectors, plus a sinusoid timing signal
    conv step  ReLU, a depthwise-separable convolution along the sequence, LayerNorm
    conv block four conv steps with kernels 3, 7, 15, 31 (the released "3.7.15.31" scheme):
                   y  = step_7(step_3(x))
                   x' = x + step_31(step_15(x + y)) + y
    encoder    num_layers // 2 conv blocks (at least one here), then a sparsely-gated
               mixture of experts with a residual and LayerNorm, then num_layers conv blocks
    experts    noisy top-k gating (Shazeer et al. 2017): per position, logits x W_g plus
               Gaussian noise of scale softplus(x W_noise) + 0.01 (training only), the k
               largest kept and softmax-normalised, experts are bias-free ReLU networks;
               the balancing loss CV²(importance) + CV²(load) (importance: summed gates per
               expert; load: the smooth estimate of how often each expert is in the top k)
               is added to the objective times 0.01
    output     a problem whose targets are class labels stops after the encoder (the released
               code skips the decoder for it) and its class-label modality net pools the
               sequence into logits

Here each task is such a class-label (or regression) problem: its output modality net is the
only task-specific part. The image or vector input is cut into tokens, the input modality
net's stand-in. ``auxiliary_loss()`` returns the weighted balancing loss of the last forward
pass, which the training loop adds to the task losses.

Left out: the I/O mixer and the autoregressive decoder (causal conv blocks, attention to the
encoded input, a second mixture of experts), which sequence outputs (translation, captions,
parses, speech) go through, together with the target-space embedding that tells the decoder
which output to write and the similarity loss; the real modality nets (the Xception-style image
entry flow, the subword and audio nets), and the class-label net's strided convolutions before
its pooling (here a ReLU, the mean over positions and a linear map); the released code keys
modality nets by their type and size, so two problems with the same number of classes share one,
while here every task has its own; sub-separable convolutions (plain depthwise-separable ones
here), padding masks, dropout, hierarchical mixtures and expert parallelism across devices.
Small-scale departures: the token stand-in (the shared ``Tokenizer``) adds a learned position
embedding before the timing signal, which the released modality nets do not have; the timing
signal keeps its 16 timescales only from dim 32 up and uses dim // 2 below (the released code
needs depth >= 32); the LayerNorms use PyTorch's epsilon 1e-5 (released: 1e-6) and the experts
PyTorch's default Linear initialisation (released: orthogonal with gain 1, from the trainer's
scope initialiser, for the experts and the convolutions alike); the released code also smooths
the class-label targets by 0.1 and trains one problem per step (every head on each batch
here); at test time the load is the
count of experts in the top k, where the released code evaluates its top-k probability with zero
noise (the same count except for tied logits).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_at_least, require_each_positive, require_positive
from .base import MultiTaskModel
from .diffusionmtl import gaussian_noise
from .houlsby_adapters import Tokenizer
from .registry import Problem


def timing_signal(length: int, dim: int, like: Tensor, num_timescales: int = 16) -> Tensor:
    """Sines and cosines of geometrically spaced timescales 1..1e4, zero-padded to ``dim``."""
    n = min(num_timescales, dim // 2)
    positions = torch.arange(length, device=like.device, dtype=like.dtype)[:, None]
    increment = math.log(1e4) / max(n - 1, 1)
    inverse = torch.exp(-increment * torch.arange(n, device=like.device, dtype=like.dtype))
    scaled = positions * inverse
    return F.pad(torch.cat([scaled.sin(), scaled.cos()], dim=1), (0, dim - 2 * n))


class ConvStep(nn.Module):
    """ReLU -> depthwise-separable convolution along the sequence -> LayerNorm."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding="same", groups=dim, bias=False)
        self.pointwise = nn.Conv1d(dim, dim, 1, bias=False)  # no bias before a norm, as released
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor) -> Tensor:
        """(B, L, dim) -> (B, L, dim)."""
        y = self.pointwise(self.depthwise(F.relu(h).transpose(1, 2)))
        return self.norm(y.transpose(1, 2))


class ConvBlock(nn.Module):
    """y = s2(s1(x)); x + s4(s3(x + y)) + y."""

    def __init__(self, dim: int, kernels: Sequence[int]):
        super().__init__()
        self.first = nn.Sequential(ConvStep(dim, kernels[0]), ConvStep(dim, kernels[1]))
        self.second = nn.Sequential(ConvStep(dim, kernels[2]), ConvStep(dim, kernels[3]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.first(x)
        return x + self.second(x + y) + y


def squared_cv(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Variance / mean² of the entries of ``x`` (epsilons as released)."""
    mean = x.sum() / (x.numel() + eps)
    variance = (x - mean).square().sum() / (x.numel() + eps)
    return variance / (mean.square() + eps)


def normal_cdf(x: Tensor, std: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / (math.sqrt(2) * std + 1e-20)))


class NoisyTopKMoE(nn.Module):
    """Sparsely-gated mixture of experts; returns LN(x + MoE(x)) and the balancing loss."""

    def __init__(self, dim: int, num_experts: int, k: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.k, self.generator = k, generator
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts))  # zero-initialised, as released
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts))
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False))
            for _ in range(num_experts))
        self.norm = nn.LayerNorm(dim)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gates (M, N), zero outside each row's top k, and the load (N,) for tokens x (M, dim)."""
        clean = x @ self.w_gate
        std = F.softplus(x @ self.w_noise) + 1e-2
        logits = clean + gaussian_noise(clean, self.generator) * std if self.training else clean
        top, index = logits.topk(min(self.k + 1, clean.shape[1]), dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, index[:, :self.k], torch.softmax(top[:, :self.k], dim=-1))
        if not self.training or self.k >= clean.shape[1]:  # no noise, or every expert kept: the counts
            return gates, (gates > 0).to(x.dtype).sum(0)
        # The chance that each expert would be in the top k under fresh noise: it must beat the
        # k-th best other logit (the (k+1)-th if it is in, the k-th if it is out).
        threshold_in, threshold_out = top[:, self.k:self.k + 1], top[:, self.k - 1:self.k]
        is_in = logits > threshold_in
        p = torch.where(is_in, normal_cdf(clean - threshold_in, std), normal_cdf(clean - threshold_out, std))
        return gates, p.sum(0)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        tokens = h.reshape(-1, h.shape[-1])
        gates, load = self.gates(tokens)
        outputs = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # (M, N, dim)
        mixed = torch.einsum("mn,mnd->md", gates, outputs).view_as(h)
        return self.norm(h + mixed), squared_cv(gates.sum(0)) + squared_cv(load)


class MultiModel(MultiTaskModel):
    """Input modality net -> conv blocks, MoE, conv blocks -> one class-label modality net per task."""

    name = "multimodel"

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dim: int = 32,
        num_layers: int = 2,
        kernels: Sequence[int] = (3, 7, 15, 31),
        num_experts: int = 4,
        k: int = 2,
        moe_loss_weight: float = 1e-2,
        num_tokens: int = 8,
        seed: int = 0,
    ):
        super().__init__(tasks)
        require_positive(dim=dim, num_layers=num_layers, num_experts=num_experts, k=k)
        require_each_positive("kernels", kernels)
        require_at_least(0, moe_loss_weight=moe_loss_weight)
        if len(kernels) != 4 or any(size % 2 == 0 for size in kernels):
            raise ValueError(f"kernels must be four odd sizes, got {tuple(kernels)}")
        if k > num_experts:
            raise ValueError(f"k={k} experts per position cannot exceed num_experts={num_experts}")
        self.moe_loss_weight = moe_loss_weight
        self.inputs = Tokenizer(input_shape, dim, num_tokens)
        self.encoder_first = nn.Sequential(*(ConvBlock(dim, kernels) for _ in range(max(num_layers // 2, 1))))
        self.experts = NoisyTopKMoE(dim, num_experts, k, dim, torch.Generator().manual_seed(seed))
        self.encoder_second = nn.Sequential(*(ConvBlock(dim, kernels) for _ in range(num_layers)))
        self.heads = nn.ModuleDict({t: nn.Linear(dim, out_dims.get(t, 1)) for t in self.tasks})
        self._last_moe_loss: Tensor | None = None

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kw: object) -> "MultiModel":
        if problem.dense:
            raise ValueError("MultiModel's class-label modality nets pool the sequence: dense problems are "
                             "not supported")
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dim=width, **kw)

    def encode(self, x: Tensor) -> Tensor:
        """The shared body's output sequence (B, L, dim); also records the balancing loss."""
        h = self.inputs(x)
        h = self.encoder_first(h + timing_signal(h.shape[1], h.shape[2], h))
        h, self._last_moe_loss = self.experts(h)
        return self.encoder_second(h)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Each task's class-label modality net: ReLU, mean over positions, linear."""
        pooled = F.relu(z).mean(dim=1)
        return {t: self.heads[t](pooled) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def auxiliary_loss(self) -> Tensor:
        """``moe_loss_weight`` x (CV²(importance) + CV²(load)) of the last forward pass."""
        if self._last_moe_loss is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass first")
        return self.moe_loss_weight * self._last_moe_loss

    def __getstate__(self) -> dict:
        # the cached loss belongs to one forward pass (and its graph): copies start without it
        return {**super().__getstate__(), "_last_moe_loss": None}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
