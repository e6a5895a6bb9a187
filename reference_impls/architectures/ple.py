"""PLE (Progressive Layered Extraction): CGC stacked into several extraction levels.

Tang, Liu, Zhao, Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning
(MTL) Model for Personalized Recommendations", RecSys 2020 (doi:10.1145/3383313.3412236),
Sec. 4.2 (CGC, the single level, is Sec. 4.1, Eqs. 2-5). Level j has task experts and shared
experts like CGC (cgc.py). Task k's gate at level j reads task k's output of the previous
level, and a *shared* gate (all levels but the last) mixes every expert of the level to feed
the next level's shared experts:

    g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)       task path (Eq. 6)
    g^{s,j}(x) = w^{s,j}(g^{s,j-1}(x)) S^{s,j}(x)       shared path, S^{s,j} = all experts
    y^k(x) = t^k(g^{k,N}(x))                            (Eq. 7)

with g^{k,0} = g^{s,0} = x; each w is a softmax of a linear map of its selector (Eq. 3) and
S stacks the selected experts' outputs (Eq. 4). The paper writes no separate formula for the
shared gate: it says in prose that the shared module's selected matrix holds all shared and
task experts of the layer, which the second line spells out. Because the shared gate reads
every task's experts, a task's experts below the last level *do* get gradient from other
tasks; only the last level's task experts and gate, and the task gate of the level below
it, are task k's alone (tested). LibMTL's PLE has no shared gate: each task runs the shared
experts on its own previous output, so no task's experts reach another task; here the shared
experts read g^{s,j-1}, the output of the paper's shared module (compared with
LibMTL/architecture/PLE.py).

DeepCTR's PLE (deepctr/models/multitask/ple.py) wires levels as we do: a bias-free shared
gate on every level but the last, reading the shared path, and task experts reading their
task's path. LibMTL's gates, unlike Eq. (3) here, add a bias, and it lists the shared experts
first. DeepCTR-Torch's port is not a reference: it sizes the shared experts by the per-task
count and gates hidden layers by default.

Left out: what the paper adds on top of the architecture for recommendation (Sec. 4.3:
sample-space aware joint loss, per-task loss weight schedules; Eqs. 8-10). Every task has
``task_experts`` own experts per level, where the paper lets the count differ by task.

Equation numbers checked in a PDF-to-text transcript of the RecSys 2020 paper, found in the public
GitHub index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .mmoe import mix_experts, require_expert_counts, softmax_gate


class ExtractionLevel(nn.Module):
    """One level: experts per task and shared, a gate per task, optionally a shared gate."""

    def __init__(self, tasks: Sequence[str], make_expert: Callable[[], nn.Module],
                 shared_experts: int, task_experts: int, gate_in_features: int, shared_gate: bool):
        super().__init__()
        self.tasks = tuple(tasks)
        self.shared_experts = nn.ModuleList(make_expert() for _ in range(shared_experts))
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList(make_expert() for _ in range(task_experts)) for t in self.tasks}
        )
        per_task = task_experts + shared_experts
        self.gates = nn.ModuleDict({t: softmax_gate(gate_in_features, per_task) for t in self.tasks})
        everything = task_experts * len(self.tasks) + shared_experts
        self.shared_gate = softmax_gate(gate_in_features, everything) if shared_gate else None

    def forward(self, task_inputs: Mapping[str, Tensor], shared_input: Tensor
                ) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        shared = [e(shared_input) for e in self.shared_experts]
        own = {t: [e(task_inputs[t]) for e in self.task_experts[t]] for t in self.tasks}
        gates = {t: self.gates[t](task_inputs[t]) for t in self.tasks}
        outputs = {t: mix_experts(gates[t], own[t] + shared) for t in self.tasks}  # g^{k,j}
        shared_output = None
        if self.shared_gate is not None:
            gates["shared"] = self.shared_gate(shared_input)
            every_expert = [o for t in self.tasks for o in own[t]] + shared  # S^{s,j}
            shared_output = mix_experts(gates["shared"], every_expert)  # g^{s,j}
        return outputs, shared_output, gates


class PLE(MultiTaskModel):
    """``len(make_expert_per_level)`` extraction levels and a tower per task."""

    name = "ple"
    equations_checked_in = "a PDF-to-text transcript of the RecSys 2020 paper"

    def __init__(
        self,
        tasks: Sequence[str],
        make_expert_per_level: Sequence[Callable[[], nn.Module]],
        gate_in_features_per_level: Sequence[int],
        shared_experts: int,
        task_experts: int,
        towers: Mapping[str, nn.Module],
    ):
        super().__init__(tasks)
        require_expert_counts(shared_experts, task_experts)
        n = len(make_expert_per_level)
        self.levels = nn.ModuleList(
            ExtractionLevel(self.tasks, make_expert_per_level[j], shared_experts, task_experts,
                            gate_in_features_per_level[j], shared_gate=j < n - 1)
            for j in range(n)
        )
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, depth: int = 1, num_levels: int = 2,
                     shared_experts: int = 2, task_experts: int = 1) -> "PLE":
        shape = tuple(problem.input_shape)
        level_shape = (width,) + shape[1:]  # experts keep spatial size, change the width
        shapes = [shape] + [level_shape] * (num_levels - 1)
        makers = [lambda s=s: trunk_for(s, width, depth) for s in shapes]
        towers = heads_for(problem, width)
        return cls(problem.tasks, makers, [math.prod(s) for s in shapes],
                   shared_experts, task_experts, towers)

    def run(self, x: Tensor) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        """Task outputs and, per level, every gate's probabilities (key "shared" too)."""
        task_inputs = {t: x for t in self.tasks}
        shared_input = x
        all_gates = []
        for level in self.levels:
            task_inputs, shared_input, gates = level(task_inputs, shared_input)
            all_gates.append(gates)
        return {t: self.towers[t](task_inputs[t]) for t in self.tasks}, all_gates

    def gate_probabilities(self, x: Tensor) -> list[dict[str, Tensor]]:
        return self.run(x)[1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.run(x)[0]

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Private = downstream of the last shared gate: the last level's task experts and
        # gate, and the gate one level below, whose output only task k's path reads.
        last = self.levels[-1]
        yield from last.task_experts[task].parameters()
        yield from last.gates[task].parameters()
        if len(self.levels) > 1:
            yield from self.levels[-2].gates[task].parameters()
        yield from self.towers[task].parameters()
