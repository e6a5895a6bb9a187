"""Actor-Mimic: Boltzmann policy regression and learned feature regression, by hand; who gets gradients."""

import math

import pytest
import torch
from torch import nn

from reference_impls.distillation.actor_mimic import ActorMimic, boltzmann, policy_regression


def _with_grad(named: dict[str, nn.Module], loss: torch.Tensor) -> set[str]:
    for m in named.values():
        m.zero_grad(set_to_none=True)
    loss.backward()
    return {
        f"{prefix}.{n}" for prefix, m in named.items() for n, p in m.named_parameters()
        if p.grad is not None and p.grad.abs().sum().item() > 0
    }


def test_policy_regression_is_cross_entropy_to_the_boltzmann_policy_by_hand():
    expert_q = torch.tensor([[0.0, 0.5 * math.log(3.0)]])  # τ = 0.5: π_E = [1/4, 3/4]
    torch.testing.assert_close(boltzmann(expert_q, 0.5), torch.tensor([[0.25, 0.75]]))
    student = torch.tensor([[0.0, math.log(2.0)]])  # π_AMN = [1/3, 2/3]
    expected = -(0.25 * math.log(1 / 3) + 0.75 * math.log(2 / 3))
    assert math.isclose(policy_regression(student, expert_q, 0.5).item(), expected, rel_tol=1e-6)


def test_policy_regression_is_stationary_when_the_student_copies_the_expert_policy():
    g = torch.Generator().manual_seed(0)
    expert_q = torch.randn(5, 4, generator=g)
    student = (expert_q / 2.0 - 3.0).requires_grad_(True)  # softmax(student) = Boltzmann at τ = 2
    policy_regression(student, expert_q, 2.0).backward()
    assert student.grad.abs().max().item() < 1e-6
    other = (expert_q / 2.0 + torch.randn(5, 4, generator=g)).requires_grad_(True)
    policy_regression(other, expert_q, 2.0).backward()
    assert other.grad.abs().max().item() > 1e-3


def test_feature_regression_and_total_by_hand():
    am = ActorMimic(student_dim=2, expert_dims={"a": 1}, tau=1.0, beta=0.5)
    with torch.no_grad():
        am.regressors["a"].weight.copy_(torch.tensor([[2.0, -1.0]]))
        am.regressors["a"].bias.fill_(0.5)
    h_amn = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # f(h) = [1.5, -1.5]
    h_expert = torch.tensor([[1.0], [0.5]])
    fr = ((1.5 - 1.0) ** 2 + (-1.5 - 0.5) ** 2) / 2
    assert math.isclose(am.feature_regression("a", h_amn, h_expert).item(), fr, rel_tol=1e-6)
    logits, q = torch.zeros(2, 3), torch.zeros(2, 3)  # uniform vs uniform: cross-entropy = log 3
    total = am({"a": logits}, {"a": h_amn}, {"a": q}, {"a": h_expert})
    assert math.isclose(total.item(), math.log(3.0) + 0.5 * fr, rel_tol=1e-6)



def test_feature_regression_sums_over_features_and_each_task_uses_its_own_regressor():
    """‖·‖² adds the feature errors (not their mean); task b is scored by f_b, not f_a."""
    am = ActorMimic(student_dim=1, expert_dims={"a": 2, "b": 2}, beta=1.0)
    with torch.no_grad():
        for t, scale in (("a", 1.0), ("b", -2.0)):
            am.regressors[t].weight.copy_(torch.tensor([[scale], [0.0]]))
            am.regressors[t].bias.zero_()
    h = torch.tensor([[1.0]])
    target = torch.tensor([[0.0, 3.0]])
    assert math.isclose(am.feature_regression("a", h, target).item(), 1.0 + 9.0, rel_tol=1e-6)
    assert math.isclose(am.feature_regression("b", h, target).item(), 4.0 + 9.0, rel_tol=1e-6)
    zeros = torch.zeros(1, 3)
    total = am({"a": zeros, "b": zeros}, {"a": h, "b": h}, {"a": zeros, "b": zeros}, {"a": target, "b": target})
    assert math.isclose(total.item(), 2 * math.log(3.0) + 10.0 + 13.0, rel_tol=1e-6)

