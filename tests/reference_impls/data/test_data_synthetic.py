import math

import pytest
import torch

from reference_impls.data import load
from reference_impls.data.synthetic import (correlated_regression, epoch_batches, labels, mse_loss, random_sine_parameters,
                                            sine_parameters, task_weights)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_label_correlation_increases_with_task_correlation():
    ps = [-0.5, 0.0, 0.3, 0.6, 0.9, 1.0]
    corr = [pearson(*correlated_regression(20000, p, seed=3)[1].values()) for p in ps]
    assert all(a < b for a, b in zip(corr, corr[1:])), corr
    assert corr[-1] > 0.99  # p = 1: identical tasks up to the label noise
    # monotone, but not the identity map p -> correlation (the paper's Fig. 2)
    assert max(abs(c - p) for c, p in zip(corr, ps)) > 0.02


def test_weights_have_norm_c_and_cosine_p():
    for p in (-0.3, 0.0, 0.9, 1.0):
        w = task_weights(p, dim=50, scale=2.5, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(w.norm(dim=1), torch.full((2,), 2.5, dtype=torch.float64))
        assert abs(torch.dot(w[0], w[1]).item() / 2.5**2 - p) < 1e-12


def test_labels_follow_the_recipe():
    x, y = correlated_regression(5, 0.4, dim=7, num_sines=3, noise_std=0.0, seed=1)
    g = torch.Generator().manual_seed(1)  # replay the generator in the documented order
    basis, _ = torch.linalg.qr(torch.randn(7, 2, generator=g, dtype=torch.float64))
    w2 = 0.4 * basis[:, 0] + math.sqrt(1 - 0.16) * basis[:, 1]
    torch.testing.assert_close(x, torch.randn(5, 7, generator=g, dtype=torch.float64).float())
    alpha, beta = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 4.0])  # α_i = i, β_i = (i-1)²
    torch.testing.assert_close(sine_parameters(3), (alpha.double(), beta.double()))
    z = x.double() @ w2
    expected = z + torch.sin(alpha.double() * z[:, None] + beta.double()).sum(1)
    torch.testing.assert_close(y["y2"], expected.float())


def _label_moments(scale: float, alphas: torch.Tensor, betas: torch.Tensor, noise_std: float):
    """Closed-form E[y] and Var[y] for y = z + Σ sin(α_i z + β_i) + ε, z ~ N(0, c²).

    E[sin(az + b)] = sin(b) e^{-a²c²/2}; E[z sin(az + b)] = a c² cos(b) e^{-a²c²/2} (Stein);
    E[sin(az + b) sin(a'z + b')] = (cos(b - b') e^{-(a-a')²c²/2} - cos(b + b') e^{-(a+a')²c²/2}) / 2.
    """
    v = scale**2
    mean = (torch.sin(betas) * torch.exp(-alphas**2 * v / 2)).sum()
    cross = (alphas * v * torch.cos(betas) * torch.exp(-alphas**2 * v / 2)).sum()
    a, b = alphas[:, None], betas[:, None]
    pairs = 0.5 * (torch.cos(b - b.T) * torch.exp(-(a - a.T) ** 2 * v / 2)
                   - torch.cos(b + b.T) * torch.exp(-(a + a.T) ** 2 * v / 2))
    second = v + 2 * cross + pairs.sum() + noise_std**2
    return mean.item(), (second - mean**2).item()


def test_label_statistics_match_the_closed_form_of_the_paper_recipe():
    """Inputs are N(0, 1) and unnormalised; labels have the moments the recipe implies."""
    n = 200_000
    for scale in (1.0, 0.5):
        x, y = correlated_regression(n, 0.7, dim=3, scale=scale, seed=11)
        assert abs(x.mean().item()) < 0.01 and abs(x.var().item() - 1) < 0.01
        mean, var = _label_moments(scale, *sine_parameters(10), 0.1)
        for label in y.values():
            assert abs(label.double().mean().item() - mean) < 4 * math.sqrt(var / n)
            assert abs(label.double().var().item() / var - 1) < 0.02
    # identical tasks (p = 1) differ only by the two noises: Var = 2 * 0.01, the paper's N(0, 0.01)
    _, y = correlated_regression(n, 1.0, dim=3, seed=12)
    assert abs((y["y1"] - y["y2"]).double().var().item() - 0.02) < 0.001


