"""DiffusionMTL: initial multi-task predictions are treated as noisy and denoised by diffusion.

Ye & Xu, "DiffusionMTL: Learning Multi-Task Denoising Diffusion Model from Partially
Annotated Data", CVPR 2024, arXiv:2403.15389 (official code: the DiffusionMTL folder of
github.com/prismformore/Multi-Task-Transformer, on its diffusionmtl branch).

Trained with partial labels, a multi-task network gives noisy maps for the tasks an image is
not labelled for. DiffusionMTL reads those maps as samples of a corrupted distribution and
learns to clean them with a short denoising diffusion chain (the paper's Multi-Task Denoising
Diffusion Network, MTDNet):

1. **Initial predictions.** A shared backbone and one preliminary decoder per task give
   starting maps ``P_t`` (the paper's "prediction diffusion"; the released code diffuses the
   decoders' features instead, "feature diffusion").
2. **Forward (diffusion) process.** DDPM's Gaussian chain with betas linear in sqrt(beta)
   from 1e-3 to 1e-2 over S steps (S = 2 in the released config). Its closed form
   ``q(x_s | x_0) = N(sqrt(abar_s) x_0, (1 - abar_s) I)``, ``abar_s = prod_{i<=s} (1 - beta_i)``,
   noises ``P_t`` to the last step.
3. **Multi-Task Conditioned Denoiser.** The initial maps of *all* tasks are concatenated and
   projected into one condition map (detached, as in the official code); condition tokens
   query the noisy map of the task being denoised through cross-attention blocks (both
   streams are updated) at 1/4 resolution, with a sinusoidal timestep embedding added to the
   noisy map and the full-resolution noisy map added back after attention. The
   denoiser predicts the clean map ``x_0`` directly (x0-parameterisation).
4. **Reverse process.** S ancestral steps: ``x_{s-1} ~ q(x_{s-1} | x_s, x_0 = denoiser(x_s))``
   (DDPM's posterior), and the last step returns the denoiser's ``x_0``. With S = 0 nothing is
   refined and the initial prediction is returned. Training supervises the output of the
   whole chain, so gradients pass through every step.

The paper's equations are not numbered here: we could read the official code but not the
paper's text, so the schedule and update above follow the code and DDPM (Ho et al., 2020).
Only the condition projection, the timestep embedding and the cross-attention blocks are
shared by the denoising of all tasks; because the condition is detached, no other task's loss
reaches a task's preliminary decoder, which therefore counts as task-specific.

Training. :meth:`DiffusionMTL.forward_with_intermediate` also returns the initial predictions,
and the training harness scores them by each task's loss next to the denoised outputs (weight
1; the official loss weights them 0.5, losses/loss_schemes.py of prismformore/DiffusionMTL at
65b84e7, which matches the diffusionmtl branch linked from the catalogue).

Left out: the ResNet/ViT backbone and its pretraining, the denoiser's large convolutional
task heads (one 1x1 layer here), the official sizes of the denoiser (4 cross-attention
blocks of 4 heads, MLP ratio 4, a 256-wide sinusoidal timestep code) and its bilinear 1/4
downsampling (average pooling here), the feature-diffusion variant, the paper's weights of the
losses on the initial predictions and the partial-label training set-up (masking losses of
unlabelled tasks is the caller's job).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_non_negative
from .base import MultiTaskModel
from .demt import CrossAttention
from .encoders import conv_block
from .registry import Problem


def gaussian_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn from ``generator`` when one is given."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, device=generator.device).to(like)


class NoiseSchedule(nn.Module):
    """Discrete DDPM schedule: closed-form forward process and the Gaussian posterior."""

    def __init__(self, num_steps: int, beta_start: float = 1e-3, beta_end: float = 1e-2):
        super().__init__()
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        self.num_steps = num_steps
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", abar.float())
        self.register_buffer("alphas_cumprod_prev", torch.cat([abar.new_ones(1), abar[:-1]]).float())

    def q_sample(self, x0: Tensor, step: int, noise: Tensor) -> Tensor:
        """``x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s) eps``: jump straight to step ``s``."""
        abar = self.alphas_cumprod[step]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def posterior(self, x0: Tensor, xs: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_{s-1} | x_s, x_0)``."""
        beta, abar, abar_prev = self.betas[step], self.alphas_cumprod[step], self.alphas_cumprod_prev[step]
        mean = (beta * abar_prev.sqrt() * x0 + (1 - abar_prev) * (1 - beta).sqrt() * xs) / (1 - abar)
        return mean, beta * (1 - abar_prev) / (1 - abar)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of a (possibly fractional) time, then a 2-layer MLP."""

    def __init__(self, dim: int, frequencies: int = 16):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """``(B,)`` times -> ``(B, dim)``."""
        dtype = self.mlp[0].weight.dtype  # the model's precision, float64 included
        steps = torch.arange(self.frequencies, device=t.device, dtype=dtype)
        angles = t.to(dtype)[:, None] * torch.exp(-math.log(10000.0) * steps / self.frequencies)[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)


class ConditionBlock(nn.Module):
    """Condition tokens query the noisy-map tokens; the noisy tokens get their own MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attend = CrossAttention(dim, num_heads)
        self.norm_kv = nn.LayerNorm(dim)
        self.mlp_kv = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, condition: Tensor, noisy: Tensor) -> tuple[Tensor, Tensor]:
        noisy = noisy + self.mlp_kv(self.norm_kv(noisy))
        return self.attend(condition, noisy), noisy


