"""Policy distillation: one student network fitted to several frozen DQN teachers.

Rusu, Colmenarejo, Gulcehre, Desjardins, Kirkpatrick, Pascanu, Mnih, Kavukcuoglu,
Hadsell, "Policy Distillation", ICLR 2016, arXiv:1511.06295.

Each teacher T (a trained DQN, one per game) writes states x and its Q-value vectors
q^T into a memory; the student S regresses onto those stored outputs with supervised
learning. The paper compares three losses (Eqs. 1-3; the loss forms were compared with
secondary summaries, and the equation numbers were not checked against a text of the paper):

    (1) NLL:  −log softmax(q^S)[argmax_a q^T]          only the teacher's best action
    (2) MSE:  ‖q^T − q^S‖²                             the raw action values
    (3) KL:   KL(softmax(q^T / τ) ‖ softmax(q^S))      a sharpened teacher distribution

The teacher is sharpened (τ < 1; the paper's best value is small, e.g. 0.01) because
Q-values of nearby actions are often close, and a soft teacher would blur the choice.
The student's own softmax has no temperature. As τ → 0 the teacher distribution becomes
one-hot on its best action, so (3) tends to (1). Multi-task distillation uses one student
with an output head per task and one teacher per task; the losses are summed over tasks.
Sums over the memory become means over a minibatch here.

Left out: the replay memory and the teachers' data collection, the network, the
per-game output layers (the caller's student returns ``{task: q^S}``) and the Atari runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_above

LOSSES = ("nll", "mse", "kl")


def states_by_actions(q: Tensor) -> Tensor:
    """Actions on the last axis, any leading axes (batch, time x batch) flattened into states:
    every loss is a mean over states, whatever their layout."""
    return q.reshape(-1, q.shape[-1])


def nll_loss(student_q: Tensor, teacher_q: Tensor) -> Tensor:
    """Eq. (1): cross-entropy of the student's softmax on the teacher's argmax action."""
    student_q, teacher_q = states_by_actions(student_q), states_by_actions(teacher_q)
    best = teacher_q.detach().argmax(dim=-1)
    return F.cross_entropy(student_q, best)


def mse_loss(student_q: Tensor, teacher_q: Tensor) -> Tensor:
    """Eq. (2): squared error on the whole Q-value vector, summed over actions."""
    return (teacher_q.detach() - student_q).square().sum(dim=-1).mean()


def kl_loss(student_q: Tensor, teacher_q: Tensor, tau: float) -> Tensor:
    """Eq. (3): KL(softmax(q^T/τ) ‖ softmax(q^S)); the student is not tempered."""
    require_above(0, tau=tau)
    student_q, teacher_q = states_by_actions(student_q), states_by_actions(teacher_q)
    teacher_logp = F.log_softmax(teacher_q.detach() / tau, dim=-1)
    student_logp = F.log_softmax(student_q, dim=-1)
    # log_target keeps the sum finite when the sharpened teacher underflows to zero.
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True)


class PolicyDistillation(nn.Module):
    """Sum over tasks of one of the paper's three losses between student and teacher."""

    name = "policy_distillation"

    def __init__(self, loss: str = "kl", tau: float = 0.01) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        require_above(0, tau=tau)
        self.loss, self.tau = loss, tau

    def task_loss(self, student_q: Tensor, teacher_q: Tensor) -> Tensor:
        if student_q.shape != teacher_q.shape:
            raise ValueError(f"shapes differ: {tuple(student_q.shape)} vs {tuple(teacher_q.shape)}")
        if self.loss == "nll":
            return nll_loss(student_q, teacher_q)
        if self.loss == "mse":
            return mse_loss(student_q, teacher_q)
        return kl_loss(student_q, teacher_q, self.tau)

    def forward(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
        """``student`` and ``teacher`` map each task to its Q-values: actions on the last axis,
        any leading axes are states."""
        if set(student) != set(teacher):
            raise ValueError(f"tasks differ: {sorted(student)} vs {sorted(teacher)}")
        return torch.stack([self.task_loss(student[t], teacher[t]) for t in student]).sum()
