"""RSA: task similarity from how alike two task models' representations of the same images are.

Dwivedi, Roig, "Representation Similarity Analysis for Efficient Task Taxonomy & Transfer
Learning", CVPR 2019, arXiv:1904.11740. Equations are named, not numbered: the paper's
numbering could not be checked here. The rule follows the authors' code
(github.com/kshitijd20/RSA-CVPR19-release: ``create_taskonomy_RDMs_enc_final.py`` builds
the dissimilarity matrices, ``RSA_analysis/C_Fig5.m`` compares them with the RSA toolbox's
``compareRefRDM2candRDMs`` set to Spearman correlation).

Representation similarity analysis, borrowed from neuroscience, compares two networks
without aligning their units. Show every task's trained model the same n images and read
one layer (the encoder output, or any block):

1. representational dissimilarity matrix (RDM) of a model: centre each unit over the n
   images, then for every pair of images

       RDM[p, q] = 1 − pearson(f_p, f_q)      (f_p: the centred features of image p)

   an n x n symmetric matrix with a zero diagonal, whatever the layer's width;
2. similarity of two tasks: the Spearman rank correlation of their two RDMs over the
   n(n − 1)/2 image pairs above the diagonal, so only the ordering of the
   dissimilarities matters, not their scale.

Doing this for every pair gives the K x K task similarity matrix the paper uses as a task
taxonomy (no transfer trained, a few hundred images). For transfer learning to a new task,
a small model trained on the new task's little data gives the reference RDM, and the
pre-trained source models are ranked by their similarity to it: the highest is the one to
fine-tune.

Left out: running the Taskonomy encoders (the caller passes each model's features), the
toolbox's significance tests (label randomisation and bootstrap) and the NaN handling of
missing pairs, the dendrogram of the figures (MATLAB single-linkage clustering of the rows
of the similarity matrix), the Pascal VOC experiments and the transfer fine-tuning itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _flat(features: Tensor) -> Tensor:
    if features.dim() < 2 or features.shape[0] < 3:
        raise ValueError(f"features need at least 3 images and one unit, got shape {tuple(features.shape)}")
    return features.reshape(features.shape[0], -1)


def rdm(features: Tensor) -> Tensor:
    """n x n dissimilarity 1 − Pearson correlation between images, units centred over images.

    ``features`` has one row per image (any trailing shape, flattened). An image whose
    centred features are constant has no correlation with anything and gets NaN.
    """
    x = _flat(features)
    x = x - x.mean(dim=0, keepdim=True)  # each unit's mean over the images removed first
    x = x - x.mean(dim=1, keepdim=True)  # then Pearson's own centring of each image's vector
    x = x / x.norm(dim=1, keepdim=True)
    return 1 - x @ x.T


def upper_triangle(matrix: Tensor) -> Tensor:
    """The n(n − 1)/2 entries above the diagonal: each image pair once."""
    n = matrix.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1, device=matrix.device)
    return matrix[rows, cols]


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..m of a vector, tied values sharing the mean of their ranks (as Spearman needs)."""
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype, device=values.device)
    unique, inverse = values.unique(return_inverse=True)
    sums = torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values))
    return (sums / counts)[inverse]


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation: the Pearson correlation of the average ranks."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-12)  # a constant vector: 0, not 0/0


def rdm_similarity(rdm_a: Tensor, rdm_b: Tensor) -> Tensor:
    """How alike two RDMs of the same images are: Spearman over the pairs above the diagonal."""
    if rdm_a.shape != rdm_b.shape or rdm_a.dim() != 2 or rdm_a.shape[0] != rdm_a.shape[1]:
        raise ValueError(f"need two n x n RDMs of the same images, got {tuple(rdm_a.shape)} and {tuple(rdm_b.shape)}")
    return spearman(upper_triangle(rdm_a), upper_triangle(rdm_b))


def task_similarity(features: Sequence[Tensor]) -> Tensor:
    """K x K RSA similarity between task models, from each model's features of the same images."""
    rdms = [rdm(f) for f in features]
    if len({r.shape[0] for r in rdms}) > 1:
        raise ValueError(f"every model must see the same images, got {[r.shape[0] for r in rdms]} images")
    k = len(rdms)
    out = torch.ones(k, k, dtype=rdms[0].dtype, device=rdms[0].device)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = rdm_similarity(rdms[i], rdms[j])
    return out


def rank_sources(target: Tensor, sources: Sequence[Tensor]) -> tuple[list[int], Tensor]:
    """Source models best first for transfer to ``target``, and each one's RSA score with it.

    ``target``: features of a (small) model trained on the new task; ``sources``: features of
    the pre-trained models, all on the same images.
    """
    reference = rdm(target)
    scores = torch.stack([rdm_similarity(reference, rdm(s)) for s in sources])
    order = sorted(range(len(sources)), key=lambda i: -scores[i].item())
    return order, scores
