"""Distral: task policies regularised towards a shared, distilled policy.

Teh, Bapst, Czarnecki, Quan, Kirkpatrick, Hadsell, Heess, Pascanu, "Distral: Robust
Multitask Reinforcement Learning", NeurIPS 2017, arXiv:1707.04175.

Instead of sharing weights, the tasks share a policy π0 that captures common behaviour.
Each task policy π_i maximises its reward, minus a KL penalty towards π0 and plus an
entropy bonus (Eq. 1):

    J = Σ_i E_πi [ Σ_t γ^t ( R_i − c_KL log(π_i/π0) − c_Ent log π_i ) ]
      = Σ_i E_πi [ Σ_t γ^t ( R_i + (α/β) log π0 − (1/β) log π_i ) ],
    α = c_KL / (c_KL + c_Ent),   β = 1 / (c_KL + c_Ent).

The optimal task policy is π_i ∝ π0^α exp(β Q_i) (Eq. 2). The paper's "two-column"
parameterisation builds this in: π0 = softmax(h) from the distilled column h_θ0
(Eq. 6), and with the task column f_θi standing in for Q_i,

    π_i = π0^α exp(β Â_i) = softmax(α h + β f_i)                 (Eqs. 7-8),

where Â_i = f_i − (1/β) log Σ_a π0^α exp(β f_i) is an advantage estimate. Maximising J
over π0 is distillation: with the π_i fixed, the best π0 is their centroid.

Here: the two policies of Eqs. (6) and (8), the regularised reward of the policy
gradient (Eq. 9), and the per-step regulariser written as a loss to minimise,
E_πi[−(α/β) log π0 + (1/β) log π_i] = c_KL·KL(π_i‖π0) − c_Ent·H(π_i), summed over tasks.

Left out: the RL training loop (soft Q-learning / A3C workers, returns, baselines,
discounting, environments). The equation numbers were not checked against a text of the
paper: they follow the NeurIPS version as independent notes on it give them.

Defaults: c_KL = c_Ent = 1 (α = β = 1/2) are ours, weighing the two regularisers equally; the
paper tunes α and β per experiment and no official code was released to take a default from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def distilled_log_policy(h: Tensor) -> Tensor:
    """Eq. (6): log π0 = log softmax of the distilled column's outputs h."""
    return F.log_softmax(h, dim=-1)


def two_column_log_policy(h: Tensor, f: Tensor, alpha: float, beta: float) -> Tensor:
    """Eq. (8): log π_i = log softmax(α h + β f_i), i.e. π_i ∝ π0^α exp(β f_i)."""
    return F.log_softmax(alpha * h + beta * f, dim=-1)


class Distral(nn.Module):
    """The KL-to-π0 and entropy terms of the Distral objective, with its α and β."""

    name = "distral"

    def __init__(self, c_kl: float = 1.0, c_ent: float = 1.0) -> None:
        super().__init__()
        for name, c in (("c_kl", c_kl), ("c_ent", c_ent)):
            if not 0 <= c < float("inf"):
                raise ValueError(f"{name} must be finite and at least 0, got {c}")
        if c_kl + c_ent == 0:
            raise ValueError("c_kl and c_ent cannot both be 0")
        self.c_kl, self.c_ent = c_kl, c_ent

    @property
    def alpha(self) -> float:
        return self.c_kl / (self.c_kl + self.c_ent)

    @property
    def beta(self) -> float:
        return 1.0 / (self.c_kl + self.c_ent)

    def task_log_policy(self, h: Tensor, f: Tensor) -> Tensor:
        """Two-column π_i for task column outputs f and distilled column outputs h."""
        return two_column_log_policy(h, f, self.alpha, self.beta)

    def regularised_reward(self, reward: Tensor, log_pi0_a: Tensor, log_pii_a: Tensor) -> Tensor:
        """Eq. (9)'s R_reg = R + (α/β) log π0(a|s) − (1/β) log π_i(a|s) at the taken action."""
        return reward + self.alpha / self.beta * log_pi0_a - log_pii_a / self.beta

    def step_regulariser(self, log_pi0: Tensor, log_pii: Tensor) -> Tensor:
        """c_KL·KL(π_i‖π0) − c_Ent·H(π_i) per state, in closed form over the actions."""
        pii = log_pii.exp()
        kl = (pii * (log_pii - log_pi0)).sum(dim=-1)
        entropy = -(pii * log_pii).sum(dim=-1)
        return self.c_kl * kl - self.c_ent * entropy

    def forward(self, h: Tensor, task_logits: Mapping[str, Tensor], two_column: bool = True) -> Tensor:
        """Σ_i mean over states of the regulariser; h and each f_i are states x actions.

        Actions are on the last axis; any leading axes (batch, or time x batch) index states.

        With ``two_column`` the task logits are f_i and π_i = softmax(α h + β f_i);
        otherwise they parameterise π_i on their own (the paper's "1col" variants).
        """
        log_pi0 = distilled_log_policy(h)
        terms = []
        for f in task_logits.values():
            log_pii = self.task_log_policy(h, f) if two_column else F.log_softmax(f, dim=-1)
            terms.append(self.step_regulariser(log_pi0, log_pii).mean())
        return torch.stack(terms).sum()
