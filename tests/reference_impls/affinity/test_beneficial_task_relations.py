"""Bingel & Søgaard 2017: task features, pair features and the logistic predictor of MTL gains."""

import math

import pytest
import torch

from reference_impls.affinity.beneficial_task_relations import (
    BenefitPredictor,
    curve_features,
    curve_gradients,
    dataset_features,
    entropy,
    fit_log_curve,
    js_divergence,
    log_curve,
    mtl_gain,
    pair_features,
)


def test_the_gain_is_the_relative_change_of_the_main_score_in_percent():
    assert mtl_gain(0.80, 0.84) == pytest.approx(5.0)
    assert mtl_gain(0.80, 0.76) == pytest.approx(-5.0)


def test_jensen_shannon_and_entropy_take_the_known_values():
    p = torch.tensor([3.0, 1.0, 0.0])
    assert js_divergence(p, 2 * p) == pytest.approx(0.0, abs=1e-12)  # counts are normalised first
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(math.log(2))
    q = torch.tensor([1.0, 1.0, 2.0])
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert entropy([5, 5, 5, 5]) == pytest.approx(math.log(4))


def test_dataset_features_by_hand():
    train = [[0, 1, 1], [2, 1]]  # 5 tokens, 3 types
    features = dataset_features(train, dev=[[0, 2]], labels=[0, 0, 1, 1, 1], num_labels=2, vocab_size=4,
                                known_words={1, 2})
    assert features["length"] == 2 and features["n_labels"] == 2
    assert features["tokens/types"] == pytest.approx(5 / 3)
    assert features["fro_norm"] == pytest.approx(math.sqrt(1 + 4 + 1 + 1))  # rows (1,2,0,0), (0,1,1,0)
    assert features["label_entropy"] == pytest.approx(-(0.4 * math.log(0.4) + 0.6 * math.log(0.6)))
    assert features["oov_rate"] == pytest.approx(20.0)  # word 0 once in five tokens
    train_dist = torch.tensor([1.0, 3.0, 1.0, 0.0])
    assert features["js_div"] == pytest.approx(js_divergence(train_dist, torch.tensor([1.0, 0.0, 1.0, 0.0])))


def test_curve_slopes_are_central_differences_exact_on_a_parabola():
    steps = [10.0 * i for i in range(100)]
    losses = [(s - 300.0) ** 2 / 1000 for s in steps]
    grads = curve_gradients(steps, losses)
    for p, g in zip((0.1, 0.2, 0.3, 0.5, 0.7), grads):
        s = steps[int(100 * p)]
        assert g == pytest.approx(2 * (s - 300.0) / 1000)  # the derivative at that step


def test_on_short_curves_the_central_difference_stays_inside_the_curve():
    """Fewer than ten entries: int(n·p) may be 0 or n − 1; the index is held to 1 .. n − 2."""
    steps, losses = [0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 4.0, 9.0, 16.0]  # t², central slopes 2, 4, 6
    # indices int(5 p) = 0, 1, 1, 2, 3 -> 1, 1, 1, 2, 3 (no wrap-around to the curve's end)
    assert curve_gradients(steps, losses) == pytest.approx([2.0, 2.0, 2.0, 4.0, 6.0])
    # three entries: int(3 · 0.7) = 2 is the last one, held back to the middle
    assert curve_gradients(steps[:3], losses[:3]) == pytest.approx([2.0] * 5)


def test_the_log_fit_reproduces_a_log_curve_and_its_identified_parameters():
    t = torch.arange(1, 61, dtype=torch.float64) * 10
    true = torch.tensor([3.0, -0.4, 0.05, 2.0], dtype=torch.float64)
    fitted = fit_log_curve(t.tolist(), log_curve(t, true).tolist())
    torch.testing.assert_close(log_curve(t, fitted), log_curve(t, true))
    a, b, c, d = fitted
    assert b.item() == pytest.approx(-0.4)  # b and d/c are fixed by the curve, c alone is not
    assert (d / c).item() == pytest.approx(40.0)
    assert (a + b * c.log()).item() == pytest.approx((true[0] + true[1] * true[2].log()).item())
    features = curve_features(t.tolist(), log_curve(t, true).tolist())
    assert features["curve_steepness0"] == pytest.approx(-0.4) and features["loss_grad_10"] < 0


