"""4M-21: the 4M model and objective, with a mixture of Dirichlet concentrations for the budgets.

Bachmann, Kar, Mizrahi, Garjani, Gao, Griffiths, Hu, Dehghan, Zamir. "4M-21: An Any-to-Any
Vision Model for Tens of Tasks and Modalities", NeurIPS 2024 (arXiv:2406.09406).

The paper (Sec. 2) keeps 4M's architecture and multimodal masked training objective
unchanged; what grows is the number and kind of modalities (21 instead of 7: SAM
instances and edges, 4DHumans poses, DINOv2 / ImageBind feature maps and global
embeddings, metadata, colour palettes, T5 caption embeddings), the tokenizers that serve
them (MLP discrete VAEs for vectors, WordPiece for anything written as text), the data
(CC12M, COYO700M and the C4 text corpus, sampled together) and the model size (up to 3B).
The only change at the level of our small model is the *masking*: the authors' 21-modality
configuration (``cfgs/default/4m/alphas_mixture/main/mix_mod21_all2allmix_rgb2all_capT5bias.yaml``
in github.com/apple/ml-4m) draws each sample's budgets from a mixture of symmetric Dirichlets
with alpha in {0.01, 0.1, 1, 10}, where the all-to-all part of 4M's 7-modality configuration
used alpha = 0.5 alone. A sample picks one component and draws both its input and its target
budget with that alpha (``fourm/data/masking.py``; tested).
Small alphas put a sample's whole budget on one modality (single-modality to
single-modality pairs), large ones spread it evenly, so one model sees both regimes.
The paper's App. E.2 lists the same four all-to-all alphas, each used for both input and
target, beside RGB-to-all and caption-biased strategies; it states the masking in words,
with no numbered equation, so none is cited (text read: arXiv:2406.09406v2).

:class:`FourM21` is therefore :class:`.four_m.FourM` with those alphas (tested: same
parameters, same budgets as 4M when given 4M's alpha, more one-modality and more even
budgets with the mixture, the same mean).

The training harness trains ``forward``'s x -> all-tasks query, which draws no budgets, so
under it 4M-21 trains exactly like 4M (:attr:`FourM21.training_procedure` says so).

Left out: everything listed for 4M, plus the new modalities and their tokenizers, span
masking of sequence modalities, text-only language modelling on C4, the dataset mixture,
the RGB -> all and caption-bias components of the official mixture, and the scale.
"""

from __future__ import annotations

from .four_m import FourM


class FourM21(FourM):
    """4M with 4M-21's mixture of symmetric Dirichlet concentrations for the token budgets."""

    name = "four_m_21"
    equations_checked_in = "arXiv:2406.09406v2"
    training_procedure = ("the network is trained by masked_modeling_loss() with budgets from the mixture of "
                          "Dirichlet alphas, its only change from 4M, which the x -> all-tasks query never uses")
    default_alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
