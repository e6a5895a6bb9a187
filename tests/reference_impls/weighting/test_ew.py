import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.ew import EW


def test_weights_are_exactly_one_and_objective_is_the_sum():
    losses = torch.tensor([0.5, 2.0, 7.25])
    assert torch.equal(EW().weights(losses), torch.ones(3))
    assert EW().combine(losses).item() == 9.75


def test_weights_are_detached_and_follow_dtype():
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    weights = EW().weights(losses)
    assert weights.dtype == torch.float64 and not weights.requires_grad


def test_zero_losses_and_single_task():
    assert torch.equal(EW().weights(torch.zeros(2)), torch.ones(2))
    assert torch.equal(EW().weights(torch.tensor([3.0])), torch.ones(1))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(EW())
    assert final < 0.2 * initial


def test_weights_do_not_depend_on_step_or_epoch():
    losses = torch.tensor([0.5, 2.0], dtype=torch.float64)
    for step, epoch in ((0, 0), (7, 0), (0, 3), (1000, 12)):
        assert torch.equal(EW().weights(losses, step=step, epoch=epoch), torch.ones(2, dtype=torch.float64))
        assert EW().combine(losses, step=step, epoch=epoch).item() == 2.5