def test_the_curve_is_fitted_on_every_tenth_of_its_first_5000_entries_and_sloped_in_full():
    """As the notebook: slopes from the whole log, the log-curve fit from entries[:5000:10]."""
    t = torch.arange(1, 6001, dtype=torch.float64) * 10  # 6000 logged steps
    true = torch.tensor([3.0, -0.4, 0.05, 2.0], dtype=torch.float64)
    losses = log_curve(t, true)
    losses[5000:] -= 1.0  # a drop after the entries the fit reads
    steps, losses = t.tolist(), losses.tolist()
    features = curve_features(steps, losses)
    _, b, c, _ = fit_log_curve(steps[:5000:10], losses[:5000:10]).tolist()
    assert features["curve_steepness0"] == pytest.approx(b) and features["curve_steepness1"] == pytest.approx(c)
    assert b == pytest.approx(-0.4)  # the drop does not reach the fit
    assert [features[f"loss_grad_{p}"] for p in (10, 20, 30, 50, 70)] == curve_gradients(steps, losses)


def test_pair_features_hold_both_tasks_and_their_ratio_in_order():
    main, aux = {"length": 100.0, "js_div": 0.2}, {"length": 400.0, "js_div": 0.1}
    pair = pair_features(main, aux)
    assert pair == {"main_js_div": 0.2, "aux_js_div": 0.1, "main/aux_js_div": 2.0,
                    "main_length": 100.0, "aux_length": 400.0, "main/aux_length": 0.25}
    assert pair_features(aux, main)["main/aux_length"] == 4.0


def test_the_predictor_is_the_optimum_of_the_regularised_logistic_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
    gains = x[:, 0] - 0.05 * x[:, 1] + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    model = BenefitPredictor().fit(x, gains)
    z = model.scale(x)
    assert z.min() == 0 and z.max() == 1  # min-max scaled columns
    w = model.weight.clone().requires_grad_(True)
    b = model.bias.clone().requires_grad_(True)
    y = torch.where(gains > 0, 1.0, -1.0).double()
    # liblinear's objective (LogisticRegression()'s solver before scikit-learn 0.22), C = 1:
    # the intercept is the weight of a constant feature 1 and is penalised like the others
    objective = 0.5 * ((w ** 2).sum() + b ** 2) + torch.log1p(torch.exp(-y * (z @ w + b))).sum()
    grad_w, grad_b = torch.autograd.grad(objective, (w, b))
    grad = torch.cat([grad_w, grad_b[None]])
    assert grad.abs().max() < 1e-6  # stationary point of the convex objective: the optimum
    # the penalty: with C tiny the weights shrink towards 0
    assert BenefitPredictor(c=1e-3).fit(x, gains).weight.norm() < 0.1 * model.weight.norm()
    assert (model.predict(x) == (gains > 0)).double().mean() > 0.8
    assert model.weight[0] > 0  # the informative column gets a positive coefficient


def test_the_intercept_is_shrunk_like_a_weight():
    """All gains positive and one constant column: only the intercept can fit; ½b² holds it back.

    With z = 0 for every row the objective is ½b² + N·log(1 + e^(−b)), whose minimum solves
    b = N / (1 + e^b); an unpenalised intercept would grow without bound.
    """
    x = torch.ones(6, 1, dtype=torch.float64)
    model = BenefitPredictor().fit(x, torch.ones(6, dtype=torch.float64))
    b = model.bias.item()
    assert b == pytest.approx(6 / (1 + math.exp(b)), abs=1e-8) and 1.0 < b < 2.0


def test_a_gain_of_exactly_zero_counts_as_no_benefit():
    """Zero gains are the negative class: the mirror image of all-positive gains, b = −N / (1 + e^(−b))."""
    x = torch.ones(6, 1, dtype=torch.float64)
    model = BenefitPredictor().fit(x, torch.zeros(6, dtype=torch.float64))
    b = model.bias.item()
    assert b == pytest.approx(-6 / (1 + math.exp(-b)), abs=1e-8) and -2.0 < b < -1.0
    assert not model.predict(x).any()


