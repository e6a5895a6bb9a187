"""MMoE: shared experts, one softmax gate per task.

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018 (doi:10.1145/3219819.3220007; no arXiv version).
The shared bottom of Eq. (1), y_k = h^k(f(x)), is replaced by a task-specific mixture of
n shared experts f_i:

    y_k = h^k(f^k(x))                       Eq. (6)
    f^k(x) = sum_i g^k(x)_i f_i(x)          Eq. (7)
    g^k(x) = softmax(W_gk x)                Eq. (8)

Each gate is a probability distribution over experts (tested); tasks whose gates
overlap share more. The gate reads the raw input (flattened for images), as in Eq. (8).

Left out: nothing of the architecture; the paper's recommender-system feature
embeddings and its hyper-parameter tuning are not part of it.

Checked against LibMTL (LibMTL/architecture/MMoE.py), DeepCTR (deepctr/models/multitask/mmoe.py)
and drawbridge/keras-mmoe (mmoe.py): the wiring agrees. LibMTL's and keras-mmoe's gates add a
bias to W_gk x; like DeepCTR we keep Eq. (8) bias-free. DeepCTR can put hidden layers before
the gate's softmax (none by default; the PyTorch port, DeepCTR-Torch, has a 64-unit hidden
layer by default); here the gate is the single linear map of Eq. (8).

Equation numbers are those of the KDD 2018 ACM copy (its p. 3 for Eq. 1, pp. 4-5 for Eqs. 5-8,
where Eq. 5 is the one-gate mixture, OMoE) kept in a paper collection, 3219819.3220007.pdf of
anmingyu11/Gor-rok (under Papers/multitask/MMOE/, commit 70760e1). The synthetic data of its
Sec. 3.2, Eqs. 2-4, are generated in :mod:`reference_impls.data.synthetic`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative, require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for


def softmax_gate(in_features: int, num_experts: int) -> nn.Sequential:
    """Eq. (8): a bias-free linear map of the (flattened) input, then a softmax."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_experts, bias=False), nn.Softmax(-1))


def require_expert_counts(shared_experts: int, task_experts: int) -> None:
    """Shared and per-task expert counts (CGC, PLE, STEM): either may be 0, but every task's
    gate needs at least one expert to weigh."""
    require_non_negative(shared_experts=shared_experts, task_experts=task_experts)
    if shared_experts + task_experts < 1:
        raise ValueError("every task needs an expert: shared_experts + task_experts must be at least 1, got 0")


def mix_experts(weights: Tensor, expert_outputs: Tensor | Sequence[Tensor]) -> Tensor:
    """sum_i weights[:, i] * expert_outputs[i] for outputs of shape (B, ...).

    Where several gates mix the same experts, stack them once and pass the (n, B, ...) tensor:
    each call keeps its stack for the backward pass, so a list would cost one copy per gate."""
    stacked = expert_outputs if isinstance(expert_outputs, Tensor) else torch.stack(list(expert_outputs))
    return torch.einsum("bn,nb...->b...", weights, stacked)


class MMoE(MultiTaskModel):
    """``num_experts`` experts from ``make_expert()``, a gate and a tower per task."""

    name = "mmoe"
    equations_checked_in = "3219819.3220007.pdf of anmingyu11/Gor-rok"

    def __init__(
        self,
        tasks: Sequence[str],
        make_expert: Callable[[], nn.Module],
        num_experts: int,
        gate_in_features: int,
        towers: Mapping[str, nn.Module],
    ):
        super().__init__(tasks)
        require_positive(num_experts=num_experts)
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))
        self.gates = nn.ModuleDict({t: softmax_gate(gate_in_features, num_experts) for t in self.tasks})
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, depth: int = 1, num_experts: int = 4) -> "MMoE":
        towers = heads_for(problem, width)
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth),
                   num_experts, math.prod(problem.input_shape), towers)

    def gate_probabilities(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.gates[t](x) for t in self.tasks}  # Eq. (8), each (B, n)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        expert_outputs = torch.stack([expert(x) for expert in self.experts])  # f_i(x), shared: stacked once
        gates = self.gate_probabilities(x)
        return {t: self.towers[t](mix_experts(gates[t], expert_outputs)) for t in self.tasks}  # (6)-(7)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.towers[task].parameters()
