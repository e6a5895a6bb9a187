"""Actor-Mimic: one network mimics the policies and the hidden features of several experts.

Parisotto, Ba & Salakhutdinov, "Actor-Mimic: Deep Multitask and Transfer Reinforcement
Learning", ICLR 2016, arXiv:1511.06342.

Expert i is a DQN trained on game i. Its Q-values are turned into a policy with a
Boltzmann softmax of temperature τ (Eq. 1),

    π_Ei(a|s) = exp(Q_Ei(s,a) / τ) / Σ_a' exp(Q_Ei(s,a') / τ),

and the Actor-Mimic Network (AMN) is trained to output that policy (policy regression,
Eq. 2): minimise the cross-entropy −Σ_a π_Ei(a|s) log π_AMN(a|s; θ). Matching a policy
rather than Q-values sidesteps the very different value scales of different games.

To also pass on *why* the expert acts, a small per-game network f_i maps the AMN's hidden
features to the expert's (feature regression, Eq. 3),

    L_FR^i(θ, θ_fi) = ‖f_i(h_AMN(s; θ); θ_fi) − h_Ei(s)‖²,

and both the AMN and f_i are trained on it. The per-game objective is
L_policy^i + β L_FR^i (Eq. 4). Experts are fixed throughout.

The equation numbers were not checked against a text of the paper: they are those of the
arXiv version as we remember it, and the forms of Eqs. 2-4 were compared with independent
notes on the paper.

Left out: the game-specific action subsets (the caller's student returns logits over
game i's actions), sampling states by running the AMN's ε-greedy policy, the DQN
experts, the transfer stage. f_i is one linear map, as in the feature-regression run of
the authors' code (github.com/eparisotto/ActorMimic, ``networks/featregnet_linearproj``;
deeper f_i are an option there). That run scales the feature term by 0.01, and its
gradient, (f_i − h_Ei) times that scale, is the one of β·½‖·‖², half of this file's
β‖·‖² for the same β.

Defaults: τ = 1 is the authors' (``NeuralActorMimicLearner.lua``: ``temperature`` 1.0, which
neither paper script overrides). β = 1 is ours: Eq. (4) with both terms at unit weight. It is
not the authors' value in this file's convention: their learner's built-in ``featreg_scale``
of 1.0 is β = 0.5 here, and the feature-regression paper run (``scripts/run_amn_featreg_paper``,
``featreg_scale=0.01``) is β = 0.005; pass ``beta=0.005`` to reproduce that run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_above, require_at_least, require_positive


def boltzmann(expert_q: Tensor, tau: float) -> Tensor:
    """Eq. (1): the expert's policy, a softmax of its Q-values (actions on the last axis) at temperature τ."""
    require_above(0, tau=tau)
    return torch.softmax(expert_q / tau, dim=-1)


def policy_regression(student_logits: Tensor, expert_q: Tensor, tau: float) -> Tensor:
    """Eq. (2): cross-entropy from the expert's Boltzmann policy to the AMN's softmax."""
    target = boltzmann(expert_q.detach(), tau)
    return -(target * F.log_softmax(student_logits, dim=-1)).sum(dim=-1).mean()


class ActorMimic(nn.Module):
    """Policy regression + β feature regression, with one learned regressor f_i per task."""

    name = "actor_mimic"

    def __init__(self, student_dim: int, expert_dims: Mapping[str, int],
                 tau: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        require_above(0, tau=tau)
        require_at_least(0, beta=beta)  # 0 drops the feature regression
        require_positive(student_dim=student_dim, **{f"expert_dims[{t}]": d for t, d in expert_dims.items()})
        self.tau, self.beta = tau, beta
        # f_i: AMN features -> expert i's features (dimensions may differ per expert).
        self.regressors = nn.ModuleDict({t: nn.Linear(student_dim, d) for t, d in expert_dims.items()})

    def feature_regression(self, task: str, student_features: Tensor, expert_features: Tensor) -> Tensor:
        """Eq. (3): ‖f_i(h_AMN) − h_Ei‖², summed over features, mean over the batch."""
        predicted = self.regressors[task](student_features)
        return (predicted - expert_features.detach()).square().sum(dim=-1).mean()

    def task_loss(self, task: str, student_logits: Tensor, student_features: Tensor,
                  expert_q: Tensor, expert_features: Tensor) -> Tensor:
        """Eq. (4) for one game: L_policy + β L_FR."""
        policy = policy_regression(student_logits, expert_q, self.tau)
        return policy + self.beta * self.feature_regression(task, student_features, expert_features)

    def forward(self, student_logits: Mapping[str, Tensor], student_features: Mapping[str, Tensor],
                expert_q: Mapping[str, Tensor], expert_features: Mapping[str, Tensor]) -> Tensor:
        """Sum over tasks; every dict maps a task to a batch of that task's states.

        Actions (logits, Q-values) and features are on the last axis; any leading axes (batch, or
        time x batch) index states, and every term is a mean over all of them.
        """
        if set(student_logits) - set(self.regressors):
            raise ValueError(f"no regressor for tasks {sorted(set(student_logits) - set(self.regressors))}")
        return torch.stack([
            self.task_loss(t, student_logits[t], student_features[t], expert_q[t], expert_features[t])
            for t in student_logits
        ]).sum()
