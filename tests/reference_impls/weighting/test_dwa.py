import math

import pytest
import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.dwa import DWA


def _feed_epochs(dwa: DWA, epoch_losses: list[list[list[float]]]) -> None:
    for epoch, steps in enumerate(epoch_losses):
        for losses in steps:
            dwa.weights(torch.tensor(losses), epoch=epoch)


def test_first_two_epochs_are_equal_weighting():
    dwa = DWA()
    assert torch.equal(dwa.weights(torch.tensor([4.0, 1.0]), epoch=0), torch.ones(2))
    assert torch.equal(dwa.weights(torch.tensor([3.0, 1.0]), epoch=1), torch.ones(2))


def test_weights_match_hand_computation():
    dwa = DWA(temperature=2.0)
    # epoch 0 means: (4+2)/2 = 3 and (1+3)/2 = 2;  epoch 1 means: 1.5 and 2
    _feed_epochs(dwa, [[[4.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [2.0, 2.0]]])
    weights = dwa.weights(torch.tensor([9.0, 9.0]), epoch=2)
    # r = (1.5/3, 2/2) = (0.5, 1.0);  w_k = 2 exp(r_k/2) / (exp(0.25) + exp(0.5))
    denominator = math.exp(0.25) + math.exp(0.5)
    expected = torch.tensor([2 * math.exp(0.25) / denominator, 2 * math.exp(0.5) / denominator])
    assert torch.allclose(weights, expected, atol=1e-6)
    assert weights[1] > weights[0]  # the task whose loss fell less gets more weight


def test_weights_sum_to_k_and_are_constant_within_an_epoch():
    dwa = DWA(temperature=0.7)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(5):
        seen = []
        for _ in range(3):
            weights = dwa.weights(torch.rand(4, generator=generator) + 0.1, epoch=epoch)
            assert math.isclose(weights.sum().item(), 4.0, rel_tol=1e-6)
            seen.append(weights)
        assert all(torch.equal(seen[0], w) for w in seen)


def test_permuting_tasks_permutes_weights():
    history = [[[3.0, 1.0, 2.0]], [[1.0, 0.9, 1.5]]]
    order = [2, 0, 1]
    dwa, permuted = DWA(), DWA()
    _feed_epochs(dwa, history)
    _feed_epochs(permuted, [[[step[i] for i in order] for step in e] for e in history])
    losses = torch.tensor([1.0, 1.0, 1.0])
    assert torch.allclose(permuted.weights(losses, epoch=2), dwa.weights(losses, epoch=2)[order])


def test_single_task_weight_is_one():
    dwa = DWA()
    _feed_epochs(dwa, [[[2.0]], [[1.0]]])
    assert torch.allclose(dwa.weights(torch.tensor([0.5]), epoch=2), torch.ones(1))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(DWA())
    assert final < 0.2 * initial


def test_a_mean_loss_of_zero_gives_the_formulas_limit_not_nan():
    # task 0's mean stays 0 (no change: r = 1); task 1 halves (r = 0.5)
    dwa = DWA(temperature=2.0)
    _feed_epochs(dwa, [[[0.0, 2.0]], [[0.0, 1.0]]])
    weights = dwa.weights(torch.tensor([0.0, 1.0]), epoch=2)
    denominator = math.exp(0.5) + math.exp(0.25)
    assert torch.allclose(weights, torch.tensor([2 * math.exp(0.5), 2 * math.exp(0.25)]) / denominator)
    # task 0 rises from 0 (r = +inf): the softmax's limit puts all of K on it
    rising = DWA()
    _feed_epochs(rising, [[[0.0, 2.0, 1.0]], [[0.5, 1.0, 1.0]]])
    assert torch.equal(rising.weights(torch.tensor([1.0, 1.0, 1.0]), epoch=2), torch.tensor([3.0, 0.0, 0.0]))


def test_a_checkpoint_carries_the_loss_history():
    trained = DWA()
    _feed_epochs(trained, [[[4.0, 1.0]], [[1.0, 2.0]]])
    restored = DWA()
    restored.load_state_dict(trained.state_dict())
    losses = torch.tensor([1.0, 1.0])
    assert torch.equal(restored.weights(losses, epoch=2), trained.weights(losses, epoch=2))
    assert not torch.equal(restored.weights(losses, epoch=2), torch.ones(2))


def test_a_temperature_that_is_not_positive_is_refused():
    for temperature in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            DWA(temperature=temperature)


def test_default_temperature_is_the_papers_two():
    # r = (0.5, 1.0) as in the hand computation above; with T = 2 the logits are (0.25, 0.5)
    dwa = DWA()
    _feed_epochs(dwa, [[[2.0, 1.0]], [[1.0, 1.0]]])
    weights = dwa.weights(torch.tensor([1.0, 1.0]), epoch=2)
    assert math.isclose(weights[1].item() / weights[0].item(), math.exp(0.25), rel_tol=1e-6)


def test_tasks_whose_loss_rose_from_zero_share_k_equally():
    dwa = DWA()
    _feed_epochs(dwa, [[[0.0, 0.0, 2.0, 1.0]], [[0.5, 3.0, 1.0, 1.0]]])
    weights = dwa.weights(torch.ones(4), epoch=2)
    assert torch.equal(weights, torch.tensor([2.0, 2.0, 0.0, 0.0]))


def test_a_call_without_epoch_counts_as_epoch_zero():
    """The LossWeighting default epoch is 0: losses given without one are epoch 0's mean."""
    dwa = DWA(temperature=2.0)
    dwa.weights(torch.tensor([4.0, 2.0]))  # epoch 0
    dwa.weights(torch.tensor([2.0, 2.0]), epoch=1)
    weights = dwa.weights(torch.tensor([9.0, 9.0]), epoch=2)
    # r = (2/4, 2/2) = (0.5, 1.0), as in the hand computation above
    denominator = math.exp(0.25) + math.exp(0.5)
    expected = torch.tensor([2 * math.exp(0.25) / denominator, 2 * math.exp(0.5) / denominator])
    assert torch.allclose(weights, expected, atol=1e-6)
