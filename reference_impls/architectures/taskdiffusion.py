"""TaskDiffusion: all tasks' labels live in one noisy map that a cross-task decoder denoises.

Yang, Jiang, Hou, Zhang, Chen & Li, "Multi-Task Dense Predictions via Unleashing the Power
of Diffusion", ICLR 2025 (openreview.net/forum?id=TzdTRC85SQ; official code:
github.com/YuqiYang213/TaskDiffusion).

Diffusion decoders for dense prediction (DDP and relatives) denoise one task's label map
conditioned on image features. Running one such chain per task would ignore how tasks relate,
so TaskDiffusion denoises *jointly*:

1. **Task-integration encoding.** Each task's label map is embedded by its own small encoder
   (1x1 convolution here), the embeddings are concatenated and fused by a 1x1 convolution into
   one joint map, squashed to ``(2 sigmoid(.) - 1) * scale`` (scale 0.01 in the released
   configs). A single map holds every task, so one chain serves them all.
2. **Forward process.** Continuous time ``t`` in [0, 1) with the cosine schedule in log-SNR
   form, ``alpha_t = sqrt(sigmoid(lambda_t))``, ``sigma_t = sqrt(sigmoid(-lambda_t))``, which is
   ``alpha_t = cos(theta)``, ``sigma_t = sin(theta)`` with ``theta = (t + 2e-4) / (1 + 2.5e-4) * pi / 2``;
   training noises the encoded labels at a random ``t``: ``z_t = alpha_t z_0 + sigma_t eps``.
3. **Cross-task diffusion decoder.** The noisy joint map is concatenated with the image features
   and projected; shared time-conditioned convolutions (FiLM by the embedded log-SNR) process it
   and a FiLM-modulated 3x3 convolution (no activation) predicts, per pixel, a T x T matrix of
   sigmoid gates. Task ``i``'s feature is
   ``sum_j sigmoid(g_ij) F_j``, where ``F_j`` are task ``j``'s features read from the image
   features, i.e. each task mixes every task's features, weighted by the denoising state. A
   task-specific time-conditioned layer (a FiLM-modulated 1x1 convolution), a few residual blocks
   and a head then predict the task.
4. **Sampling (DDIM).** From pure noise, a few steps (3 in the released configs): the decoder
   predicts every task, the predictions are re-encoded into the joint map as the clean estimate
   ``z_0``, ``eps = (z_t - alpha_t z_0) / sigma_t`` and ``z_next = alpha_next z_0 + sigma_next eps``.
   The step times follow the code's asymmetric intervals (the next time is ``time_difference``
   steps further on). The last step's predictions are the outputs.

The equations above follow the official code; we did not have the paper's text, so they are not
numbered. :meth:`TaskDiffusion.forward` is the sampler (what the model does at test time);
:meth:`TaskDiffusion.denoising_outputs` is the paper's training pass on noised ground truth, for a
caller that has the labels. The authors' training loop calls the model with ``if_eval=False``,
which runs that training pass (``forward_train`` of TaskDiffusion_head.py, YuqiYang213/
TaskDiffusion); our training harness calls ``forward`` and so trains the sampler end to end,
which neither the paper nor the code does (``training_procedure`` says so). Their released
configurations use 3 refiner blocks per task (2 here), a GELU time embedding that also reads
the raw log-SNR (SiLU here), a x4 upsampling before the last refiner block, and a separate
embedding for invalid pixels of regression labels.

Left out: the ViT backbone and its pretraining, the four feature levels and their softmax
fusion (one level here), class-index embedding tables for segmentation tasks (every task's map is
embedded by a 1x1 convolution, the code's encoder for regression tasks), BatchNorm, the separate
channels for saliency, the auxiliary heads and learned sinusoidal frequencies in the time
embedding (fixed ones here, reused from :mod:`.diffusionmtl`), the second conv block of each
task's feature reader (the code stacks two), and the code's task-wise post-processing of the
predictions before they are re-encoded during sampling (argmax and embedding lookup for
segmentation, depth clamped to [0, 80], sigmoid for edges, unit-length normals): the raw
predictions are re-encoded here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .diffusionmtl import TimestepEmbedding, gaussian_noise
from .encoders import conv_block
from .registry import Problem


def cosine_log_snr(t: Tensor, ns: float = 2e-4, ds: float = 2.5e-4) -> Tensor:
    """Cosine schedule as log signal-to-noise ratio: ``-log(cos(theta)^-2 - 1)``, clamped."""
    theta = (t + ns) / (1 + ds) * math.pi / 2
    return -torch.log((torch.cos(theta) ** -2 - 1).clamp(min=1e-5))


def alpha_sigma(log_snr: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales of a variance-preserving process: alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def cross_task_mix(gates: Tensor, features: Tensor) -> Tensor:
    """``(B, T, T, h, w)`` gate logits and ``(B, T, C, h, w)`` features -> ``sum_j sig(g_ij) F_j``."""
    return torch.einsum("bijhw,bjchw->bichw", torch.sigmoid(gates), features)


class TimeFiLMConv(nn.Module):
    """Convolution, FiLM by the time embedding (``conv(x) (1 + scale) + shift``), nothing after it.

    The code's ``Conv_withtime``: the gate logits and each task's specific layer.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_channels))

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        scale, shift = self.film(time)[:, :, None, None].chunk(2, dim=1)
        return self.conv(x) * (1 + scale) + shift