def test_only_the_student_and_that_tasks_regressor_get_gradients():
    torch.manual_seed(0)
    student = nn.ModuleDict({"trunk": nn.Linear(4, 8), "a": nn.Linear(8, 3), "b": nn.Linear(8, 2)})
    experts = {t: nn.Linear(4, 6 if t == "a" else 5) for t in ("a", "b")}  # frozen by the loss, not by us
    expert_heads = {t: nn.Linear(experts[t].out_features, 3 if t == "a" else 2) for t in experts}
    am = ActorMimic(student_dim=8, expert_dims={"a": 6, "b": 5})
    x = torch.randn(5, 4)
    h = torch.relu(student["trunk"](x))
    feats = {t: e(x) for t, e in experts.items()}
    loss = am({"a": student["a"](h)}, {"a": h}, {"a": expert_heads["a"](feats["a"])}, {"a": feats["a"]})
    named = {"student": student, "am": am, **{f"expert_{t}": e for t, e in experts.items()},
             **{f"head_{t}": e for t, e in expert_heads.items()}}
    got = _with_grad(named, loss)
    assert got == {"student.trunk.weight", "student.trunk.bias", "student.a.weight", "student.a.bias",
                   "am.regressors.a.weight", "am.regressors.a.bias"}


def test_beta_zero_is_pure_policy_regression_and_regressors_then_get_nothing():
    am = ActorMimic(student_dim=3, expert_dims={"a": 2}, tau=0.7, beta=0.0)
    g = torch.Generator().manual_seed(1)
    logits, q = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    h, he = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    loss = am({"a": logits}, {"a": h}, {"a": q}, {"a": he})
    torch.testing.assert_close(loss, policy_regression(logits, q, 0.7))
    loss.backward()
    assert am.regressors["a"].weight.grad.abs().sum().item() == 0


def test_short_training_lowers_both_terms():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = {t: torch.randn(32, 4, generator=g) for t in ("a", "b")}
    experts = {t: nn.Linear(4, 6).requires_grad_(False) for t in x}
    heads = {t: nn.Linear(6, 3).requires_grad_(False) for t in x}
    trunk = nn.Linear(4, 16)
    out = nn.ModuleDict({t: nn.Linear(16, 3) for t in x})
    am = ActorMimic(student_dim=16, expert_dims={t: 6 for t in x}, beta=0.1)
    opt = torch.optim.Adam([*trunk.parameters(), *out.parameters(), *am.parameters()], lr=2e-2)
    feats = {t: torch.tanh(experts[t](x[t])) for t in x}
    q = {t: heads[t](feats[t]) for t in x}
    # Cross-entropy never drops below the experts' entropy; measure the excess (a KL) instead.
    floor = sum(-(boltzmann(q[t], 1.0) * boltzmann(q[t], 1.0).log()).sum(-1).mean() for t in x)

    def terms():
        h = {t: torch.tanh(trunk(x[t])) for t in x}
        fr = sum(am.feature_regression(t, h[t], feats[t]) for t in x)
        return am({t: out[t](h[t]) for t in x}, h, q, feats), fr

    total0, fr0 = terms()
    kl0 = total0 - 0.1 * fr0 - floor
    for _ in range(60):
        opt.zero_grad()
        terms()[0].backward()
        opt.step()
    total, fr = terms()
    assert total - 0.1 * fr - floor < 0.2 * kl0
    assert fr < 0.3 * fr0