@pytest.mark.parametrize("call, message", [
    (lambda: mtl_gain(0.0, 1.0), "single_task_score"),
    (lambda: BenefitPredictor(c=0.0), "c must be"),
    (lambda: BenefitPredictor().fit(torch.zeros(3, 2), torch.zeros(2)), "N x F matrix and N gains"),
    (lambda: curve_gradients([0.0, 1.0], [1.0, 0.5]), "at least 3"),
    (lambda: curve_features([0.0, 1.0, 2.0], [1.0, 0.5, 0.2], fit_every=0), "fit_every"),
    (lambda: pair_features({"a": 1.0}, {"b": 1.0}), "same features"),
    (lambda: dataset_features([], [[0]], [0], 1, 2), "training tokens"),
    (lambda: dataset_features([[0]], [[0]], [], 1, 2), "training tokens"),
    (lambda: curve_features([0.0, 1.0, 2.0], [1.0, 0.5, 0.2], fit_first=0), "fit_first"),
    (lambda: fit_log_curve([0.0, 1.0, 2.0], [1.0, 0.5]), "non-negative steps as losses"),
    (lambda: fit_log_curve([-1.0, 0.0, 1.0], [1.0, 0.5, 0.2]), "non-negative steps as losses"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_entropy_skips_labels_with_zero_count():
    """0 · log 0 is taken as 0: a zero count changes nothing (and gives no NaN)."""
    assert entropy([2, 0, 2]) == pytest.approx(math.log(2))
    assert entropy([0, 7]) == 0.0


def test_a_probability_of_exactly_one_half_predicts_no_benefit():
    """Balanced gains on a constant column: w = b = 0 is the optimum, so P = ½; like scikit-learn's
    decision_function > 0, only P > ½ counts as the auxiliary task helping."""
    x = torch.ones(6, 1, dtype=torch.float64)
    model = BenefitPredictor().fit(x, torch.tensor([1.0, -1.0] * 3, dtype=torch.float64))
    assert model.probability(x).tolist() == [0.5] * 6
    assert not model.predict(x).any()


def test_the_log_fit_of_a_noisy_curve_is_a_stationary_point_of_the_squared_error():
    """Least squares: at the returned (a, b, c, d) the gradient of Σ (curve − loss)² vanishes.

    The steps start at 0, which the fit must accept (only negative steps are refused).
    """
    t = torch.arange(0, 60, dtype=torch.float64) * 10
    true = torch.tensor([3.0, -0.4, 0.05, 2.0], dtype=torch.float64)
    for seed in range(3):
        noise = 0.01 * torch.randn(60, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        losses = log_curve(t, true) + noise
        fitted = fit_log_curve(t.tolist(), losses.tolist())
        assert fitted.dtype == torch.float64
        params = fitted.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(((log_curve(t, params) - losses) ** 2).sum(), params)
        assert grad.abs().max() < 1e-8
        # the fit's squared error is no worse than the generating curve's (that is only one candidate)
        assert ((log_curve(t, fitted) - losses) ** 2).sum() <= (noise ** 2).sum()


def test_a_log_curve_given_as_python_floats_is_fitted_to_double_precision():
    """Losses passed as a list are read in float64: an exact log curve is reproduced to ~1e-12, not float32's ~1e-7."""
    t = torch.arange(1, 61, dtype=torch.float64) * 10
    losses = log_curve(t, torch.tensor([3.0, -0.4, 0.05, 2.0], dtype=torch.float64))
    fitted = fit_log_curve(t.tolist(), losses.tolist())
    assert (log_curve(t, fitted) - losses).abs().max() < 1e-10


def test_label_entropy_counts_labels_seen_once_and_features_are_double_precision():
    """Labels seen once are part of the distribution; entropy and the Frobenius norm match float64 references."""
    assert entropy([1, 3]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-12)
    counts = [1, 2, 3, 4, 5]
    reference = -math.fsum(c / 15 * math.log(c / 15) for c in counts)
    assert entropy(counts) == pytest.approx(reference, rel=1e-12)
    features = dataset_features([[0, 1, 1], [2, 1]], dev=[[0, 2]], labels=[0, 1], num_labels=2, vocab_size=4)
    assert features["fro_norm"] == pytest.approx(math.sqrt(7), rel=1e-12)
    assert features["label_entropy"] == pytest.approx(math.log(2), rel=1e-12)


def test_the_oov_rate_is_the_percentage_of_training_tokens_outside_the_known_words():
    train = [[0, 1, 1], [2, 1]]
    for known, oov_tokens in [({1, 2}, 1), ({1}, 2), ({0, 1, 2}, 0), (set(), 5)]:
        features = dataset_features(train, dev=[[0, 2]], labels=[0, 1], num_labels=2, vocab_size=4, known_words=known)
        assert features["oov_rate"] == pytest.approx(100.0 * oov_tokens / 5)


def test_predictor_reaches_the_optimum_on_a_weakly_regularised_wide_problem():
    """C = 100 and eight columns: the fit must still be the stationary point of the convex objective."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    gains = x[:, 0] + 0.5 * x[:, 1] + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    model = BenefitPredictor(c=100.0).fit(x, gains)
    w = torch.cat([model.weight, model.bias[None]]).requires_grad_(True)
    z, y = model.scale(x), torch.where(gains > 0, 1.0, -1.0).double()
    objective = 0.5 * (w ** 2).sum() + 100.0 * torch.log1p(torch.exp(-y * (z @ w[:-1] + w[-1]))).sum()
    (grad,) = torch.autograd.grad(objective, w)
    assert grad.abs().max() < 1e-4 * (1 + w.detach().abs().max())
