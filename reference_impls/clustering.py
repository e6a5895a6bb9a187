"""k-means with k-means++ seeding (Arthur & Vassilvitskii, SODA 2007), shared by the methods that
cluster (task grouping, codebooks).

Draws come from the caller's ``torch.Generator`` (kept on the CPU, as generators are), so a
run is reproducible on any device. Distances are computed exactly: ``torch.cdist``'s default
switches to the expansion ||a||² - 2 a·b + ||b||² once an input has more than 25 rows, which in
float32 loses the distances between points far from the origin (seeds picked twice, separated
clusters mixed). scikit-learn, which centres the data first, and this file differ in two more
ways: its seeding is greedy (several candidates per seed), and it moves an emptied cluster to a
far point where this file keeps its centre.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _distances(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k seeds: each new one drawn with probability ∝ squared distance to the nearest seed so far,
    so repeated points are not picked twice while others remain."""
    first = int(torch.randint(len(points), (1,), generator=generator))
    centres = points[first : first + 1]
    for _ in range(1, k):
        gap = _distances(points, centres).min(dim=1).values.square()
        weights = gap if gap.sum() > 0 else torch.ones_like(gap)  # every point already a seed
        pick = int(torch.multinomial(weights.cpu().double(), 1, generator=generator))
        centres = torch.cat([centres, points[pick : pick + 1]])
    return centres.clone()


def kmeans(points: Tensor, k: int, generator: torch.Generator | None = None, iterations: int = 100,
           restarts: int = 1) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on (n, d) points: (k, d) centres and each point's centre index.

    Stops when no assignment changes; an emptied cluster keeps its centre. With several
    restarts, the run of lowest inertia (summed squared distance to the centres) wins.
    """
    if k > len(points):
        raise ValueError(f"k={k} is more than the {len(points)} points to cluster")
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = kmeans_plus_plus(points, k, generator)
        labels = _distances(points, centres).argmin(dim=1)
        for _ in range(iterations):
            sums = torch.zeros_like(centres).index_add_(0, labels, points)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
            updated = _distances(points, centres).argmin(dim=1)
            if torch.equal(updated, labels):
                break
            labels = updated
        inertia = (points - centres[labels]).square().sum().item()
        if inertia < best_inertia:
            best, best_inertia = (centres, labels), inertia
    return best
