import math

import pytest
import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.igb import IGBv1


def feed(igb: IGBv1, epochs: list[list[list[float]]]) -> None:
    for epoch, steps in enumerate(epochs):
        for losses in steps:
            igb.weights(torch.tensor(losses, dtype=torch.float64), epoch=epoch)


def test_until_the_base_epoch_ends_it_is_the_plain_sum_of_log_losses():
    igb = IGBv1(base_epoch=1)
    losses = torch.tensor([4.0, 0.5])
    for epoch in (0, 1):
        assert torch.equal(igb.weights(losses, epoch=epoch), torch.ones(2))
    assert math.isclose(igb.combine(losses, epoch=1).item(), math.log(4.0) + math.log(0.5), rel_tol=1e-6)


def test_weights_match_hand_computation():
    igb = IGBv1(base_epoch=1)
    # epoch 1 means (the base): (2+4)/2 = 3 and (1+3)/2 = 2; epoch 0 is ignored
    feed(igb, [[[100.0, 100.0]], [[2.0, 1.0], [4.0, 3.0]]])
    losses = torch.tensor([1.5, 1.6], dtype=torch.float64)
    weights = igb.weights(losses, epoch=2)
    r = [1.5 / 3, 1.6 / 2]  # share of the base loss still left
    expected = [2 * math.exp(x) / (math.exp(r[0]) + math.exp(r[1])) for x in r]
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert weights[1] > weights[0]  # the task with more of its loss left (larger gap) gets more
    expected_objective = sum(w * math.log(x) for w, x in zip(expected, losses.tolist()))
    assert math.isclose(igb.combine(losses, epoch=2).item(), expected_objective, rel_tol=1e-12)


def test_rescaling_a_task_loss_changes_neither_weights_nor_gradient():
    # L_1 -> c L_1 everywhere: the ratio L / L̄(base) is unchanged and log(c L) has the same gradient.
    theta = torch.tensor([0.3, -1.2], dtype=torch.float64)
    history = [[[2.0, 5.0]], [[1.5, 4.0], [1.0, 3.0]]]

    def weights_and_grad(c: float):
        igb = IGBv1()
        feed(igb, [[[a, c * b] for a, b in e] for e in history])
        t = theta.clone().requires_grad_()
        losses = torch.stack([1 + t[0] ** 2, c * (2 + (t[1] - t[0]) ** 2)])
        igb.combine(losses, epoch=2).backward()
        return igb.weights(losses.detach(), epoch=2), t.grad

    (w1, g1), (w2, g2) = weights_and_grad(1.0), weights_and_grad(1e4)
    assert torch.allclose(w1, w2, rtol=1e-10) and torch.allclose(g1, g2, rtol=1e-10)


def test_weights_sum_to_k_and_permute_with_tasks():
    history = [[[3.0, 1.0, 2.0]], [[2.0, 0.9, 1.5], [1.0, 1.1, 0.5]]]
    order = [2, 0, 1]
    igb, permuted = IGBv1(), IGBv1()
    feed(igb, history)
    feed(permuted, [[[s[i] for i in order] for s in e] for e in history])
    losses = torch.tensor([0.7, 0.4, 1.2], dtype=torch.float64)
    weights = igb.weights(losses, epoch=2)
    assert math.isclose(weights.sum().item(), 3.0, rel_tol=1e-12)
    assert torch.allclose(permuted.weights(losses[order], epoch=2), weights[order])


def test_zero_losses_stay_finite():
    igb = IGBv1()
    feed(igb, [[[1.0, 0.0]], [[0.0, 0.0]]])
    zero = torch.zeros(2, requires_grad=True)
    objective = igb.combine(zero, epoch=2)
    objective.backward()
    assert torch.isfinite(objective) and torch.isfinite(igb.weights(zero.detach(), epoch=2)).all()


def test_a_skipped_base_epoch_is_an_error():
    igb = IGBv1(base_epoch=1)
    igb.weights(torch.ones(2), epoch=0)
    with pytest.raises(ValueError, match="base epoch"):
        igb.weights(torch.ones(2), epoch=3)


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(IGBv1(), lr=0.01, steps=200, adam=True)  # log losses: small raw gradients
    assert final < 0.2 * initial


def test_default_base_epoch_is_the_authors_epoch_one():
    history = [[[4.0, 1.0]], [[2.0, 2.0]]]  # epoch 0 means (4, 1), epoch 1 means (2, 2)
    default, explicit = IGBv1(), IGBv1(base_epoch=1)
    feed(default, history)
    feed(explicit, history)
    losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    weights = default.weights(losses, epoch=2)
    assert torch.equal(weights, explicit.weights(losses, epoch=2))
    # r = (1/2, 3/2) over epoch 1's means, not (1/4, 3) over epoch 0's (and not all 1 as if the
    # base epoch had not ended): w = 2 softmax(r) = 2 (1, e) / (1 + e)
    e = math.e
    assert torch.allclose(weights, torch.tensor([2 / (1 + e), 2 * e / (1 + e)], dtype=torch.float64))
    # combine passes the epoch on: Σ w_k log L_k with the same weights
    objective = IGBv1().combine(torch.ones(2), epoch=0)
    assert objective.item() == 0.0
    fresh = IGBv1()
    feed(fresh, history)
    expected = float(weights[1]) * math.log(3.0)
    assert fresh.combine(losses, epoch=2).item() == pytest.approx(expected, rel=1e-12)


def test_small_positive_losses_enter_the_log_unchanged():
    """The eps floor is only there for a zero loss: a loss of 1e-6 contributes log(1e-6) itself."""
    igb = IGBv1()
    losses = torch.tensor([1e-6, 0.5], dtype=torch.float64, requires_grad=True)
    objective = igb.combine(losses, epoch=0)
    assert math.isclose(objective.item(), math.log(1e-6) + math.log(0.5), rel_tol=1e-12)
    objective.backward()
    assert torch.allclose(losses.grad, 1 / losses.detach(), rtol=1e-12)  # d log L / dL = 1 / L
