"""DMTRL: one network per task whose layer weights are slices of a factorised tensor.

Yang & Hospedales, "Deep Multi-task Representation Learning: A Tensor Factorisation
Approach", ICLR 2017 (arXiv:1605.06391). Every task has a network of the same shape. For
each layer, the T task weights (a D1 x D2 matrix, or a conv kernel) are stacked into a
tensor W of shape D1 x ... x T, and W is never stored: it is a product of factors that
the task slices have in common. Two factorisations are provided:

    Tucker:        W = S x_1 U_1 x_2 U_2 ... x_N U_N      (core S, one factor U_n per mode)
    Tensor train:  W[i_1, ..., i_N] = G_1[i_1] G_2[i_2] ... G_N[i_N]   (G_n[i]: r_{n-1} x r_n)

(the paper's Eqs. 3-4 for Tucker and Eqs. 6-8 for the tensor train; the task mode is last,
so U_N, resp. G_N, is the task-specific factor).

How much the tasks share is learned, not designed: low ranks force the slices into a
common low-dimensional family, full ranks leave them free (Tucker with identity factors
is exactly T independent networks, tested). The ranks are the only design choice.

As in the paper, the factors are initialised by decomposing a tensor of per-task weights
(truncated HOSVD for Tucker, core S = W x_1 U_1^T ... x_N U_N^T as in Eq. 5; TT-SVD for the
tensor train; the authors' code uses the same SVD-based decompositions); here those weights
are freshly initialised single-task layers, not trained single-task networks. Each task
keeps its own (unfactorised) biases and its own output head.

Left out: the pre-training of single-task networks whose weights seed the factors, the
paper's rank selection by a relative SVD threshold (here ``rank`` caps every mode), the
factorisation of the output layer (each task keeps its own head here, so tasks may have
different output widths), and its third variant (last-axis flattening, a matrix
factorisation of the task mode, Eq. 2). The authors' demo (wOOL/DMTRL) stacks weights as
(input, output, task), here (output, input, task), which changes only the tensor-train
variant, and seeds its factors with scipy's interpolative SVD, not the optimal truncation.

Equation numbers checked in a Markdown transcript of arXiv:1605.06391, found in the public GitHub
index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """tensor x_mode matrix: contracts ``mode`` with the matrix's columns (new size = its rows)."""
    return torch.tensordot(matrix, tensor, dims=([1], [mode])).movedim(0, mode)


def unfold(tensor: Tensor, mode: int) -> Tensor:
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def tucker_product(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """S x_1 U_1 ... x_N U_N."""
    for mode, factor in enumerate(factors):
        core = mode_product(core, factor, mode)
    return core


def tt_product(cores: Sequence[Tensor]) -> Tensor:
    """Contract the train G_1 (1 x n_1 x r_1), ..., G_N (r_{N-1} x n_N x 1) into an n_1 x ... x n_N tensor."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    return full.squeeze(0).squeeze(-1)


def hosvd(tensor: Tensor, ranks: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Truncated higher-order SVD: U_n = leading left singular vectors of each unfolding."""
    factors = [torch.linalg.svd(unfold(tensor, n), full_matrices=False)[0][:, :r] for n, r in enumerate(ranks)]
    core = tucker_product(tensor, [u.T for u in factors])
    return core, factors


def tt_svd(tensor: Tensor, ranks: Sequence[int]) -> list[Tensor]:
    """TT-SVD (Oseledets, 2011): peel one mode at a time off a truncated SVD; ``ranks`` are r_1..r_{N-1}."""
    shape, cores, left = tensor.shape, [], 1
    rest = tensor.reshape(1, -1)
    for n, r in enumerate(ranks):
        u, s, vh = torch.linalg.svd(rest.reshape(left * shape[n], -1), full_matrices=False)
        r = min(r, s.numel())
        cores.append(u[:, :r].reshape(left, shape[n], r))
        rest, left = s[:r, None] * vh[:r], r
    cores.append(rest.reshape(left, shape[-1], 1))
    return cores


class FactorisedTensor(nn.Module):
    """A tensor kept as Tucker factors or a tensor train, initialised by decomposing ``init``."""

    def __init__(self, init: Tensor, method: str = "tucker", rank: int = 4):
        super().__init__()
        if method not in ("tucker", "tt"):
            raise ValueError(f"method must be 'tucker' or 'tt', got {method!r}")
        self.method, self.shape = method, tuple(init.shape)
        if method == "tucker":
            core, factors = hosvd(init, [min(rank, n) for n in self.shape])
            self.core = nn.Parameter(core)
            self.factors = nn.ParameterList(nn.Parameter(u) for u in factors)
        else:
            ranks = [min(rank, math.prod(self.shape[: n + 1]), math.prod(self.shape[n + 1 :]))
                     for n in range(len(self.shape) - 1)]
            self.factors = nn.ParameterList(nn.Parameter(g) for g in tt_svd(init, ranks))

    def forward(self) -> Tensor:
        if self.method == "tucker":
            return tucker_product(self.core, list(self.factors))
        return tt_product(list(self.factors))


class DMTRLLayer(nn.Module):
    """One layer of every task network: weights from a FactorisedTensor, per-task biases."""

    def __init__(self, templates: Sequence[nn.Linear | nn.Conv2d], method: str, rank: int):
        super().__init__()
        self.padding = getattr(templates[0], "padding", 0)
        stacked = torch.stack([m.weight.detach() for m in templates], dim=-1)  # (*weight shape, T)
        self.weights = FactorisedTensor(stacked, method, rank)
        self.biases = nn.ParameterList(nn.Parameter(m.bias.detach().clone()) for m in templates)

    def forward(self, x: Tensor, task_index: int, full: Tensor | None = None) -> Tensor:
        w = (self.weights() if full is None else full)[..., task_index]
        if w.dim() == 2:
            return F.linear(x, w, self.biases[task_index])
        return F.conv2d(x, w, self.biases[task_index], padding=self.padding)


class DMTRL(MultiTaskModel):
    """T parallel networks (ReLU after each factorised layer), then a head per task."""

    name = "dmtrl"
    equations_checked_in = "a Markdown transcript of arXiv:1605.06391"

    def __init__(self, tasks: Sequence[str], layers: Sequence[DMTRLLayer], heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        self.layers = nn.ModuleList(layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, method: str = "tucker",
                     rank: int = 4) -> "DMTRL":
        columns = [trunk_for(problem.input_shape, width, depth) for _ in problem.tasks]  # init only
        layers = [DMTRLLayer([c.blocks[j][0] for c in columns], method, rank) for j in range(depth)]
        return cls(problem.tasks, layers, heads_for(problem, width))

    def task_weights(self, layer: int) -> Tensor:
        """The reconstructed stack of task weights of ``layer``: (*weight shape, T)."""
        return self.layers[layer].weights()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        full = [layer.weights() for layer in self.layers]  # each product once per pass
        outputs = {}
        for k, t in enumerate(self.tasks):
            h = x
            for layer, w in zip(self.layers, full):
                h = torch.relu(layer(h, k, w))
            outputs[t] = self.heads[t](h)
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        k = self.tasks.index(task)
        for layer in self.layers:
            yield layer.biases[k]
        yield from self.heads[task].parameters()
