"""RMTL: per-task critics turn a session-wise MDP into dynamic weights for the multi-task loss.

Liu, Tian, Cai, Zhao, Gao, Liu, Chen, He, Zheng, Jiang, Gai, "Multi-Task Recommendations with
Reinforcement Learning", WWW 2023, arXiv:2302.03328.

A multi-task recommender predicts, for every item a user sees in a session, K probabilities
(CTR and CTCVR in the paper). RMTL reads the session as a Markov decision process: the state
s is the user-item features, the action a_k is the model's prediction for task k, and the
reward is how well that prediction matched the label, r_k = −BCE(a_k, y_k). The multi-task
model is the actor. One critic per task learns Q_k(s, a_k), the discounted sum of future
rewards, by temporal differences:

    Q_k(s, a_k)  ←  r_k + γ (1 − done) Q'_k(s', π'_k(s'))        (Q' and π' soft-updated copies)

Since rewards are never positive the critic's output is forced to be ≤ 0 (a −ReLU at the
end). The critics then re-weight the actor's per-sample, per-task BCE:

    w_nk = 1 − λ Q_k(s_n, a_nk)   (≥ 1, held fixed: no gradient into the critic)
    L    = (1/K) Σ_k mean_n  w_nk · BCE(a_nk, y_nk)

A prediction the critic expects to lead to poor returns (very negative Q) gets a larger
weight; λ = 0 gives back the plain mean of the task losses, the model's pre-training loss.

Sources: the weight rule, the −ReLU critic, the −BCE reward and γ = 0.9, τ = 0.2 follow the
official code; λ = 0.5 is the default argument of its loss-weighting class, while its script
defaults to 0 (weighting off) and its README's RMTL run uses λ = 1. Its critic stage never
updates the actor (the actor loss is only logged), soft-updates the targets every second step
and keeps the critics' dropout on (Applied-Machine-Learning-Lab/RMTL: ``RlLossPolisher.polish_loss``
in ``train/utils.py``, ``CriticNeg`` in ``layers/critic.py``, ``Visitor.step`` in ``env.py``,
``train/Arguments.py``); the paper's equation numbers could not be consulted here, so
equations are named, not numbered.

Left out: the state representation network over categorical embeddings, the actor backbones
(ESMM, MMoE, PLE), the TD3+BC details of the offline critic training (the minimum over two
next-state values, target-policy noise, the behaviour-cloning penalty), inverse-propensity
sample weights and the replay buffer; the caller supplies transitions as tensors.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_positive

_CLIP = 1e-4  # the official reward clips predictions to [1e-4, 1] inside the logs


class NonPositiveCritic(nn.Module):
    """Q_k(s, a) ≤ 0 from an MLP on [state, action]: returns are sums of non-positive rewards."""

    def __init__(self, state_dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        features = torch.cat([state, action.unsqueeze(1).to(state)], dim=1)
        return -F.relu(self.net(features)).squeeze(1)


def bce_reward(prediction: Tensor, label: Tensor) -> Tensor:
    """r_k = −BCE(a_k, y_k) = y log a + (1 − y) log(1 − a), with a clipped away from 0 and 1."""
    p = prediction.detach()
    return label * torch.log(p.clamp(_CLIP, 1.0)) + (1 - label) * torch.log((1 - p).clamp(_CLIP, 1.0))


class RMTLCriticWeighting(nn.Module):
    """K critics; ask ``sample_weights`` / ``combine``, tell ``critic_loss`` with transitions."""

    name = "rmtl"

    def __init__(
        self, num_tasks: int, state_dim: int, lam: float = 0.5, gamma: float = 0.9,
        tau: float = 0.2, hidden: int = 32,
    ) -> None:
        super().__init__()
        require_positive(num_tasks=num_tasks, state_dim=state_dim, hidden=hidden)
        if not 0 <= lam < float("inf"):
            raise ValueError(f"lam must be finite and at least 0, got {lam}")
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        self.lam, self.gamma, self.tau = lam, gamma, tau
        self.critics = nn.ModuleList(NonPositiveCritic(state_dim, hidden) for _ in range(num_tasks))
        self.targets = copy.deepcopy(self.critics).requires_grad_(False)

    def q_values(self, states: Tensor, actions: Tensor, target: bool = False) -> Tensor:
        """N x K matrix of Q_k(s_n, a_nk); ``actions`` is N x K (one prediction per task)."""
        critics = self.targets if target else self.critics
        return torch.stack([q(states, actions[:, k]) for k, q in enumerate(critics)], dim=1)

    def sample_weights(self, states: Tensor, predictions: Tensor) -> Tensor:
        """w_nk = 1 − λ Q_k(s_n, a_nk), detached: the critics only set the weights."""
        with torch.no_grad():
            return 1 - self.lam * self.q_values(states, predictions.detach())

    def combine(self, states: Tensor, predictions: Tensor, labels: Tensor) -> Tensor:
        """The actor's objective: mean over tasks of the critic-weighted mean per-sample BCE."""
        bce = F.binary_cross_entropy(predictions, labels.to(predictions), reduction="none")
        return (self.sample_weights(states, predictions) * bce).mean(dim=0).mean()

    def critic_loss(
        self, states: Tensor, actions: Tensor, rewards: Tensor,
        next_states: Tensor, next_actions: Tensor, done: Tensor,
    ) -> Tensor:
        """Squared TD error summed over tasks; ``next_actions`` come from the (target) actor."""
        with torch.no_grad():
            future = self.q_values(next_states, next_actions, target=True)
            target = rewards + self.gamma * (1 - done.to(rewards)).unsqueeze(1) * future
        return ((self.q_values(states, actions) - target) ** 2).mean(dim=0).sum()

    def actor_loss(self, states: Tensor, predictions: Tensor) -> Tensor:
        """Deterministic policy gradient objective −Σ_k Q_k(s, π_k(s)); step only the actor with it."""
        return -self.q_values(states, predictions).sum(dim=1).mean()

    @torch.no_grad()
    def soft_update(self) -> None:
        """Target critics follow the critics: θ' ← τ θ + (1 − τ) θ'."""
        for target, online in zip(self.targets.parameters(), self.critics.parameters()):
            target.lerp_(online, self.tau)