@pytest.mark.parametrize("kwargs, message", [
    ({"tau": 0.0}, "tau must be above 0, got 0.0"),
    ({"tau": -1.0}, "tau must be above 0, got -1.0"),
    ({"tau": float("nan")}, "tau must be above 0, got nan"),
    ({"beta": -1.0}, "beta must be at least 0, got -1.0"),
    ({"beta": float("nan")}, "beta must be at least 0, got nan"),
    ({"student_dim": 0}, "student_dim must be at least 1, got 0"),
    ({"expert_dims": {"a": -2}}, r"expert_dims\[a\] must be at least 1, got -2"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    arguments = {"student_dim": 4, "expert_dims": {"a": 3}, **kwargs}
    with pytest.raises(ValueError, match=message):
        ActorMimic(**arguments)
    if "tau" in kwargs:
        with pytest.raises(ValueError, match=message):
            boltzmann(torch.zeros(1, 2), kwargs["tau"])


def test_feature_regression_trains_the_amn_features_too():
    """Eq. (3) is minimised over θ as well as θ_fi: d‖W h + b − h_E‖²/dh = 2 Wᵀ(W h + b − h_E), per state / batch."""
    am = ActorMimic(student_dim=2, expert_dims={"a": 1})
    with torch.no_grad():
        am.regressors["a"].weight.copy_(torch.tensor([[2.0, -1.0]]))
        am.regressors["a"].bias.fill_(0.5)
    h = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)  # f(h) = [1.5, -1.5]
    am.feature_regression("a", h, torch.tensor([[1.0], [0.5]])).backward()
    residual = torch.tensor([[0.5], [-2.0]])  # f(h) − h_E
    torch.testing.assert_close(h.grad, 2 * residual * torch.tensor([[2.0, -1.0]]) / 2)


def test_default_temperature_and_feature_weight_are_one_by_hand():
    """τ = 1, β = 1 by default; f_a zeroed, so f_a(h) = 0 and L_FR = ‖[1, 2, 2]‖² = 9.

    π_E = softmax([1, 0, 0]) = [e, 1, 1] / (e + 2); log π_AMN = [0, 1, 2] − log(1 + e + e²);
    L_policy = log(1 + e + e²) − (1 + 2) / (e + 2) = 1.77178; total = 1.77178 + 1 · 9.
    """
    am = ActorMimic(2, {"a": 3})
    assert (am.tau, am.beta) == (1.0, 1.0)
    with torch.no_grad():
        am.regressors["a"].weight.zero_()
        am.regressors["a"].bias.zero_()
    e = math.e
    policy = math.log(1 + e + e * e) - 3 / (e + 2)
    assert math.isclose(policy, 1.77178, abs_tol=1e-5)
    loss = am({"a": torch.tensor([[0.0, 1.0, 2.0]])}, {"a": torch.zeros(1, 2)},
              {"a": torch.tensor([[1.0, 0.0, 0.0]])}, {"a": torch.tensor([[1.0, 2.0, 2.0]])})
    assert math.isclose(loss.item(), policy + 9.0, rel_tol=1e-6)


def test_leading_axes_index_states_so_a_time_by_batch_rollout_equals_its_flattened_batch():
    """Actions and features are on the last axis; a (T, B, ·) rollout is T·B states, averaged alike."""
    g = torch.Generator().manual_seed(4)
    am = ActorMimic(student_dim=3, expert_dims={"a": 2}, tau=0.5, beta=0.7)
    logits, q = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    h, he = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 2, generator=g)
    torch.testing.assert_close(boltzmann(q, 0.5), boltzmann(q.reshape(8, 5), 0.5).reshape(2, 4, 5))
    torch.testing.assert_close(boltzmann(q, 0.5).sum(-1), torch.ones(2, 4))
    flat = am({"a": logits.reshape(8, 5)}, {"a": h.reshape(8, 3)}, {"a": q.reshape(8, 5)}, {"a": he.reshape(8, 2)})
    torch.testing.assert_close(am({"a": logits}, {"a": h}, {"a": q}, {"a": he}), flat)
    flat_policy = policy_regression(logits.reshape(8, 5), q.reshape(8, 5), 0.5)
    torch.testing.assert_close(policy_regression(logits, q, 0.5), flat_policy)


def test_a_task_without_a_regressor_is_refused_with_a_value_error():
    """Logits for a game the module has no f_i for: a ValueError before any loss is computed."""
    am = ActorMimic(student_dim=2, expert_dims={"a": 1})
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError):
        am({"a": z, "c": z}, {"a": z, "c": z}, {"a": z, "c": z}, {"a": z[:, :1], "c": z[:, :1]})
