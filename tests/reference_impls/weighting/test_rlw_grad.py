import torch

from reference_impls.weighting.rlw_grad import RandomLossWeightingGradient


def test_weights_are_softmax_of_normal_draws_from_the_generator(grad_checks):
    grads = grad_checks.gradient_matrix(5, 3, seed=0)
    result = RandomLossWeightingGradient(torch.Generator().manual_seed(9))(grads)
    expected = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(9)).double(), 0)
    assert torch.allclose(result.weights, expected)
    assert torch.allclose(result.update, expected @ grads)
    assert abs(float(result.weights.sum()) - 1) < 1e-12 and (result.weights > 0).all()


def test_reproducible_and_fresh_each_step(grad_checks):
    grads = grad_checks.gradient_matrix(3, 4, seed=1)
    a, b = RandomLossWeightingGradient(torch.Generator().manual_seed(1)), RandomLossWeightingGradient(torch.Generator().manual_seed(1))
    first, second = [a(grads).weights for _ in range(3)], [b(grads).weights for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], first[1])


def test_gramian_route_draws_the_same_weights(grad_checks):
    """weights_from_gramian (used when the Gramian is all-reduced) follows the same rule."""
    grads = grad_checks.gradient_matrix(4, 3, seed=2)
    direct = RandomLossWeightingGradient(torch.Generator().manual_seed(5))(grads).weights
    via_gramian = RandomLossWeightingGradient(torch.Generator().manual_seed(5)).weights_from_gramian(grads @ grads.T)
    assert torch.equal(direct, via_gramian)


def seeded(seed: int) -> RandomLossWeightingGradient:
    return RandomLossWeightingGradient(torch.Generator().manual_seed(seed))


def test_draws_are_float32_whatever_the_precision(grad_checks):
    """Softmax of float32 N(0, 1) draws: float64 rows get those draws widened, not float64 draws.

    K = 20 because below 16 CPU draws of both precisions round the same numbers.
    """
    grads = grad_checks.gradient_matrix(20, 3, seed=3)
    wide = seeded(4)(grads).weights
    draws = torch.randn(20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(wide, torch.softmax(draws.double(), 0))
    narrow = seeded(4)(grads.float()).weights
    assert narrow.dtype == torch.float32
    assert torch.allclose(narrow.double(), wide, rtol=1e-6, atol=0)


def test_default_generator_is_its_own_seeded_at_0(grad_checks):
    """Without a generator: deterministic (seed 0) and the global RNG is neither read nor advanced."""
    grads = grad_checks.gradient_matrix(4, 3, seed=5)
    with torch.random.fork_rng():  # leaves the global RNG of the other tests alone
        torch.manual_seed(123)
        before = torch.get_rng_state()
        first = [RandomLossWeightingGradient()(grads).weights for _ in range(2)]
        assert torch.equal(torch.get_rng_state(), before)
        torch.manual_seed(321)
        second = RandomLossWeightingGradient()(grads).weights
    assert torch.equal(first[0], second) and torch.equal(first[0], seeded(0)(grads).weights)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(RandomLossWeightingGradient)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(RandomLossWeightingGradient(), lr=0.02)
    assert final < 0.5 * initial
