"""FAMO: fast adaptive multitask optimization.

Bo Liu et al., "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023, arXiv:2306.03792.

FAMO looks for the update that decreases every task's *log* loss at the same rate
(Eqs. 3-6, Proposition 3.2), without computing per-task gradients. It keeps logits ξ ∈ R^K,
z = softmax(ξ), and (Algorithm 1)

  step (before the network update): with shifted losses ℓ_k = L_k - L_k* (> 0; line 1),

      d = sum_k c · z_k / ℓ_k · ∇ℓ_k,   c = (sum_k z_k / ℓ_k)^(-1),        (Eq. 11; line 5)

    i.e. task weights w_k = c z_k / ℓ_k on the losses (they weight ∇ log ℓ_k by z_k);

  update (after the network step, with the new losses ℓ'):

      δ = J_z(ξ)ᵀ (log ℓ - log ℓ'),   J_z = diag(z) - z zᵀ  (softmax Jacobian)   (Eq. 10)
      ξ ← ξ - β (δ + γ ξ).                                               (Eq. 12; line 6)

β is the logit learning rate, γ a decay pulling ξ back to 0 (uniform z). The default
is the paper's plain gradient step on ξ (Eq. 12); ``logit_optimizer="adam"`` feeds the same
gradient δ + γξ to Adam (betas 0.9/0.999, eps 1e-8, i.e. PyTorch's Adam with weight
decay γ), which is what the official code does and also the paper's own PyTorch pseudocode
(Algorithm 2, Appendix C). The two differ a lot in practice: δ is tiny when losses move
slowly, and Adam rescales it to steps of about β. The logits are a buffer, not a Parameter:
they are changed by ``update`` and must not be handed to the network's optimizer.

Two-call protocol:

    loss = famo.combine(losses); loss.backward(); optimizer.step()   # remembers ℓ
    with torch.no_grad(): famo.update(new_losses)                      # ℓ' after the step

``loss_lower_bounds`` are the L* (0 by default; the toy problem, whose losses are
negative, uses -21 as in the paper's code). ``eps`` keeps the logs finite at ℓ = 0.
The defaults β = 0.025, γ = 0.01 and eps = 1e-8 are the official code's. The paper's
defaults differ in γ: Algorithm 1 gives γ = 0.001 as the default, Algorithm 2 uses β = 0.025
(named α there) with γ = 0.001, and Sec. 5.2 picks γ = 0.01 only for CityScapes.
Equation numbers were checked in a Markdown conversion of arXiv:2306.03792v3 in the GitHub
file index (index id 66297217630).

Left out: the official ``backward`` also clips the shared parameters' gradient norm to
``max_norm`` = 1 after the weighted loss is back-propagated; that is the training loop's job
(in the authors' experiment code the clip runs before the backward pass, so it has no
effect there). Their NYUv2, CelebA and QM9 scripts use γ = 0.001.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting


class FAMO(LossWeighting):
    """Softmax logits updated from the observed log-loss decrease after each step."""

    name = "famo"
    training_hook = "update"  # driven by reference_impls.train: called with the losses after the step

    def __init__(
        self,
        num_tasks: int,
        lr: float = 0.025,
        gamma: float = 0.01,
        loss_lower_bounds: Tensor | None = None,
        eps: float = 1e-8,
        logit_optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        if logit_optimizer not in ("sgd", "adam"):
            raise ValueError(f"logit_optimizer must be 'sgd' or 'adam', got {logit_optimizer!r}")
        self.lr = lr  # β
        self.gamma = gamma  # γ
        self.eps = eps
        self.logit_optimizer = logit_optimizer
        self.register_buffer("adam_moments", torch.zeros(2, num_tasks))  # Adam's m and v
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))  # in state_dict too
        bounds = torch.zeros(num_tasks) if loss_lower_bounds is None else loss_lower_bounds
        self.register_buffer("logits", torch.zeros(num_tasks))  # ξ
        self.register_buffer("loss_lower_bounds", torch.as_tensor(bounds, dtype=torch.float32))
        self._previous_losses: Tensor | None = None

    def _log_shifted(self, losses: Tensor) -> Tensor:
        return torch.log(losses.detach() - self.loss_lower_bounds.to(losses) + self.eps)

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        self._previous_losses = losses.detach().clone()
        z = torch.softmax(self.logits.to(losses), dim=0)
        shifted = losses.detach() - self.loss_lower_bounds.to(losses) + self.eps  # ℓ_k
        inverse = z / shifted
        return inverse / inverse.sum()  # c z_k / ℓ_k

    def update(self, new_losses: Tensor) -> None:
        """Move the logits using the losses measured after the network step."""
        if self._previous_losses is None:
            raise RuntimeError("call weights()/combine() before update()")
        decrease = self._log_shifted(self._previous_losses) - self._log_shifted(new_losses)
        logits = self.logits.to(decrease)
        z = torch.softmax(logits, dim=0)
        delta = z * (decrease - (z * decrease).sum())  # J_z(ξ)ᵀ (log ℓ - log ℓ')
        gradient = delta + self.gamma * logits
        step = self._adam_step(gradient) if self.logit_optimizer == "adam" else gradient
        self.logits = (logits - self.lr * step).to(self.logits)

    def _adam_step(self, gradient: Tensor) -> Tensor:
        """Adam's bias-corrected direction m̂ / (√v̂ + 1e-8) for this gradient."""
        beta1, beta2 = 0.9, 0.999
        self.adam_steps += 1
        steps = int(self.adam_steps)
        moments = self.adam_moments.to(gradient)
        first = beta1 * moments[0] + (1 - beta1) * gradient
        second = beta2 * moments[1] + (1 - beta2) * gradient**2
        self.adam_moments = torch.stack([first, second]).to(self.adam_moments)
        corrected_first = first / (1 - beta1**steps)
        corrected_second = second / (1 - beta2**steps)
        return corrected_first / (corrected_second.sqrt() + 1e-8)