class TimeConv(nn.Module):
    """A :class:`TimeFiLMConv`, GELU, 1x1 convolution (plus the input, if ``residual``)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, kernel_size: int = 3,
                 residual: bool = False):
        super().__init__()
        self.modulated = TimeFiLMConv(in_channels, out_channels, time_dim, kernel_size)
        self.out = nn.Conv2d(out_channels, out_channels, 1)
        self.residual = residual

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        y = self.out(nn.functional.gelu(self.modulated(x, time)))
        return x + y if self.residual else y


class CrossTaskDecoder(nn.Module):
    """Shared denoising features -> per-pixel T x T gates -> every task mixes all tasks' features."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        c, n = channels, len(tasks)
        self.tasks = tuple(tasks)
        self.shared = nn.ModuleList([TimeConv(c, c, c), TimeConv(c, c, c)])
        self.gates = TimeFiLMConv(c, n * n, c)
        self.task_features = nn.ModuleDict({
            t: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 1)) for t in tasks
        })
        self.specific = nn.ModuleDict({t: TimeFiLMConv(c, c, c, kernel_size=1) for t in tasks})

    def forward(self, noisy_input: Tensor, image_features: Tensor, time: Tensor) -> dict[str, Tensor]:
        shared = noisy_input
        for layer in self.shared:
            shared = layer(shared, time)
        b, _, h, w = shared.shape
        gates = self.gates(shared, time).reshape(b, len(self.tasks), len(self.tasks), h, w)
        feats = torch.stack([self.task_features[t](image_features) for t in self.tasks], dim=1)
        mixed = cross_task_mix(gates, feats)
        return {t: self.specific[t](mixed[:, i], time) for i, t in enumerate(self.tasks)}


