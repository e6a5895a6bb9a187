"""GradNorm: balance tasks by the gradient norms they produce on the last shared layer.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257.

With task weights w_k and W the weights of the last shared layer, the paper defines
(Sec. 3.1, and the target and loss of Eqs. 1-2)

    G_k      = || ∇_W (w_k L_k) ||                    gradient norm of the weighted loss
    Ḡ        = mean_k G_k
    L̃_k      = L_k(t) / L_k(0)                       inverse training rate
    r_k      = L̃_k / mean_j L̃_j                      relative inverse training rate
    G_k  ->  Ḡ · r_k^α                                 the target norm (Eq. 1)
    L_grad   = sum_k | G_k - Ḡ · r_k^α |              target held constant (Eq. 2)

and updates only the w_k by the gradient of L_grad, then renormalises them so that
sum_k w_k = K (Algorithm 1). α sets how strongly slow tasks are pulled back: the paper
uses 0.12 on its toy problem and 1.5 on NYUv2, where any 0 < α < 3 beat equal weights
(Sec. 5.4). Equation numbers were checked in a PDF-to-text transcript of
arXiv:1711.02257v4 (12 June 2018) in the GitHub file index (index id 52706219253).

Interface (GradNorm needs more than the losses):

    w = gradnorm.weights(losses)                          # current w_k (detached)
    gradnorm.balance_step(losses, shared_layer.weight)    # updates w_k in place
    (w * losses).sum().backward(); optimizer.step()       # network step with w(t)

``balance_step`` takes the losses with their graph and the last shared layer's weight
tensor. Because w_k is a positive scalar, G_k = w_k ||∇_W L_k||, so the norms are taken
once without a double backward and L_grad is differentiated with respect to w only.
The first call to ``balance_step`` records L(0). The weight update is plain gradient
descent with rate ``lr`` (the paper, Sec. 5.1, trains the weights with their own Adam at 0.025
while the network runs at 2e-5; LibMTL puts them in the network's optimizer; a plain step here
scales with the raw gradient norms, which Adam's would not); weights are clamped
at ``min_weight`` before renormalising — a guard the paper does not state.
LibMTL's GradNorm differs: it learns logits p with w = K·softmax(p), keeps equal weights
for the first epoch and takes L(0) as that epoch's mean loss; here w itself is stepped and
renormalised from the first step, with L(0) the first step's losses (the paper's Algorithm 1).
LibMTL also takes G_k from the gradient of all shared parameters (or of the shared
representation), not of the last shared layer W alone. Checked against LibMTL's
re-implementation, ``LibMTL/weighting/GradNorm.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference_impls.weighting.base import LossWeighting


class GradNorm(LossWeighting):
    """Learned task weights whose weighted gradient norms track the tasks' training rates."""

    name = "gradnorm"
    training_hook = "balance_step"

    def __init__(
        self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025, min_weight: float = 1e-3
    ) -> None:
        super().__init__()
        self.alpha = alpha
        self.lr = lr
        self.min_weight = min_weight
        self.task_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.empty(0))

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return self.task_weights.detach().clone().to(losses)  # a copy: balance_step edits w in place

    def gradient_norms(self, losses: Tensor, shared_weight: Tensor) -> Tensor:
        """||∇_W L_k|| for every task (the graph of ``losses`` is kept)."""
        norms = [
            torch.autograd.grad(loss, shared_weight, retain_graph=True)[0].norm()
            for loss in losses
        ]
        return torch.stack(norms)

    def balance_step(self, losses: Tensor, shared_weight: Tensor) -> Tensor:
        """One GradNorm update of the task weights; returns L_grad before the update."""
        if self.initial_losses.numel() == 0:
            self.initial_losses = losses.detach().clone()
        weighted_norms = self.task_weights * self.gradient_norms(losses, shared_weight).to(
            self.task_weights
        )  # G_k
        mean_norm = weighted_norms.mean().detach()  # Ḡ
        inverse_rate = losses.detach().to(self.task_weights) / self.initial_losses.to(
            self.task_weights
        )  # L̃_k
        relative_rate = inverse_rate / inverse_rate.mean()  # r_k
        target = (mean_norm * relative_rate**self.alpha).detach()
        grad_loss = (weighted_norms - target).abs().sum()  # L_grad
        (grad_wrt_weights,) = torch.autograd.grad(grad_loss, self.task_weights)
        with torch.no_grad():
            self.task_weights -= self.lr * grad_wrt_weights
            self.task_weights.clamp_(min=self.min_weight)
            self.task_weights *= self.task_weights.numel() / self.task_weights.sum()
        return grad_loss.detach()
