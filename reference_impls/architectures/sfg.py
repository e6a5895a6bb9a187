"""Stochastic filter groups: every filter learns whether it is shared or belongs to one task.

Bragman, Tanno, Ourselin, Alexander, Cardoso, "Stochastic Filter Groups for Multi-Task CNNs:
Learning Specialist and Generalist Convolution Kernels", ICCV 2019, arXiv:1908.09597.

Each convolution layer's filters are split among T + 1 groups: one "specialist" group per
task and one "generalist" (shared) group. Which group a filter belongs to is a categorical
random variable with learned probabilities, one distribution per filter; training samples
the assignment with the Gumbel-softmax relaxation so the probabilities get gradients, and
the network's connectivity follows the sampled groups (the paper's Sec. 3):

* shared filters at layer l + 1 read only the shared features of layer l;
* task t's filters read the shared features and task t's own features;
* task t's head reads the last layer's shared and task-t features.

Features of task A's specialists therefore never reach task B (tested). Here a layer
keeps one weight tensor W and one assignment z (filters x groups); with h_s and h_t the
masked shared and task-t feature maps,

    h_s' = z_s * f(W h_s),      h_t' = z_t * f(W (h_s + h_t)),

where f is the layer (convolution + ReLU) and z_g the per-filter weight of group g (one-hot
when the assignment is hard). Since a hard assignment puts each filter in one group, the
masked maps occupy disjoint channels and h_s + h_t is their concatenation. At evaluation
the most probable group is used, so the network is deterministic (tested).

Training objective. The paper learns the assignment distributions q by variational
inference: the task losses plus the KL divergence of q from a prior over the groups.
:meth:`StochasticFilterGroups.kl_divergence` is that KL, summed over filters and layers,
against a uniform prior over the T + 1 groups, KL = sum_filters (sum_g q_g log q_g + log(T + 1)),
and :meth:`StochasticFilterGroups.auxiliary_loss` gives ``kl_weight`` times it, which the
training harness adds to the task losses. The uniform prior and the default
``kl_weight = 1e-3`` (about one over the number of training examples, as the KL of an ELBO
is weighted per example) are our choices; 0 leaves the task losses alone. The first author's
research code subtracts the mean entropy of each layer's filter probabilities at weight 1, the
same uniform prior up to a constant, at another scale; it adds the Gumbel noise to the
probabilities rather than their logs (no filter can then pass about 0.58 for one group; ours
is the standard form the paper describes), and its default temperature is 0.1 (1.0 here).

Left out: the paper's own prior and KL weighting, its temperature annealing schedule (the
temperature is a fixed attribute), and its medical-imaging backbones. The same mechanism is applied to the units of a
fully connected trunk for vector inputs. Also left out, from the first author's research code
(github.com/fbragman/NiftyNet, LearnedCategoricalGroupConvolutionalLayer and demo_sfg.py): its
option of hard straight-through samples in training, its evaluation by one more hard Gumbel
sample (here the most probable group), the group probabilities kept as normalised softplus
values (here a softmax of logits), batch norm per group, and its 1x1 convolution that merges
each task's concatenated [specialist, shared] maps back to the layer width.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_non_negative
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


def sample_gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """softmax((logits + Gumbel noise) / tau) over the last dimension."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-10)))
    return torch.softmax((logits + gumbel) / tau, dim=-1)


def _channel_view(z: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-filter weight (C,) to broadcast over (B, C) or (B, C, H, W)."""
    return z.view(1, -1, *([1] * (like.ndim - 2)))


class StochasticFilterGroups(MultiTaskModel):
    """Trunk layers whose filters are softly or hardly assigned to shared / specialist groups."""

    name = "sfg"

    def __init__(
        self, tasks: Sequence[str], layers: Sequence[nn.Module], widths: Sequence[int],
        heads: Mapping[str, nn.Module], tau: float = 1.0, generator: torch.Generator | None = None,
        kl_weight: float = 1e-3,
    ):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_non_negative(kl_weight=kl_weight)
        self.kl_weight = kl_weight
        self.layers = nn.ModuleList(layers)
        groups = len(self.tasks) + 1  # column 0: shared, column 1 + k: task k's specialists
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(w, groups)) for w in widths)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.tau = tau
        self.generator = generator

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2,
                     tau: float = 1.0, kl_weight: float = 1e-3) -> "StochasticFilterGroups":
        trunk = trunk_for(problem.input_shape, width, depth)
        return cls(problem.tasks, list(trunk.blocks), [width] * depth, heads_for(problem, width), tau=tau,
                   kl_weight=kl_weight)

    def assignment_probabilities(self) -> list[Tensor]:
        """Per layer, a (filters, T + 1) matrix whose rows are distributions over groups."""
        return [torch.softmax(logit, dim=-1) for logit in self.logits]

    def kl_divergence(self) -> Tensor:
        """KL(q || uniform) of every filter's group distribution, summed over filters and layers."""
        total = self.logits[0].new_zeros(())
        for logit in self.logits:
            log_q = torch.log_softmax(logit, dim=-1)
            total = total + (log_q.exp() * log_q).sum() + logit.shape[0] * math.log(logit.shape[1])
        return total

    def auxiliary_loss(self) -> Tensor:
        """``kl_weight`` x :meth:`kl_divergence` (from the parameters; no forward needed)."""
        return self.kl_weight * self.kl_divergence()

    def assignments(self) -> list[Tensor]:
        """Gumbel-softmax samples in training, the one-hot most probable group in eval."""
        if self.training:
            return [sample_gumbel_softmax(logit, self.tau, self.generator) for logit in self.logits]
        return [nn.functional.one_hot(logit.argmax(-1), logit.shape[-1]).to(logit.dtype) for logit in self.logits]

    def streams(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The last layer's shared features and each task's specialist features."""
        shared, own = x, {t: torch.zeros_like(x) for t in self.tasks}
        for layer, z in zip(self.layers, self.assignments()):
            new_shared = _channel_view(z[:, 0], x) * layer(shared)
            own = {t: _channel_view(z[:, 1 + k], x) * layer(shared + own[t]) for k, t in enumerate(self.tasks)}
            shared = new_shared
        return shared, own

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared, own = self.streams(x)
        return {t: self.heads[t](shared + own[t]) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Filter weights are one tensor per layer; which filters serve a task is in z.
        return self.heads[task].parameters()
