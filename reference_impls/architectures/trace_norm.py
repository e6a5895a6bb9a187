"""Trace-norm regularised deep MTL: parallel task networks, low-rank pressure across tasks.

Yang & Hospedales, "Trace Norm Regularised Deep Multi-Task Learning", ICLR 2017 workshop
track (arXiv:1606.04038). Every task has its own network of the same shape; nothing is
tied. For each layer the T task weights are stacked into a tensor W (D1 x ... x T), and
the loss gets a tensor trace norm of W: a sum of nuclear norms (sums of singular values)
of matrices made from W (Eq. (2)). The paper's three variants, all here (``variant=``):

    "tucker" (default):  sum_n ||W_(n)||_*   every mode-n unfolding; Eqs. (3)-(4)
    "tt":                sum_n ||W_[n]||_*   W reshaped to (D1...Dn) x (D_{n+1}...D_N); Eqs. (5)-(6)
    "laf":               ||W_(N)||_*         last-axis flattening, the T x (rest) matrix; Eq. (7)

A layer's modes are ordered as in the authors' TensorFlow code, (in, out) for a linear layer
and (kh, kw, in, out) for a convolution, then the task axis: the Tucker and LAF norms do not
depend on that order, the TT reshapings do.

A small nuclear norm of the task-mode unfolding means the task weights lie close to a
low-dimensional family; sharing is encouraged softly, not imposed (the gradient of a
nuclear norm, U V^T (Eqs. (8)-(10)), shrinks every singular value at the same rate, so the small ones
reach zero first: tested). With weight 0 the model is T independent networks.

:meth:`TraceNormMTL.auxiliary_loss` is ``trace_norm_weight`` times the sum over layers;
the training harness adds it. The authors' released demo (wOOL/TNRDMTL) likewise sums the
unfoldings' nuclear norms, with weight 0.001 (the default here), and its nuclear-norm op uses
U V^T as the gradient, which is what autograd gives for ``svdvals``. Equation numbers are
those of the draft the authors kept in that repository on 2016-06-13, the day of arXiv v1
(wOOL/TNRDMTL, paper_draft.pdf, commit 3487d4e, removed the next day), where the LAF variant
is called "Matrix"; the ICLR workshop text was not checked.

Left out: the paper's weighting of the unfoldings (the gamma_i of Eqs. (3), (5) and (7);
all weights 1 here; the authors' 2016 demo.py averages the norms over unfoldings and layers
where they are summed here, their released demo uses the LAF variant and averages the task
losses, and the draft's experiments use a weight of 0.01), the penalty on
the output layer (each task keeps its own head, so output widths may differ), and its
CNN backbones and datasets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for

VARIANTS = ("tucker", "tt", "laf")


def nuclear_norm(matrix: Tensor) -> Tensor:
    return torch.linalg.svdvals(matrix).sum()


def tensor_trace_norm(w: Tensor, variant: str = "tucker") -> Tensor:
    """The chosen tensor trace norm of ``w`` (any number of modes, tasks last)."""
    if variant == "tucker":
        unfoldings = [w.movedim(n, 0).reshape(w.shape[n], -1) for n in range(w.dim())]
    elif variant == "tt":
        unfoldings = [w.reshape(math.prod(w.shape[:n]), -1) for n in range(1, w.dim())]
    elif variant == "laf":
        unfoldings = [w.movedim(-1, 0).reshape(w.shape[-1], -1)]
    else:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return torch.stack([nuclear_norm(m) for m in unfoldings]).sum()


def authors_layout(weight: Tensor) -> Tensor:
    """A PyTorch weight, (out, in) or (out, in, kh, kw), in TensorFlow's order: (in, out) or
    (kh, kw, in, out). The TT unfoldings depend on the order of the modes."""
    return weight.T if weight.dim() == 2 else weight.permute(*range(2, weight.dim()), 1, 0)


class TraceNormMTL(MultiTaskModel):
    """One ``make_column()`` network and one head per task; trace norm over stacked layers."""

    name = "trace_norm"
    equations_checked_in = "wOOL/TNRDMTL, paper_draft.pdf"

    def __init__(self, tasks: Sequence[str], columns: Mapping[str, nn.Module], heads: Mapping[str, nn.Module],
                 variant: str = "tucker", trace_norm_weight: float = 1e-3):
        super().__init__(tasks)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.columns = nn.ModuleDict({t: columns[t] for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.variant, self.trace_norm_weight = variant, trace_norm_weight

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kwargs: object) -> "TraceNormMTL":
        columns = {t: trunk_for(problem.input_shape, width, depth) for t in problem.tasks}
        return cls(problem.tasks, columns, heads_for(problem, width), **kwargs)

    def stacked_weights(self) -> list[Tensor]:
        """Per layer, the task weights in the authors' layout stacked on a last axis: (in, out, T)
        for a linear layer, (kh, kw, in, out, T) for a convolution."""
        depth = len(self.columns[self.tasks[0]].blocks)
        return [torch.stack([authors_layout(self.columns[t].blocks[j][0].weight) for t in self.tasks], dim=-1)
                for j in range(depth)]

    def trace_norm_penalty(self) -> Tensor:
        return torch.stack([tensor_trace_norm(w, self.variant) for w in self.stacked_weights()]).sum()

    def auxiliary_loss(self) -> Tensor:
        """``trace_norm_weight`` x the summed tensor trace norms (from the weights; no forward needed)."""
        return self.trace_norm_weight * self.trace_norm_penalty()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.columns[t](x)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.columns[task].parameters()  # the penalty couples them; the data does not
        yield from self.heads[task].parameters()
