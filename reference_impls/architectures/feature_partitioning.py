"""Feature partitioning: every task reads its own subset of the channels of each shared layer.

Newell, Jiang, Wang, Li & Deng, "Feature Partitioning for Efficient Multi-Task
Architectures", ICLR 2020, arXiv:1908.04339 (official code:
github.com/google/multi-task-architecture-search).

All tasks run through one set of layer weights, but task ``t`` sees only the channels its
binary mask ``m_t`` selects: after every shared layer its features are multiplied by the
mask, so channels outside the mask are zero for ``t`` and never feed its next layer or head.
The whole sharing strategy of a network is thus one small matrix ``P`` in ``[0, 1]^{N x N}``
for ``N`` tasks (the paper's search space, read here from the official code's partition
manager):

* ``P[t, t]``: the fraction of the channels task ``t`` uses;
* ``P[s, t]`` (``s != t``): the fraction of the channels tasks ``s`` and ``t`` both use.

Raw search values in ``[0, 1]`` always describe a feasible partition: the off-diagonal entry
is rescaled into the range that the two task fractions allow,
``[max(0, P_ss + P_tt - 1), min(P_ss, P_tt)]`` (:func:`feasible_partition`). Concrete masks
are then drawn so that per-task counts and pairwise overlaps match ``P`` as closely as
possible (:func:`partition_masks`: the first task takes the first channels, each further
task samples its channels with weights that favour the overlaps asked for, best of a few
draws). ``P = 1`` everywhere is a plain shared-bottom network; zero off-diagonals give
disjoint channel sets, i.e. independent narrow networks that merely live in one tensor
(both tested). The paper gives no equation numbers for this search space that we could
check; the rules above follow the official code.

Left out: the search itself (an evolution strategy over ``P`` whose candidates are scored
quickly by distilling each task's features from single-task teachers), the separate
backward (gradient) masks of the official code, the ResNet on Visual Decathlon and the
choice of masking only the last third of the network; masks here are fixed once built. The
official network (google/multi-task-architecture-search at f75c0b4) also masks only the output
of the first convolution inside each residual block (the second convolution, the shortcut and
the features the head reads stay unmasked, so there zero overlaps do not give independent
networks; every layer is masked here), computes one set of masks per feature width and reuses
it for every layer of that width (drawn per layer here), rounds channel counts down (to the
nearest here), keeps the best of 100 draws by squared error (16 by absolute error here), and
has batch norm per task.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


def feasible_partition(raw: Tensor) -> Tensor:
    """Symmetric ``P`` from raw values in [0, 1]: keep the diagonal, rescale the upper triangle."""
    d = raw.diagonal().clamp(0, 1)
    low = (d[:, None] + d[None, :] - 1).clamp(min=0)
    high = torch.minimum(d[:, None], d[None, :])
    upper = (low + raw.clamp(0, 1) * (high - low)).triu(1)
    return upper + upper.T + torch.diag(d)


def _sampling_weights(masks: Tensor, counts: Tensor, t: int) -> Tensor:
    """Per-channel weights for task ``t`` given the masks of tasks ``0..t-1``."""
    channels = masks.shape[1]
    weights = torch.ones(channels, dtype=torch.float64)
    for s in range(t):
        k_s, k_t, shared = counts[s, s].item(), counts[t, t].item(), counts[s, t].item()
        inside = shared / max(k_s, 1)
        outside = max(k_t - shared, 0) / max(channels - k_s, 1)
        weights = weights * torch.where(masks[s], inside, outside)
    return weights if weights.sum() > 0 else torch.ones(channels, dtype=torch.float64)


def partition_masks(p: Tensor, channels: int, generator: torch.Generator, draws: int = 16) -> Tensor:
    """(N, channels) boolean masks whose sizes and pairwise overlaps follow ``P`` (best of ``draws``)."""
    counts = (p.double() * channels).round().long()
    masks = torch.zeros(p.shape[0], channels, dtype=torch.bool)
    masks[0, : counts[0, 0]] = True
    for t in range(1, p.shape[0]):
        weights = _sampling_weights(masks, counts, t)
        n_pick = min(counts[t, t].item(), int((weights > 0).sum()))
        best, best_error = masks[t].clone(), None
        for _ in range(draws if n_pick > 0 else 0):
            candidate = torch.zeros(channels, dtype=torch.bool)
            candidate[torch.multinomial(weights, n_pick, generator=generator)] = True
            error = ((masks[:t] & candidate).sum(1) - counts[:t, t]).abs().sum().item()
            if best_error is None or error < best_error:
                best, best_error = candidate, error
        masks[t] = best
    return masks


class FeaturePartitioning(MultiTaskModel):
    """Shared layers of equal width; task ``t`` keeps only its channels after each one."""

    name = "feature_partitioning"
    training_procedure = ("the partition P is found by an evolution strategy whose candidates are scored by "
                          "distillation from single-task teachers (not implemented here; set_partition() installs a "
                          "P)")

    def __init__(
        self,
        tasks: Sequence[str],
        blocks: Sequence[nn.Module],
        width: int,
        heads: Mapping[str, nn.Module],
        raw_partition: Tensor,
        seed: int = 0,
    ):
        super().__init__(tasks)
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.width = width
        self.seed = seed
        self.register_buffer("masks", torch.zeros(len(blocks), len(self.tasks), width, dtype=torch.bool))
        self.set_partition(raw_partition)

    @classmethod
    def from_problem(
        cls, problem: Problem, width: int = 32, depth: int = 2, fraction: float = 0.75, overlap: float = 0.5,
        seed: int = 0,
    ) -> FeaturePartitioning:
        """Every task uses ``fraction`` of each layer; ``overlap`` places the shared part in its feasible
        range; ``seed`` draws which channels each task gets."""
        n = len(problem.tasks)
        raw = torch.full((n, n), overlap).fill_diagonal_(fraction)
        trunk = trunk_for(problem.input_shape, width, depth)
        return cls(problem.tasks, list(trunk.blocks), width, heads_for(problem, width), raw, seed)

    @torch.no_grad()
    def set_partition(self, raw_partition: Tensor) -> None:
        """Turn raw search values into ``P`` and draw one mask per layer and task."""
        self.partition = feasible_partition(raw_partition.detach().float().cpu())
        generator = torch.Generator().manual_seed(self.seed)
        for layer in range(len(self.blocks)):
            self.masks[layer] = partition_masks(self.partition, self.width, generator).to(self.masks.device)

    def task_features(self, x: Tensor, task: str) -> Tensor:
        """The shared layers as task ``task`` sees them: its channels only, the rest zeroed."""
        k = self.tasks.index(task)
        for block, mask in zip(self.blocks, self.masks):
            h = block(x)
            x = h * mask[k].to(h.dtype).view(1, -1, *([1] * (h.ndim - 2)))
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.task_features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Channel ownership lives inside the shared weight tensors; only the heads are separate.
        return self.heads[task].parameters()
