import math

import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.lbtw import LBTW


def run(method: LBTW, epochs: list[list[list[float]]]) -> list[torch.Tensor]:
    """Weights of every step of ``epochs`` (a list of epochs, each a list of loss vectors)."""
    return [method.weights(torch.tensor(losses), epoch=e) for e, steps in enumerate(epochs) for losses in steps]


def test_weights_match_hand_computation():
    first, second = run(LBTW(), [[[4.0, 1.0], [1.0, 0.81]]])  # default α = 0.5, the authors' value
    assert torch.equal(first, torch.ones(2))  # the reference batch itself: ratio 1
    # ratios (1/4, 0.81/1) -> square roots (0.5, 0.9) -> times 2 / 1.4
    assert torch.allclose(second, torch.tensor([2 * 0.5 / 1.4, 2 * 0.9 / 1.4]))
    assert second[1] > second[0]  # the task that improved less keeps more weight


def test_reference_is_reset_at_the_first_batch_of_every_epoch():
    history = [[[4.0, 1.0], [2.0, 0.9]], [[3.0, 3.0], [1.5, 2.7], [0.3, 1.5]]]
    weights = run(LBTW(alpha=0.7), history)
    assert torch.equal(weights[2], torch.ones(2))  # epoch 1 starts over
    fresh = run(LBTW(alpha=0.7), history[1:])  # epoch 0 leaves no trace on epoch 1
    assert all(torch.allclose(a, b) for a, b in zip(weights[2:], fresh))
    expected = torch.tensor([0.1, 0.5]) ** 0.7  # last step: ratios (0.3/3, 1.5/3)
    assert torch.allclose(weights[4], 2 * expected / expected.sum())


def test_alpha_zero_is_equal_weighting_and_larger_alpha_sharpens():
    history = [[[3.0, 2.0, 5.0], [0.3, 1.8, 2.5]]]
    assert torch.allclose(run(LBTW(alpha=0.0), history)[1], torch.ones(3))
    spread = [float(run(LBTW(alpha=a), history)[1].max() / run(LBTW(alpha=a), history)[1].min()) for a in (0.25, 0.5, 1.0)]
    assert spread[0] < spread[1] < spread[2]
    assert math.isclose(spread[2], (1.8 / 2.0) / (0.3 / 3.0), rel_tol=1e-6)  # α = 1: ratio of ratios


def test_invariant_to_the_scale_of_each_loss():
    history = [[[3.0, 2.0], [1.0, 1.5], [0.4, 1.1]]]
    scaled = [[[1000.0 * a, 0.01 * b] for a, b in steps] for steps in history]
    for a, b in zip(run(LBTW(), history), run(LBTW(), scaled)):
        assert torch.allclose(a, b)


def test_weights_sum_to_k_and_permute_with_the_tasks():
    generator = torch.Generator().manual_seed(0)
    history = [[(torch.rand(4, generator=generator) + 0.1).tolist() for _ in range(5)] for _ in range(2)]
    order = [2, 0, 3, 1]
    original = run(LBTW(alpha=0.8), history)
    permuted = run(LBTW(alpha=0.8), [[[step[i] for i in order] for step in epoch] for epoch in history])
    for a, b in zip(original, permuted):
        assert math.isclose(a.sum().item(), 4.0, rel_tol=1e-6)
        assert torch.allclose(a[order], b)


def test_single_task_and_zero_losses():
    assert torch.allclose(run(LBTW(), [[[2.0], [0.5]]])[1], torch.ones(1))
    for history in ([[[0.0, 1.0], [0.0, 0.5]]], [[[1.0, 2.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]):
        assert all(torch.isfinite(w).all() for w in run(LBTW(), history))
    assert torch.equal(run(LBTW(), [[[1.0, 2.0], [0.0, 0.0]]])[1], torch.ones(2))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(LBTW(alpha=0.5), lr=0.01, steps=200)
    assert final < 0.2 * initial


def test_a_zero_reference_counts_as_ratio_one():
    # task 0 started the epoch at loss 0: ratios (1, 0.25) -> square roots (1, 0.5) -> times 2 / 1.5
    weights = run(LBTW(), [[[0.0, 1.0], [0.0, 0.25]]])[1]
    assert torch.allclose(weights, torch.tensor([4 / 3, 2 / 3]))


def test_a_negative_ratio_counts_as_zero():
    # a loss that went below 0 (ratio −0.5) gives weight 0, not the NaN of (−0.5) ** 0.5
    weights = run(LBTW(), [[[2.0, 1.0], [-1.0, 0.25]]])[1]
    assert torch.equal(weights, torch.tensor([0.0, 2.0]))