def test_deterministic_under_seed_and_split_shares_the_task():
    a = load("synthetic", correlation=0.2, n_train=50, n_test=20, seed=7)
    b = load("synthetic", correlation=0.2, n_train=50, n_test=20, seed=7)
    torch.testing.assert_close(a.train.x, b.train.x)
    assert len(a.train) == 50 and len(a.test) == 20
    x, targets = a.test[0]
    assert x.shape == (100,) and set(targets) == {"y1", "y2"}
    assert a.problem.out_dims == {"y1": 1, "y2": 1}


def test_finite_set_mode_visits_the_same_examples_every_epoch():
    n, batch = 10, 4
    first = epoch_batches(n, batch, torch.Generator().manual_seed(5))
    epochs = [torch.cat([next(first) for _ in range(3)]) for _ in range(4)]  # 3 batches = one epoch of 10
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))  # every example once, nothing new
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])  # reshuffled between epochs
    again = epoch_batches(n, batch, torch.Generator().manual_seed(5))
    torch.testing.assert_close(torch.cat([next(again) for _ in range(12)]), torch.cat(epochs))


def test_random_sines_are_seeded_and_per_run_parameters_broadcast():
    a, b = random_sine_parameters(6, torch.Generator().manual_seed(2))
    a2, b2 = random_sine_parameters(6, torch.Generator().manual_seed(2))
    assert torch.equal(a, a2) and torch.equal(b, b2) and not torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)  # 3 runs
    w = torch.stack([task_weights(p, 5, generator=g) for p in (1.0, 0.6, -0.2)])
    alphas = torch.randn(3, 4, generator=g, dtype=torch.float64)
    betas = torch.randn(3, 4, generator=g, dtype=torch.float64)
    together = labels(x, w, alphas, betas, noise_std=0.0)
    for r in range(3):  # one set of (α, β) per run, same as labelling each run alone
        torch.testing.assert_close(together[r], labels(x[r], w[r], alphas[r], betas[r], noise_std=0.0))


def test_label_variance_with_random_sines_matches_the_closed_form():
    alphas, betas = random_sine_parameters(10, torch.Generator().manual_seed(8))
    n = 200_000
    _, y = correlated_regression(n, 0.3, dim=3, seed=13, alphas=alphas, betas=betas)
    mean, var = _label_moments(1.0, alphas, betas, 0.1)
    for label in y.values():
        assert abs(label.double().mean().item() - mean) < 4 * math.sqrt(var / n)
        assert abs(label.double().var().item() / var - 1) < 0.02


def test_a_correlation_outside_minus_one_to_one_is_refused_by_name():
    for p in (1.5, -1.01):
        with pytest.raises(ValueError, match=rf"correlation must lie in \[-1, 1\], got {p}"):
            task_weights(p, dim=4)
    opposite = task_weights(-1.0, dim=4, generator=torch.Generator().manual_seed(0))  # the ends are allowed
    torch.testing.assert_close(opposite[1], -opposite[0])


def test_the_benchmark_splits_one_draw_of_n_train_plus_n_test_examples_in_order():
    """Train is the first n_train examples of one draw, test the rest: same tasks, aligned labels."""
    bench = load("synthetic", correlation=0.3, n_train=30, n_test=10, dim=6, num_sines=2, seed=4)
    x, y = correlated_regression(40, 0.3, dim=6, num_sines=2, seed=4)
    for part, rows in ((bench.train, slice(0, 30)), (bench.test, slice(30, 40))):
        assert torch.equal(part.x, x[rows])
        for task in ("y1", "y2"):
            assert torch.equal(part.labels[task], y[task][rows])


def test_random_sine_parameters_are_standard_normal():
    alphas, betas = random_sine_parameters(100_000, torch.Generator().manual_seed(9))
    for draws in (alphas, betas):
        assert abs(draws.mean().item()) < 0.02 and abs(draws.var().item() - 1) < 0.02
    assert abs(pearson(alphas, betas)) < 0.02  # drawn independently


def test_mse_loss_is_the_mean_of_squared_errors_over_the_targets_shape():
    prediction, target = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([0.0, 2.0, 1.0])  # (n, 1) head output
    assert mse_loss(prediction, target).item() == pytest.approx((1 + 0 + 9) / 3)