class TaskDiffusion(MultiTaskModel):
    """Backbone -> joint noisy task map -> cross-task diffusion decoder, sampled with few DDIM steps."""

    name = "taskdiffusion"
    training_procedure = ("the decoder is trained by denoising_outputs(x, targets) on noised, encoded ground-truth "
                          "maps, and the DDIM sampler (forward) is only run at test time")

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: Mapping[str, int],
                 channels: int = 16, num_steps: int = 3, num_blocks: int = 2, scale: float = 0.01,
                 time_difference: int = 1, dense: bool = True):
        super().__init__(tasks)
        if num_steps < 1:
            raise ValueError(f"TaskDiffusion needs at least one denoising step, got num_steps={num_steps}")
        c, e = channels, max(1, channels // 4)
        self.dense, self.scale = dense, scale
        self.num_steps, self.time_difference = num_steps, time_difference
        self.backbone = nn.Sequential(conv_block(in_channels, c), conv_block(c, c))
        self.label_encoders = nn.ModuleDict({t: nn.Conv2d(out_dims[t], e, 1) for t in tasks})
        self.integrate = nn.Conv2d(len(tasks) * e, c, 1)
        self.condition_input = nn.Conv2d(2 * c, c, 1)
        self.time = TimestepEmbedding(c)
        self.decoder = CrossTaskDecoder(tasks, c)
        self.refiners = nn.ModuleDict({
            t: nn.ModuleList(TimeConv(c, c, c, residual=True) for _ in range(num_blocks)) for t in tasks
        })
        self.heads = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 3, padding=1) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> TaskDiffusion:
        if not problem.is_image:
            raise ValueError("TaskDiffusion denoises per-pixel task maps; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def encode_tasks(self, maps: Mapping[str, Tensor]) -> Tensor:
        """Task-integration encoding: all tasks' maps -> one joint map in ``(-scale, scale)``."""
        joint = self.integrate(torch.cat([self.label_encoders[t](maps[t]) for t in self.tasks], dim=1))
        return (2 * torch.sigmoid(joint) - 1) * self.scale

    def decode(self, features: Tensor, noisy: Tensor, log_snr: Tensor) -> dict[str, Tensor]:
        """Every task's per-pixel prediction from the image features and the noisy joint map."""
        time = self.time(log_snr)
        task_feats = self.decoder(self.condition_input(torch.cat([features, noisy], 1)), features, time)
        out = {}
        for t in self.tasks:
            y = task_feats[t]
            for block in self.refiners[t]:
                y = block(y, time)
            out[t] = self.heads[t](y)
        return out

    def denoising_outputs(self, x: Tensor, targets: Mapping[str, Tensor],
                          generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training pass: encode the dense targets, noise them at a random time, decode."""
        features = self.backbone(x)
        z0 = self.encode_tasks(targets)
        u = torch.rand(x.shape[0], generator=generator, device=generator.device if generator else x.device)
        log_snr = cosine_log_snr(u.to(x) * 0.999)
        alpha, sigma = alpha_sigma(log_snr[:, None, None, None])
        return self.decode(features, alpha * z0 + sigma * gaussian_noise(z0, generator), log_snr)

    def step_times(self) -> list[tuple[float, float]]:
        """``(t_now, t_next)`` per DDIM step; ``t_next`` jumps ``time_difference`` steps ahead."""
        n = self.num_steps
        return [(1 - s / n, max(1 - (s + 1 + self.time_difference) / n, 0.0)) for s in range(n)]

    @staticmethod
    def ddim_step(z_t: Tensor, z0: Tensor, log_snr: Tensor, log_snr_next: Tensor) -> Tensor:
        """Deterministic DDIM update from ``t`` to ``t_next`` given the clean estimate ``z0``."""
        alpha, sigma = alpha_sigma(log_snr)
        alpha_next, sigma_next = alpha_sigma(log_snr_next)
        eps = (z_t - alpha * z0) / sigma.clamp(min=1e-8)
        return alpha_next * z0 + sigma_next * eps

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """DDIM from pure noise; returns the last step's per-pixel predictions."""
        features = self.backbone(x)
        b, c, h, w = features.shape
        z = gaussian_noise(features, generator)
        for now, nxt in self.step_times():
            log_snr, log_snr_next = (cosine_log_snr(features.new_full((b,), v)) for v in (now, nxt))
            preds = self.decode(features, z, log_snr)
            z0 = self.encode_tasks(preds)  # re-encode the predictions as the clean joint map
            z = self.ddim_step(z, z0, log_snr[:, None, None, None], log_snr_next[:, None, None, None])
        return preds

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        preds = self.sample(x, generator)
        return preds if self.dense else {t: p.mean(dim=(2, 3)) for t, p in preds.items()}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """With one step: the task's specific layer, refiners and head. With more: none.

        After every step but the last, each task's prediction is re-encoded into the joint map
        that all tasks decode next, so with several steps every parameter reaches every task.
        """
        if self.num_steps > 1:
            return
        for module in (self.decoder.specific[task], self.refiners[task], self.heads[task]):
            yield from module.parameters()
