"""MLoRE: a shared generic convolution plus low-rank expert convolutions mixed per task.

Yang, Jiang, Hou, Zhang, Chen, Li, "Multi-Task Dense Prediction via Mixture of Low-Rank
Experts", CVPR 2024, arXiv:2403.17749.

A decoder-side mixture of experts. Each task first projects the shared backbone feature
to its own feature F_t; one MLoRE module then sums three convolution paths on F_t:

  generic path      one k x k convolution shared by *all* tasks (explicit parameter
                    sharing that ties every task together);
  low-rank experts  N experts shared by all tasks, each a k x k convolution down to r_i
                    channels followed by a 1x1 convolution back up (a LoRA-style
                    factorisation), mixed by a task-specific router that keeps the top k;
  task expert       one more low-rank expert that belongs to task t alone;

    G_t = Conv_gen(F_t) + Σ_i w_t,i(F_t) M_i W_i F_t + M_t W_t F_t,    then act, 1x1 conv.

The router pools F_t over space, scores the N experts, keeps the k best and renormalises
(softmax over the kept scores, zero elsewhere): one weight vector per image and task
(tested). There is no non-linearity inside any path, so for a given image and task the
three paths are one ordinary k x k convolution with kernel

    K_t = K_gen + Σ_i w_t,i M_i W_i + M_t W_t

which is the paper's re-parameterisation argument: at inference many experts cost about
as much as the generic convolution alone (tested). A rank-r expert has r (C k^2 + C)
parameters against C^2 k^2 for a full convolution (tested). As in the official code the
generic convolution reads a detached F_t, so the shared path does not push gradients into
the task projections.

Vectors are handled as 1 x 1 maps with k = 1 (every convolution becomes a linear map).

Left out: the ViT backbone and the multi-layer design (MLoRE modules at several backbone
depths, two stacked per depth, and their learned per-pixel fusion), batch normalisation,
router noise, the router's spatial-attention features, the per-image scale on the task
expert that the router predicts, the load-balancing loss on the routing weights, and expert
biases. The routing here (softmax over the kept scores) is that of the official NYUD
configurations; its PASCAL ViT configurations take the softmax over all experts and zero the
dropped ones without renormalising (YuqiYang213/MLoRE). Equation numbers are not quoted: we
could not check them; the structure follows the paper's Sec. 3 and the official code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_each_positive, require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for, trunk_for
from .registry import Problem


class LowRankConv(nn.Module):
    """M W: k x k convolution to ``rank`` channels, then 1x1 back to ``channels`` (no bias)."""

    def __init__(self, channels: int, rank: int, kernel_size: int):
        super().__init__()
        self.down = nn.Conv2d(channels, rank, kernel_size, padding=kernel_size // 2, bias=False)  # W
        self.up = nn.Conv2d(rank, channels, 1, bias=False)  # M

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def kernel(self) -> Tensor:
        """M W as one k x k kernel (C_out, C_in, k, k)."""
        return torch.einsum("or,rikl->oikl", self.up.weight.flatten(1), self.down.weight)


def top_k_softmax(scores: Tensor, k: int) -> Tensor:
    """softmax over each row's k largest scores, zero elsewhere."""
    top, index = scores.topk(k, dim=-1)
    return torch.zeros_like(scores).scatter(-1, index, torch.softmax(top, dim=-1))


class MLoREModule(nn.Module):
    """Generic conv + routed shared low-rank experts + one low-rank expert per task."""

    def __init__(self, channels: int, tasks: Sequence[str], ranks: Sequence[int], k: int,
                 task_rank: int, kernel_size: int):
        super().__init__()
        require_each_positive("ranks", ranks)
        if not 1 <= k <= len(ranks):
            raise ValueError(f"need 1 <= k <= number of experts, got k={k}, experts={len(ranks)}")
        self.k = k
        self.generic = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.experts = nn.ModuleList(LowRankConv(channels, r, kernel_size) for r in ranks)
        self.task_experts = nn.ModuleDict({t: LowRankConv(channels, task_rank, kernel_size) for t in tasks})
        self.routers = nn.ModuleDict({t: nn.Linear(channels, len(ranks)) for t in tasks})
        self.outputs = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in tasks})

    def route(self, f: Tensor, task: str) -> Tensor:
        """w_t: (B, N) weights, k non-zero per image, from the spatially pooled feature."""
        return top_k_softmax(self.routers[task](f.mean(dim=(2, 3))), self.k)

    def mixed(self, f: Tensor, task: str) -> Tensor:
        """G_t before the activation: the sum of the three paths."""
        w = self.route(f, task)
        experts = torch.stack([e(f) for e in self.experts], dim=1)  # (B, N, C, H, W)
        routed = (w[:, :, None, None, None] * experts).sum(1)
        return self.generic(f.detach()) + routed + self.task_experts[task](f)

    def merged_kernel(self, f: Tensor, task: str) -> Tensor:
        """K_t per image, (B, C, C, k, k): the three paths re-parameterised into one conv."""
        w = self.route(f, task)
        expert_kernels = torch.stack([e.kernel() for e in self.experts])  # (N, C, C, k, k)
        routed = torch.einsum("bn,noikl->boikl", w, expert_kernels)
        return self.generic.weight + routed + self.task_experts[task].kernel()

    def forward(self, f: Tensor, task: str) -> Tensor:
        return self.outputs[task](F.gelu(self.mixed(f, task)))


class MLoRE(MultiTaskModel):
    """Shared trunk, a 1x1 projection per task, one MLoRE module, a head per task."""

    name = "mlore"

    def __init__(
        self,
        tasks: Sequence[str],
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        width: int,
        ranks: Sequence[int] = (2, 2, 4, 4),
        k: int = 2,
        task_rank: int = 2,
        kernel_size: int = 3,
    ):
        super().__init__(tasks)
        require_positive(kernel_size=kernel_size, task_rank=task_rank)
        self.trunk = trunk
        self.projections = nn.ModuleDict({t: ChannelLinear(width, width) for t in self.tasks})
        self.module = MLoREModule(width, self.tasks, ranks, k, task_rank, kernel_size)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 2, **kw: object) -> "MLoRE":
        kernel = 3 if problem.is_image else 1  # a vector is a 1 x 1 map
        kw.setdefault("kernel_size", kernel)
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), heads_for(problem, width), width, **kw)

    def task_features(self, x: Tensor) -> dict[str, Tensor]:
        """F_t for every task, always as (B, C, H, W) maps."""
        z = self.trunk(x)
        z = z if z.ndim == 4 else z[:, :, None, None]
        return {t: self.projections[t](z) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = {}
        for t, f in self.task_features(x).items():
            g = self.module(f, t)
            outputs[t] = self.heads[t](g if x.ndim == 4 else g.flatten(1))
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.projections[task].parameters()
        for part in (self.module.task_experts, self.module.routers, self.module.outputs):
            yield from part[task].parameters()
        yield from self.heads[task].parameters()
