import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.rlw import RLW


def test_weights_lie_on_the_simplex():
    rlw = RLW(torch.Generator().manual_seed(0))
    for _ in range(50):
        weights = rlw.weights(torch.ones(5))
        assert torch.all(weights > 0)
        assert torch.isclose(weights.sum(), torch.tensor(1.0))


def test_weights_are_softmax_of_standard_normal_draws():
    weights = RLW(torch.Generator().manual_seed(3)).weights(torch.ones(4))
    expected = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(3)), dim=0)
    assert torch.allclose(weights, expected)


def test_reproducible_under_a_seed_and_different_across_steps():
    first = RLW(torch.Generator().manual_seed(7))
    second = RLW(torch.Generator().manual_seed(7))
    a = [first.weights(torch.ones(3)) for _ in range(3)]
    b = [second.weights(torch.ones(3)) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])


def test_single_task_and_zero_losses():
    rlw = RLW(torch.Generator().manual_seed(0))
    assert torch.allclose(rlw.weights(torch.tensor([2.0])), torch.ones(1))
    assert torch.isfinite(rlw.combine(torch.zeros(3)))


def test_training_reduces_total_loss():
    initial, final = train_with_weighting(RLW(torch.Generator().manual_seed(0)), lr=0.02)
    assert final < 0.3 * initial


def test_float64_weights_sum_to_one_in_float64():
    losses = torch.ones(5, dtype=torch.float64)
    weights = RLW(torch.Generator().manual_seed(0)).weights(losses)
    draws = torch.randn(5, generator=torch.Generator().manual_seed(0)).double()
    assert weights.dtype == torch.float64
    assert abs(float(weights.sum()) - 1) < 1e-12
    assert torch.allclose(weights, torch.softmax(draws, dim=0), rtol=1e-12, atol=0)


def test_each_step_takes_the_next_k_standard_normal_draws():
    rlw = RLW(torch.Generator().manual_seed(5))
    steps = torch.stack([rlw.weights(torch.ones(3)) for _ in range(4)])
    stream = torch.randn(12, generator=torch.Generator().manual_seed(5)).view(4, 3)
    assert torch.allclose(steps, torch.softmax(stream, dim=1))


def test_without_a_generator_it_draws_from_the_global_generator():
    """generator=None is allowed (the default): the draws come from torch's global RNG on the
    losses' device. The global state is forked and seeded so the test stays deterministic."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = RLW().weights(torch.ones(4, dtype=torch.float64))
        torch.manual_seed(0)
        expected = torch.softmax(torch.randn(4).double(), dim=0)
    assert torch.allclose(weights, expected, atol=1e-15)
    assert abs(float(weights.sum()) - 1) < 1e-12
