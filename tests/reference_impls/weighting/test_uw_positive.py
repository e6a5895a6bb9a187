import math

import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.uw import UW
from reference_impls.weighting.uw_positive import UWPositive, optimal_variance


def with_log_variances(cls, values: list[float]):
    method = cls(num_tasks=len(values))
    with torch.no_grad():
        method.log_variances.copy_(torch.tensor(values))
    return method


def test_objective_matches_hand_computation():
    method = with_log_variances(UWPositive, [0.0, math.log(4.0)])  # σ² = 1 and 4
    losses = torch.tensor([3.0, 8.0])
    # 3/(2·1) + ln 2  +  8/(2·4) + ln 5
    expected = 1.5 + math.log(2.0) + 1.0 + math.log(5.0)
    assert math.isclose(method.combine(losses).item(), expected, rel_tol=1e-6)
    assert torch.allclose(method.weights(losses), torch.tensor([0.5, 0.125]))


def test_differs_from_uw_only_in_the_regulariser():
    s = [-3.0, -0.5, 0.0, 2.0]
    losses = torch.tensor([0.1, 1.0, 2.0, 7.0])
    positive, uw = with_log_variances(UWPositive, s), with_log_variances(UW, s)
    assert torch.equal(positive.weights(losses), uw.weights(losses))
    s_t = torch.tensor(s)
    # ln(1 + σ²) - log σ  =  softplus(s) - s/2
    expected = (torch.log1p(torch.exp(s_t)) - 0.5 * s_t).sum()
    assert torch.isclose(positive.combine(losses) - uw.combine(losses), expected)


def test_objective_stays_positive_where_uw_goes_negative():
    losses = torch.tensor([0.0, 0.01])
    for s in torch.linspace(-20, 5, 26):
        value = with_log_variances(UWPositive, [float(s)] * 2).combine(losses)
        assert value > 0
    assert with_log_variances(UW, [-3.0, -3.0]).combine(losses) < 0  # 0.5 e³ · 0.01 - 3
    # a solved task (L = 0): UW's objective falls without bound as s → -∞, this one tends to 0
    uw_values = [with_log_variances(UW, [s]).combine(torch.zeros(1)).item() for s in (-10.0, -50.0)]
    assert uw_values[1] < uw_values[0] < 0
    assert 0 < with_log_variances(UWPositive, [-50.0]).combine(torch.zeros(1)).item() < 1e-20


def test_learned_variance_converges_to_the_closed_form_optimum_not_to_the_loss():
    losses = torch.tensor([0.05, 1.0, 6.0])
    method = UWPositive(num_tasks=3)
    optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
    for _ in range(300):
        optimizer.zero_grad()
        method.combine(losses).backward()
        optimizer.step()
    target = optimal_variance(losses)  # (L + sqrt(L² + 8L)) / 4
    assert torch.allclose(method.log_variances.exp(), target, rtol=1e-3)
    assert not torch.allclose(target, losses, rtol=0.1)  # UW's optimum σ² = L is elsewhere


def test_optimum_weight_limits():
    small, large = torch.tensor([1e-6]), torch.tensor([1e4])
    weight = lambda loss: 1 / (2 * optimal_variance(loss))  # noqa: E731
    assert torch.allclose(weight(small), 1 / torch.sqrt(2 * small), rtol=1e-2)  # not 1/(2L) = 5e5
    assert torch.allclose(weight(large), 1 / (large + 2), rtol=1e-3)


def test_regulariser_is_stable_for_large_log_variances():
    """ln(1 + e^s) ≈ s for large s: finite (e^100 overflows float32) with slope 1, not inf."""
    method = with_log_variances(UWPositive, [100.0, 1000.0])
    value = method.combine(torch.tensor([2.0, 5.0]))
    assert math.isclose(value.item(), 1100.0, rel_tol=1e-6)  # the L_k/(2σ²) terms vanish
    value.backward()
    assert torch.allclose(method.log_variances.grad, torch.ones(2))


def test_permutation_and_zero_losses():
    method = with_log_variances(UWPositive, [0.1, -0.3, 0.7])
    order = [2, 0, 1]
    permuted = with_log_variances(UWPositive, [[0.1, -0.3, 0.7][i] for i in order])
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(permuted.weights(losses[order]), method.weights(losses)[order])
    assert torch.isclose(permuted.combine(losses[order]), method.combine(losses))
    assert torch.isfinite(method.combine(torch.zeros(3)))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(UWPositive(num_tasks=2), lr=0.05, steps=300)
    assert final < 0.2 * initial
