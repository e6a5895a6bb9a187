"""RMTL (Liu et al., WWW 2023): critic-weighted BCE by hand, λ = 0 limit, TD target, soft update, critic learning."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.sampling.rmtl import RMTLCriticWeighting, bce_reward


def constant_critics(rmtl: RMTLCriticWeighting, values: list[float]) -> None:
    """Make critic k output Q_k = −values[k] everywhere (last layer zero weight, bias values[k])."""
    with torch.no_grad():
        for critic, v in zip(rmtl.critics, values):
            critic.net[-1].weight.zero_()
            critic.net[-1].bias.fill_(v)


def batch(n: int = 6, k: int = 2, state_dim: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, state_dim, generator=g, dtype=torch.float64)
    preds = torch.rand(n, k, generator=g, dtype=torch.float64) * 0.9 + 0.05
    labels = (torch.rand(n, k, generator=g, dtype=torch.float64) < 0.5).to(torch.float64)
    return states, preds, labels


def test_weighted_loss_matches_the_rule_by_hand():
    rmtl = RMTLCriticWeighting(2, state_dim=3).double()  # the official default λ = 0.5
    constant_critics(rmtl, [0.4, 2.0])  # Q = (−0.4, −2.0) → w = 1 + 0.5·(0.4, 2.0) = (1.2, 2.0)
    states, preds, labels = batch()
    torch.testing.assert_close(rmtl.sample_weights(states, preds), torch.tensor([[1.2, 2.0]] * 6, dtype=torch.float64))
    bce = -(labels * preds.log() + (1 - labels) * (1 - preds).log())
    by_hand = 0.5 * (1.2 * bce[:, 0].mean() + 2.0 * bce[:, 1].mean())
    torch.testing.assert_close(rmtl.combine(states, preds, labels), by_hand)


def test_lambda_zero_is_the_plain_mean_task_loss():
    rmtl = RMTLCriticWeighting(2, state_dim=3, lam=0.0).double()
    states, preds, labels = batch(seed=1)
    plain = torch.stack([F.binary_cross_entropy(preds[:, k], labels[:, k]) for k in range(2)]).mean()
    torch.testing.assert_close(rmtl.combine(states, preds, labels), plain)


def test_critic_is_non_positive_weights_at_least_one_and_fixed():
    rmtl = RMTLCriticWeighting(3, state_dim=4).double()
    with torch.no_grad():
        for critic in rmtl.critics:
            critic.net[-1].bias.fill_(1.0)  # make the ReLU active somewhere
    states, preds, labels = batch(n=50, k=3, state_dim=4, seed=2)
    q = rmtl.q_values(states, preds)
    assert (q <= 0).all() and (q < 0).any()
    w = rmtl.sample_weights(states, preds)
    assert (w >= 1).all()
    preds.requires_grad_(True)
    rmtl.combine(states, preds, labels).backward()
    assert all(p.grad is None for p in rmtl.critics.parameters())  # critics only set weights
    dbce = (preds - labels) / (preds * (1 - preds))  # d BCE / d a
    torch.testing.assert_close(preds.grad, (w * dbce.detach()) / (50 * 3))


def test_reward_is_negative_bce_and_clipped():
    p = torch.tensor([0.8, 0.3, 0.0, 1.0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    r = bce_reward(p, y)
    torch.testing.assert_close(r[:2], torch.log(torch.tensor([0.8, 0.7])))
    assert torch.isfinite(r).all() and torch.allclose(r[2:], torch.log(torch.tensor(1e-4)))


def test_td_target_and_soft_update_by_hand():
    rmtl = RMTLCriticWeighting(2, state_dim=3).double()  # the official defaults γ = 0.9, τ = 0.2
    constant_critics(rmtl, [0.5, 1.0])  # online Q = (−0.5, −1.0)
    with torch.no_grad():
        for target, v in zip(rmtl.targets, [2.0, 3.0]):  # target Q' = (−2, −3)
            target.net[-1].weight.zero_()
            target.net[-1].bias.fill_(v)
    states, preds, _ = batch(n=4, seed=3)
    rewards = -torch.rand(4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    done = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    target = rewards + 0.9 * (1 - done)[:, None] * torch.tensor([-2.0, -3.0], dtype=torch.float64)
    by_hand = ((torch.tensor([-0.5, -1.0], dtype=torch.float64) - target) ** 2).mean(0).sum()
    torch.testing.assert_close(rmtl.critic_loss(states, preds, rewards, states, preds, done), by_hand)
    before = [p.clone() for p in rmtl.targets.parameters()]
    rmtl.soft_update()
    for old, new, online in zip(before, rmtl.targets.parameters(), rmtl.critics.parameters()):
        torch.testing.assert_close(new, 0.2 * online + 0.8 * old)
    torch.testing.assert_close(rmtl.targets[1].net[-1].bias, torch.tensor([0.2 * 1.0 + 0.8 * 3.0], dtype=torch.float64))


def test_critics_learn_that_bad_predictions_deserve_more_weight():
    """One-step episodes: Q_k → −BCE, so the worse prediction gets the larger weight."""
    torch.manual_seed(0)
    rmtl = RMTLCriticWeighting(1, state_dim=1, gamma=0.9, hidden=16)
    opt = torch.optim.Adam(rmtl.critics.parameters(), lr=0.04)
    g = torch.Generator().manual_seed(5)
    states = torch.zeros(64, 1)
    labels = torch.ones(64, 1)
    done = torch.ones(64)
    for _ in range(150):
        actions = torch.rand(64, 1, generator=g) * 0.9 + 0.05
        rewards = bce_reward(actions, labels)
        loss = rmtl.critic_loss(states, actions, rewards, states, actions, done)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = torch.tensor([[0.9], [0.5], [0.1]])
    q = rmtl.q_values(torch.zeros(3, 1), probe).squeeze(1).detach()
    torch.testing.assert_close(q, torch.log(probe.squeeze(1)), atol=0.25, rtol=0)
    w = rmtl.sample_weights(torch.zeros(3, 1), probe).squeeze(1)
    assert w[0] < w[1] < w[2]


def test_actor_loss_pushes_predictions_towards_higher_value():
    rmtl = RMTLCriticWeighting(1, state_dim=1).double()
    with torch.no_grad():  # Q(a) = −ReLU(1 − a): larger a is better
        first, last = rmtl.critics[0].net[0], rmtl.critics[0].net[-1]
        first.weight.zero_()
        first.weight[0, 1] = -1.0
        first.bias.fill_(1.0)
        last.weight.zero_()
        last.weight[0, 0] = 1.0
        last.bias.zero_()
    a = torch.full((4, 1), 0.3, dtype=torch.float64, requires_grad=True)
    rmtl.actor_loss(torch.zeros(4, 1, dtype=torch.float64), a).backward()
    assert (a.grad < 0).all()  # descending the loss raises a


def test_rejects_bad_hyperparameters():
    with pytest.raises(ValueError):
        RMTLCriticWeighting(2, 3, gamma=1.0)
    with pytest.raises(ValueError):
        RMTLCriticWeighting(2, 3, lam=-0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_tasks": 0}, "num_tasks must be at least 1, got 0"),
    ({"state_dim": 0}, "state_dim must be at least 1, got 0"),
    ({"state_dim": -1}, "state_dim must be at least 1, got -1"),
    ({"hidden": 0}, "hidden must be at least 1, got 0"),
    ({"lam": float("nan")}, "lam must be finite and at least 0, got nan"),
    ({"lam": float("inf")}, "lam must be finite and at least 0, got inf"),
    ({"gamma": 1.0}, r"gamma must be in \[0, 1\), got 1.0"),
    ({"tau": 0.0}, r"tau must be in \(0, 1\], got 0.0"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMTLCriticWeighting(**{"num_tasks": 2, "state_dim": 3, **kwargs})


def test_critic_k_scores_the_prediction_for_task_k():
    rmtl = RMTLCriticWeighting(3, state_dim=3).double()
    states, preds, _ = batch(n=5, k=3, seed=7)
    with torch.no_grad():
        for critic in rmtl.critics:  # a positive last bias keeps every critic's output below zero, not clipped at 0
            critic.net[-1].bias.fill_(2.0)
    q = rmtl.q_values(states, preds)
    assert (q < 0).all()
    for k, critic in enumerate(rmtl.critics):
        by_hand = -F.relu(critic.net(torch.cat([states, preds[:, k:k + 1]], dim=1))).squeeze(1)
        torch.testing.assert_close(q[:, k], by_hand)


def test_actor_loss_is_minus_the_summed_q_averaged_over_samples():
    """−(1/N) Σ_n Σ_k Q_k: with constant critics Q = (−0.4, −2.0) it is 2.4 whatever the batch size."""
    rmtl = RMTLCriticWeighting(2, state_dim=3).double()
    constant_critics(rmtl, [0.4, 2.0])
    for n in (1, 6):
        states, preds, _ = batch(n=n)
        torch.testing.assert_close(rmtl.actor_loss(states, preds), torch.tensor(2.4, dtype=torch.float64))


def test_boundary_hyperparameters_gamma_zero_and_tau_one():
    """γ = 0 (allowed) makes the TD target the reward alone; τ = 1 (allowed) copies the critics into the targets."""
    rmtl = RMTLCriticWeighting(2, state_dim=3, gamma=0.0, tau=1.0).double()
    constant_critics(rmtl, [0.5, 1.0])  # online Q = (−0.5, −1.0); the targets keep their random weights
    states, preds, _ = batch(n=4, seed=3)
    rewards = -torch.rand(4, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    by_hand = ((torch.tensor([-0.5, -1.0], dtype=torch.float64) - rewards) ** 2).mean(0).sum()
    torch.testing.assert_close(rmtl.critic_loss(states, preds, rewards, states, preds, torch.zeros(4)), by_hand)
    rmtl.soft_update()
    for target, online in zip(rmtl.targets.parameters(), rmtl.critics.parameters()):
        torch.testing.assert_close(target, online)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\], got 1.5"):
        RMTLCriticWeighting(2, 3, tau=1.5)


def test_only_the_online_critics_are_trainable():
    """The target critics follow by soft updates only: no parameter of theirs asks for a gradient."""
    rmtl = RMTLCriticWeighting(2, state_dim=3)
    trainable = {id(p) for p in rmtl.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in rmtl.critics.parameters()}


def test_labels_done_flags_and_actions_of_other_dtypes_are_converted():
    """0/1 labels and done flags often arrive as bool or int, actions as float64: each is cast to the model's dtype."""
    rmtl = RMTLCriticWeighting(2, state_dim=3)  # float32
    states, preds, labels = (t.float() for t in batch())
    rewards = bce_reward(preds, labels)
    done = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    expected_combine = rmtl.combine(states, preds, labels)
    expected_td = rmtl.critic_loss(states, preds, rewards, states, preds, done)
    for kind in (torch.bool, torch.int64, torch.float64):
        torch.testing.assert_close(rmtl.combine(states, preds, labels.to(kind)), expected_combine)
        torch.testing.assert_close(rmtl.critic_loss(states, preds, rewards, states, preds, done.to(kind)), expected_td)
    torch.testing.assert_close(rmtl.q_values(states, preds.double()), rmtl.q_values(states, preds))
