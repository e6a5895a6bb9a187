"""Task Switching Network: one encoder-decoder for all tasks, switched by a task code.

Sun, Probst, Paudel, Popović, Kanakis, Patel, Dai & Van Gool, "Task Switching Network
for Multi-task Learning", ICCV 2021.

Every weight is shared. To compute task ``t`` the network is given a fixed code ``c_t``
(here a one-hot vector in a space of ``code_dim`` slots); a small *task embedding
network* maps it to a latent vector ``w_t``, and each decoder layer turns ``w_t`` into
the scale and shift of an adaptive instance normalisation (AdaIN):

    AdaIN(x, w) = gamma_l(w) * (x - mean(x)) / std(x) + beta_l(w)

followed by a leaky ReLU (slope 0.01, as in the official code), with mean/std taken per
sample and channel over space. The encoder is not conditioned, so its output is one shared
representation (:meth:`encode`); the decoder runs once per task. The number of parameters
does not grow with the number of tasks (up to ``code_dim`` tasks), and two tasks' outputs
can differ *only* through their codes.

Outputs of different widths come from one shared final 1x1 convolution with
``max(out_dims)`` channels; task ``t`` reads its first ``out_dims[t]`` channels. (The official
test code averages groups of consecutive channels instead: 21 channels give parts 7 means of
three, normals 3 means of seven, edges and saliency the mean of all.)

Left out: the paper's HRNet/ResNet encoder and full decoder, and its study of
different task encodings; the encoder here is a couple of conv blocks. Also simplified
against the official code: its task embedding network is StyleGAN's mapping (pixel norm,
then eight equalised-learning-rate linear layers with leaky ReLU 0.2), here Linear-ReLU-
Linear; its style layers use equalised learning rates, here a plain nn.Linear whose
weights keep the default initialisation. Their biases start as the official ones do, 1
for the scale and 0 for the shift, so a fresh AdaIN passes the normalised features on
instead of multiplying them by about 0. Its task code is a block one-hot vector (20 ones per
task in 100 slots, pixel-normalised), here a one-hot of ``code_dim``; its decoder's skip
connections pass task-conditioned 1x1 layers too (no skips here). Checked against
GuoleiSun/TSNs at 5f1b452 (model.py, test.py; the release has no training script).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import require_positive
from .base import MultiTaskModel
from .registry import Problem


class AdaIN(nn.Module):
    """Instance-normalise ``x`` and re-style it with a scale/shift predicted from ``w``."""

    def __init__(self, channels: int, latent_dim: int, eps: float = 1e-5):
        super().__init__()
        self.to_style = nn.Linear(latent_dim, 2 * channels)
        with torch.no_grad():  # as the official style layers: scale bias 1, shift bias 0
            self.to_style.bias[:channels].fill_(1.0)
            self.to_style.bias[channels:].zero_()
        self.eps = eps

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        gamma, beta = self.to_style(w).chunk(2, dim=-1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + self.eps).sqrt()
        return gamma.view(1, -1, 1, 1) * (x - mean) / std + beta.view(1, -1, 1, 1)


class TaskSwitchingNetwork(MultiTaskModel):
    """Shared encoder, task-conditioned shared decoder, shared output layer."""

    name = "tsn"

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: dict[str, int],
        channels: int = 16,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        code_dim: int = 8,
        latent_dim: int = 16,
    ):
        super().__init__(tasks)
        require_positive(channels=channels, encoder_depth=encoder_depth, latent_dim=latent_dim)
        if len(self.tasks) > code_dim:
            raise ValueError(f"{len(self.tasks)} tasks do not fit one-hot codes of size {code_dim}")
        # Fixed task codes: not parameters, so nothing about the weights is task-specific.
        self.register_buffer("task_codes", torch.eye(code_dim)[: len(self.tasks)].clone())
        enc_widths = [in_channels] + [channels] * encoder_depth
        self.encoder = nn.Sequential(*(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU())
            for a, b in zip(enc_widths[:-1], enc_widths[1:])
        ))
        self.task_embedding = nn.Sequential(
            nn.Linear(code_dim, latent_dim), nn.ReLU(), nn.Linear(latent_dim, latent_dim)
        )
        # No conv bias in the decoder: the instance normalisation right after would cancel it.
        self.decoder_convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(decoder_depth)
        )
        self.decoder_adains = nn.ModuleList(AdaIN(channels, latent_dim) for _ in range(decoder_depth))
        self.out_dims = dict(out_dims)
        self.output = nn.Conv2d(channels, max(self.out_dims[t] for t in self.tasks), 1)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> TaskSwitchingNetwork:
        if not (problem.is_image and problem.dense):
            raise ValueError("this TSN has a dense decoder; it needs a dense image problem")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=width, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode_with_code(self, z: Tensor, code: Tensor) -> Tensor:
        """The decoder conditioned on an arbitrary code (all ``max(out_dims)`` channels)."""
        w = self.task_embedding(code)
        for conv, adain in zip(self.decoder_convs, self.decoder_adains):
            z = F.leaky_relu(adain(conv(z), w), 0.01)  # the official convrelu block's nn.LeakyReLU()
        return self.output(z)

    def decode_task(self, z: Tensor, task: str) -> Tensor:
        code = self.task_codes[self.tasks.index(task)]
        return self.decode_with_code(z, code)[:, : self.out_dims[task]]

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.decode_task(z, t) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        if task not in self.tasks:
            raise KeyError(task)
        return iter(())  # every weight serves every task
