"""SNR: shared sub-networks routed to the tasks through learned, sparsifiable connections.

Ma, Zhao, Chen, Li, Hong, Chi, "SNR: Sub-Network Routing for Flexible Parameter Sharing in
Multi-Task Learning", AAAI 2019, pp. 216-223 (doi:10.1609/aaai.v33i01.3301216).
The shared bottom is cut into K sub-networks with outputs v_j. Each connection from
sub-network j to upper unit i carries a coding variable z_ij in [0, 1]:

    SNR-Trans:  u_i = sum_j z_ij W_ij v_j        SNR-Aver:  u_i = sum_j z_ij v_j

z follows the hard-concrete relaxation of L0 (Louizos et al., 2018), so it can be exactly
0 (connection cut) or exactly 1 and still be trained by gradient descent:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log alpha) / beta)
    z = min(1, max(0, s (zeta - gamma) + gamma))
    at test time z = min(1, max(0, sigmoid(log alpha) (zeta - gamma) + gamma))

and the expected number of open connections, sum sigmoid(log alpha - beta log(-gamma /
zeta)), is the L0 penalty added to the loss. Which sub-networks a task uses is thus
learned, from fully shared (all z = 1: a fixed dense connection, tested) to disjoint.

Here the upper units are the task towers (one routed input per task). Each connection
has its own W_ij (SNR-Trans, the default) or none (SNR-Aver, ``transform=False``).
:meth:`SNR.auxiliary_loss` gives ``l0_weight`` times the L0 penalty; the training
harness adds it (default weight 0: opt in with e.g. ``--arch-kw l0_weight=1e-3``).
The noise u comes from a CPU ``torch.Generator`` seeded by ``seed``, so samples do not
depend on the device. beta, gamma, zeta are Louizos et al.'s constants (2/3, -0.1, 1.1);
log alpha starts at 2, so every connection starts mostly open (test-time z = 0.96).
The paper's equations are not cited by number: the only text of it found here is a Chinese
translation in the GitHub file index (index id 58733570297), whose numbering (only the three
forms of the training objective carry numbers, 1-3) was not compared with the original. That
translation writes the routing as v_i = sum_j z_ij W_ij u_j (u: lower outputs, v: upper
inputs; the letters are swapped above) and says beta, gamma, zeta were drawn at random from
[0.5, 0.9], [-1, -0.1] and [1.1, 2] in the hyper-parameter search, with the L0 weight from
{1e-3, 1e-4, 1e-5}.

Left out: several routing levels stacked (one level here), and the paper's
hyper-parameter search over the sub-network split on YouTube-8M and the recommendation data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, head_for, trunk_for


class HardConcrete(nn.Module):
    """Coding variables z in [0, 1] of a given shape with a learnable log alpha each."""

    def __init__(self, shape: Sequence[int], generator: torch.Generator, init_log_alpha: float = 2.0,
                 beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), init_log_alpha))
        self.generator, self.beta, self.gamma, self.zeta = generator, beta, gamma, zeta

    def stretch(self, s: Tensor) -> Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self, n: int = 1) -> Tensor:
        """n training-time draws of z, shape (n, *shape)."""
        u = torch.rand((n, *self.log_alpha.shape), generator=self.generator).clamp(1e-6, 1 - 1e-6)
        u = u.to(self.log_alpha)
        return self.stretch(torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta))

    def forward(self) -> Tensor:
        if self.training:
            return self.sample()[0]
        return self.stretch(torch.sigmoid(self.log_alpha))  # deterministic at test time

    def l0_penalty(self) -> Tensor:
        """Expected number of non-zero z: sum of P(z > 0)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()


class SNR(MultiTaskModel):
    """K shared sub-networks, routed to each task tower through z (and W_ij for SNR-Trans)."""

    name = "snr"

    def __init__(self, tasks: Sequence[str], make_subnetwork: Callable[[], nn.Module], num_subnetworks: int,
                 width: int, towers: Mapping[str, nn.Module], transform: bool = True,
                 l0_weight: float = 0.0, seed: int = 0):
        super().__init__(tasks)
        require_positive(num_subnetworks=num_subnetworks)
        self.subnetworks = nn.ModuleList(make_subnetwork() for _ in range(num_subnetworks))
        self.transform, self.l0_weight = transform, l0_weight
        self.transforms = nn.ModuleDict({  # W_ij, one per connection (SNR-Trans only)
            t: nn.ModuleList(ChannelLinear(width, width, bias=False) for _ in range(num_subnetworks))
            for t in self.tasks
        }) if transform else None
        generator = torch.Generator().manual_seed(seed)
        self.codes = nn.ModuleDict({t: HardConcrete((num_subnetworks,), generator) for t in self.tasks})
        self.towers = nn.ModuleDict({t: towers[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 16, depth: int = 1, num_subnetworks: int = 3,
                     transform: bool = True, l0_weight: float = 0.0, seed: int = 0) -> "SNR":
        shape = tuple(problem.input_shape)
        routed = (width,) + shape[1:]
        towers = {t: nn.Sequential(trunk_for(routed, width, 1),  # the upper sub-network
                                   head_for(shape, width, d, problem.dense))
                  for t, d in problem.task_out_dims.items()}
        return cls(problem.tasks, lambda: trunk_for(shape, width, depth), num_subnetworks,
                   width, towers, transform, l0_weight, seed)

    def coding_variables(self) -> dict[str, Tensor]:
        """z for every task: a fresh sample in training mode, the deterministic value in eval mode."""
        return {t: self.codes[t]() for t in self.tasks}

    def route(self, task: str, z: Tensor, v: Sequence[Tensor]) -> Tensor:
        """u_task = sum_j z_j W_j v_j (SNR-Trans) or sum_j z_j v_j (SNR-Aver)."""
        if self.transform:
            v = [w(vj) for w, vj in zip(self.transforms[task], v)]
        return torch.einsum("n,nb...->b...", z, torch.stack(list(v)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        v = [s(x) for s in self.subnetworks]
        z = self.coding_variables()
        return {t: self.towers[t](self.route(t, z[t], v)) for t in self.tasks}

    def l0_penalty(self) -> Tensor:
        return sum(self.codes[t].l0_penalty() for t in self.tasks)

    def auxiliary_loss(self) -> Tensor:
        """``l0_weight`` x the expected number of open connections (needs no forward pass)."""
        return self.l0_weight * self.l0_penalty()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.codes[task].parameters()
        if self.transforms is not None:
            yield from self.transforms[task].parameters()
        yield from self.towers[task].parameters()
