"""Multi-objective meta learning (MOML), multi-task instance: loss weights learned bilevel.

Ye, Lin, Yue, Guo, Xiao & Zhang, "Multi-Objective Meta Learning", NeurIPS 2021,
arXiv:2102.07121 (code: github.com/Baijiong-Lin/MOML).

MOML casts meta learning with several objectives as a multi-objective bilevel problem:
the meta learner's parameters ω are chosen for several upper-level objectives at once,
the model's parameters θ minimise a lower-level objective that depends on ω. The
gradient-based solver alternates a lower-level gradient step on θ with an upper-level
step on ω whose direction is the MGDA min-norm combination of the per-objective
hypergradients, so no weights between the upper-level objectives have to be tuned.

In the multi-task instance (``MTL/moml_*.py`` in the authors' code) ω are the logits of
the task-loss weights w = softmax(ω), the lower level is the weighted training loss and
the upper-level objectives are the K validation losses:

    θ'(ω)   = θ - α ∇_θ sum_k w_k L_k^train(θ)          one unrolled step (hypergradient)
    h_k     = ∇_ω L_k^val(θ'(ω))                        K hypergradients, K x K matrix
    γ       = argmin_{γ in simplex} || sum_k γ_k h_k / ||h_k|| ||²      MGDA on normalised rows
    ω      <- ω - β sum_k γ_k h_k                        upper-level step
    θ      <- θ - η ∇_θ sum_k w_k L_k^train(θ)          lower-level step (the training loop)

The normalisation of the rows before MGDA and the step on the unnormalised γ-weighted
sum follow the authors' code (``gradient_normalizers(..., 'l2')`` in its Office-31 script;
its NYUv2 script divides each hypergradient by its validation loss instead); the paper's
equation numbers were not checked against its text. ``use_mgda=False`` gives the single-objective
baseline that the code also runs (γ = 1: the summed validation loss).

Interface: ``weights(losses)`` returns w = softmax(ω) (uniform at the start);
``meta_step(params, train_losses, val_losses)`` performs the upper-level step, where
``params`` maps names to the model's parameters and ``train_losses`` / ``val_losses``
map such a dictionary to K losses (e.g. with ``torch.func.functional_call``). It returns γ.
The upper-level step is plain gradient descent with rate ``meta_lr`` (the authors use Adam).

Left out: the other MOML instances (few-shot learning, domain adaptation, architecture
search), the convergence analysis, the image benchmarks. The authors' code
(Baijiong-Lin/MOML) solves MGDA's problem iteratively (tolerance 1e-5; the weights agreed with
the exact solver here to 1e-10, or 5e-6 where it stopped early) and also trains the network on
the validation data (train and validation together).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from reference_impls.weighting.base import LossWeighting
from reference_impls.weighting.gradients import min_norm_weights, per_task_gradients

LossFunction = Callable[[Mapping[str, Tensor]], Tensor]


def unrolled_parameters(params: Mapping[str, Tensor], loss: Tensor, lr: float) -> dict[str, Tensor]:
    """θ' = θ - lr ∇_θ loss, kept differentiable in whatever ``loss`` depends on."""
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    return {
        name: p if g is None else p - lr * g for (name, p), g in zip(params.items(), grads)
    }


def mgda_on_normalized(hypergrads: Tensor) -> Tensor:
    """MGDA weights on the simplex for the rows scaled to unit norm (zero rows stay zero)."""
    norms = hypergrads.norm(dim=1, keepdim=True)
    unit = hypergrads / norms.where(norms > 0, torch.ones_like(norms))
    return min_norm_weights(unit @ unit.T).to(hypergrads)


class MOML(LossWeighting):
    """Task weights softmax(ω); ω follows the MGDA direction of the validation hypergradients."""

    name = "moml"
    training_hook = "meta_step"

    def __init__(
        self, num_tasks: int, inner_lr: float = 1e-4, meta_lr: float = 1e-3, use_mgda: bool = True
    ) -> None:
        super().__init__()
        self.inner_lr = inner_lr
        self.meta_lr = meta_lr
        self.use_mgda = use_mgda
        self.logits = nn.Parameter(torch.full((num_tasks,), 1.0 / num_tasks))

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return torch.softmax(self.logits.detach(), dim=0).to(losses)

    def hypergradients(
        self, params: Mapping[str, Tensor], train_losses: LossFunction, val_losses: LossFunction
    ) -> Tensor:
        """K x K matrix, row k = ∇_ω L_k^val(θ'(ω)) through one unrolled training step."""
        task_weights = torch.softmax(self.logits, dim=0)
        inner = (task_weights * train_losses(params)).sum()
        fast = unrolled_parameters(params, inner, self.inner_lr)
        return per_task_gradients(val_losses(fast), [self.logits])

    def meta_step(
        self, params: Mapping[str, Tensor], train_losses: LossFunction, val_losses: LossFunction
    ) -> Tensor:
        """One upper-level step on ω; returns the MGDA weights γ used for it."""
        hyper = self.hypergradients(params, train_losses, val_losses).detach()
        gamma = mgda_on_normalized(hyper) if self.use_mgda else torch.ones_like(hyper[:, 0])
        with torch.no_grad():
            self.logits -= self.meta_lr * (gamma @ hyper).to(self.logits)
        return gamma
