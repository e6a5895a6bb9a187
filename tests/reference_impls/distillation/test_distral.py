"""Distral: α and β from c_KL and c_Ent, the two-column policy identity, the KL / entropy terms by hand."""

import math

import pytest
import torch

from reference_impls.distillation.distral import Distral, distilled_log_policy, two_column_log_policy


def test_alpha_and_beta_from_the_two_coefficients():
    d = Distral(c_kl=1.0, c_ent=3.0)
    assert math.isclose(d.alpha, 0.25) and math.isclose(d.beta, 0.25)
    kl_only = Distral(c_kl=2.0, c_ent=0.0)
    assert kl_only.alpha == 1.0 and kl_only.beta == 0.5
    with pytest.raises(ValueError):
        Distral(c_kl=0.0, c_ent=0.0)


def test_two_column_policy_is_pi0_to_the_alpha_times_exp_beta_advantage():
    g = torch.Generator().manual_seed(0)
    h, f = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    alpha, beta = 0.3, 2.0
    pi0 = torch.softmax(h, dim=-1)  # Eq. (6)
    # Eq. (7): Â = f − (1/β) log Σ_a π0^α exp(β f), computed from π0 itself (not from h).
    advantage = f - torch.log((pi0**alpha * torch.exp(beta * f)).sum(-1, keepdim=True)) / beta
    direct = pi0**alpha * torch.exp(beta * advantage)
    torch.testing.assert_close(direct.sum(-1), torch.ones(6))  # already normalised
    torch.testing.assert_close(two_column_log_policy(h, f, alpha, beta).exp(), direct)
    unnormalised = pi0**alpha * torch.exp(beta * f)
    torch.testing.assert_close(direct, unnormalised / unnormalised.sum(-1, keepdim=True))


def test_two_column_limits():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 3, generator=g)
    d = Distral(c_kl=1.0, c_ent=0.0)  # α = 1: no task correction means π_i = π0, zero KL
    zero = torch.zeros(4, 3)
    torch.testing.assert_close(d.task_log_policy(h, zero), distilled_log_policy(h))
    torch.testing.assert_close(d.step_regulariser(distilled_log_policy(h), d.task_log_policy(h, zero)),
                               torch.zeros(4), atol=1e-6, rtol=0)
    tempered = Distral(c_kl=1.0, c_ent=1.0)  # α = 1/2: π_i = softmax(h / 2) without a task column
    torch.testing.assert_close(tempered.task_log_policy(h, zero), torch.log_softmax(h / 2, dim=-1))


def test_kl_and_entropy_terms_by_hand():
    d = Distral(c_kl=2.0, c_ent=0.5)
    log_pi0 = torch.log(torch.tensor([[0.5, 0.5]]))
    log_pii = torch.log(torch.tensor([[0.25, 0.75]]))
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    got = d.step_regulariser(log_pi0, log_pii)
    assert math.isclose(got.item(), 2.0 * kl - 0.5 * entropy, abs_tol=1e-6)
    # Same value written with α and β: E_πi[−(α/β) log π0 + (1/β) log π_i].
    pii = log_pii.exp()
    rewritten = (pii * (-d.alpha / d.beta * log_pi0 + log_pii / d.beta)).sum(-1)
    torch.testing.assert_close(got, rewritten)


