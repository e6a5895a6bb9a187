"""AutoSeM stage 1 (Guo et al. 2019): Beta sampler, the decayed posterior update, Thompson preference."""

import pytest
import torch

from reference_impls.sampling.autosem import AutoSeMTaskSelector, sample_beta, sample_gamma


def test_beta_sampler_matches_the_moments_and_is_seeded():
    a = torch.tensor([0.5, 2.0, 7.5], dtype=torch.float64)
    b = torch.tensor([0.5, 5.0, 1.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = sample_beta(a.expand(4000, 3), b.expand(4000, 3), g)
    torch.testing.assert_close(draws.mean(0), a / (a + b), atol=0.02, rtol=0)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    torch.testing.assert_close(draws.var(0), var, atol=0.01, rtol=0)
    again = sample_beta(a, b, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, sample_beta(a, b, torch.Generator().manual_seed(0)))


def test_posterior_update_by_hand():
    sel = AutoSeMTaskSelector(3)  # the authors' defaults: prior Beta(1, 1), decay γ = 0.3
    sel.update(1, 1.0)
    torch.testing.assert_close(sel.alpha, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sel.beta, torch.ones(3, dtype=torch.float64))
    sel.update(2, 0.0)
    # decay towards the prior (1, 1) first: α_1 = 0.7·2 + 0.3·1 = 1.7; then β_2 += 1
    torch.testing.assert_close(sel.alpha, torch.tensor([1.0, 1.7, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sel.beta, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sel.utilities(), torch.tensor([0.5, 1.7 / 2.7, 1 / 3], dtype=torch.float64))
    with pytest.raises(ValueError):
        sel.update(0, 0.5)


def test_without_decay_it_is_the_stationary_beta_bernoulli_posterior():
    sel = AutoSeMTaskSelector(2, decay=0.0)
    for r in (1.0, 1.0, 0.0, 1.0):
        sel.update(0, r)
    assert sel.alpha[0] == 4.0 and sel.beta[0] == 2.0  # 1 + successes, 1 + failures


def test_reward_is_one_when_the_primary_metric_does_not_drop():
    sel = AutoSeMTaskSelector(2)
    assert [sel.reward_from_metric(m) for m in (0.5, 0.6, 0.6, 0.4, 0.7)] == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_a_rewarded_task_is_sampled_more_often():
    g = torch.Generator().manual_seed(1)
    sel = AutoSeMTaskSelector(3, decay=0.05, generator=g)
    useful = 2
    picks = torch.zeros(3)
    for step in range(300):
        k = sel.select()
        picks[k] += 1
        sel.update(k, 1.0 if k == useful else 0.0)
    assert picks[useful] > 0.7 * picks.sum()
    assert torch.argmax(sel.utilities()) == useful
    assert torch.isfinite(sel.alpha).all() and torch.isfinite(sel.beta).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_tasks": 0}, "num_tasks must be at least 1, got 0"),
    ({"num_tasks": -1}, "num_tasks must be at least 1, got -1"),
    ({"decay": 1.5}, r"decay must be in \[0, 1\], got 1.5"),
    ({"decay": float("nan")}, r"decay must be in \[0, 1\], got nan"),
    ({"prior": (0.0, 1.0)}, r"prior must be two finite numbers above 0, got \(0.0, 1.0\)"),
    ({"prior": (float("nan"), 1.0)}, r"prior must be two finite numbers above 0, got \(nan, 1.0\)"),  # hung select()
    ({"prior": (1.0, float("inf"))}, r"prior must be two finite numbers above 0, got \(1.0, inf\)"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoSeMTaskSelector(**{"num_tasks": 3, **kwargs})


def test_reward_compares_with_the_previous_metric_not_the_first():
    sel = AutoSeMTaskSelector(2)
    # 0.6 is above the first metric 0.5 but below the previous one 0.9: a drop, reward 0
    assert [sel.reward_from_metric(m) for m in (0.5, 0.9, 0.6)] == [1.0, 1.0, 0.0]


def test_each_parameter_decays_towards_its_own_prior_value():
    sel = AutoSeMTaskSelector(2, decay=0.5, prior=(2.0, 1.0))
    sel.update(0, 1.0)  # α = 0.5·2 + 0.5·2 = 2, then α_0 += 1; β stays at its prior 1
    sel.update(1, 0.0)  # α_0 = 0.5·3 + 0.5·2 = 2.5; β_1 = 0.5·1 + 0.5·1 + 1 = 2
    torch.testing.assert_close(sel.alpha, torch.tensor([2.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sel.beta, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_a_nan_metric_is_refused_instead_of_zeroing_every_later_reward():
    """NaN became the last metric, and every later 'metric >= last' was False: reward 0 forever."""
    sel = AutoSeMTaskSelector(3)
    assert sel.reward_from_metric(0.5) == 1.0
    with pytest.raises(ValueError, match="metric must be finite, got nan"):
        sel.reward_from_metric(float("nan"))
    assert sel.reward_from_metric(0.6) == 1.0


@pytest.mark.parametrize("shape", [0.3, 1.0, 2.5, 40.0])
def test_gamma_sampler_follows_the_exact_gamma_cdf(shape):
    """Kolmogorov–Smirnov distance to Gamma(shape, 1)'s CDF, the regularised lower incomplete gamma function.

    Covers the a < 1 boost, the Marsaglia–Tsang proposal and its acceptance test: any slip in them moves the law.
    """
    n = 40000
    draws = sample_gamma(torch.full((n,), shape, dtype=torch.float64), torch.Generator().manual_seed(3))
    x = draws.sort().values
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(upper - cdf, cdf - (upper - 1.0 / n)).max()
    assert (x > 0).all()
    assert ks < 1.63 / n**0.5  # the 1 % critical value of the KS statistic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_samplers_keep_the_dtype_of_their_parameters(dtype):
    a = torch.tensor([0.4, 3.0], dtype=dtype)  # 0.4 takes the a < 1 boost path
    assert sample_gamma(a, torch.Generator().manual_seed(0)).dtype == dtype
    assert sample_beta(a, a.flip(0), torch.Generator().manual_seed(0)).dtype == dtype


def test_draws_depend_only_on_the_given_generator():
    """Same seed, same draws: every random number (proposals, acceptance uniforms, the a < 1 boost) uses it."""
    a = torch.full((2000,), 0.7, dtype=torch.float64)  # enough draws that some proposals are rejected
    first = sample_gamma(a, torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample_gamma(a, torch.Generator().manual_seed(5)), first, rtol=0, atol=0)
    picks = []
    for _ in range(2):
        sel = AutoSeMTaskSelector(4, generator=torch.Generator().manual_seed(11))
        picks.append([sel.select() for _ in range(40)])
    assert picks[0] == picks[1]


def test_full_decay_keeps_only_the_last_outcome():
    """γ = 1 is allowed ([0, 1]): every step resets all arms to the prior before the new outcome is added."""
    sel = AutoSeMTaskSelector(3, decay=1.0, prior=(2.0, 3.0))
    sel.update(0, 1.0)
    sel.update(2, 0.0)
    torch.testing.assert_close(sel.alpha, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sel.beta, torch.tensor([3.0, 3.0, 4.0], dtype=torch.float64))


def test_beta_decays_towards_a_prior_beta_other_than_one():
    sel = AutoSeMTaskSelector(2, decay=0.25, prior=(1.0, 4.0))
    sel.update(0, 0.0)  # β_0 = 4 + 1 = 5 (decay of the prior is a no-op)
    sel.update(1, 1.0)  # β_0 = 0.75·5 + 0.25·4 = 4.75; β_1 = 4; α_1 = 1 + 1 = 2
    torch.testing.assert_close(sel.beta, torch.tensor([4.75, 4.0], dtype=torch.float64))
    torch.testing.assert_close(sel.alpha, torch.tensor([1.0, 2.0], dtype=torch.float64))
