"""RCM: convolutions split into a frozen shared filter bank and per-task modulators.

Kanakis, Bruggemann, Saha, Georgoulis, Obukhov & Van Gool, "Reparameterizing
Convolutions for Incremental Multi-Task Learning without Task Interference",
ECCV 2020, arXiv:2007.12540.

Every ``k x k`` convolution ``W`` is rewritten as the product of two parts:

* a shared filter bank ``W_s`` (``M`` filters of size ``c_in x k x k``), normally taken
  from a pretrained network and **never trained**;
* a task-specific modulator ``W_t`` (an ``c_out x M`` matrix, i.e. a 1x1 convolution)
  that mixes the bank's responses into the task's own filters.

So task ``t`` convolves with ``W^t = W_t · W_s`` (contracting the bank dimension). Because
the only trainable weights on a task's path are its own, training one task cannot change
another task's output: no task interference, and new tasks can be added later without
touching old ones (incremental learning).

Normalised feature fusion (NFF): the modulator is weight-normalised per output filter,
``W_t[o] = g_o · v_o / ||v_o||``, so the mixing weights stay on a fixed scale while the
bank's responses are recombined; ``v = I`` and ``g = 1`` make the initial modulator the
identity, i.e. each task starts from the bank's own filters. (The authors' code does the same
with PyTorch weight normalisation, per output filter, on the 1x1 modulator; ``normalized=False``
gives the plain matrix modulator.)

Left out: the pretrained ResNet/DeepLab backbone (the bank here is a random frozen
initialisation) and the decomposition of its filters (from the principal directions of each
layer's responses) into the bank and the initial modulators, task-specific batch
normalisation and the paper's decoders.

Compared with the authors' release, github.com/menelaoskanakis/RCM (modules/layers.py:
RCMConv2d; modules/deeplab_resnet.py: ResNet, create_decompositions, create_nff_layer;
configs/*_RC_RI_NFF.yaml). Differences: the release runs the bank and then the 1x1 modulator
as two convolutions, where we compose the weight first (the same map, tested); it can also
share one modulator among all tasks, which we do not offer; its response-based initialisation
also shifts the following batch norm's running mean to absorb the bias the projection leaves;
and its ResNet's 1x1 shortcut convolutions are plain per-task convolutions, not reparameterised.
Its modulators start from each layer's principal directions (the bank projected onto them),
not from the identity, and it trains one task per run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import image_head
from .registry import Problem


class Modulator(nn.Module):
    """A task's ``c_out x M`` mixing matrix, optionally weight-normalised per row (NFF)."""

    def __init__(self, bank_size: int, out_channels: int, normalized: bool = True):
        super().__init__()
        if out_channels != bank_size:
            raise ValueError("identity initialisation needs out_channels == bank size")
        self.direction = nn.Parameter(torch.eye(out_channels, bank_size))
        self.gain = nn.Parameter(torch.ones(out_channels)) if normalized else None

    def matrix(self) -> Tensor:
        if self.gain is None:
            return self.direction
        unit_rows = self.direction / self.direction.norm(dim=1, keepdim=True)
        return self.gain.unsqueeze(1) * unit_rows  # NFF: W_t[o] = g_o v_o / ||v_o||


class RCMConv2d(nn.Module):
    """``k x k`` convolution whose weight for task ``t`` is ``W_t · W_s``."""

    def __init__(self, in_channels: int, out_channels: int, tasks: Sequence[str],
                 kernel_size: int = 3, normalized: bool = True):
        super().__init__()
        bank = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(bank, a=5 ** 0.5)  # stand-in for pretrained filters
        # A buffer, not a parameter: optimisers cannot see it and autograd never tracks it.
        self.register_buffer("filter_bank", bank)
        self.modulators = nn.ModuleDict({t: Modulator(out_channels, out_channels, normalized) for t in tasks})
        self.padding = kernel_size // 2

    def task_weight(self, task: str) -> Tensor:
        """W^t[o, i, :, :] = sum_m W_t[o, m] W_s[m, i, :, :]."""
        return torch.einsum("om,mikl->oikl", self.modulators[task].matrix(), self.filter_bank)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return F.conv2d(x, self.task_weight(task), padding=self.padding)

    def shared_conv(self, x: Tensor) -> Tensor:
        """The bank alone, i.e. the network before any task adapts it."""
        return F.conv2d(x, self.filter_bank, padding=self.padding)



class RCMNet(MultiTaskModel):
    """A stack of RCM convolutions (ReLU between) and one head per task.

    Nothing trainable is shared: :meth:`shared_parameters` is empty, which is the point.
    """

    name = "rcm"

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: dict[str, int],
        channels: Sequence[int] = (16, 16),
        normalized: bool = True,
        dense: bool = True,
    ):
        super().__init__(tasks)
        widths = [in_channels, *channels]
        self.convs = nn.ModuleList(
            RCMConv2d(a, b, tasks, normalized=normalized) for a, b in zip(widths[:-1], widths[1:])
        )
        self.heads = nn.ModuleDict({t: image_head(widths[-1], out_dims[t], dense) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> RCMNet:
        if not problem.is_image:
            raise ValueError("RCM reparameterises convolutions; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=(width, width),
                   dense=problem.dense, **kwargs)

    def features(self, x: Tensor, task: str) -> Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x, task))
        return x

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self.features(x, task))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.forward_task(x, t) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for conv in self.convs:
            yield from conv.modulators[task].parameters()
        yield from self.heads[task].parameters()
