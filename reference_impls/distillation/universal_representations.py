"""Universal representations: distil many single-task/domain teachers through small adapters.

Li, Liu, Bilen, "Universal Representations: A Unified Look at Multiple Task and Domain
Learning", IJCV 2024, arXiv:2204.02744. Equations are named, not numbered: the paper's
numbering could not be checked here.

Training one network on many tasks or domains means minimising a sum of losses of very
different sizes, and one usually dominates. The paper first trains one network per task /
domain, freezes it, and then trains a single universal network ψ on the task losses plus
two distillation terms per task t:

    L = Σ_t L_t  +  Σ_t λ_t d(A_t ψ(x), φ_t(x))  +  β Σ_t KL(p_t^T(x) ‖ p_t(x))

- feature alignment: a small task-specific adapter A_t (a linear map, a 1 x 1 convolution
  on feature maps) maps the shared features into teacher t's feature space, both sides are
  L2-normalised over channels, and d measures what is left. For dense prediction d is the
  squared distance (exactly KD-MTL's term, which this class extends); for image
  classification across domains d = 1 − CKA, centred kernel alignment with an RBF kernel
  over the batch, which compares the batch's similarity structure rather than each vector;
- logit alignment: the student's class distribution for task t matches the teacher's,
  both softened by a temperature T, with the usual T² factor.

The adapters are trained with the student and thrown away afterwards; teachers never
receive gradients. The universal network keeps no task-specific capacity for alignment.

Sources: the CKA variant (RBF kernel, bandwidth from the median pairwise distance) and
the temperature T = 8 follow the official code (VICO-UoE/UniversalRepresentations:
``VisualDecathlon/cka.py``, ``utils.py`` and ``train_url.py``; VICO-UoE/URL, ``models/cka.py``),
which weights each task's KL term separately (e.g. ImageNet 10, Daimler 0.1; one β here) and
applies CKA to pooled vectors only (spatial maps are our extension); the L2 variant with
1 x 1 convolution adapters follows ``DensePred/nyu_url.py``.

Left out: the teachers' training, the linear annealing of the distillation weights over
epochs, the adapters' separate optimizer, distilling several feature levels (call the
feature term once per level), the ResNet / SegNet backbones and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from reference_impls.checks import require_above, require_at_least, require_known_tasks

from reference_impls.distillation.kd_mtl import KDMTL, channel_normalise


def rbf_gram(x: Tensor) -> Tensor:
    """RBF kernel over the batch, bandwidth² = median of the non-zero squared distances."""
    sq = torch.cdist(x, x).square()
    positive = sq[sq > 0].detach()
    bandwidth = positive.median() if positive.numel() else sq.new_tensor(1.0)
    return torch.exp(-sq / (2 * bandwidth.clamp_min(1e-12)))


def linear_gram(x: Tensor) -> Tensor:
    return x @ x.T


def centre(k: Tensor) -> Tensor:
    """H K H with H = I − 11ᵀ/n: removes the batch mean in feature space."""
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def cka(x: Tensor, y: Tensor, kernel: str = "rbf") -> Tensor:
    """Centred kernel alignment ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖) of two batches (n x d, n x d')."""
    gram = rbf_gram if kernel == "rbf" else linear_gram
    kx, ky = centre(gram(x)), centre(gram(y))
    norm = (kx.square().sum().clamp_min(1e-12) * ky.square().sum().clamp_min(1e-12)).sqrt()
    return (kx * ky).sum() / norm


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(z_T / T) ‖ softmax(z_S / T)), summed over classes, mean over the batch."""
    require_above(0, temperature=temperature)
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


class UniversalRepresentations(KDMTL):
    """KD-MTL's adapted feature term (L2 or 1 − CKA) plus softened logit KD per task."""

    name = "universal_representations"

    def __init__(self, student_channels: int, teacher_channels: Mapping[str, int],
                 weights: Mapping[str, float] | None = None, feature: str = "l2",
                 kernel: str = "rbf", beta: float = 1.0, temperature: float = 8.0) -> None:
        super().__init__(student_channels, teacher_channels, weights)
        if feature not in ("l2", "cka") or kernel not in ("rbf", "linear"):
            raise ValueError("feature must be 'l2' or 'cka', kernel 'rbf' or 'linear'")
        require_at_least(0, beta=beta)  # 0 drops the logit term
        require_above(0, temperature=temperature)
        self.feature, self.kernel = feature, kernel
        self.beta, self.temperature = beta, temperature

    def alignment(self, task: str, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """d(A_t ψ(x), φ_t(x)) on channel-normalised features."""
        if self.feature == "l2":
            return self.distance(task, student_features, teacher_features)
        adapted = channel_normalise(self.adapt(task, student_features)).flatten(1)
        target = channel_normalise(teacher_features.detach()).flatten(1)
        return 1 - cka(adapted, target, self.kernel)

    def forward(self, student_features: Tensor | Mapping[str, Tensor],
                teacher_features: Mapping[str, Tensor],
                student_logits: Mapping[str, Tensor] | None = None,
                teacher_logits: Mapping[str, Tensor] | None = None) -> Tensor:
        """One shared feature batch, or one per task (multi-domain: each domain its own images)."""
        require_known_tasks("teacher features", teacher_features, self.adaptors)
        if not isinstance(student_features, Tensor):
            require_known_tasks("teacher features", teacher_features, student_features)
        if teacher_logits:
            require_known_tasks("teacher logits", teacher_logits, student_logits or {})
        terms = []
        for t in teacher_features:
            psi = student_features if isinstance(student_features, Tensor) else student_features[t]
            terms.append(self.weights[t] * self.alignment(t, psi, teacher_features[t]))
        for t in teacher_logits or {}:
            terms.append(self.beta * softened_kl(student_logits[t], teacher_logits[t], self.temperature))
        return torch.stack(terms).sum()
