"""GREAT for multi-task learning: make task gradients indistinguishable to an adversary.

Sinha, Chen, Badrinarayanan, Rabinovich, "Gradient Adversarial Training of Neural
Networks", arXiv 2018 (arXiv:1806.08028). Premise: gradients that different task losses
send into a shared layer should look alike; if an auxiliary network can tell which task a
gradient tensor came from, the tasks pull the shared layer in task-specific ways. The
paper trains such an auxiliary classifier on the gradient tensors and lets the main network
play its adversary. In the multi-task variant, task-specific gradient-alignment layers
(identity in the forward pass) rescale each task's gradient element-wise on its way into
the shared layer; the classifier learns to name the task of a rescaled gradient and the
alignment layers receive its reversed gradient, so they learn rescalings that hide the
task of origin.

Form used here, on the K x d matrix of task gradients (row k = dL_k / d shared):

    update  = sum_k a_k * g_k                         (alignment layers, element-wise)
    u_k     = a_k * g_k / ||a_k * g_k||               (the classifier reads the direction)
    L_aux   = CE(softmax(W u_k + c), k), averaged over k
    W, c   <- W, c - lr * dL_aux / d(W, c)            (the classifier names the task)
    a      <- max(0, a + lr * reversal * dL_aux / da)  (reversed: the alignment fools it)

Each call returns the update with the current alignment, then plays one round of the
game. With ``lr = 0`` the alignment stays at 1 and the update is the plain sum of the
task gradients (equal weighting), as it also is on the first call (both tested).

Our choices, not the paper's: the classifier is linear and reads unit-norm rows (so the
game is scale-free and finite on every input), the alignment is kept non-negative (a
negative factor would turn a task's descent into ascent), and the state lives on this
object, updated by plain SGD. The gradient rows may be gradients of the shared
representation (the paper) or of the shared parameters (what the training harness passes).

Left out: the paper's deep auxiliary network on per-example spatial gradient tensors, the
double back-propagation of the adversarial signal into the encoder weights, and the
adversarial-defence and distillation uses of GREAT. The alignment-layer details follow the
paper's description of its multi-task experiments, not released code (none is public). The
per-task scaling factors are never normalised, so their overall size can drift upward (about 3 %
after 2000 random steps at lr 0.5 in the audit's check).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


class GREAT(GradientMethod):
    """Per-task element-wise gradient alignment trained against a task classifier."""

    name = "great"

    def __init__(self, lr: float = 0.05, reversal: float = 1.0, eps: float = 1e-12,
                 generator: torch.Generator | None = None) -> None:
        self.lr, self.reversal, self.eps = lr, reversal, eps
        self.generator = generator
        self.alignment: Tensor | None = None  # K x d, a_k
        self.classifier: tuple[Tensor, Tensor] | None = None  # (W: K x d, c: K)

    def _reset(self, num_tasks: int, dim: int) -> None:
        g = self.generator or torch.Generator().manual_seed(0)
        self.alignment = torch.ones(num_tasks, dim, dtype=torch.float64)
        weight = torch.randn(num_tasks, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.classifier = (weight, torch.zeros(num_tasks, dtype=torch.float64))

    def auxiliary_loss(self, grads: Tensor, alignment: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """Cross-entropy of the classifier naming the task of each aligned, unit-norm row."""
        aligned = alignment * grads
        rows = aligned / (aligned.norm(dim=1, keepdim=True) + self.eps)
        targets = torch.arange(grads.shape[0], device=grads.device)
        return F.cross_entropy(rows @ weight.T + bias, targets)

    def _adversarial_round(self, grads: Tensor) -> None:
        """One SGD step of the classifier and one reversed step of the alignment."""
        grads = grads.detach().to(torch.float64)
        scale = grads.abs().amax(dim=1, keepdim=True)
        grads = grads / torch.where(scale > 0, scale, torch.ones_like(scale))  # avoids overflow
        a = self.alignment.clone().requires_grad_(True)
        w, c = (t.clone().requires_grad_(True) for t in self.classifier)
        da, dw, dc = torch.autograd.grad(self.auxiliary_loss(grads, a, w, c), (a, w, c))
        self.classifier = (w.detach() - self.lr * dw, c.detach() - self.lr * dc)
        self.alignment = (a.detach() + self.lr * self.reversal * da).clamp_min(0.0)

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        if self.alignment is None or self.alignment.shape != grads.shape:
            self._reset(*grads.shape)
        update = (self.alignment.to(grads) * grads).sum(dim=0)
        self._adversarial_round(grads.cpu())
        return Aggregation(update=update)
