"""SplitNet: learn to cut the top layers into disjoint groups of features and outputs.

Kim, Park, Kim, Hwang, "SplitNet: Learning to Semantically Split Deep Networks for
Parameter Reduction and Model Parallelization", ICML 2017 (PMLR 70:1866-1874; no arXiv
version).

The top layers of a network are split into G groups that share nothing: every output (a
class in the paper, a task here) and every feature of the split layers is assigned to one
group, and only weights between a group's inputs and the same group's outputs are kept,
so after reordering each split weight matrix is block diagonal. The assignment is learned
(the paper's Sec. 3): each output and each feature carries a soft assignment, a
distribution over the groups (softmax of free logits), trained with the network under
three regularisers added to the task loss:

* group weight regularisation Omega_W: for every group g, the group-lasso (L2 norm per row
  and per column) of the weights that connect g's inputs to outputs outside g and g's
  outputs to inputs outside g, each weighted by the assignments
  (:func:`group_weight_regulariser`), which pushes those weights to zero;
* disjoint group assignment Omega_D: the inner products between the assignment vectors of
  different groups, small when each item sits in one group (:func:`disjoint_regulariser`);
* balanced group assignment Omega_E: the sum over groups of their squared total
  assignment, small when groups have equal size (:func:`balance_regulariser`).

:meth:`SplitNet.split` then makes the assignment hard (most probable group) and masks every
cross-group weight, which leaves block-diagonal weights (tested): task t's output no longer
depends on any feature outside its group.

Left out: the hierarchical (tree of) splits over several levels, the fine-tuning schedule and
the parameter-reduction / parallel-evaluation measurements; weights are masked, not
physically cut into separate smaller layers.

Checked against the authors' code, dalgu90/splitnet-wrn (utils.py: _get_split_q, _add_split_loss;
resnet.py: build_train_op; train_split.py; group.sh): the assignments there are also a softmax
over groups of logits drawn with std 0.01, the same three penalties are used, and the split takes
the most probable group. Not reproduced: their rescaling of each penalty by the layer's sizes
(and, for Omega_W, by the weight initialisation scale), their averaging over layers (weighted by
each layer's own Omega_W value when weighted_group_loss is set) instead of our plain sum, their
per-position mean of squared kernel weights (which only scales a k x k convolution's Omega_W by
1/k), and their dropout on the split layers; the release weights the three penalties 1, 1
and 10.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


def group_weight_regulariser(weight: Tensor, out_assign: Tensor, in_assign: Tensor) -> Tensor:
    """Omega_W for one layer: ``weight`` is (out, in, ...), assignments are (G, out), (G, in).

    For each group g, rows (outputs) outside g are penalised on g's inputs and columns
    (inputs) outside g on g's outputs, each row / column by its L2 norm.
    """
    w = weight.flatten(2) if weight.ndim > 2 else weight.unsqueeze(-1)  # (out, in, k)
    total = weight.new_zeros(())
    for p, q in zip(out_assign, in_assign):
        rows = (1 - p)[:, None, None] * w * q[None, :, None]  # g's inputs -> other outputs
        cols = p[:, None, None] * w * (1 - q)[None, :, None]  # other inputs -> g's outputs
        total = total + rows.flatten(1).norm(dim=1).sum() + cols.transpose(0, 1).flatten(1).norm(dim=1).sum()
    return total


def disjoint_regulariser(assign: Tensor) -> Tensor:
    """Omega_D: sum over pairs of different groups of their assignment vectors' inner product."""
    gram = assign @ assign.T
    return (gram.sum() - gram.diagonal().sum()) / 2


def balance_regulariser(assign: Tensor) -> Tensor:
    """Omega_E: sum over groups of the squared total assignment to the group."""
    return assign.sum(dim=1).square().sum()


def _weighted(module: nn.Module) -> nn.Linear | nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def _apply(module: nn.Sequential, x: Tensor, mask: Tensor | None) -> Tensor:
    """Run ``module`` with the weight of its first linear / conv layer multiplied by ``mask``."""
    masked = False
    for m in module:
        if mask is not None and not masked and isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight * mask.to(m.weight).view(*mask.shape, *([1] * (m.weight.ndim - 2)))
            x = F.linear(x, w, m.bias) if isinstance(m, nn.Linear) else F.conv2d(x, w, m.bias, padding=m.padding)
            masked = True
        else:
            x = m(x)
    return x


