"""Higher-order task affinity from random task subsets, then spectral clustering into groups.

Li, Ju, Sharma, Zhang, "Boosting Multitask Learning on Graphs through Higher-Order Task
Affinities", KDD 2023, arXiv:2306.14009. Equations are named, not numbered: the paper's
numbering could not be checked here. The rules below follow the authors' code
(github.com/VirtuosoResearch/Boosting-multitask-learning-on-graphs: ``train_sample_tasks.py``
for the subsets, ``notebooks/run_task_grouping.py`` for the scores and the clustering).

Whether task j helps task i is not measured on the pair alone, where the transfer between
graph tasks is often non-linear, but in the company of other tasks:

1. draw n random subsets S_1 … S_n of the K tasks (sizes uniform in [min, max]), train one
   multi-task model on each and record every member's validation performance f_i(S_k);
2. per task i, standardise its results over the subsets that contain it (a loss is negated
   first, so higher is better everywhere): z_i(S_k) = (f_i(S_k) − mean) / (std + ε);
3. the higher-order affinity of j to i is task i's mean standardised result over the
   subsets that contain both,

       θ[i, j] = mean_{k : {i, j} ⊆ S_k} z_i(S_k),      θ[i, i] = 0;

4. spectral clustering of the symmetrised scores (θ + θᵀ) / 2 into a given number of
   groups; one network is then trained per group (the "boosting" of the title).

Spectral clustering here is the normalised-Laplacian kind the released code calls from
scikit-learn: W's diagonal is set to 0 (scipy's Laplacian ignores self-loops), D holds the
row sums of what is left, and the k eigenvectors of D^{-1/2} W D^{-1/2} with the largest
eigenvalues, mapped back by D^{-1/2}, go to k-means on their rows. A graph's weights must be non-negative, and
standardised scores are not, so W = exp((θ + θᵀ) / 2) by default, as the same group's Grad-TAG
clustering script does (``use_exp=True``); the KDD'23 notebook passes the scores unchanged.

Left out: training the n multi-task GNNs that produce f_i(S_k) (the caller's, and the
expensive part), the per-cluster training, the planted-block-model analysis, the
"extended" spectral co-clustering variants of the notebook, and the released sampler's
skipping of subsets already drawn. Our choices: a pair that never appears together scores
0 (the notebook divides by zero), and k-means uses k-means++ seeding with a few restarts
instead of the notebook's 100 (its ``n_init``); the notebook skips results that are NaN, where
a NaN inside a subset propagates here. Affinities and clusters matched the notebook's (to
4e-15) in the audit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.affinity.surrogate_negative_transfer import sample_subsets
from reference_impls.clustering import kmeans

__all__ = ["sample_subsets", "higher_order_affinity", "spectral_clustering", "groups_of"]


def standardised_results(masks: Tensor, performance: Tensor, higher_is_better: bool,
                         eps: float = 1e-3) -> Tensor:
    """z_i(S_k) for members (0 elsewhere): each task's results z-scored over its own subsets."""
    present = masks.to(torch.bool)
    scores = performance if higher_is_better else -performance
    scores = torch.where(present, scores, torch.zeros_like(scores))
    counts = present.sum(0).clamp_min(1)
    mean = scores.sum(0) / counts
    centred = torch.where(present, scores - mean, torch.zeros_like(scores))
    std = (centred.square().sum(0) / counts).sqrt()  # population std, as numpy's default
    return centred / (std + eps)


def higher_order_affinity(masks: Tensor, performance: Tensor, higher_is_better: bool = False,
                          standardise: bool = True) -> Tensor:
    """θ[i, j]: task i's mean (standardised) result over the sampled subsets holding i and j.

    ``masks`` is n x K (subset membership), ``performance`` n x K with f_i(S_k) where task i
    is in S_k (other entries are ignored); ``higher_is_better=False`` for losses.
    """
    if masks.shape != performance.shape or masks.dim() != 2:
        raise ValueError(f"masks and performance must both be n x K, got {tuple(masks.shape)} "
                         f"and {tuple(performance.shape)}")
    present = masks.to(performance.dtype)
    if standardise:
        z = standardised_results(masks, performance, higher_is_better)
    else:
        z = torch.where(masks.bool(), performance if higher_is_better else -performance, 0.0)  # NaN outside too
    together = present.T @ present  # [i, j]: subsets containing both
    theta = (z.T @ present) / together.clamp_min(1)  # [i, j] = Σ_k z_i(S_k) 1[j ∈ S_k]
    theta = torch.where(together > 0, theta, torch.zeros_like(theta))
    return theta.fill_diagonal_(0)


def spectral_clustering(affinity: Tensor, k: int, use_exp: bool = True,
                        generator: torch.Generator | None = None) -> Tensor:
    """A cluster label per task from the symmetrised K x K affinity (normalised-Laplacian spectral)."""
    n = affinity.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= number of tasks, got k={k} for {n} tasks")
    weights = (affinity + affinity.T) / 2
    if use_exp:
        weights = weights.exp()
    weights = weights.clone().fill_diagonal_(0)  # no self-loops: scipy's Laplacian drops W's diagonal
    if (weights < 0).any():
        raise ValueError("spectral clustering needs non-negative weights: pass use_exp=True")
    degree = weights.sum(1).clamp_min(torch.finfo(weights.dtype).tiny)
    inv_sqrt = degree.rsqrt()
    normalised = inv_sqrt[:, None] * weights * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(normalised)  # ascending eigenvalues
    embedding = vectors[:, -k:] * inv_sqrt[:, None]
    return kmeans(embedding, k, generator, restarts=10)[1]


def groups_of(labels: Tensor) -> list[list[int]]:
    """The task indices of each cluster, clusters in order of their smallest member."""
    groups: dict[int, list[int]] = {}
    for task, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(task)
    return sorted(groups.values())
