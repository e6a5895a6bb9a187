"""MRN: a tensor-normal prior ties the task-specific layers of otherwise separate heads.

Long, Cao, Wang, Yu, "Learning Multiple Tasks with Multilinear Relationship Networks",
NeurIPS 2017 (arXiv:1506.02117). The lower layers are shared; every task then has its
own layers. For one such layer the K task weight matrices are stacked into a tensor W of
size D1 x D2 x K (input features x output units ("classes") x tasks), and W gets a
tensor-normal prior with zero mean and one covariance per mode:

    vec(W) ~ N(0, Sigma_1 (x) Sigma_2 (x) Sigma_3)

MAP training adds the negative log prior to the task losses; with the covariances held
fixed that is the quadratic form

    vec(W)^T (Sigma_1 (x) Sigma_2 (x) Sigma_3)^{-1} vec(W)

(the log-determinants do not depend on W). The covariances are then re-estimated from
W in closed form, one mode at a time with the other two fixed (a flip-flop step):

    Sigma_1 = W_(1) (Sigma_2 (x) Sigma_3)^{-1} W_(1)^T / (D2 K) + eps I

and likewise for modes 2 and 3. Low penalty is paid for weights that vary along the
directions the covariances have learned (related tasks, related features), so tasks
borrow strength without being tied.

Conventions here: ``vec`` is row-major (C order) and W_(k) is the mode-k unfolding
``W.movedim(k, 0).reshape(D_k, -1)``, which makes the Kronecker product torch.kron's
(the paper writes column-major vec with the factors in reverse order; same penalty).
As in the authors' code (thuml/MTlearn) the model stores the inverse covariances
("precisions"); here each is scaled to unit trace after its update, since only the
Kronecker product is identifiable, not the scale of each factor. The modes are updated in
turn, each with the newest estimate of the other two. The released code is narrower: it
re-estimates the task covariance only (the class and feature ones stay the identity, their
updates commented out), without dividing by the other modes' sizes, inverts it through an
SVD that leaves singular values at or below 0.1 uninverted, caps its trace at 3000 instead
of normalising it, and does so every 100 iterations. In training mode the forward pass runs one
flip-flop sweep every ``update_every`` calls, from the current (detached) weights, so
the training harness needs no extra hook; :meth:`MRN.auxiliary_loss` is ``prior_weight``
times the summed quadratic forms, which the harness adds to the objective.

The prior covers every task-specific layer whose weights have the same shape in all
tasks: the hidden layer of each head always, the output layer only when all tasks have
the same output width. The paper's equation numbers are not cited: its text was not
available to check them.

Left out: the AlexNet/VGG backbones with fine-tuned conv layers and two task-specific
fully connected layers (fc7, fc8); here one hidden and one output layer per task on a
small trunk, 1x1 (per-pixel) layers for dense image tasks. ``prior_weight`` (1e-2; 1 in the
authors' code, whose only task-specific layer is the last and whose backbone is frozen by
default) and ``eps`` (1e-5, the authors' code's value) are not tuned. With all three factors
at unit trace, the prior's overall scale is gone too, so the penalty grows like ||W||², close
to an uneven weight decay (7.7e-5, 0.052 and 1.73 for W scaled by 0.01, 1 and 10 in the
audit), where the authors' version stays roughly constant; its Kronecker quadratic and
covariance update agree with theirs to 1e-13 up to our division by the other modes' sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import ChannelLinear, trunk_for


def mode_unfold(w: Tensor, mode: int) -> Tensor:
    """Mode-k unfolding W_(k): (D_k, product of the other sizes), row-major."""
    return w.movedim(mode, 0).reshape(w.shape[mode], -1)


def mode_multiply(w: Tensor, matrices: Sequence[Tensor | None]) -> Tensor:
    """W x_1 M_1 x_2 M_2 x_3 M_3 (a ``None`` skips that mode)."""
    for mode, m in enumerate(matrices):
        if m is not None:
            w = torch.tensordot(m, w, dims=([1], [mode])).movedim(0, mode)
    return w


def kronecker_quadratic(w: Tensor, precisions: Sequence[Tensor]) -> Tensor:
    """vec(W)^T (P_1 (x) P_2 (x) P_3) vec(W), without forming the Kronecker product."""
    return (w * mode_multiply(w, precisions)).sum()


def flip_flop_covariance(w: Tensor, precisions: Sequence[Tensor], mode: int, eps: float) -> Tensor:
    """Sigma_k = W_(k) (Kronecker product of the other precisions) W_(k)^T / (their sizes) + eps I."""
    others = [None if j == mode else p for j, p in enumerate(precisions)]
    scaled = mode_multiply(w, others)
    n_other = math.prod(s for j, s in enumerate(w.shape) if j != mode)
    sigma = mode_unfold(w, mode) @ mode_unfold(scaled, mode).T / n_other
    return sigma + eps * torch.eye(w.shape[mode], dtype=w.dtype, device=w.device)


class TensorNormalPrior(nn.Module):
    """The three unit-trace precisions of a D1 x D2 x K weight tensor (buffers, not trained)."""

    def __init__(self, shape: Sequence[int], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for mode, size in enumerate(shape):  # start from isotropic covariances
            self.register_buffer(f"precision{mode}", torch.eye(size) / size)

    def precisions(self) -> list[Tensor]:
        return [getattr(self, f"precision{mode}") for mode in range(3)]

    def penalty(self, w: Tensor) -> Tensor:
        """The prior's quadratic form: vec(W)^T (Sigma_1 (x) Sigma_2 (x) Sigma_3)^{-1} vec(W)."""
        return kronecker_quadratic(w, self.precisions())

    @torch.no_grad()
    def update(self, w: Tensor) -> None:
        """One flip-flop sweep: each mode's precision from W and the other two, unit trace."""
        w = w.detach()
        for mode in range(3):
            precision = torch.linalg.inv(flip_flop_covariance(w, self.precisions(), mode, self.eps))
            precision = (precision + precision.T) / 2  # symmetric up to rounding
            getattr(self, f"precision{mode}").copy_(precision / torch.trace(precision))


