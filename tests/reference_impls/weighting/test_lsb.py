import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.lsb import LSB


def test_equal_weights_in_the_first_period():
    assert torch.equal(LSB().weights(torch.tensor([5.0, 1.0]), epoch=0), torch.ones(2))


def test_second_period_balances_loss_scales():
    lsb = LSB()
    lsb.weights(torch.tensor([1.0, 4.0]), epoch=0)
    lsb.weights(torch.tensor([3.0, 8.0]), epoch=0)  # means (2, 6)
    weights = lsb.weights(torch.tensor([0.0, 0.0]), epoch=1)
    # b_k = (2 + 6) / (2 L̄_k) = (2, 2/3): every w_k L̄_k = 4 and the total stays 8
    assert torch.allclose(weights, torch.tensor([2.0, 2.0 / 3.0]))
    assert torch.allclose(weights * torch.tensor([2.0, 6.0]), torch.tensor([4.0, 4.0]))


def test_difficulty_tilts_towards_the_task_whose_loss_fell_least():
    lsb = LSB(difficulty_power=1.0)
    lsb.weights(torch.tensor([4.0, 4.0]), epoch=0)
    lsb.weights(torch.tensor([1.0, 3.0]), epoch=1)
    weights = lsb.weights(torch.tensor([1.0, 1.0]), epoch=2)
    # ratios (0.25, 0.75) -> d = (0.5, 1.5); b = (4/2, 4/6) = (2, 2/3); w = (1, 1)
    assert torch.allclose(weights, torch.tensor([1.0, 1.0]))
    pure_balance = LSB(difficulty_power=0.0)
    pure_balance.weights(torch.tensor([4.0, 4.0]), epoch=0)
    pure_balance.weights(torch.tensor([1.0, 3.0]), epoch=1)
    assert torch.allclose(pure_balance.weights(torch.ones(2), epoch=2), torch.tensor([2.0, 2 / 3]))


def test_permutation_and_single_task():
    history = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.9, 1.5])]
    order = torch.tensor([2, 0, 1])
    lsb, permuted = LSB(), LSB()
    for epoch, losses in enumerate(history):
        lsb.weights(losses, epoch=epoch)
        permuted.weights(losses[order], epoch=epoch)
    ones = torch.ones(3)
    assert torch.allclose(permuted.weights(ones, epoch=2), lsb.weights(ones, epoch=2)[order])
    single = LSB()
    for epoch in range(3):
        weights = single.weights(torch.tensor([2.0 - epoch * 0.5]), epoch=epoch)
    assert torch.allclose(weights, torch.ones(1))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(LSB(), lr=0.02, steps=300, adam=True)
    assert final < 0.1 * initial


def test_default_difficulty_power_is_1():
    lsb = LSB()
    for epoch, losses in enumerate(([4.0, 4.0], [1.0, 3.0])):
        lsb.weights(torch.tensor(losses, dtype=torch.float64), epoch=epoch)
    # ratios (0.25, 0.75) to the power 1 -> d = (0.5, 1.5); b = (2, 2/3); w = (1, 1)
    # (β = 2 would give d = (0.2, 1.8) and w = (0.4, 1.2))
    weights = lsb.weights(torch.ones(2, dtype=torch.float64), epoch=2)
    assert torch.allclose(weights, torch.ones(2, dtype=torch.float64), rtol=1e-12)


def test_difficulty_is_the_ratio_of_the_last_two_period_means():
    lsb = LSB(difficulty_power=1.0)
    lsb.weights(torch.tensor([2.0, 8.0]), epoch=0)
    lsb.weights(torch.tensor([1.0, 2.0]), epoch=1)
    weights = lsb.weights(torch.tensor([1.0, 1.0]), epoch=2)
    # ratios (1/2, 1/4) -> d = 2 (1/2, 1/4) / (3/4) = (4/3, 2/3); b = 3 / (2 (1, 2)) = (3/2, 3/4)
    assert torch.allclose(weights, torch.tensor([2.0, 0.5]))


def test_calls_without_an_epoch_fill_period_0():
    lsb = LSB()
    lsb.weights(torch.tensor([1.0, 3.0]))  # epoch defaults to 0, as for every LossWeighting
    # period 0's means (1, 3) give b = 4 / (2 (1, 3)) = (2, 2/3) in period 1
    assert torch.allclose(lsb.weights(torch.tensor([0.0, 0.0]), epoch=1), torch.tensor([2.0, 2.0 / 3.0]))