class SplitNet(MultiTaskModel):
    """A trunk whose last ``split_layers`` blocks and the heads are split among ``groups``."""

    name = "splitnet"
    training_procedure = "the group assignment is learned with regularisers(), then split() masks the weights before fine-tuning"

    def __init__(
        self, tasks: Sequence[str], blocks: Sequence[nn.Sequential], widths: Sequence[int],
        heads: dict[str, nn.Sequential], split_layers: int = 1, groups: int | None = None,
    ):
        super().__init__(tasks)
        if not 1 <= split_layers <= len(blocks):
            raise ValueError(f"split_layers must be in [1, {len(blocks)}], got {split_layers}")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.first_split = len(blocks) - split_layers
        self.groups = len(self.tasks) if groups is None else groups
        require_positive(groups=self.groups)
        # widths[i] = width of the input of block i (i = 0 is the data); one logit row per feature
        split_widths = widths[self.first_split : len(blocks) + 1]
        self.feature_logits = nn.ParameterList(
            nn.Parameter(0.01 * torch.randn(self.groups, w)) for w in split_widths
        )
        self.task_logits = nn.Parameter(0.01 * torch.randn(self.groups, len(self.tasks)))
        self.num_masks = split_layers + len(self.tasks)  # split() masks each split block, then each head
        for j in range(self.num_masks):  # empty until split(); buffers: saved, moved by .to()
            self.register_buffer(f"mask_{j}", torch.empty(0))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, split_layers: int = 1) -> "SplitNet":
        trunk = trunk_for(problem.input_shape, width, depth)
        return cls(problem.tasks, list(trunk.blocks), trunk.widths, heads_for(problem, width), split_layers)

    def feature_assignments(self) -> list[Tensor]:
        """(G, width) soft assignments of the split layers' input and output features."""
        return [torch.softmax(logit, dim=0) for logit in self.feature_logits]

    def task_assignment(self) -> Tensor:
        """(G, T) soft assignment of the tasks (the paper's classes) to groups."""
        return torch.softmax(self.task_logits, dim=0)

    def regularisers(self) -> dict[str, Tensor]:
        """Omega_W, Omega_D and Omega_E over every split layer and the heads."""
        q, p = self.feature_assignments(), self.task_assignment()
        omega_w = sum(
            group_weight_regulariser(_weighted(b).weight, q[i + 1], q[i])
            for i, b in enumerate(self.blocks[self.first_split :])
        )
        for k, t in enumerate(self.tasks):
            w = _weighted(self.heads[t]).weight
            omega_w = omega_w + group_weight_regulariser(w, p[:, k : k + 1].expand(-1, w.shape[0]), q[-1])
        assigns = [*q, p]
        return {"weight": omega_w, "disjoint": sum(disjoint_regulariser(a) for a in assigns),
                "balance": sum(balance_regulariser(a) for a in assigns)}

    @torch.no_grad()
    def split(self) -> None:
        """Make every assignment hard and mask the weights between different groups."""
        q = [a.argmax(0) for a in self.feature_assignments()]
        p = self.task_assignment().argmax(0)
        masks = [(q[i + 1][:, None] == q[i][None, :]) for i in range(len(q) - 1)]
        masks += [(q[-1] == p[k])[None, :].expand(_weighted(self.heads[t]).weight.shape[0], -1)
                  for k, t in enumerate(self.tasks)]
        for j, mask in enumerate(masks):
            setattr(self, f"mask_{j}", mask.to(self.task_logits.dtype))

    @property
    def masks(self) -> list[Tensor] | None:
        """The masks split() made (one per split block, then one per head), None before."""
        masks = [getattr(self, f"mask_{j}") for j in range(self.num_masks)]
        return None if masks[0].numel() == 0 else masks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        n_split = len(self.blocks) - self.first_split
        for i, block in enumerate(self.blocks):
            j = i - self.first_split
            x = _apply(block, x, self.masks[j] if self.masks is not None and j >= 0 else None)
        head_masks = self.masks[n_split:] if self.masks is not None else [None] * len(self.tasks)
        return {t: _apply(self.heads[t], x, m) for t, m in zip(self.tasks, head_masks)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # After split() whole weight blocks serve one group, but they live in shared tensors.
        return self.heads[task].parameters()
