"""Knowledge distillation for multi-task learning (KD-MTL): single-task teachers, adapted features.

Li & Bilen, "Knowledge Distillation for Multi-task Learning", ECCV Workshops (Imbalance
Problems in Computer Vision) 2020, arXiv:2007.06889.

Multi-task losses of different kinds and scales pull a shared network unevenly. KD-MTL
first trains one single-task network per task and freezes it; the multi-task network
is then trained on the sum of task losses plus, for every task t, a distance between its
shared features ψ(x) and teacher t's features φ_t(x). The shared features cannot equal
every teacher's at once, so a small task-specific adaptor A_t (a linear map, a 1 x 1
convolution on feature maps) first maps them into teacher t's feature space, and both
sides are L2-normalised over channels before the squared distance is taken:

    L = Σ_t L_t  +  Σ_t λ_t ‖ A_t ψ(x) / ‖A_t ψ(x)‖ − φ_t(x) / ‖φ_t(x)‖ ‖²

(the paper's objective in Sec. 3; equation numbers not checked against the PDF).
Normalising makes the distance ignore each teacher's feature scale, which is what keeps
one task from dominating. The adaptors and the student are trained on it; the teachers
are not. In the authors' code A_t is a bias-free 1 x 1 convolution with Xavier-normal
initial weights, the distance is summed over channels and averaged over batch and
positions, and λ_t is set per task. Their normalisation divides by sqrt(Σ_c x_c² + 1e-6),
which shrinks near-zero feature vectors; ``channel_normalise`` divides by the plain norm.

This module is the distillation term only; the caller adds its task losses Σ_t L_t.

Left out: the teachers' training, distilling at several feature levels (the authors'
code uses an encoder and a decoder level; call the loss once per level), the adaptors'
separate optimizer with a larger learning rate, the SegNet / MTAN networks and NYUv2.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.architectures.encoders import channel_linear
from reference_impls.checks import require_at_least, require_known_tasks, require_positive


def channel_normalise(x: Tensor) -> Tensor:
    """L2-normalise over the channel axis (dim 1) at every position; zero stays zero."""
    return F.normalize(x, p=2.0, dim=1)


class KDMTL(nn.Module):
    """Σ_t λ_t distance between adapted, normalised student features and teacher t's."""

    name = "kd_mtl"

    def __init__(self, student_channels: int, teacher_channels: Mapping[str, int],
                 weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        require_positive(student_channels=student_channels,
                         **{f"teacher_channels[{t}]": c for t, c in teacher_channels.items()})
        if weights is not None:  # 0 switches a teacher off; a negative weight would reward moving away
            require_at_least(0, **{f"weights[{t}]": w for t, w in weights.items()})
        self.adaptors = nn.ParameterDict()
        for task, c in teacher_channels.items():
            w = torch.empty(c, student_channels)
            nn.init.xavier_normal_(w)
            self.adaptors[task] = nn.Parameter(w)  # A_t, a bias-free linear map on channels
        self.weights = dict(weights) if weights is not None else {t: 1.0 for t in teacher_channels}

    def adapt(self, task: str, student_features: Tensor) -> Tensor:
        """A_t ψ(x): the same linear map at every position (a 1 x 1 convolution on maps)."""
        return channel_linear(student_features, self.adaptors[task])

    def distance(self, task: str, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """Squared distance of the normalised features, summed over channels, mean elsewhere."""
        adapted = channel_normalise(self.adapt(task, student_features))
        target = channel_normalise(teacher_features.detach())
        if adapted.shape != target.shape:
            raise ValueError(f"{task}: adapted {tuple(adapted.shape)} vs teacher {tuple(target.shape)}")
        return (adapted - target).square().sum(dim=1).mean()

    def forward(self, student_features: Tensor, teacher_features: Mapping[str, Tensor]) -> Tensor:
        """``student_features`` is the shared ψ(x) (batch x channels [x H x W])."""
        require_known_tasks("teacher features", teacher_features, self.adaptors)
        return torch.stack([
            self.weights[t] * self.distance(t, student_features, teacher_features[t])
            for t in teacher_features
        ]).sum()
