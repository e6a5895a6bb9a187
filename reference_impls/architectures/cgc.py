"""CGC (Customized Gate Control): shared experts plus experts owned by each task.

Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020 (doi:10.1145/3383313.3412236),
Sec. 4.1. Task k has m_k experts of its own and shares m_s experts with every task; its
gate mixes only those m_k + m_s experts:

    y^k(x) = t^k(g^k(x))                                             (Eq. 5)
    g^k(x) = w^k(x) S^k(x)                                           (Eq. 2)
    w^k(x) = softmax(W_g^k x)                                        (Eq. 3)
    S^k(x) = [E_(k,1), ..., E_(k,m_k), E_(s,1), ..., E_(s,m_s)]      (Eq. 4)

so task k's experts receive no gradient from any other task's loss (tested), unlike
MMoE where every expert serves every task. CGC is the single-level case of PLE (ple.py).

Left out: the paper's recommender features and its joint-loss details for tasks with
different sample spaces. Every task gets the same number of own experts (``task_experts``);
the paper's m_k, like LibMTL's CGC, may differ from task to task.

Checked against LibMTL (LibMTL/architecture/CGC.py) and one level of DeepCTR's PLE
(deepctr/models/multitask/ple.py). LibMTL's gates add a bias to W_g^k x and list the shared
experts first; we keep Eq. (3) bias-free, as DeepCTR does, and order S^k as in Eq. (4).

Equation numbers checked in a PDF-to-text transcript of the PLE paper (RecSys 2020), found in the
public GitHub index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .mmoe import mix_experts, require_expert_counts, softmax_gate


class CGC(MultiTaskModel):
    """Per task: ``task_experts`` own experts, a gate and a tower; ``shared_experts`` common."""

    name = "cgc"
    equations_checked_in = "a PDF-to-text transcript of the PLE paper (RecSys 2020)"

    def __init__(
        self,
        tasks: Sequence[str],
        make_expert: Callable[[], nn.Module],
        shared_experts: int,
        task_experts: int,
        gate_in_features: int,
        towers: Mapping[str, nn.Module],
    ):
        super().__init__(tasks)
        require_expert_counts(shared_experts, task_experts)
        self.shared_experts = nn.ModuleList(make_expert() for _ in range(shared_experts))
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList(make_expert() for _ in range(task_experts)) for t in self.tasks}
        )
        width = task_experts + shared_experts
        self.gates = nn.ModuleDict({t: softmax_gate(gate_in_features, width) for t in self.tasks})
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, depth: int = 1,
                     shared_experts: int = 2, task_experts: int = 1) -> "CGC":
        towers = heads_for(problem, width)
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth),
                   shared_experts, task_experts, math.prod(problem.input_shape), towers)

    def gate_probabilities(self, x: Tensor) -> dict[str, Tensor]:
        """w^k(x): weights over [task k's experts, shared experts], each (B, m_k + m_s)."""
        return {t: self.gates[t](x) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = [e(x) for e in self.shared_experts]
        gates = self.gate_probabilities(x)
        outputs = {}
        for t in self.tasks:
            selected = [e(x) for e in self.task_experts[t]] + shared  # S^k(x)
            outputs[t] = self.towers[t](mix_experts(gates[t], selected))  # t^k(w^k(x) S^k(x))
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.task_experts[task].parameters()
        yield from self.gates[task].parameters()
        yield from self.towers[task].parameters()
