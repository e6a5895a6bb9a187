"""Grad-TAG (Li, Sharma & Zhang, KDD 2024): the linearised fit matches real training where the
expansion is exact, and the estimated affinities separate agreeing from conflicting tasks."""

import itertools
import math

import pytest
import torch
from torch import nn

from reference_impls.affinity.grad_tag import (
    GradTAG,
    fit_logistic,
    module_output_fn,
    round_clusters,
    sdp_clustering,
    sdp_relaxation,
    sign_projection,
)

DIM = 4


class SharedLogistic(nn.Module):
    """Every task's logit is x · θ: linear in θ, so the first-order expansion is exact."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return {t: x @ self.theta for t in "abc"}


def task_data(seed: int = 0, n: int = 120):
    """Tasks a and b share a labelling direction, task c is labelled by its opposite (noisy)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.tensor([1.5, -1.0, 0.5, 2.0], dtype=torch.float64)
    inputs, labels = {}, {}
    for task, sign in zip("abc", (1, 1, -1)):
        x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        p = torch.sigmoid(sign * x @ direction)
        inputs[task], labels[task] = x, torch.bernoulli(p, generator=g)
    return inputs, labels


def trained_directly(theta0, inputs, labels, subset, inverse_l2):
    """The subset's model trained for real (L-BFGS on the same objective, in θ − θ*)."""
    delta = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    x = torch.cat([inputs[t] for t in subset])
    y = torch.cat([labels[t] for t in subset])
    opt = torch.optim.LBFGS([delta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inverse_l2 * nn.functional.binary_cross_entropy_with_logits(
            x @ (theta0 + delta), y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return theta0 + delta.detach()


def test_sign_projection_has_entries_plus_minus_one_over_root_m_and_is_seeded():
    p = sign_projection(50, 16, torch.Generator().manual_seed(0), torch.float64)
    assert p.shape == (50, 16) and set((p * 4).unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(p, sign_projection(50, 16, torch.Generator().manual_seed(0), torch.float64))
    with pytest.raises(ValueError, match="project_dim must be at least 1"):
        sign_projection(50, 0)


def test_estimate_equals_real_training_when_the_expansion_is_exact():
    inputs, labels = task_data()
    theta0 = torch.tensor([0.3, 0.2, -0.4, 0.1], dtype=torch.float64)  # base model, not at 0
    fn, theta = module_output_fn(SharedLogistic(theta0))
    # m = 12 > d = 4: θ* + P w reaches every θ, and a large C makes the ridge on w negligible
    tag = GradTAG(fn, theta, inputs, labels, project_dim=12, inverse_l2=1e4,
                  generator=torch.Generator().manual_seed(0))
    for subset in (["a", "b"], ["a", "c"], ["c"]):
        torch.testing.assert_close(tag.estimate_parameters(subset),
                                   trained_directly(theta0, inputs, labels, subset, 1e4),
                                   atol=2e-3, rtol=0)


def test_estimated_affinity_separates_agreeing_from_conflicting_tasks():
    inputs, labels = task_data()
    held_out = task_data(seed=1)
    fn, theta = module_output_fn(SharedLogistic(torch.zeros(DIM, dtype=torch.float64)))
    tag = GradTAG(fn, theta, inputs, labels, project_dim=8, generator=torch.Generator().manual_seed(0))
    pairs = [["a", "b"], ["a", "c"], ["b", "c"]]
    affinity = tag.affinity(pairs, *held_out)  # [i, j] = −loss of i when trained with j
    losses = {tuple(p): tag.task_losses(p, *held_out) for p in pairs}
    torch.testing.assert_close(affinity[0, 1], -losses[("a", "b")]["a"])
    torch.testing.assert_close(affinity[2, 0], -losses[("a", "c")]["c"])
    assert affinity[0, 1] > affinity[0, 2] + 0.15 and affinity[1, 0] > affinity[1, 2] + 0.15
    assert (affinity.diagonal() == 0).all()


def test_per_example_gradients_come_from_the_flattened_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    wrapped = type("Wrapped", (nn.Module,), {
        "__init__": lambda self: (nn.Module.__init__(self), setattr(self, "net", model))[0],
        "forward": lambda self, x: {"t": self.net(x)},
    })()
    fn, theta = module_output_fn(wrapped)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.ones(6, dtype=torch.float64)
    tag = GradTAG(fn, theta, {"t": x}, {"t": y}, project_dim=7, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    model(x[4:5]).sum().backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(tag.features["t"][4], grad @ tag.projection)
    torch.testing.assert_close(tag.base["t"], model(x).detach().squeeze(1))
    with pytest.raises(ValueError, match="non-empty list of known tasks"):
        tag.coefficients(["u"])
    with pytest.raises(ValueError, match="inverse_l2 must be"):
        GradTAG(fn, theta, {"t": x}, {"t": y}, project_dim=7, inverse_l2=0.0)


def test_the_fit_is_stationary_for_the_ridge_plus_c_times_logistic_objective():
    """At the optimum w = C Σ_i s_i σ(−s_i (o_i + a_i · w)) a_i (gradient of ½‖w‖² + C Σ softplus)."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(30, 3, generator=g, dtype=torch.float64)
    labels = torch.bernoulli(torch.full((30,), 0.5, dtype=torch.float64), generator=g)
    offset = torch.randn(30, generator=g, dtype=torch.float64)
    signs = 2 * labels - 1
    for c in (1.0, 0.3):
        w = fit_logistic(features, labels, offset, c)
        pull = torch.sigmoid(-signs * (offset + features @ w))
        torch.testing.assert_close(w, c * features.T @ (signs * pull), atol=1e-9, rtol=0)


def test_task_losses_are_the_mean_cross_entropy_at_the_estimated_parameters():
    inputs, labels = task_data(n=30)
    fn, theta = module_output_fn(SharedLogistic(torch.zeros(DIM, dtype=torch.float64)))
    tag = GradTAG(fn, theta, inputs, labels, project_dim=6, generator=torch.Generator().manual_seed(0))
    estimated = tag.estimate_parameters(["a", "c"])
    losses = tag.task_losses(["a", "c"], inputs, labels)
    for task in "ac":
        logits = inputs[task] @ estimated
        pairs = zip(labels[task].tolist(), logits.tolist())
        by_hand = sum(math.log1p(math.exp(-(2 * y - 1) * z)) for y, z in pairs)
        assert losses[task].item() == pytest.approx(by_hand / 30)


def partition_matrix(labels: list[int]) -> torch.Tensor:
    """X = Σ_c 1_c 1_cᵀ / |c|: the integral point of the relaxation for a partition."""
    one_hot = torch.nn.functional.one_hot(torch.tensor(labels)).double()
    return one_hot @ torch.diag(1 / one_hot.sum(0)) @ one_hot.T


def test_sdp_returns_the_planted_partition_matrix_for_dense_blocks():
    blocks = [0, 0, 1, 1, 1, 2, 2, 2, 2]  # unequal sizes 2, 3, 4
    same = torch.tensor(blocks)[:, None] == torch.tensor(blocks)[None, :]
    noise = 0.2 * torch.rand(9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels, relaxed = sdp_clustering(same.double() + noise, 3)
    assert labels.tolist() == blocks
    torch.testing.assert_close(relaxed, partition_matrix(blocks), atol=1e-4, rtol=0)


def test_sdp_is_feasible_and_bounds_every_partition_of_a_random_affinity():
    affinity = torch.rand(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cost = affinity.max() - affinity
    relaxed = sdp_relaxation(cost, 2)
    assert torch.linalg.eigvalsh(relaxed).min() > -1e-5 and relaxed.min() > -1e-5
    torch.testing.assert_close(relaxed.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(relaxed.trace(), torch.tensor(2.0, dtype=torch.float64))
    value = (cost * relaxed).sum()
    partitions = [p for p in itertools.product(range(2), repeat=5) if len(set(p)) == 2]
    best = min((cost * partition_matrix(list(p))).sum() for p in partitions)
    assert value <= best + 1e-5  # a relaxation: never worse than the best partition into 2
    with pytest.raises(ValueError, match="k=6 for 5 tasks"):
        sdp_relaxation(cost, 6)


def test_rounding_joins_strictly_above_one_over_n_in_task_order_among_unassigned_tasks():
    relaxed = torch.tensor([[0.5, 0.5, 0.25, 0.0],   # 0 takes 1; X[0, 2] = 1/n exactly does not join
                            [0.5, 0.5, 0.3, 0.0],    # 1 is close to 2 but already assigned: skipped
                            [0.25, 0.3, 0.5, 0.2],   # 2 cannot take the assigned 1; 0.2 < 1/n leaves 3
                            [0.0, 0.0, 0.2, 0.5]], dtype=torch.float64)
    assert round_clusters(relaxed).tolist() == [0, 0, 1, 2]


def test_the_affinity_is_used_as_is_unless_exponentiated_by_one_over_temperature():
    affinity = torch.rand(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    affinity = (affinity + affinity.T) / 2
    _, plain = sdp_clustering(affinity, 2, tol=1e-5)
    torch.testing.assert_close(plain, sdp_relaxation(affinity.max() - affinity, 2, tol=1e-5))
    _, tempered = sdp_clustering(affinity, 2, use_exp=True, temperature=0.25, tol=1e-5)
    scaled = (4 * affinity).exp()
    torch.testing.assert_close(tempered, sdp_relaxation(scaled.max() - scaled, 2, tol=1e-5))
    assert not torch.allclose(tempered, plain, atol=1e-3)


def test_default_inverse_l2_is_one_checked_on_a_closed_form_fit():
    """One example, f_θ(x) = x·θ − 1/2 at θ* = 0 with x = 1, label 1; P = p = ±1, feature a = p.

    The fit minimises ½w² + C log(1 + exp(−(−1/2 + p w))); its stationarity condition
    w = C p σ(1/2 − p w) holds at p w = 1/2 exactly when C = 1, so w = p/2 and θ_S = P w = 1/2.
    """
    def output_fn(flat, x, task):
        return x @ flat - 0.5

    theta = torch.zeros(1, dtype=torch.float64)
    inputs, labels = {"t": torch.ones(1, 1, dtype=torch.float64)}, {"t": torch.ones(1)}
    default = GradTAG(output_fn, theta, inputs, labels, project_dim=1,
                      generator=torch.Generator().manual_seed(0))
    explicit = GradTAG(output_fn, theta, inputs, labels, project_dim=1, inverse_l2=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert default.inverse_l2 == 1.0
    p = default.projection.item()
    assert abs(p) == 1.0
    torch.testing.assert_close(default.coefficients(["t"]), torch.tensor([p / 2], dtype=torch.float64))
    torch.testing.assert_close(default.estimate_parameters(["t"]), torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(explicit.coefficients(["t"]), default.coefficients(["t"]))


def test_newton_steps_reach_the_optimum_of_the_logistic_fit_to_near_machine_precision():
    """The objective is strongly convex: damped Newton ends where w = C Σ_i s_i σ(−s_i m_i) a_i to ~1e-8,
    over several random problems (a line search that stalls on a flat step would stop far short)."""
    worst = 0.0
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        features = 3 * torch.randn(40, 3, generator=g, dtype=torch.float64)
        labels = torch.bernoulli(torch.full((40,), 0.5, dtype=torch.float64), generator=g)
        offset = torch.randn(40, generator=g, dtype=torch.float64)
        signs = 2 * labels - 1
        w = fit_logistic(features, labels, offset, 1.0)
        pull = torch.sigmoid(-signs * (offset + features @ w))
        worst = max(worst, (w - features.T @ (signs * pull)).abs().max().item())
    assert worst < 1e-8


@pytest.mark.parametrize("k", [2, 3])
def test_the_relaxed_solution_meets_the_equality_constraints_exactly(k):
    """X 1 = 1 and tr X = k hold to rounding, not only to the solver's tolerance."""
    affinity = torch.rand(6, 6, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64)
    relaxed = sdp_relaxation(affinity.max() - affinity, k)
    assert (relaxed.sum(1) - 1).abs().max() < 1e-12
    assert abs(relaxed.diagonal().sum().item() - k) < 1e-12
    assert (relaxed - relaxed.T).abs().max() < 1e-12


class DropoutLogistic(nn.Module):
    """A model that samples in training mode: dropout between two layers."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)).double()

    def forward(self, x):
        return {"t": self.net(x)}


def test_a_sampling_model_is_linearised_around_one_draw_and_evaluated_with_it():
    """The Jacobian that GradTAG projects is the derivative of the very function it evaluates:
    a central difference of the output along the projection's first column matches it."""
    torch.manual_seed(0)
    model = DropoutLogistic().train()
    fn, theta = module_output_fn(model)
    x = torch.randn(10, 3, dtype=torch.float64)
    assert torch.equal(fn(theta, x, "t"), fn(theta, x, "t"))
    tag = GradTAG(fn, theta, {"t": x}, {"t": torch.ones(10, dtype=torch.float64)}, project_dim=2,
                  generator=torch.Generator().manual_seed(1))
    direction, eps = tag.projection[:, 0], 1e-6
    difference = (fn(theta + eps * direction, x, "t") - fn(theta - eps * direction, x, "t")) / (2 * eps)
    torch.testing.assert_close(tag.features["t"][:, 0], difference, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tag.base["t"], fn(theta, x, "t"))


def test_the_seed_of_the_output_function_decides_the_draw_it_is_linearised_around():
    """``module_output_fn(model, seed)`` fixes the sampling model's draw: one seed reproduces it
    across separately built output functions, another seed draws other dropout masks."""
    model = DropoutLogistic().train()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn1, theta = module_output_fn(model, seed=1)
    fn1_again, _ = module_output_fn(model, seed=1)
    fn2, _ = module_output_fn(model, seed=2)
    assert torch.equal(fn1(theta, x, "t"), fn1_again(theta, x, "t"))
    assert not torch.equal(fn1(theta, x, "t"), fn2(theta, x, "t"))


def test_damped_newton_converges_where_full_newton_steps_overshoot():
    """f(w) = ½w² + C [softplus(L − w) + softplus(w − L)] (one positive and one negative example,
    feature 1, offsets −L) starts far from its minimum at w = 0; undamped Newton jumps to about −C.
    The optimum solves w = C tanh((L − w) / 2), found here by bisection on [0, L]."""
    big_l, c = 5.0, 1e3
    features = torch.ones(2, 1, dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    offset = torch.full((2,), -big_l, dtype=torch.float64)
    lo, hi = 0.0, big_l
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - c * math.tanh((big_l - mid) / 2) < 0 else (lo, mid)
    w = fit_logistic(features, labels, offset, c)
    assert w.item() == pytest.approx(lo, abs=1e-9)


def test_without_the_offset_the_fit_ignores_the_base_output():
    """``offset=False`` fits the projected gradients alone: shifting every base logit by a constant
    (which leaves the gradients unchanged) changes nothing, whereas with the offset it moves w_S."""
    inputs, labels = task_data(n=40)

    def shifted(shift):
        def output_fn(flat, x, task):
            return x @ flat + shift
        return output_fn

    theta = torch.zeros(DIM, dtype=torch.float64)
    fits = {}
    for offset in (False, True):
        for shift in (0.0, 2.0):
            tag = GradTAG(shifted(shift), theta, inputs, labels, project_dim=5, offset=offset,
                          generator=torch.Generator().manual_seed(0))
            fits[offset, shift] = tag.coefficients(["a", "c"])
            if not offset:
                assert all((base == 0).all() for base in tag.base.values())
    torch.testing.assert_close(fits[False, 0.0], fits[False, 2.0])
    torch.testing.assert_close(fits[False, 0.0], fits[True, 0.0])  # a zero base output is no offset
    assert not torch.allclose(fits[True, 0.0], fits[True, 2.0], atol=1e-3)


def test_integer_labels_give_the_same_fit_and_losses_as_float_labels():
    """Binary labels may come as 0/1 integers: the cross-entropy uses them as the same 0./1. targets."""
    inputs, labels = task_data(n=30)
    as_int = {t: y.long() for t, y in labels.items()}
    fn, theta = module_output_fn(SharedLogistic(torch.zeros(DIM, dtype=torch.float64)))
    tag = GradTAG(fn, theta, inputs, as_int, project_dim=6, generator=torch.Generator().manual_seed(0))
    reference = GradTAG(fn, theta, inputs, labels, project_dim=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tag.coefficients(["a", "b"]), reference.coefficients(["a", "b"]))
    got, expected = tag.task_losses(["a", "b"], inputs, as_int), reference.task_losses(["a", "b"], inputs, labels)
    for task in "ab":
        torch.testing.assert_close(got[task], expected[task])


def test_one_cluster_and_one_cluster_per_task_have_a_single_feasible_point():
    """k = 1: tr X = 1 with X ⪰ 0 and X 1 = 1 forces X = 11ᵀ/n (1ᵀX1 = n needs λ_max = 1 along 1).
    k = n: rows of X ≥ 0 summing to 1 give X_ii ≤ 1, so tr X = n forces X = I, one task per cluster."""
    affinity = torch.rand(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cost = affinity.max() - affinity
    torch.testing.assert_close(sdp_relaxation(cost, 1), torch.full((4, 4), 0.25, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    labels, relaxed = sdp_clustering(affinity, 4)
    torch.testing.assert_close(relaxed, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="k=0 for 4 tasks"):
        sdp_relaxation(cost, 0)


def test_the_final_projection_meets_the_equality_constraints_even_before_convergence():
    """The returned X is projected onto X 1 = 1, tr X = k in the cost's dtype, whatever the iterate:
    after a single ADMM iteration, far from the optimum, the constraints still hold to float64 rounding."""
    affinity = 50 * torch.rand(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for iterations in (1, 2):
        relaxed = sdp_relaxation(affinity.max() - affinity, 2, iterations=iterations)
        assert relaxed.dtype == torch.float64
        assert (relaxed.sum(1) - 1).abs().max() < 1e-12
        assert abs(relaxed.diagonal().sum().item() - 2) < 1e-12


def test_exponentiation_uses_temperature_one_by_default():
    affinity = torch.rand(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    affinity = (affinity + affinity.T) / 2
    _, default = sdp_clustering(affinity, 2, use_exp=True, tol=1e-5)
    scaled = affinity.exp()
    torch.testing.assert_close(default, sdp_relaxation(scaled.max() - scaled, 2, tol=1e-5))


def test_bad_sizes_penalties_and_temperatures_are_refused():
    with pytest.raises(ValueError, match="^dim must be at least 1"):
        sign_projection(0, 4)
    cost = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="rho"):
        sdp_relaxation(cost, 2, rho=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sdp_clustering(cost, 2, use_exp=True, temperature=0.0)