def test_regularised_reward_by_hand():
    d = Distral(c_kl=1.0, c_ent=1.0)  # α/β = 1, 1/β = 2
    r = torch.tensor([1.0])
    got = d.regularised_reward(r, torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert math.isclose(got.item(), 1.0 + math.log(0.5) - 2.0 * math.log(0.25), rel_tol=1e-6)


def test_distilled_policy_gradient_and_optimum_is_the_centroid_of_the_task_policies():
    g = torch.Generator().manual_seed(2)
    d = Distral(c_kl=1.0, c_ent=0.5)
    task = {t: torch.randn(3, 4, generator=g) for t in ("a", "b", "c")}  # separate (1col) task policies
    h = torch.zeros(3, 4, requires_grad=True)
    d(h, task, two_column=False).backward()
    pi0 = torch.softmax(h.detach(), -1)
    # Eq. (10)'s distillation term: (α/β) Σ_i (π_i − π0) ∂h, negated for a loss; / 3 = mean over states.
    expected = sum(d.alpha / d.beta * (pi0 - torch.softmax(f, -1)) for f in task.values()) / 3
    torch.testing.assert_close(h.grad, expected)
    opt = torch.optim.Adam([h], lr=0.2)
    for _ in range(120):
        opt.zero_grad()
        d(h, task, two_column=False).backward()
        opt.step()
    centroid = sum(torch.softmax(f, -1) for f in task.values()) / 3
    torch.testing.assert_close(torch.softmax(h, -1), centroid, atol=2e-3, rtol=0)


def test_two_column_regulariser_is_finite_on_extreme_logits_and_trains_both_columns():
    d = Distral(c_kl=1.0, c_ent=0.1)
    h = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    f = {"a": torch.tensor([[-1e4, 1e4, 0.0]], requires_grad=True)}
    loss = d(h, f)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(f["a"].grad).all()
    h2, f2 = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    d(h2, {"a": f2}).backward()
    assert h2.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0


def test_two_column_forward_by_hand_with_unequal_alpha_and_beta():
    """π_i = softmax(α h + β f_i) with α ≠ β; h reaches the loss through π0 and through every π_i."""
    d = Distral(c_kl=3.0, c_ent=1.0)  # α = 3/4, β = 1/4
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    f = {t: torch.randn(5, 4, generator=g) for t in ("a", "b")}
    loss = d(h, f)

    h_ref = h.detach().clone().requires_grad_(True)
    log_pi0 = torch.log_softmax(h_ref, -1)
    expected = 0.0
    for logits in f.values():
        log_pii = torch.log_softmax(0.75 * h_ref + 0.25 * logits, -1)
        pii = log_pii.exp()
        expected = expected + (3.0 * (pii * (log_pii - log_pi0)).sum(-1) + 1.0 * (pii * log_pii).sum(-1)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("kwargs, message", [
    ({"c_kl": -1.0}, "c_kl must be finite and at least 0, got -1.0"),
    ({"c_kl": float("nan")}, "c_kl must be finite and at least 0, got nan"),
    ({"c_ent": float("nan")}, "c_ent must be finite and at least 0, got nan"),
    ({"c_kl": float("inf")}, "c_kl must be finite and at least 0, got inf"),
])
def test_negative_or_non_finite_coefficients_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distral(**kwargs)


def test_default_coefficients_are_one_so_alpha_and_beta_are_one_half():
    """c_KL = c_Ent = 1: α = 1 / (1 + 1) = 0.5 and β = 1 / (1 + 1) = 0.5."""
    d = Distral()
    assert (d.c_kl, d.c_ent) == (1.0, 1.0)
    assert d.alpha == 0.5 and d.beta == 0.5


@pytest.mark.parametrize("two_column", [True, False])
def test_leading_axes_index_states_so_a_time_by_batch_rollout_equals_its_flattened_batch(two_column):
    """Actions are on the last axis; a (T, B, actions) rollout is T·B states and the mean runs over all."""
    g = torch.Generator().manual_seed(4)
    d = Distral(c_kl=1.5, c_ent=0.5)
    h = torch.randn(3, 2, 4, generator=g)
    f = {t: torch.randn(3, 2, 4, generator=g) for t in ("a", "b")}
    flat = d(h.reshape(6, 4), {t: x.reshape(6, 4) for t, x in f.items()}, two_column=two_column)
    torch.testing.assert_close(d(h, f, two_column=two_column), flat)
    log_pi0, log_pii = distilled_log_policy(h), d.task_log_policy(h, f["a"])
    torch.testing.assert_close(log_pi0.exp().sum(-1), torch.ones(3, 2))
    torch.testing.assert_close(log_pii.exp().sum(-1), torch.ones(3, 2))
    per_state = d.step_regulariser(log_pi0.reshape(6, 4), log_pii.reshape(6, 4)).reshape(3, 2)
    torch.testing.assert_close(d.step_regulariser(log_pi0, log_pii), per_state)