@pytest.mark.parametrize("options, message", [
    ({"dim": 1}, "dim must be at least 2"),  # used to fail as 'index 1 is out of bounds'
    ({"n_train": -3}, "n_train and n_test must be >= 0, got -3"),  # used to train on n_train + n_test - 3
    ({"n_test": -1}, "n_train and n_test must be >= 0"),
])
def test_sizes_that_cannot_make_the_data_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        load("synthetic", None, **{"n_train": 8, "n_test": 4, **options})


def test_defaults_are_the_papers_input_dimension_100_and_scale_c_1():
    """d = 100 (Sec. 5.1) and c = 1 are the documented defaults of both entry points."""
    w = task_weights(0.3, generator=torch.Generator().manual_seed(0))
    assert w.shape == (2, 100)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(2, dtype=torch.float64))
    x, y = correlated_regression(4, 0.3)
    assert x.shape == (4, 100) and y["y1"].shape == (4,)


def test_two_dimensions_are_enough_for_two_orthogonal_task_directions():
    """The refusal is for dim < 2 only: in the plane, w2 is still at cosine p from w1."""
    w = task_weights(0.6, dim=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w.norm(dim=1), torch.ones(2, dtype=torch.float64))
    assert abs(torch.dot(w[0], w[1]).item() - 0.6) < 1e-12
    assert load("synthetic", n_train=3, n_test=2, dim=2).problem.input_shape == (2,)


@pytest.mark.parametrize("n_train, n_test", [(0, 5), (5, 0)])
def test_an_empty_split_is_allowed(n_train, n_test):
    """'>= 0' as the refusal says: zero examples in one split is a valid (if odd) request."""
    bench = load("synthetic", n_train=n_train, n_test=n_test, dim=4, seed=2)
    assert (len(bench.train), len(bench.test)) == (n_train, n_test)


def test_the_benchmark_describes_vectors_of_dim_and_trains_each_task_with_mse():
    bench = load("synthetic", n_train=4, n_test=2, dim=6, seed=1)
    assert bench.problem.tasks == ("y1", "y2") and bench.problem.input_shape == (6,)
    assert set(bench.tasks) == {"y1", "y2"}
    for spec in bench.tasks.values():
        assert spec.loss is mse_loss and spec.metric().name == "mse"


def test_labels_keep_the_dtype_of_the_inputs():
    """float64 sine parameters (the defaults) must not promote float32 inputs' labels to float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g)
    w = task_weights(0.2, dim=4, generator=g).float()
    y = labels(x, w, *sine_parameters(3), noise_std=0.0)
    assert y.dtype == torch.float32
    z = x.double() @ w.double().T  # the recipe in float64, for the values
    expected = z + torch.sin(torch.tensor([1.0, 2.0, 3.0]).double() * z[..., None]
                             + torch.tensor([0.0, 1.0, 4.0]).double()).sum(-1)
    torch.testing.assert_close(y, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"alphas": [1.0, 2.0, 3.0]}, r"alphas must hold one value per sine, num_sines = 10, got 3 value\(s\)"),
    ({"alphas": [1.0]}, r"alphas must hold one value per sine, num_sines = 10, got 1 value"),  # was broadcast
    ({"betas": [0.0, 1.0]}, r"betas must hold one value per sine, num_sines = 10, got 2 value"),
    ({"betas": [[0.0, 1.0]], "num_sines": 2}, r"betas must hold one value per sine, num_sines = 2, got shape \(1, 2\)"),
    ({"num_sines": -1}, r"num_sines must be >= 0, got -1"),  # was torch.arange's 'bound inconsistent'
])
def test_sine_parameters_of_another_length_than_num_sines_are_refused_by_name(options, message):
    """A wrong length used to fail inside labels() with torch's 'size of tensor a (3) must match',
    and a single value was silently used for every sine."""
    with pytest.raises(ValueError, match=message):
        correlated_regression(4, 0.5, dim=4, **options)


def test_sine_parameters_of_num_sines_values_are_used():
    alphas, betas = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    _, given = correlated_regression(6, 0.5, dim=4, num_sines=3, seed=2, alphas=alphas.tolist(), betas=betas)
    _, default = correlated_regression(6, 0.5, dim=4, num_sines=3, seed=2)
    assert not torch.equal(given["y1"], default["y1"])
