"""Knowledge factorisation: a common-knowledge network plus one task network per task, distilled.

Yang, Ye, Wang, "Factorizing Knowledge in Neural Networks", ECCV 2022, arXiv:2207.03337
(code: github.com/Adamdad/KnowledgeFactor).

A pretrained multi-task teacher is split into *factor networks*, one per task, that can be used
alone or assembled without fine-tuning. Each factor network has two parts: a common-knowledge
network (CKN), identical in every factor network, and a task-specific network (TSN) of its
own. The TSN is a Gaussian encoder: it outputs a mean and a log-variance, and its feature is a
sample from that Gaussian (the mean at evaluation). The task reads the sum of both features,
as in the official ``KFImageClassifier``:

    c     = CKN(x)                                   (shared by all factor networks)
    z_t   = mu_t(x) + exp(logvar_t(x) / 2) * eps,    eps ~ N(0, I)
    y_t   = head_t(c + z_t)

Training distils the teacher into the factor networks with an InfoMax-Bottleneck objective:

    L = λ_kd  sum_t KD(y_t, teacher_t)                         (match the teacher's outputs)
      + λ_max InfoMax(P(teacher feature), c)                   (common part keeps input information)
      + λ_min sum_t KL( N(mu_t, exp(logvar_t)) || N(0, I) )    (task parts keep as little as needed)

InfoMax is a Donsker-Varadhan style bound with a cosine critic s_ij between the projected
teacher feature of example i and the common feature of example j: -(mean_i s_ii - log
mean_{i != j} exp(s_ij)); it is lowest when each common feature matches its own example
(tested). The official code averages both terms over the whole B x B grid with the other
cells zeroed before the exponential, so its positive term is ours divided by B and each
zeroed diagonal cell adds exp(0) = 1 to its negative term; we average over the intended
cells only. InfoMin is the closed-form Gaussian KL (tested
against ``torch.distributions``). KD is the mean squared error between outputs, or, with a
``temperature``, the temperature-scaled KL between softmaxes (both are in the official
``kd_loss.py``). :meth:`factorization_loss` returns every term; the teacher is any model with
``forward`` and ``encode`` (e.g. a trained ``shared_bottom``), kept out of this module.

Task t's output depends on the CKN, TSN_t and head_t only (tested), so :meth:`factor_network`
returns a standalone network for one task that reproduces it exactly (tested). The registry's
training harness has no teacher, so it cannot run KD or InfoMax (``training_procedure`` says
so); it trains the factor networks on the task losses plus the one term that needs no teacher,
:meth:`auxiliary_loss` = ``infomin_weight`` x the InfoMin KL of the last forward pass.

Default loss weights and the log-variance bias initialisation (-4, so the sampling noise
starts small) are our choices (the official configurations use λ_kd = 0.1, λ_max = 1 and
λ_min = 1e-3). The per-example Gaussian TSN is the one of the official multi-task dSprites
configuration (``SimpleGaussianConv64``); the TSN of the official ImageNet/CIFAR
configurations (``TSN_backbone``) is deterministic instead, its feature entering the sum
as it is, and its InfoMin KL is taken on the per-channel batch mean and variance of that
feature. Equation numbers are not cited: the paper text was not
available to check them; the structure and losses follow the official code.

Left out: the pretrained ResNet/WideResNet teachers and students, the auxiliary head that
classifies from task features alone, per-layer feature matching with batch-normalised
projectors, and assembling factor networks from different teachers. The official objective
also has a supervised cross-entropy on the factor networks' outputs (weight 1, kf.py), and its
Gaussian TSN samples at test time too (the mean here at evaluation; Adamdad/KnowledgeFactor).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above, require_non_negative, require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for, trunk_for
from .registry import Problem


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over channels (dim 1), averaged over the rest."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1).mean()


def infomax_loss(a: Tensor, b: Tensor) -> Tensor:
    """-(mean_i s_ii - log mean_{i != j} exp s_ij) with s the cosine similarity of rows of a and b.

    The bound contrasts each example with the others, so a batch needs at least 2 rows.
    """
    if len(a) < 2:
        raise ValueError(f"InfoMax needs at least 2 examples to contrast, got a batch of {len(a)}")
    s = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    off_diagonal = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return -(s.diagonal().mean() - s[off_diagonal].exp().mean().log())


def pooled(f: Tensor) -> Tensor:
    """(B, C) features as they are, (B, C, H, W) maps averaged over space."""
    return f.flatten(2).mean(-1) if f.ndim > 2 else f


class FactorNetwork(nn.Module):
    """One task's network: the (shared) CKN, the task's TSN and head; deterministic (mean of z)."""

    def __init__(self, ckn: nn.Module, tsn: nn.Module, head: nn.Module):
        super().__init__()
        self.ckn, self.tsn, self.head = ckn, tsn, head

    def forward(self, x: Tensor) -> Tensor:
        mu, _ = self.tsn(x).chunk(2, dim=1)
        return self.head(self.ckn(x) + mu)


class KnowledgeFactorization(MultiTaskModel):
    """A CKN shared by every task, a Gaussian TSN and a head per task, and the KF loss."""

    name = "knowledge_factorization"
    per_pass_attributes = ("_last_infomin",)
    training_procedure = ("factor networks are distilled from a trained teacher with factorization_loss() "
                          "(its KD and InfoMax terms need the teacher)")

    def __init__(self, tasks: Sequence[str], ckn: nn.Module, tsn: Mapping[str, nn.Module],
                 heads: Mapping[str, nn.Module], width: int, teacher_dim: int | None = None,
                 kd_weight: float = 1.0, infomax_weight: float = 0.1, infomin_weight: float = 0.01,
                 temperature: float | None = None, seed: int = 0):
        super().__init__(tasks)
        require_non_negative(kd_weight=kd_weight, infomax_weight=infomax_weight, infomin_weight=infomin_weight)
        if temperature is not None:
            require_above(0, temperature=temperature)
        self.ckn = ckn
        self.tsn = nn.ModuleDict({t: tsn[t] for t in self.tasks})  # each outputs (mu, logvar) channels
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        teacher_dim = width if teacher_dim is None else teacher_dim
        require_positive(teacher_dim=teacher_dim)
        self.project = nn.Sequential(nn.Linear(teacher_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.weights = (kd_weight, infomax_weight, infomin_weight)
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self._last_infomin: Tensor | None = None  # set by forward, read by auxiliary_loss

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kw: object) -> "KnowledgeFactorization":
        def gaussian_tsn() -> nn.Module:
            out = ChannelLinear(width, 2 * width)
            with torch.no_grad():
                out.bias[width:] = -4.0  # logvar starts low: little sampling noise at first
            return nn.Sequential(trunk_for(problem.input_shape, width, depth), out)

        tsn = {t: gaussian_tsn() for t in problem.tasks}
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), tsn, heads_for(problem, width), width, **kw)

    def factors(self, x: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor, Tensor]]]:
        """The common feature c and, per task, (z_t, mu_t, logvar_t); z_t is sampled in training."""
        common, per_task = self.ckn(x), {}
        for t in self.tasks:
            mu, logvar = self.tsn[t](x).chunk(2, dim=1)
            z = mu
            if self.training:
                eps = torch.randn(mu.shape, generator=self.generator).to(mu)
                z = mu + (0.5 * logvar).exp() * eps  # reparameterisation
            per_task[t] = (z, mu, logvar)
        return common, per_task

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        common, per_task = self.factors(x)
        self._last_infomin = sum(gaussian_kl(mu, logvar) for _, mu, logvar in per_task.values())
        return {t: self.heads[t](common + per_task[t][0]) for t in self.tasks}

    def auxiliary_loss(self) -> Tensor:
        """``infomin_weight`` x the InfoMin term (summed Gaussian KL) of the last forward pass."""
        if self._last_infomin is None:
            raise RuntimeError("auxiliary_loss() reads the last forward pass; call the model first")
        return self.weights[2] * self._last_infomin

    def factor_network(self, task: str) -> FactorNetwork:
        """Task ``task``'s standalone network (shares its modules with this model)."""
        return FactorNetwork(self.ckn, self.tsn[task], self.heads[task])

    def distillation(self, student: Tensor, teacher: Tensor) -> Tensor:
        """MSE between outputs, or temperature-scaled KL between softmaxes over dim 1."""
        if self.temperature is None:
            return F.mse_loss(student, teacher)
        tau = self.temperature
        kl = F.kl_div(F.log_softmax(student / tau, 1), F.log_softmax(teacher / tau, 1), log_target=True, reduction="none")
        return kl.sum(1).mean() * tau**2

    def factorization_loss(self, x: Tensor, teacher_outputs: Mapping[str, Tensor], teacher_feature: Tensor) -> dict[str, Tensor]:
        """The weighted KD, InfoMax and InfoMin terms and their sum (key ``total``)."""
        common, per_task = self.factors(x)
        outputs = {t: self.heads[t](common + per_task[t][0]) for t in self.tasks}
        kd = sum(self.distillation(outputs[t], teacher_outputs[t].detach()) for t in self.tasks)
        infomax = infomax_loss(self.project(pooled(teacher_feature.detach())), pooled(common))
        infomin = sum(gaussian_kl(mu, logvar) for _, mu, logvar in per_task.values())
        terms = {"kd": kd, "infomax": infomax, "infomin": infomin}
        terms["total"] = sum(w * v for w, v in zip(self.weights, terms.values()))
        return terms

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.tsn[task].parameters()
        yield from self.heads[task].parameters()
