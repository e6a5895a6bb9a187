"""Deep Elastic Networks: a selector picks, per input and task, how much of each block to run.

Ahn, Kim & Oh, "Deep Elastic Networks with Model Selection for Multi-Task Learning",
ICCV 2019, arXiv:1909.04860 (official TensorFlow code: github.com/rllab-snu/Deep-Elastic-Network).

Two networks. The *estimator* is a residual network whose blocks are elastic: the hidden
channels of a block's first layer are split into nested groups (for three groups of a
width-``C`` block: ``C/4``, ``C/4``, ``C/2``), and level ``k`` of the block runs the first
``k`` groups only. Level 0 runs none, so the block is skipped (the identity); the top level
is the full block. One estimator therefore holds a hierarchy of sub-models of every
depth and width, all sharing their weights; run with the levels z = (l_1, ..., l_n) of its
n blocks it is the model f(x; theta_est, z, t) of Eq. (1). The *selector* is a small
network that, for an input of task ``t``, outputs a softmax over the levels of every block
(the h x n column-stochastic matrix C of Eq. (2)); a whole structure z then has probability

    P(z; x) = prod_i C_i(l_i; x)                                   Eq. (3)

At test time each block takes its most likely level, so the model size depends on the
instance and the task.

The paper minimises E_{z ~ g(x)} [ L(f(x; theta_est, z, t), y) + S(z) ] (Eq. (4)) with the
size penalty S(z) = rho * ((1/n) sum_i d_i(l_i))^2 (Eq. (5)), d_i being the fraction of
block i's parameters kept, and trains the selector on that cost by the score-function
(REINFORCE) gradient of Eqs. (6)-(7). Here, as in the official code, for a batch, levels
``k`` are sampled from the selector's distribution (with probability ``epsilon`` per
example, from a random softmax instead, for exploration), the estimator is run with them,
and each example gets the reward

    R = (1 - u^2) / rho - CE + 1

where ``CE`` is the example's task loss and ``u`` the fraction of hidden channels used,
averaged over blocks and over the batch. The selector minimises
``- log(prod_blocks p(k_block)) * R``. So rho divides the size term instead of multiplying
it as in Eq. (5), ``u`` is a batch mean rather than a per-example value, and the samples are
averaged with equal weights, whereas the last line of Eq. (7) as printed also weights each
sampled z by P(z; x). The estimator is trained on the task losses, first mostly at full size
with some random levels mixed in (the paper's initial distribution, Eq. (8), puts extra
mass tau = 0.75 on the full structure), then with the selector's choices. These rules are
read from the official code (``get_reward``, ``density``, ``sample_pred``, the
``policy_loss``). Equation numbers are those of the ICCV 2019 camera-ready copy (pages
6529-6538) kept on the first author's site as files/den.pdf of
Chanho-Ahn/Chanho-Ahn.github.io (commit ad9fe7d).

Left out: the ResNet / WideResNet backbones, batch normalisation, the per-dataset input
stems and separate input sizes of the paper's tasks (here all tasks read the same input and
the task enters the selector through its own output layer), and the two-stage schedule
itself (the methods needed for it are here). Without batch normalisation the second
layer of a block has no bias, so that level 0 is exactly the identity (in the official code,
with batch norm between the mask and the second convolution, only roughly). The official
blocks apply a ReLU before each convolution and the network a last ReLU before the heads
(here a block's input has none after the first block); its ResNet file masks the width in the
first block only, its WideResNet file in every block, as here; its exploration rate decays as
0.99^step, here ``epsilon`` is fixed (rllab-snu/Deep-Elastic-Network at 5051dcd).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for
from .registry import Problem


def group_bounds(width: int, groups: int = 3) -> list[int]:
    """Cumulative hidden widths of levels ``0..groups``: group 0 is ``width / 2^(groups-1)``,
    group ``i > 0`` is ``width / 2^(groups-i)``, so the top level uses every channel."""
    sizes = [width // 2 ** (groups - 1)] + [width // 2 ** (groups - i) for i in range(1, groups)]
    if sum(sizes) != width or min(sizes) < 1:
        raise ValueError(f"width {width} cannot be split into {groups} nested groups")
    return [sum(sizes[:k]) for k in range(groups + 1)]


def _layer(width: int, image: bool, bias: bool = True) -> nn.Module:
    return nn.Conv2d(width, width, 3, padding=1, bias=bias) if image else nn.Linear(width, width, bias=bias)


class ElasticBlock(nn.Module):
    """``x + W2 (m_k * ReLU(W1 x + b1))``: ``m_k`` keeps the first ``bounds[k]`` hidden channels."""

    def __init__(self, width: int, image: bool):
        super().__init__()
        self.inner = _layer(width, image)
        self.outer = _layer(width, image, bias=False)

    def forward(self, x: Tensor, active: Tensor) -> Tensor:
        """``active``: (B,) number of hidden channels each example uses."""
        h = torch.relu(self.inner(x))
        mask = torch.arange(h.shape[1], device=h.device) < active[:, None]
        return x + self.outer(h * mask.to(h.dtype).view(*mask.shape, *([1] * (h.ndim - 2))))


class DeepElasticNetwork(MultiTaskModel):
    """Estimator (stem, elastic blocks, one head per task) plus a selector over block levels."""

    name = "den"
    equations_checked_in = "files/den.pdf of Chanho-Ahn/Chanho-Ahn.github.io"
    training_procedure = "the selector is trained separately, by selector_loss() with its reward over the chosen levels"

    def __init__(
        self,
        tasks: Sequence[str],
        in_shape: Sequence[int],
        heads: Mapping[str, nn.Module],
        width: int = 16,
        num_blocks: int = 2,
        groups: int = 3,
        selector_width: int = 8,
    ):
        super().__init__(tasks)
        require_positive(num_blocks=num_blocks, selector_width=selector_width)
        image = len(in_shape) == 3
        self.bounds = group_bounds(width, groups)
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1) if image
                                  else nn.Linear(in_shape[0], width), nn.ReLU())
        self.blocks = nn.ModuleList(ElasticBlock(width, image) for _ in range(num_blocks))
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if image else []
        first = nn.Conv2d(in_shape[0], selector_width, 3, padding=1) if image else nn.Linear(in_shape[0], selector_width)
        self.selector_body = nn.Sequential(first, nn.ReLU(), *pool)
        self.selector_heads = nn.ModuleDict(
            {t: nn.Linear(selector_width, num_blocks * (groups + 1)) for t in self.tasks})
        self.width = width

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> DeepElasticNetwork:
        return cls(problem.tasks, problem.input_shape, heads_for(problem, width), width=width, **kwargs)

    @property
    def num_levels(self) -> int:
        return len(self.bounds)

    def policy(self, x: Tensor, task: str) -> Tensor:
        """(B, blocks, levels): the selector's distribution over each block's level."""
        logits = self.selector_heads[task](self.selector_body(x))
        return logits.view(x.shape[0], len(self.blocks), self.num_levels).softmax(-1)

    def select(self, x: Tensor, task: str) -> Tensor:
        """(B, blocks) most likely level of every block (the test-time choice)."""
        return self.policy(x, task).argmax(-1)

    def forward_task(self, x: Tensor, task: str, levels: Tensor) -> Tensor:
        """Task output with block ``j`` of example ``i`` run at level ``levels[i, j]``."""
        active = torch.tensor(self.bounds, device=x.device)[levels]
        h = self.stem(x)
        for j, block in enumerate(self.blocks):
            h = block(h, active[:, j])
        return self.heads[task](h)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.forward_task(x, t, self.select(x, t).detach()) for t in self.tasks}

    def full_levels(self, batch: int, device: torch.device | None = None) -> Tensor:
        return torch.full((batch, len(self.blocks)), self.num_levels - 1, dtype=torch.long, device=device)

    def sample_levels(self, probs: Tensor, epsilon: float, generator: torch.Generator) -> Tensor:
        """Inverse-CDF samples; with probability ``epsilon`` an example uses a random softmax."""
        b, n, k = probs.shape
        explore = torch.rand(b, 1, 1, generator=generator).to(probs.device) < epsilon
        noise = torch.rand(b, n, k, generator=generator).to(probs).softmax(-1)
        mixed = torch.where(explore, noise, probs.detach())
        u = torch.rand(b, n, 1, generator=generator).to(probs)
        return (mixed.cumsum(-1)[..., :-1] < u).sum(-1)

    def density(self, levels: Tensor) -> Tensor:
        """``u``: fraction of hidden channels used, averaged over blocks and the batch."""
        return torch.tensor(self.bounds, device=levels.device)[levels].float().mean() / self.width

    def reward(self, losses: Tensor, levels: Tensor, rho: float) -> Tensor:
        """Per-example ``R = (1 - u^2) / rho - loss + 1``."""
        return (1 - self.density(levels) ** 2) / rho - losses + 1

    def selector_loss(
        self, x: Tensor, task: str, per_example_loss: Callable[[Tensor], Tensor],
        generator: torch.Generator, rho: float = 10.0, epsilon: float = 0.0,
    ) -> Tensor:
        """REINFORCE loss of the selector for one batch of ``task`` (the estimator gets no gradient)."""
        probs = self.policy(x, task)
        levels = self.sample_levels(probs, epsilon, generator)
        with torch.no_grad():
            r = self.reward(per_example_loss(self.forward_task(x, task, levels)), levels, rho)
        chosen = probs.gather(-1, levels.unsqueeze(-1)).squeeze(-1)
        return (-torch.log(chosen.prod(-1) + 1e-15) * r).mean()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
        yield from self.selector_heads[task].parameters()
