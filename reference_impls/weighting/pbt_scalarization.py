"""Population-based search over scalarization weights (Royer et al., NeurIPS 2023).

Royer, Blankevoort, Ehteshami Bejnordi, "Scalarization for Multi-Task and Multi-Domain
Learning at Scale", NeurIPS 2023, arXiv:2310.08910. The paper is mostly a large study of
plain scalarization, training on sum_k w_k L_k with fixed weights w. What it proposes on top
of the study is to find w with population-based training (PBT) rather than a grid, which
becomes unaffordable once there are many tasks or domains. Equation numbers of the paper
could not be checked here, so none are cited.

What one PBT round does, in our words:

1. P members each train the same network on their own weight vector w_p (a point of the
   simplex), for a while;
2. each member is scored on validation data (lower is better here);
3. exploit: every member in the worst fraction copies the network parameters *and* the
   weight vector of a member drawn uniformly from the best fraction (truncation selection);
4. explore: each copied weight vector is perturbed, every entry multiplied by 0.8 or 1.2
   drawn at random, then put back on the simplex.

Training goes on from the copied parameters, so the population follows a schedule of
weights instead of restarting a grid point from scratch. The 0.8 / 1.2 factors are those of the
original PBT (Jaderberg et al. 2017, arXiv:1711.09846), whose truncation selection moves the
bottom 20 % to the top 20 %; the default fraction here, 25 %, is Ray Tune's (which also rounds
the number of members that move, sometimes resamples instead of perturbing, and does not put
weights back on the simplex, our step);
which selection rule, perturbation and initial distribution Royer et al. used is not
verified here. Initial weights are drawn uniformly on the simplex (Dirichlet(1)).

``weights`` returns K · w_p for the active member, so a uniform vector is exactly equal
weighting (all ones, the package's convention).

Left out: the asynchronous workers and the ready/step schedule of real PBT, copying the
optimizer state (the caller's), the paper's multi-domain ViT / ResNet benchmarks and its
validation metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from reference_impls.weighting.base import LossWeighting


def truncation_pairs(scores: Tensor, fraction: float = 0.25,
                     generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """(loser, donor) pairs: each of the worst ``fraction`` copies one of the best ``fraction``.

    Lower scores are better; NaN counts as the worst possible score.
    """
    size = scores.numel()
    count = int(fraction * size)
    if count == 0:
        return []
    clean = torch.nan_to_num(scores.detach().double().cpu(), nan=float("inf"))
    order = torch.argsort(clean, stable=True)
    best, worst = order[:count], order[size - count:]
    picks = torch.randint(count, (count,), generator=generator)
    return [(int(loser), int(best[pick])) for loser, pick in zip(worst, picks)]


def perturb(weights: Tensor, factors: tuple[float, float] = (0.8, 1.2),
            generator: torch.Generator | None = None) -> Tensor:
    """Multiply each entry by one of ``factors`` at random, then renormalise to the simplex."""
    choice = torch.randint(2, weights.shape, generator=generator).to(weights.device)
    moved = weights * torch.tensor(factors, dtype=weights.dtype, device=weights.device)[choice]
    return moved / moved.sum()


class PBTScalarization(LossWeighting):
    """A population of scalarization weight vectors; ``active`` picks the member training now."""

    name = "pbt_scalarization"
    training_hook = "exploit_and_explore"

    def __init__(self, num_tasks: int, population_size: int = 8, fraction: float = 0.25,
                 factors: tuple[float, float] = (0.8, 1.2),
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if population_size < 2 or not 0.0 < fraction <= 0.5:
            raise ValueError(f"need population_size >= 2 and 0 < fraction <= 0.5, got {population_size} and {fraction}")
        self.fraction, self.factors, self.generator = fraction, factors, generator
        # Dirichlet(1) draws through the generator: normalised Exp(1) variables, -log(U)
        exp = -(1 - torch.rand(population_size, num_tasks, generator=generator, dtype=torch.float64)).log()
        self.register_buffer("population", exp / exp.sum(dim=1, keepdim=True))
        self.active = 0

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        w = self.population[self.active].to(device=losses.device, dtype=losses.dtype)
        return (w * losses.numel()).detach()

    @torch.no_grad()
    def exploit_and_explore(self, scores: Tensor,
                            models: Sequence[nn.Module] | None = None) -> list[tuple[int, int]]:
        """One PBT round from the members' validation scores; returns the (loser, donor) pairs.

        ``models[p]`` is member p's network; losers load their donor's parameters in place.
        """
        if scores.numel() != self.population.shape[0]:
            raise ValueError("need one score per member")
        pairs = truncation_pairs(scores, self.fraction, self.generator)
        for loser, donor in pairs:
            if models is not None:
                models[loser].load_state_dict(models[donor].state_dict())
            self.population[loser] = perturb(self.population[donor], self.factors, self.generator)
        return pairs
