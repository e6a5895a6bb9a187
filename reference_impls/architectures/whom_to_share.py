"""Learning with whom to share: tasks split into groups, each group learns its own shared features.

Kang, Grauman & Sha, "Learning with Whom to Share in Multi-task Feature Learning", ICML
2011 (pp. 521-528; no arXiv version). Multi-task feature learning (Argyriou et al., see
:mod:`.mtfl`) pushes all task weights W (d x T) into one low-dimensional subspace with the
squared trace norm ||W||_*^2; unrelated tasks then hurt each other. Here the tasks are
partitioned into G groups, with diagonal 0/1 indicators Q_g (sum_g Q_g = I), and only
tasks in the same group share a subspace:

    min_{W, Q}  sum_t loss_t(w_t) + gamma sum_g ||W Q_g^{1/2}||_*^2

The integer assignment is relaxed to memberships q_gt in [0, 1] with sum_g q_gt = 1, and
the problem is solved by alternating the task weights and the grouping. For fixed W, a
group's penalty is a feature-learning penalty in variational form,

    ||W Q_g^{1/2}||_*^2 = min_{D_g PSD, tr D_g <= 1} tr(W Q_g W^T D_g^{-1}),
    attained at D_g = (W Q_g W^T)^{1/2} / tr((W Q_g W^T)^{1/2})   (tested)

so for fixed groups each task's weights are a ridge problem with metric sum_g q_gt D_g^{-1}.
Since splitting tasks that use orthogonal features into separate groups lowers the sum of
squared trace norms ((a + b)^2 > a^2 + b^2) while tasks sharing features cost less
together, minimising over Q groups the tasks by the features they share (tested).

Source of the rule: the authors' MATLAB code, as copies found in the code index
(``getFastGroupQ.m``, headed "Zhuoliang Kang 1/14/2011", ``fastSqrtD.m`` and a toy-data
demo that calls both; Biqiao Zhang's 2016 hinge-loss port points to
http://www-scf.usc.edu/~zkang/research.html for them), and the objective as restated in
JordanFrecon/jordanfrecon.github.io, _posts/2020-10-29-multi-task-structure-learning.md.
The code smooths each penalty as tr((W Q_g W^T + eps I)^{1/2})^2, parametrises each
task's memberships as a softmax over groups, and runs gradient descent with an Armijo
line search on them for fixed W; its D_g step is the closed form above with the same eps.
The paper's equation numbers are not cited: its text was not available to check them.

:class:`WhomToShare` puts this on a network: a shared trunk (the paper's inputs are its
features), one linear output layer per task whose weights side by side are W, and a G x T
matrix of membership logits (a task with several outputs puts all its columns in the same
groups). :meth:`WhomToShare.auxiliary_loss` is gamma times the smoothed penalty, the
D_g minimised out in closed form; the harness takes joint gradient steps on the weights
and the logits, which stand in for the alternation of W-steps and grouping steps
(:func:`group_step`: many gradient steps on the logits for fixed W).

Left out: the exact W-step (per task a ridge problem with the metric above, as the demo
solves it), the Armijo line search (``group_step`` uses a fixed step size), the
restart of every grouping step (getFastGroupQ.m draws fresh uniform logits each time it
is called; ``group_step`` continues from the logits it is given), the
experiments. ``num_groups`` (2), ``gamma`` (1e-3) and ``eps``
(1e-4) defaults are ours (the demo uses eps = 0.1 with three groups, and starts with all tasks in
one group). Where the feature width is below the number of output columns, the authors'
``computeHValue`` subtracts sqrt(eps) (columns - width) from the trace; the formula is computed
exactly here, so the two objectives differ there (50.9 against 39.0 in the audit's check;
elsewhere D_g and the grouping gradient matched to about 1e-15).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, trunk_for
from .mtfl import sqrtm_psd


def smoothed_trace_norm(w: Tensor, eps: float) -> Tensor:
    """tr((W W^T + eps I)^{1/2}): the trace norm of W (d x n) as eps -> 0, differentiable for eps > 0."""
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return torch.linalg.eigvalsh(w @ w.T + eps * eye).clamp_min(0).sqrt().sum()


def group_penalty(w: Tensor, memberships: Tensor, eps: float) -> Tensor:
    """sum_g tr((W Q_g W^T + eps I)^{1/2})^2; ``memberships`` is G x (columns of W)."""
    return torch.stack([smoothed_trace_norm(w * q.sqrt(), eps) ** 2 for q in memberships]).sum()


def feature_covariance_step(w: Tensor, q: Tensor, eps: float = 0.0) -> Tensor:
    """D_g = (W Q_g W^T + eps I)^{1/2} / trace(...), the minimiser of tr(W Q_g W^T D^{-1}) for fixed W, Q_g."""
    eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    root = sqrtm_psd((w * q) @ w.T + eps * eye)
    return root / torch.trace(root)


def group_step(w: Tensor, logits: Tensor, eps: float, steps: int = 200, lr: float = 1.0) -> Tensor:
    """The grouping step for fixed W: gradient descent on the membership logits (G x columns)."""
    logits = logits.detach().clone().requires_grad_()
    w = w.detach()
    for _ in range(steps):
        (grad,) = torch.autograd.grad(group_penalty(w, logits.softmax(dim=0), eps), logits)
        logits = (logits - lr * grad).detach().requires_grad_()
    return logits.detach()


class WhomToShare(MultiTaskModel):
    """Shared ``trunk``; one linear output layer per task; learned soft groups, a squared trace norm per group."""

    name = "whom_to_share"
    training_procedure = ("the task weights and the grouping are optimised in alternation, the grouping by "
                          "descent on the memberships for fixed weights (whom_to_share.group_step())")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, feature_dim: int, out_dims: Mapping[str, int],
                 num_groups: int = 2, gamma: float = 1e-3, eps: float = 1e-4):
        super().__init__(tasks)
        require_positive(num_groups=num_groups)
        require_above(0, eps=eps)
        self.trunk = trunk
        self.heads = nn.ModuleDict({t: ChannelLinear(feature_dim, out_dims[t]) for t in self.tasks})
        self.group_logits = nn.Parameter(0.1 * torch.randn(num_groups, len(self.tasks)))  # small: start undecided
        column_task = [i for i, t in enumerate(self.tasks) for _ in range(out_dims[t])]  # output column -> task
        self.register_buffer("column_task", torch.tensor(column_task), persistent=False)
        self.gamma, self.eps = gamma, eps

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kwargs: float) -> "WhomToShare":
        trunk = trunk_for(problem.input_shape, width, depth)
        if problem.is_image and not problem.dense:  # image-level tasks read pooled features
            trunk = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return cls(problem.tasks, trunk, width, problem.task_out_dims, **kwargs)

    def memberships(self) -> Tensor:
        """q_gt (groups x tasks): each task's memberships are a softmax over the groups."""
        return self.group_logits.softmax(dim=0)

    def weight_matrix(self) -> Tensor:
        """W (features x total outputs): the output layers' weights side by side."""
        return torch.cat([self.heads[t].weight.T for t in self.tasks], dim=1)

    def auxiliary_loss(self) -> Tensor:
        """gamma sum_g tr((W Q_g W^T + eps I)^{1/2})^2 (from the parameters; no forward needed)."""
        columns = self.memberships()[:, self.column_task]  # each output column in its task's groups
        return self.gamma * group_penalty(self.weight_matrix(), columns, self.eps)

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()  # the membership logits are read by the penalty only: shared
