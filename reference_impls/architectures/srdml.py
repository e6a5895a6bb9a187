"""SRDML: tasks that should share are pushed to look at the same shared features.

Bai & Zhao, "Saliency-Regularized Deep Multi-Task Learning", KDD 2022 (doi
10.1145/3534678.3539442; code: github.com/BaiTheBest/SRDML, TensorFlow, by the first
author). A shared trunk gives features h(x) and task heads give f_t(h). Each task's
saliency is the gradient of its output with respect to the shared features, summed over
the spatial positions of a feature map, so one weight per channel:

    a_t(x) = sum_positions  d f_t(h) / d h          (the sum of a task's outputs is differentiated)

The regulariser is a weighted mean, over pairs of tasks, of the l1 distance between
their saliencies, averaged over the batch:

    R = sum_{u < v} c_uv / (sum_{u' < v'} c_u'v')  ||a_u(x) - a_v(x)||_1

and the loss is sum_t L_t + mu R. The pair weights c >= 0 are learned by gradient descent
on the same mu R (clipped at zero) while the network trains: the normalised weights move
toward the pairs whose saliencies already agree, and those pairs are pulled closer still.
Learned c is a task-relation matrix: :meth:`SRDML.relation` returns it. The gradient of R
reaches the heads through a second derivative (``create_graph``), so training pays a double
backward pass.

All of this comes from the authors' code: train.py differentiates each task's output with
respect to the shared feature map one example at a time, sums over the spatial axes, weights
the pairwise l1 distances by c / sum c with mu = 0.1 and c starting at 1, and updates c by
the optimiser's step on its analytic gradient mu (D_uv / sum c - sum c D / (sum c)^2), then
clips it at zero; synthetic_train.py does the same with linear heads on the input, so there
the saliency is the input gradient, but keeps the penalty weight at 0 for its first 11
iterations and steps the pair weights with their own SGD (BaiTheBest/SRDML). The paper's text was not available, so its equation
numbers are not cited.

Here R is the mean over the batch's examples, where the authors' code sums them (so its
mu of 0.1 acts on a batch of 200); c is ``relu(c_raw)``, and an entry that reaches zero
gets no gradient and stays there, where the authors clip after each step and an entry can
come back. The saliency is computed whenever autograd is on; under ``torch.no_grad``
the forward pass skips it and :meth:`SRDML.auxiliary_loss` asks for a pass
with gradients. Heads must treat examples independently (no batch norm), so that one
backward pass gives every example's saliency.

Left out: the authors' pre-training of a base model before SRDML training, the paper's
generalisation analysis, the CIFAR-MTL and other experiments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import combinations

import torch
from torch import Tensor, nn

from ..checks import require_non_negative
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for


def saliency(output: Tensor, features: Tensor) -> Tensor:
    """d(sum of ``output``)/d ``features`` per example, summed over any spatial axes: (B, C).

    ``create_graph`` keeps it differentiable, so a penalty on it trains the heads."""
    grad = torch.autograd.grad(output.sum(), features, create_graph=True)[0]
    return grad.flatten(2).sum(dim=2) if grad.dim() > 2 else grad


def saliency_penalty(maps: Sequence[Tensor], pair_weights: Tensor) -> Tensor:
    """sum over pairs u < v of c_uv / sum(c) times the batch mean of ||a_u - a_v||_1."""
    distances = torch.stack([(maps[u] - maps[v]).abs().sum(dim=1).mean() for u, v in combinations(range(len(maps)), 2)])
    return (pair_weights * distances).sum() / pair_weights.sum().clamp_min(torch.finfo(distances.dtype).tiny)


class SRDML(MultiTaskModel):
    """Shared trunk, task heads, pairwise saliency distances weighted by learned task relations."""

    name = "srdml"
    per_pass_attributes = ("_last_penalty",)

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, heads: Mapping[str, nn.Module], mu: float = 0.1):
        super().__init__(tasks)
        require_non_negative(mu=mu)
        self.trunk = trunk
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.pairs = list(combinations(range(len(self.tasks)), 2))
        self.pair_weights = nn.Parameter(torch.ones(len(self.pairs))) if self.pairs else None  # c_uv, u < v
        self.mu = mu
        self._last_penalty: Tensor | None = None  # set by forward, read by auxiliary_loss

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "SRDML":
        return cls(problem.tasks, trunk_for(problem.input_shape, width), heads_for(problem, width), **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def graph_weights(self) -> Tensor | None:
        """c = relu(c_raw): non-negative pair weights (None with a single task)."""
        return None if self.pair_weights is None else torch.relu(self.pair_weights)

    def relation(self) -> Tensor:
        """The learned task relations c as a symmetric K x K matrix (zero diagonal)."""
        k = len(self.tasks)
        c = self.graph_weights()
        if c is None:
            return torch.zeros(k, k)
        matrix = c.new_zeros(k, k)
        for i, (u, v) in enumerate(self.pairs):
            matrix[u, v] = matrix[v, u] = c[i]
        return matrix

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.encode(x)
        if not torch.is_grad_enabled() or self.pair_weights is None:
            self._last_penalty = None if self.pair_weights is not None else h.new_zeros(())
            return self.decode(h)
        if not h.requires_grad:  # a frozen trunk: the saliency still needs a graph from h
            h = h.detach().requires_grad_()
        outputs = self.decode(h)
        maps = [saliency(outputs[t], h) for t in self.tasks]
        self._last_penalty = saliency_penalty(maps, self.graph_weights())
        return outputs

    def auxiliary_loss(self) -> Tensor:
        """mu x the last forward pass's saliency penalty R."""
        if self._last_penalty is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass with autograd enabled first")
        return self.mu * self._last_penalty

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()  # the penalty couples the heads; the outputs do not
