"""GTTN: a learned convex combination of the trace norms of every flattening of the task tensor.

Zhang, Zhang & Wang, "Multi-Task Learning via Generalized Tensor Trace Norm", KDD 2021,
doi:10.1145/3447548.3467329 (earlier version: "Deep Multi-Task Learning via Generalized
Tensor Trace Norm", arXiv:2002.04799). As in trace-norm regularised deep MTL
(:mod:`.trace_norm`), every task has its own network of the same shape and, per layer,
the T task weights are stacked into an N-mode tensor W (tasks on the last mode). Earlier
tensor trace norms pick a few matrix flattenings of W by hand (Tucker: the N single-mode
unfoldings; TT: the N - 1 prefix splits; LAF: the task mode alone) and weigh them
equally. A low rank can hide in any split of the modes, so GTTN uses all of them:

    GTTN(W) = sum_S alpha_S ||W_(S)||_*,   alpha_S >= 0,  sum_S alpha_S = 1

where S runs over the non-empty proper subsets of the modes and W_(S) is the matrix whose
rows index the modes in S and whose columns index the rest. W_(S) and W_(complement of S)
are transposes with the same nuclear norm, so each split is counted once: 2^(N-1) - 1
flattenings. The combination coefficients alpha are learned with the model instead of
being fixed by the user.

Here alpha = softmax(logits), one logit vector per layer, trained with everything else
by the training harness (the authors' code, GTTN_weight_net in their repository
Pengxin-Guo/GTTN-NGTTN, parameterises the weights the same way). Minimising the penalty
over alpha alone puts all mass on the flattening with the smallest nuclear norm (tested),
so the learned alpha points at the split along which the tasks are most low-rank.
``learn_coefficients=False`` keeps alpha uniform. :meth:`GTTN.auxiliary_loss` is
``gttn_weight`` times the sum over layers. The paper's equation numbers are not cited:
its text was not available to check them.

Left out: the paper's other strategies for choosing alpha (only the softmax-learned and
the uniform ones are here), its penalty on the output layer (each task keeps its own
head, so output widths may differ), and its backbones and datasets. The authors' released code
(fc7/model.py) differs in where the penalty sits: it shares the one hidden layer between tasks
(only a squared Frobenius penalty on it) and applies the weighted trace norms to the stacked
task-specific output layer alone (a 3-mode task x class x hidden tensor, whose three single-mode
unfoldings are all its flattenings); its logits start from N(0, 1) draws, here from zero.
Its penalty is rebuilt as a new tensor from the list of trace norms (``torch.FloatTensor``),
which cuts it from autograd: only the mixing logits are trained by it and the weights never
see it, while here it reaches the weights, as the method intends. Its pool5 variant fills
its 15 coefficients with the 5 single-mode unfoldings, each three times; its penalty weight
is 0.25 (``gttn_weight`` 1e-3 here). Checked at Pengxin-Guo/GTTN-NGTTN a09f176.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

import torch
from torch import Tensor, nn

from .trace_norm import TraceNormMTL, nuclear_norm


def flattening_subsets(n_modes: int) -> list[tuple[int, ...]]:
    """One subset S per distinct flattening: |S| < N/2, or |S| = N/2 with mode 0 in S."""
    subsets = []
    for size in range(1, n_modes // 2 + 1):
        for s in combinations(range(n_modes), size):
            if 2 * size < n_modes or 0 in s:  # a half-split and its complement are one flattening
                subsets.append(s)
    return subsets


def flatten(w: Tensor, subset: Sequence[int]) -> Tensor:
    """W_(S): the modes in ``subset`` index the rows, the remaining modes the columns."""
    rows = math.prod(w.shape[m] for m in subset)
    return w.permute(*subset, *[m for m in range(w.dim()) if m not in subset]).reshape(rows, -1)


def gttn_norm(w: Tensor, alpha: Tensor) -> Tensor:
    """sum_S alpha_S ||W_(S)||_* over :func:`flattening_subsets` (``alpha`` in that order)."""
    norms = torch.stack([nuclear_norm(flatten(w, s)) for s in flattening_subsets(w.dim())])
    return (alpha * norms).sum()


class GTTN(TraceNormMTL):
    """Trace-norm MTL whose per-layer penalty is a learned mix of all flattenings' trace norms."""

    name = "gttn"

    def __init__(self, tasks: Sequence[str], columns: Mapping[str, nn.Module], heads: Mapping[str, nn.Module],
                 gttn_weight: float = 1e-3, learn_coefficients: bool = True):
        super().__init__(tasks, columns, heads, variant="tucker", trace_norm_weight=gttn_weight)
        counts = [len(flattening_subsets(w.dim())) for w in self.stacked_weights()]
        self.coefficient_logits = nn.ParameterList(
            nn.Parameter(torch.zeros(n), requires_grad=learn_coefficients) for n in counts)

    def coefficients(self) -> list[Tensor]:
        """alpha per layer: on the simplex by construction."""
        return [torch.softmax(logits, dim=0) for logits in self.coefficient_logits]

    def trace_norm_penalty(self) -> Tensor:
        layers = zip(self.stacked_weights(), self.coefficients())
        return torch.stack([gttn_norm(w, alpha) for w, alpha in layers]).sum()