class MultiTaskDenoiser(nn.Module):
    """``(task, noisy map x_s, all tasks' initial maps, s) -> estimate of the clean map x_0``."""

    def __init__(self, tasks: Sequence[str], out_dims: Mapping[str, int], dim: int,
                 depth: int = 2, num_heads: int = 2):
        super().__init__()
        self.tasks = tuple(tasks)
        self.condition = nn.Conv2d(sum(out_dims[t] for t in tasks), dim, 3, padding=1)
        self.time = TimestepEmbedding(dim)
        self.inputs = nn.ModuleDict({t: nn.Conv2d(out_dims[t], dim, 3, padding=1) for t in tasks})
        self.blocks = nn.ModuleList(ConditionBlock(dim, num_heads) for _ in range(depth))
        self.outputs = nn.ModuleDict({t: nn.Conv2d(dim, out_dims[t], 1) for t in tasks})

    def multi_task_condition(self, initial: Mapping[str, Tensor]) -> Tensor:
        """Multi-Task Conditioning: every task's (detached) initial map in one condition map."""
        return self.condition(torch.cat([initial[t].detach() for t in self.tasks], dim=1))

    def forward(self, task: str, noisy: Tensor, condition: Tensor, step: int) -> Tensor:
        t = torch.full((noisy.shape[0],), step, device=noisy.device)
        x = self.inputs[task](noisy) + self.time(t)[:, :, None, None]
        # Attention runs at 1/4 resolution (as in the official code); the residual keeps detail.
        small = [F.adaptive_avg_pool2d(m, (math.ceil(m.shape[-2] / 4), math.ceil(m.shape[-1] / 4)))
                 for m in (condition, x)]
        b, c, h, w = small[0].shape
        query, keys = _tokens(small[0]), _tokens(small[1])
        for block in self.blocks:
            query, keys = block(query, keys)
        attended = F.interpolate(query.transpose(1, 2).reshape(b, c, h, w), size=x.shape[-2:],
                                 mode="bilinear", align_corners=False)
        return self.outputs[task](attended + x)


class DiffusionMTL(MultiTaskModel):
    """Backbone -> preliminary task maps -> few-step multi-task conditioned denoising diffusion."""

    name = "diffusionmtl"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: Mapping[str, int],
                 channels: int = 16, num_steps: int = 2, depth: int = 2, num_heads: int = 2,
                 dense: bool = True):
        super().__init__(tasks)
        require_non_negative(num_steps=num_steps)
        c, self.dense = channels, dense
        self.backbone = nn.Sequential(conv_block(in_channels, c), conv_block(c, c))
        self.preliminary = nn.ModuleDict({t: conv_block(c, c) for t in tasks})
        self.preliminary_heads = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})
        self.schedule = NoiseSchedule(num_steps)
        self.denoiser = MultiTaskDenoiser(tasks, out_dims, c, depth, num_heads)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> DiffusionMTL:
        if not problem.is_image:
            raise ValueError("DiffusionMTL denoises per-pixel prediction maps; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def initial_predictions(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.backbone(x)
        return {t: self.preliminary_heads[t](self.preliminary[t](shared)) for t in self.tasks}

    def refine(self, initial: Mapping[str, Tensor], steps: int | None = None,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Noise every initial map to step ``steps - 1``, then run ``steps`` reverse steps."""
        steps = self.schedule.num_steps if steps is None else steps
        if not 0 <= steps <= self.schedule.num_steps:
            raise ValueError(f"steps must be in [0, {self.schedule.num_steps}], got {steps}")
        if steps == 0:
            return dict(initial)
        condition = self.denoiser.multi_task_condition(initial)
        refined = {}
        for t in self.tasks:
            x = self.schedule.q_sample(initial[t], steps - 1, gaussian_noise(initial[t], generator))
            for s in reversed(range(steps)):
                x0 = self.denoiser(t, x, condition, s)
                if s == 0:
                    x = x0  # the last step returns the clean estimate itself
                else:
                    mean, var = self.schedule.posterior(x0, x, s)
                    x = mean + var.sqrt() * gaussian_noise(x, generator)
            refined[t] = x
        return refined

    def forward_with_intermediate(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(denoised outputs, initial predictions)``, both as the problem's output shapes."""
        initial = self.initial_predictions(x)
        refined = self.refine(initial, generator=generator)
        shape = (lambda m: m) if self.dense else (lambda m: m.mean(dim=(2, 3)))  # noqa: E731
        return {t: shape(refined[t]) for t in self.tasks}, {t: shape(initial[t]) for t in self.tasks}

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self.forward_with_intermediate(x, generator)[0]

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The task's preliminary decoder and head and its denoiser input/output layers."""
        for module in (self.preliminary[task], self.preliminary_heads[task],
                       self.denoiser.inputs[task], self.denoiser.outputs[task]):
            yield from module.parameters()