class MRN(MultiTaskModel):
    """Shared ``trunk``; per task ``layers[task]`` (ChannelLinear, ReLU between); priors across tasks."""

    name = "mrn"

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, layers: Mapping[str, Sequence[ChannelLinear]],
                 prior_weight: float = 1e-2, update_every: int = 1, eps: float = 1e-5):
        super().__init__(tasks)
        self.trunk = trunk
        self.layers = nn.ModuleDict({t: nn.ModuleList(layers[t]) for t in self.tasks})
        self.prior_weight, self.update_every = prior_weight, update_every
        depth = len(self.layers[self.tasks[0]])
        self.regularised = [i for i in range(depth)
                            if len({self.layers[t][i].weight.shape for t in self.tasks}) == 1]
        self.priors = nn.ModuleDict({str(i): TensorNormalPrior(self.stacked_weights(i).shape, eps)
                                     for i in self.regularised})
        self._calls = 0

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kwargs: object) -> "MRN":
        trunk = trunk_for(problem.input_shape, width, depth)
        if problem.is_image and not problem.dense:  # image-level tasks read pooled features
            trunk = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        layers = {t: [ChannelLinear(width, width), ChannelLinear(width, d)]
                  for t, d in problem.task_out_dims.items()}
        return cls(problem.tasks, trunk, layers, **kwargs)

    def stacked_weights(self, index: int) -> Tensor:
        """W of layer ``index``: D1 (inputs) x D2 (outputs) x K (tasks)."""
        return torch.stack([self.layers[t][index].weight.T for t in self.tasks], dim=-1)

    def update_covariances(self) -> None:
        for i in self.regularised:
            self.priors[str(i)].update(self.stacked_weights(i))

    def prior_penalty(self) -> Tensor:
        """Sum over the regularised layers of the tensor-normal quadratic form."""
        zero = next(self.parameters()).new_zeros(())
        return sum((self.priors[str(i)].penalty(self.stacked_weights(i)) for i in self.regularised), zero)

    def auxiliary_loss(self) -> Tensor:
        """``prior_weight`` x the prior penalty (from the current weights; no forward pass needed)."""
        return self.prior_weight * self.prior_penalty()

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        outputs = {}
        for t in self.tasks:
            h = z
            for j, layer in enumerate(self.layers[t]):
                h = layer(h if j == 0 else torch.relu(h))
            outputs[t] = h
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.training and self.update_every > 0:
            if self._calls % self.update_every == 0:
                self.update_covariances()  # flip-flop step from the weights of the last update
            self._calls += 1
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.layers[task].parameters()
