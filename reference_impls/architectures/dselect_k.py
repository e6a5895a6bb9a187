"""DSelect-k: a differentiable gate that selects at most k of n experts.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi, "DSelect-k:
Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
Learning", NeurIPS 2021 (arXiv:2106.03760), Sec. 3. With n = 2^m experts, a *single
expert selector* is a vector z in R^m read as a soft binary code: expert i (bits l(i)) gets

    r(z)_i = prod_j S(z_j)^[l(i)_j = 1] (1 - S(z_j))^[l(i)_j = 0]

where S is the cubic smooth-step: 0 below -gamma/2, 1 above gamma/2 and
-2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 in between (continuously differentiable; gamma defaults to
1, as in the official code). r(z) is a probability vector, one-hot once every S(z_j) is 0 or 1.
DSelect-k combines k selectors with softmax weights:

    q(alpha, Z) = sum_{i=1..k} softmax(alpha)_i r(z^(i))

so the gate always sums to one and, once binary, has at most k non-zeros (tested).
The *static* gate learns alpha and Z directly; the *per-example* gate computes them as
linear functions of the input. An entropy penalty on each r(z^(i)) (:meth:`entropy`)
pushes the selectors to binary; :meth:`DSelectK.auxiliary_loss` gives ``entropy_weight``
times the entropy of the last forward pass, which the training harness adds to the
objective (``entropy_weight`` defaults to 0: opt in with e.g. ``--arch-kw entropy_weight=0.1``).

Left out: n that is not a power of two (the paper handles it; here it is an error), and
the regularisation schedule (the official default weight is a constant 1e-6). The entropy
of a per-example gate is averaged over the batch here; the official code sums it over the
batch. The per-example gate is initialised as in the official code (google-research,
dselect_k_moe/dselect_k_moe.py at ccc94ce): Z's weights and biases from U(-gamma/100,
gamma/100), alpha's from U(-0.05, 0.05), so every selector starts where S is not flat; the
static gate draws Z from U(-gamma/2, gamma/2) and starts alpha at zero (ours). Experts are a
MultiTaskModel's shared parameters, each task gets its own gate and tower, as in the paper's
MTL use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .mmoe import mix_experts


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """Cubic S(t): 0 for t <= -gamma/2, 1 for t >= gamma/2, C^1 in between."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKGate(nn.Module):
    """q(alpha, Z) over ``num_experts`` experts with ``k`` selectors; static or per-example."""

    def __init__(self, num_experts: int, k: int, gamma: float = 1.0, in_features: int | None = None):
        super().__init__()
        if num_experts < 2 or num_experts & (num_experts - 1):
            raise ValueError(f"this DSelect-k needs a power-of-two number of experts >= 2, got {num_experts}")
        m = num_experts.bit_length() - 1  # log2 of a power of two
        self.k, self.m, self.gamma = k, m, gamma
        codes = torch.tensor([[(i >> j) & 1 for j in range(m)] for i in range(num_experts)])
        self.register_buffer("codes", codes.float(), persistent=False)  # l(i), (n, m)
        if in_features is None:  # static gate: alpha and Z are parameters
            self.alpha = nn.Parameter(torch.zeros(k))
            self.z = nn.Parameter(torch.empty(k, m).uniform_(-gamma / 2, gamma / 2))
            self.alpha_net = self.z_net = None
        else:  # per-example gate: alpha = A x, Z = W x
            self.alpha_net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, k))
            self.z_net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, k * m))
            # The official initialisers: with nn.Linear's default about 40 % of the selectors start
            # where S is flat (|z| >= gamma / 2) and get no gradient; these start them near its middle.
            with torch.no_grad():
                for p in self.z_net.parameters():
                    p.uniform_(-gamma / 100, gamma / 100)
                for p in self.alpha_net.parameters():
                    p.uniform_(-0.05, 0.05)

    def parameters_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha of shape (B, k) and Z of shape (B, k, m)."""
        if self.alpha_net is None:
            batch = x.shape[0]
            return self.alpha.expand(batch, -1), self.z.expand(batch, -1, -1)
        return self.alpha_net(x), self.z_net(x).view(-1, self.k, self.m)

    def selectors(self, z: Tensor) -> Tensor:
        """r(z^(i)) for every selector: (B, k, m) -> (B, k, n)."""
        s = smooth_step(z, self.gamma).unsqueeze(-2)  # (B, k, 1, m)
        bits = self.codes  # (n, m)
        return (bits * s + (1 - bits) * (1 - s)).prod(-1)

    def forward(self, x: Tensor) -> Tensor:
        alpha, z = self.parameters_for(x)
        return torch.einsum("bk,bkn->bn", torch.softmax(alpha, -1), self.selectors(z))

    def entropy(self, x: Tensor) -> Tensor:
        """Mean over the batch of sum_i H(r(z^(i))); zero exactly when all selectors are binary."""
        r = self.selectors(self.parameters_for(x)[1])
        return -(r * torch.log(r.clamp_min(1e-12))).sum((-1, -2)).mean()


class DSelectK(MultiTaskModel):
    """``num_experts`` shared experts, a DSelect-k gate and a tower per task."""

    name = "dselect_k"
    per_pass_attributes = ("_last_entropy",)

    def __init__(
        self,
        tasks: Sequence[str],
        make_expert: Callable[[], nn.Module],
        num_experts: int,
        k: int,
        towers: Mapping[str, nn.Module],
        gamma: float = 1.0,
        gate_in_features: int | None = None,
        entropy_weight: float = 0.0,
    ):
        super().__init__(tasks)
        require_positive(k=k)
        self.entropy_weight = entropy_weight
        self._last_entropy: Tensor | None = None  # set by forward, read by auxiliary_loss
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))
        self.gates = nn.ModuleDict(
            {t: DSelectKGate(num_experts, k, gamma, gate_in_features) for t in self.tasks}
        )
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, depth: int = 1, num_experts: int = 4,
                     k: int = 2, per_example: bool = False, entropy_weight: float = 0.0) -> "DSelectK":
        towers = heads_for(problem, width)
        gate_in = math.prod(problem.input_shape) if per_example else None
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth),
                   num_experts, k, towers, gate_in_features=gate_in, entropy_weight=entropy_weight)

    def gate_probabilities(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.gates[t](x) for t in self.tasks}

    def entropy(self, x: Tensor) -> Tensor:
        """Sum of the gates' selector entropies: the paper's regulariser, to add to the loss."""
        return sum(self.gates[t].entropy(x) for t in self.tasks)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        expert_outputs = torch.stack([e(x) for e in self.experts])  # once for every task's gate
        gates = self.gate_probabilities(x)
        self._last_entropy = self.entropy(x)
        return {t: self.towers[t](mix_experts(gates[t], expert_outputs)) for t in self.tasks}

    def auxiliary_loss(self) -> Tensor:
        """``entropy_weight`` x the selectors' entropy of the last forward pass."""
        if self._last_entropy is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass first")
        return self.entropy_weight * self._last_entropy

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.towers[task].parameters()
