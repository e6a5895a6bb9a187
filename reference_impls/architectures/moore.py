"""MOORE: a mixture of experts whose outputs are made orthonormal per input, mixed per task.

Hendawy, Peters, D'Eramo, "Multi-Task Reinforcement Learning with Mixture of Orthogonal
Experts", ICLR 2024, arXiv:2311.11385 (official code: github.com/AhmedMagdyHendawy/MOORE).

k shared experts each map the input to a representation h_i(x). Plain mixtures of experts let
those representations collapse onto each other; MOORE instead runs the Gram-Schmidt process
over the k expert outputs of every single input, so the representations a task can mix form
an orthonormal basis U(x) = [u_1(x), ..., u_k(x)] of a k-dimensional subspace (a point on the
Stiefel manifold; orthonormality is tested exactly):

    u_1 = h_1 / |h_1|,    u_i = (h_i - sum_{j<i} <h_i, u_j> u_j) / |...|

Each task t owns a weight vector w_t in R^k (in the paper a bias-free linear map of the task's
one-hot context) and reads its own vector v_t(x) = sum_i w_t[i] u_i(x) of that shared subspace
(tested by hand), which a task head turns into the output. Diversity is thus enforced by
construction, with no extra loss term.

Image experts give feature maps; each is flattened to one vector per input for the
orthogonalisation and reshaped afterwards, so dense heads still see a map. A small ``eps``
keeps the normalisation finite when an expert output is (numerically) in the span of the
previous ones.

The paper's equations are not cited by number: its text was not available to check them.

Left out: the reinforcement-learning algorithms (SAC, PPO) and benchmarks (MetaWorld,
MiniGrid), actor/critic duplication, the transfer-learning variants, and the official code's
optional activations applied before and after the task mixing (ReLU at both places by its
constructor's default, but both published setups use none before the mixing and tanh after
it; ``activation`` applies one after the mixing, none by default, so v_t stays in the
orthonormal span). Its experts end in a linear layer, so their outputs are signed before the
orthogonalisation; ours end in a ReLU (AhmedMagdyHendawy/MOORE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


def gram_schmidt(h: Tensor, eps: float = 1e-8) -> Tensor:
    """Orthonormalise the k rows of every (k, D) matrix in a (B, k, D) batch, in order."""
    basis: list[Tensor] = []
    for i in range(h.shape[1]):
        v = h[:, i]
        for u in basis:
            v = v - (v * u).sum(-1, keepdim=True) * u  # remove the component along u
        basis.append(v / v.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.stack(basis, dim=1)


class MOORE(MultiTaskModel):
    """``num_experts`` experts from ``make_expert()``, orthonormalised per input, one weight vector and head per task."""

    name = "moore"

    def __init__(self, tasks: Sequence[str], make_expert: Callable[[], nn.Module], num_experts: int,
                 heads: Mapping[str, nn.Module], activation: nn.Module | None = None):
        super().__init__(tasks)
        require_positive(num_experts=num_experts)
        self.experts = nn.ModuleList(make_expert() for _ in range(num_experts))
        # w_t: the task encoder's column for task t (a one-hot context times a bias-free linear map)
        self.task_weights = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(num_experts) / num_experts**0.5) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.activation = activation if activation is not None else nn.Identity()

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 1, num_experts: int = 4,
                     **kwargs: object) -> "MOORE":
        return cls(problem.tasks, lambda: trunk_for(problem.input_shape, width, depth), num_experts,
                   heads_for(problem, width), **kwargs)

    def basis(self, x: Tensor) -> Tensor:
        """U(x): the experts' outputs orthonormalised per input, (B, k, *feature shape)."""
        h = torch.stack([f(x) for f in self.experts], dim=1)
        return gram_schmidt(h.flatten(2)).view_as(h)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        u = self.basis(x)
        mixed = {t: torch.einsum("k,bk...->b...", self.task_weights[t], u) for t in self.tasks}  # v_t = U w_t
        return {t: self.heads[t](self.activation(mixed[t])) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.task_weights[task]
        yield from self.heads[task].parameters()
