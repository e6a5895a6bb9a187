"""ETR-NLP: explicit task routing over features from non-learnable primitives.

Ding, Lu, Wang, Cheng, Boddeti, "Mitigating Task Interference in Multi-Task Learning via
Explicit Task Routing with Non-Learnable Primitives", CVPR 2023 (arXiv:2308.02066).
The official repositories (github.com/ChuntaoDing/ETR-NLP, github.com/zhichao-lu/etr-nlp-mtl)
held no code when looked at; the block below follows the abstract and two public
re-implementations of the block (one for images, one for graphs), read, not copied.

Each layer is an ETR-NLP block with C_out output channels and a sharing ratio gamma in
[0, 1]. For task t and the block input h_t (the image for the first block):

    NLP:  p(h) = [P_1(h), ..., P_k(h)]                 k non-learnable primitives
    shared branch:         s(h)   = A * p(h)            A: learnable 1x1 combination,
                                                        C_s = floor(gamma * C_out) channels
    task-specific branch:  u_t(h) = conv3x3_t(h)        learnable, C_out - C_s channels
    block output:          h_t'   = ReLU([s(h_t), u_t(h_t)])

The primitives P_i have no learnable parameters (fixed random filters, pooling), so no task
can pull them its way; the only parameters shared by all tasks are the 1x1 combination
weights A of the shared branch, and each task also routes its features through a branch no
other task touches (explicit task routing). gamma sets the split: 1 is a fully shared
network over frozen primitives, 0 one private network per task. Because the routes differ,
task t's features after the first block are its own, and every later block runs once per
task (the shared branch with the same A on each task's input); each task ends in its own head.

Tested: the primitives are buffers, not parameters, and do not change when the model trains;
the shared branch's channels are identical across tasks after the first block and the
task-specific ones differ; a task's loss reaches only A, its own branches and its head;
gamma sets the channel split.

Choices where the sources are silent or disagree (the paper's text was not available to
check): the primitive set is a fixed random 3x3 convolution, a fixed random 3x3 convolution
with dilation 2, 3x3 average pooling and 3x3 max pooling (stride 1, same size); the image
re-implementation uses shifts, a random convolution and additive noise, the graph one graph
convolutions and noise; random noise is left out so the model stays deterministic. The
combination A is a dense 1x1 convolution over all k * C_in primitive responses (the image
re-implementation groups it per input channel after a channel shuffle, which needs C_out
divisible by C_in). The task-specific branch is a standard 3x3 convolution of the block input,
as in both re-implementations (not a second combination of the primitive responses). No
batch norm. Image inputs only (the primitives are spatial operators).

Left out: the paper's backbones (ResNet-style networks built from these blocks), the search
over primitive sets and gamma, and its data sets (CelebA, NYUv2, PASCAL-Context, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import image_head

PRIMITIVES = ("conv", "dilated_conv", "avg_pool", "max_pool")


class FixedConv(nn.Module):
    """A 3x3 convolution whose random weights are a buffer: saved with the model, never trained."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.register_buffer("weight", torch.randn(channels, channels, 3, 3) / (9 * channels) ** 0.5)
        self.dilation = dilation

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, padding=self.dilation, dilation=self.dilation)


def primitive(kind: str, channels: int) -> nn.Module:
    """One non-learnable primitive that keeps the number of channels and the image size."""
    if kind == "conv":
        return FixedConv(channels)
    if kind == "dilated_conv":
        return FixedConv(channels, dilation=2)
    if kind == "avg_pool":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if kind == "max_pool":
        return nn.MaxPool2d(3, stride=1, padding=1)
    raise ValueError(f"unknown primitive {kind!r}; choose from {PRIMITIVES}")


class ETRNLPBlock(nn.Module):
    """NLPs + a shared 1x1 combination (gamma of the channels) and one 3x3 conv per task (the rest)."""

    def __init__(self, tasks: Sequence[str], in_channels: int, out_channels: int, gamma: float,
                 primitives: Sequence[str]):
        super().__init__()
        # floor(gamma * C_out), where a product that is an integer but rounds just below it
        # (0.7 * 90 = 62.999...) counts as that integer, as it does an ulp above
        self.shared_channels = int(gamma * out_channels + 1e-9)
        specific_channels = out_channels - self.shared_channels
        self.primitives = nn.ModuleList(primitive(kind, in_channels) for kind in primitives)
        self.shared = (nn.Conv2d(len(primitives) * in_channels, self.shared_channels, 1)
                       if self.shared_channels else None)
        self.specific = nn.ModuleDict({t: nn.Conv2d(in_channels, specific_channels, 3, padding=1)
                                       for t in tasks} if specific_channels else {})

    def responses(self, h: Tensor) -> Tensor:
        """p(h): every primitive's response, concatenated over channels (no parameters involved)."""
        return torch.cat([p(h) for p in self.primitives], dim=1)

    def forward(self, h: Tensor, task: str) -> Tensor:
        parts = []
        if self.shared is not None:
            parts.append(self.shared(self.responses(h)))  # s(h): the only weights every task trains
        if self.specific:
            parts.append(self.specific[task](h))  # u_t(h): explicit route of task t
        return F.relu(torch.cat(parts, dim=1))


class ETRNLP(MultiTaskModel):
    """A stack of ETR-NLP blocks run once per task, then a head per task."""

    name = "etr_nlp"

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: Mapping[str, int],
                 channels: int = 16, num_blocks: int = 2, gamma: float = 0.8,
                 primitives: Sequence[str] = PRIMITIVES, dense: bool = True):
        super().__init__(tasks)
        require_positive(in_channels=in_channels, channels=channels, num_blocks=num_blocks)
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma is the shared fraction of the channels, so it must be in [0, 1], got {gamma}")
        if not primitives:
            raise ValueError("the shared branch needs at least one primitive (primitives is empty)")
        widths = [in_channels] + [channels] * num_blocks
        self.blocks = nn.ModuleList(ETRNLPBlock(self.tasks, a, b, gamma, primitives)
                                    for a, b in zip(widths[:-1], widths[1:]))
        self.heads = nn.ModuleDict({t: image_head(channels, out_dims[t], dense) for t in self.tasks})
        self.gamma = gamma

    @classmethod
    def from_problem(cls, problem, width: int = 16, **kwargs) -> "ETRNLP":
        if not problem.is_image:
            raise ValueError("ETR-NLP's non-learnable primitives are spatial filters and poolings; "
                             "it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=width,
                   dense=problem.dense, **kwargs)

    def features(self, x: Tensor, task: str) -> Tensor:
        """h_t after the last block: the input routed through the shared and task t's branches."""
        h = x
        for block in self.blocks:
            h = block(h, task)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            if block.specific:
                yield from block.specific[task].parameters()
        yield from self.heads[task].parameters()
