"""Pareto Manifold Learning (PaMaL): a weight-space ensemble whose convex combinations span a front.

Dimitriadis, Frossard & Fleuret, "Pareto Manifold Learning: Tackling multiple tasks via
ensembles of single-task models", ICML 2023, arXiv:2210.09759.

The paper's conjecture is that the Pareto front admits a *linear* parameterisation in weight
space. PaMaL keeps K ensemble members θ_1..θ_K (one per task, each a full copy of the
network's weights, heads included) and, for a preference α on the simplex Δ_K, uses the
network with weights

    θ(α) = Σ_k α_k θ_k        (θ = α^T Θ, Algorithm 1 line 7; unnumbered in the paper).

Each training step draws α ~ Dirichlet(p) (p = 1 here: uniform on the simplex) and minimises
Σ_k α_k L_k(θ(α)), the one-member-per-task case of the objective E_α[α^T W L(f(x; αΘ), y)] of
Eq. 2 (W = identity): the closer α is to the vertex e_k, the more the combined network is member k
and the more the loss is task k's, so the members become single-task specialists whose
convex hull holds the trade-offs. Consequences tested: α = e_k gives exactly member k, θ(α)
is linear in α, and dL/dθ_k = α_k dL/dθ(α), i.e. member k receives the gradient in
proportion to α_k (zero for α_k = 0).

The wrapper holds the members as stacked parameters (K x shape per weight of a template
network) and runs the template with the combined weights via ``torch.func.functional_call``;
the template's own parameters are never used. The default template is a shared-bottom
network from ``trunk_for`` / ``heads_for``, so ``encode`` / ``decode`` run its trunk and heads
with the combined weights. Task-specific parameters are the members' copies of the task's head.

Like the other preference models here, the current α is a buffer (uniform by default, so
``model(x)`` is the midpoint model), ``forward`` also takes α explicitly, ``sample_preference``
draws one with a ``torch.Generator`` and ``weighted_loss`` returns Σ_k α_k L_k. The training
harness calls neither: it trains the midpoint model with the method's combination of the
losses, where every member receives the same gradient (times 1/K) and so never becomes a
specialist; ``training_procedure`` says so.

Left out: the multi-forward regularisation (several α per batch with a log-sum-exp penalty
when the loss ordering disagrees with the α ordering, Eq. 3 and Algorithm 1 lines 10-12), any
BatchNorm recalibration for each α (the ICML text read does not describe one; the official code
keeps one set of running statistics for all α), its loss- and gradient-balanced variants of
Section 4.2 (unnumbered there; Cityscapes uses the gradient-norm one), and the Dirichlet
concentration p ≠ 1.

Equation numbers are those of the ICML 2023 camera-ready copy (38 pages with appendix) kept
on the first author's site, dimitriadis-frossard-fleuret-2023.pdf of nik-dim/nik-dim.github.io
(under publication/dimitriadis-frossard-fleuret-2023/, commit 380fc24); the main text numbers
only Eqs. 1-3.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .base import MultiTaskModel
from .palora import check_preference, sample_preference
from .registry import Problem
from .shared_bottom import SharedBottom


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class PaMaL(MultiTaskModel):
    """K weight-space members; the model for α runs the template with Σ_k α_k θ_k."""

    name = "pamal"
    equations_checked_in = "dimitriadis-frossard-fleuret-2023.pdf of nik-dim/nik-dim.github.io"
    training_procedure = ("every step draws a preference with sample_preference() and minimises "
                          "weighted_loss() at the combined weights, so the members become specialists")

    def __init__(self, templates: list[SharedBottom]):
        super().__init__(templates[0].tasks)
        if len(templates) != len(self.tasks):
            raise ValueError(f"need one member per task ({len(self.tasks)}), got {len(templates)}")
        names = [n for n, _ in templates[0].named_parameters()]
        self.members = nn.ParameterDict({
            _key(n): nn.Parameter(torch.stack([dict(t.named_parameters())[n].detach() for t in templates]))
            for n in names
        })
        self.param_names = names
        # structure only, not a submodule; a copy, since Module.to moves the caller's model in place
        self.__dict__["template"] = copy.deepcopy(templates[0]).to("meta")
        self.register_buffer("preference", torch.full((len(self.tasks),), 1.0 / len(self.tasks)))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2) -> "PaMaL":
        """K independently initialised shared-bottom networks as the members."""
        return cls([SharedBottom.from_problem(problem, width, depth) for _ in problem.tasks])

    def set_preference(self, preference: Tensor) -> None:
        self.preference.copy_(check_preference(preference, len(self.tasks)))

    def sample_preference(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw α uniformly from the simplex, make it the current preference and return it."""
        self.set_preference(sample_preference(len(self.tasks), generator))
        return self.preference.clone()

    def weighted_loss(self, losses: Mapping[str, Tensor], preference: Tensor | None = None) -> Tensor:
        alpha = self.preference if preference is None else preference
        return sum(alpha[i] * losses[t] for i, t in enumerate(self.tasks))

    def combined_parameters(self, preference: Tensor | None = None, prefix: str = "") -> dict[str, Tensor]:
        """θ(α) = Σ_k α_k θ_k for every template weight whose name starts with ``prefix``."""
        alpha = self.preference if preference is None else check_preference(preference, len(self.tasks))
        return {
            n[len(prefix):]: torch.einsum("k,k...->...", alpha.to(self.members[_key(n)]), self.members[_key(n)])
            for n in self.param_names if n.startswith(prefix)
        }

    def encode(self, x: Tensor, preference: Tensor | None = None) -> Tensor:
        params = self.combined_parameters(preference, "encoder.")
        return functional_call(self.template.encoder, params, (x,))

    def decode(self, z: Tensor, preference: Tensor | None = None) -> dict[str, Tensor]:
        return {
            t: functional_call(self.template.heads[t], self.combined_parameters(preference, f"heads.{t}."), (z,))
            for t in self.tasks
        }

    def forward(self, x: Tensor, preference: Tensor | None = None) -> dict[str, Tensor]:
        return self.decode(self.encode(x, preference), preference)

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for n in self.param_names:
            if n.startswith(f"heads.{task}."):
                yield self.members[_key(n)]
