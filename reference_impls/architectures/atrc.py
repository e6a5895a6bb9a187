"""ATRC: each target task refines itself with a context, chosen per source task, from other tasks.

Bruggemann, Kanakis, Obukhov, Georgoulis & Van Gool, "Exploring Relational Context for
Multi-Task Dense Prediction", ICCV 2021, arXiv:2104.13874.

A shared backbone feeds one head per task, which gives task features ``F_t`` and an initial
(auxiliary) prediction ``A_t``. The Adaptive Task-Relational Context (ATRC) module then
refines every *target* task ``t`` with information from every *source* task ``s`` (itself
included) through a context pooling (CP) block, whose type depends on the pair:

  global  attention of every target pixel over all source pixels. As in the authors'
          code it is a linearised attention with positive (softplus) query/key maps:
          ``out(p) = sum_j (q_p . k_j) v_j / sum_j (q_p . k_j)``
  local   softmax attention of every target pixel over a ``window x window``
          neighbourhood of the same position in the source map (9x9 in the paper)
  none    no message (the pair is cut)

The target's own features and its CP outputs are concatenated, projected (``Task t``) and
mapped to the final prediction (``Pred t``). Which type each pair uses is searched: every
pair has logits ``alpha_{t,s}`` over the types; during the search a CP block returns the
convex combination of all types weighted by a relaxed categorical (Gumbel-softmax with
temperature ``tau``, or plain softmax without a generator), and afterwards the argmax type is
kept (:meth:`ATRC.derive`). Passing ``contexts`` fixes the types instead.

With ``none`` for every source the module reduces to each task's own head: the final
prediction depends on ``F_t`` only.

Task-specific: the target's CP blocks, its search logits, projection and predictors. The task
heads producing ``F_t`` feed other targets as sources, so they are shared.

Left out: the two label contexts (target- and source-label pooling over the auxiliary
predictions' class regions), BatchNorm and the two-layer query/key projections, the HRNet/
ResNet backbones, the search's separate optimiser/temperature schedule and resource loss,
the official search's early, irreversible fixing of a pair's type once its softmax leads the
runner-up by 0.3, and upsampling the auxiliary predictions (they stay at 1/2 scale here).
Also simplified: the official code first projects the concatenated CP outputs with a 1x1
convolution followed by a batch norm whose scale and shift start at zero (so training starts
from the no-context network) and 5% dropout, and only then concatenates F_t; here one 1x1
block reads [F_t; messages] with default initialisation.
The official local CP keeps window positions outside the image with score 0 and a zero value
inside the softmax; here they are masked out. The auxiliary predictions here are a 1x1 layer
on F_t; the official auxiliary head reads the backbone features with the gradient stopped
(they only feed the label contexts, which are left out).

Checked against brdav/atrc at 76d8055. Further differences: its search evaluates the one-hot
argmax of the type logits where :meth:`forward` here uses the soft mixture; on equal logits
its argmax prefers ``none`` where :meth:`derive` here prefers ``global``; its search code
regularises the type logits with an entropy term (weight ramped from -0.02 to 0.06) and has
no resource term, which the paper's text (not checked here) may describe; its released
genotypes choose the left-out label contexts for 48 of 57 pairs and ``local`` for none; its
attention blocks work at half the channel width, and its local window is 9 (3 here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above
from .base import MultiTaskModel, require_image_side
from .encoders import conv_block
from .registry import Problem

CONTEXT_TYPES = ("global", "local", "none")


class GlobalContext(nn.Module):
    """Linearised global attention: target pixels query all source pixels."""

    def __init__(self, channels: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Conv2d(channels, channels, 1) for _ in range(3))

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        q = F.softplus(self.query(target)).flatten(2)  # (B, C, HW), positive
        k = F.softplus(self.key(source)).flatten(2)
        v = F.relu(self.value(source)).flatten(2)
        summary = v @ k.transpose(1, 2)  # (B, C_v, C_k): sum_j v_j k_j^T
        normaliser = torch.einsum("bc,bcp->bp", k.sum(2), q).clamp_min(1e-12)  # sum_j q_p . k_j
        return ((summary @ q) / normaliser.unsqueeze(1)).view_as(target)


class LocalContext(nn.Module):
    """Softmax attention over a ``window x window`` neighbourhood; outside the image is masked."""

    def __init__(self, channels: int, window: int = 3):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number, got {window}")
        self.window = window
        self.query, self.key, self.value = (nn.Conv2d(channels, channels, 1) for _ in range(3))

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        b, c, h, w = target.shape
        n = self.window * self.window
        pad = self.window // 2
        q = F.relu(self.query(target)).view(b, c, 1, h * w)
        k = F.unfold(F.relu(self.key(source)), self.window, padding=pad).view(b, c, n, h * w)
        v = F.unfold(F.relu(self.value(source)), self.window, padding=pad).view(b, c, n, h * w)
        inside = F.unfold(torch.ones_like(source[:, :1]), self.window, padding=pad).view(b, 1, n, h * w)
        scores = (q * k).sum(1, keepdim=True) / math.sqrt(c)
        weights = torch.softmax(scores.masked_fill(inside == 0, float("-inf")), dim=2)
        return (weights * v).sum(2).view(b, c, h, w)


class ContextPooling(nn.Module):
    """One CP block (target <- source): a fixed context type, or a relaxed mixture of all types."""

    def __init__(self, channels: int, window: int = 3):
        super().__init__()
        self.contexts = nn.ModuleDict({"global": GlobalContext(channels), "local": LocalContext(channels, window)})

    def forward(self, target: Tensor, source: Tensor, weights: Mapping[str, Tensor | float]) -> Tensor:
        """``sum_type weight[type] * context_type(target, source)``; ``none`` contributes zero."""
        out = torch.zeros_like(target)
        for kind, module in self.contexts.items():
            weight = weights.get(kind, 0.0)
            if isinstance(weight, Tensor) or weight != 0.0:
                out = out + weight * module(target, source)
        return out


class ATRC(MultiTaskModel):
    """Backbone -> task heads (F_t, A_t) -> ATRC refinement (CP per task pair) -> predictions."""

    name = "atrc"
    training_procedure = ("the context types are searched first (with a resource loss, its own optimiser and "
                          "temperature schedule), then derive() fixes them and the network with those contexts is "
                          "trained")

    def __init__(self, tasks: Sequence[str], in_channels: int, out_dims: dict[str, int], channels: int = 16,
                 contexts: Mapping[tuple[str, str], str] | None = None, window: int = 3, tau: float = 1.0,
                 generator: torch.Generator | None = None, dense: bool = True):
        super().__init__(tasks)
        require_above(0, tau=tau)
        c, self.dense, self.tau, self.generator = channels, dense, tau, generator
        if contexts is not None:
            bad = {v for v in contexts.values() if v not in CONTEXT_TYPES}
            missing = {(t, s) for t in tasks for s in tasks} - set(contexts)
            if bad or missing:
                raise ValueError(f"contexts need a type in {CONTEXT_TYPES} for every (target, source); "
                                 f"unknown {sorted(bad)}, missing {sorted(missing)}")
        self.contexts = dict(contexts) if contexts is not None else None
        self.backbone = nn.Sequential(conv_block(in_channels, c), conv_block(c, c, pool=True))
        self.task_heads = nn.ModuleDict({t: conv_block(c, c) for t in tasks})
        self.auxiliary = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})
        self.cp = nn.ModuleDict({t: nn.ModuleDict({s: ContextPooling(c, window) for s in tasks}) for t in tasks})
        self.alpha = nn.ParameterDict({t: nn.Parameter(torch.zeros(len(tasks), len(CONTEXT_TYPES)))
                                       for t in tasks}) if contexts is None else None
        self.project = nn.ModuleDict({t: conv_block((1 + len(tasks)) * c, c, kernel_size=1) for t in tasks})
        self.predict = nn.ModuleDict({t: nn.Conv2d(c, out_dims[t], 1) for t in tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> ATRC:
        if not problem.is_image:
            raise ValueError("ATRC's contexts attend over image positions; it needs image inputs")
        require_image_side(problem.input_shape, 2, "its encoder halves the feature map")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims,
                   channels=width, dense=problem.dense, **kwargs)

    def context_weights(self, target: str) -> list[dict[str, Tensor | float]]:
        """Per source: the fixed one-hot type, or the relaxed categorical over the types."""
        if self.alpha is None:
            return [{self.contexts[(target, s)]: 1.0} for s in self.tasks]
        logits = self.alpha[target]
        if self.generator is not None and self.training:
            u = torch.rand(logits.shape, generator=self.generator).to(logits)
            logits = logits - torch.log(-torch.log(u.clamp(1e-10, 1.0)))  # Gumbel noise
        probs = torch.softmax(logits / self.tau, dim=-1)
        return [dict(zip(CONTEXT_TYPES, row)) for row in probs]

    def derive(self) -> dict[tuple[str, str], str]:
        """The searched architecture: the most likely context type for every (target, source)."""
        if self.alpha is None:
            return dict(self.contexts)
        return {(t, s): CONTEXT_TYPES[int(self.alpha[t][i].argmax())]
                for t in self.tasks for i, s in enumerate(self.tasks)}

    def forward_with_intermediate(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(final predictions, auxiliary predictions at 1/2 scale)``."""
        shared = self.backbone(x)
        feats = {t: self.task_heads[t](shared) for t in self.tasks}
        auxiliary = {t: self.auxiliary[t](feats[t]) for t in self.tasks}
        final = {}
        for t in self.tasks:
            messages = [self.cp[t][s](feats[t], feats[s], wts) for s, wts in zip(self.tasks, self.context_weights(t))]
            out = self.predict[t](self.project[t](torch.cat([feats[t], *messages], dim=1)))
            final[t] = (F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
                        if self.dense else out.mean(dim=(2, 3)))
        return final, auxiliary

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_intermediate(x)[0]

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The target's CP blocks, search logits, projection and both predictors."""
        for module in (self.cp[task], self.project[task], self.predict[task], self.auxiliary[task]):
            yield from module.parameters()
        if self.alpha is not None:
            yield self.alpha[task]
