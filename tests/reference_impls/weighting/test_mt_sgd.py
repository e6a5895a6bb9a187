"""MT-SGD: one particle is MGDA, the kernel-coupled KKT conditions, repulsion, spread on a 2-task toy."""

import math

import torch

from reference_impls.weighting.mgda import MGDA
from reference_impls.weighting.mt_sgd import MTSGD


def test_one_particle_is_mgda(grad_checks):
    for k, d, _, _, seed in grad_checks.random_cases(12, max_tasks=5, max_dim=8):
        grads = grad_checks.gradient_matrix(k, d, seed)
        ours, mgda = MTSGD()(grads), MGDA()(grads)
        if k <= d:  # full row rank: the min-norm weights are unique
            torch.testing.assert_close(ours.weights, mgda.weights, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(ours.update, mgda.update, atol=1e-9, rtol=1e-7)


def test_directions_match_a_loop_over_particles(grad_checks):
    m, k, d, h = 3, 2, 4, 2.5
    particles = grad_checks.gradient_matrix(m, d, seed=5)
    grads = torch.stack([grad_checks.gradient_matrix(k, d, seed=10 + i) for i in range(m)])
    method = MTSGD(repulsion=0.7, bandwidth=h)
    updates, w = method.directions(particles, grads)
    kappa = lambda a, b: torch.exp(-(a - b).square().sum() / h)  # noqa: E731
    q = torch.zeros(k, k, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            q += kappa(particles[i], particles[j]) * grads[i] @ grads[j].T
    torch.testing.assert_close(w, MGDA().weights_from_gramian(q))  # same simplex point as min-norm of Q
    for i in range(m):
        expected = torch.zeros(d, dtype=torch.float64)
        for j in range(m):
            kji = kappa(particles[j], particles[i])
            expected += kji * (w @ grads[j]) + 0.7 * (2 / h) * (particles[j] - particles[i]) * kji
        torch.testing.assert_close(updates[i], expected / m)


def test_median_bandwidth_is_the_true_median_over_log_m_plus_one():
    """h = median(||θ_i − θ_j||²) / log(M + 1), the median averaging the two middle entries as
    numpy's does (the authors'); with two particles the lower middle entry is a zero diagonal."""
    for particles in (torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([[0.0], [1.0], [3.0]])):
        squared = torch.cdist(particles, particles).square().flatten().sort().values
        n = len(squared)
        median = (squared[(n - 1) // 2] + squared[n // 2]) / 2
        kappa, h = MTSGD().kernel(particles)
        assert abs(h - float(median) / math.log(len(particles) + 1)) < 1e-6
        torch.testing.assert_close(kappa, torch.exp(-torch.cdist(particles, particles).square() / h))


def test_common_descent_in_the_kernel_geometry(grad_checks):
    """KKT of the min-norm problem: (Q w)_l >= wᵀ Q w for every task l."""
    method = MTSGD(repulsion=0.0)
    for seed in range(6):
        particles = grad_checks.gradient_matrix(4, 5, seed)
        grads = torch.stack([grad_checks.gradient_matrix(3, 5, 100 * seed + i) for i in range(4)])
        _, w = method.directions(particles, grads)
        kappa, _ = method.kernel(particles)
        q = torch.einsum("ij,ikd,jld->kl", kappa, grads, grads)
        assert (q @ w >= w @ q @ w - 1e-9 * q.abs().max()).all()
        assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype)) and (w >= 0).all()


def test_repulsion_pushes_particles_apart():
    particles = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    grads = torch.zeros(2, 2, 2, dtype=torch.float64)
    updates = MTSGD(repulsion=1.0).particle_updates(list(particles), list(grads))
    moved = [p - 0.1 * u for p, u in zip(particles, updates)]
    assert (moved[1] - moved[0]).norm() > (particles[1] - particles[0]).norm()
    updates = MTSGD(repulsion=0.0).particle_updates(list(particles), list(grads))
    assert all(torch.equal(u, torch.zeros(2, dtype=torch.float64)) for u in updates)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(MTSGD)
    grad_checks.check_permutation_equivariance(MTSGD)


def run_toy(repulsion: float) -> torch.Tensor:
    """L_1 = ||θ − a||², L_2 = ||θ − b||² (Pareto set: the segment [a, b]); 5 particles, 400 steps."""
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 0.0], dtype=torch.float64)
    theta = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + torch.tensor([0.0, 2.0])
    method = MTSGD(repulsion=repulsion)
    for _ in range(400):
        grads = torch.stack([torch.stack([2 * (t - a), 2 * (t - b)]) for t in theta])
        theta = theta - 0.05 * torch.stack(method.particle_updates(list(theta), list(grads)))
    return theta


def test_particles_spread_over_a_two_task_front():
    theta, plain = run_toy(0.05), run_toy(0.0)
    assert theta[:, 1].abs().max() < 0.2 and (theta[:, 0].abs() < 1.05).all()  # near the segment [b, a]
    spread, plain_spread = (theta[:, 0].max() - theta[:, 0].min()), (plain[:, 0].max() - plain[:, 0].min())
    assert spread > 0.2 and spread > 2 * plain_spread  # the repulsion spreads the particles
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 0.0], dtype=torch.float64)
    losses = torch.stack([(theta - a).square().sum(1), (theta - b).square().sum(1)], dim=1)
    for i in range(5):  # different points, none dominated by another
        for j in range(5):
            assert i == j or not (losses[j] <= losses[i]).all()


def test_short_training_lowers_the_loss(grad_checks):
    first, last = grad_checks.train_two_task_regression(MTSGD())
    assert last < first


def test_median_bandwidth_is_one_when_all_particles_coincide():
    for particles in (torch.ones(3, 2, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)):
        kappa, h = MTSGD().kernel(particles)
        assert h == 1.0
        assert torch.equal(kappa, torch.ones(len(particles), len(particles), dtype=torch.float64))


def test_weights_are_scale_free_even_where_q_would_overflow(grad_checks):
    # Q's minimiser does not change when every gradient is scaled; at 1e200 the raw Q_kl overflow float64.
    grads = grad_checks.gradient_matrix(3, 4, seed=7)
    plain, huge = MTSGD()(grads), MTSGD()(1e200 * grads)
    torch.testing.assert_close(huge.weights, plain.weights)
    torch.testing.assert_close(huge.update / 1e200, plain.update)


def test_negative_repulsion_and_non_positive_bandwidth_are_refused():
    for kwargs in ({"repulsion": -0.1}, {"bandwidth": 0.0}, {"bandwidth": -1.0}):
        try:
            MTSGD(**kwargs)
        except ValueError:
            continue
        raise AssertionError(f"{kwargs} was accepted")
    MTSGD(repulsion=0.0, bandwidth=0.5)  # no repulsion and a narrow kernel are fine


def test_default_repulsion_is_one_on_two_particles_with_no_gradient():
    # θ_0 = 0, θ_1 = e_1, zero gradients: only the repulsion acts. Squared distances are
    # [0, 1, 1, 0] (median 1/2), so h = (1/2) / log 3, and with ρ = 1
    # d_0 = (1/2) · ρ (2/h) (θ_1 − θ_0) exp(−1/h) and d_1 = −d_0.
    particles = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    updates = MTSGD().particle_updates(list(particles), list(torch.zeros(2, 2, 2, dtype=torch.float64)))
    h = 0.5 / math.log(3)
    expected = 0.5 * (2 / h) * math.exp(-1 / h) * torch.tensor([1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(updates[0], expected)
    torch.testing.assert_close(updates[1], -expected)


def test_float32_gradients_are_combined_in_float64():
    # The work is done in float64 and rounded once at the end: a float32 input gives exactly the
    # float64 result of the same values, rounded to float32.
    grads = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    single, double = MTSGD()(grads), MTSGD()(grads.double())
    assert single.update.dtype == torch.float32
    assert torch.equal(single.update, double.update.float()) and torch.equal(single.weights, double.weights.float())


def test_gradients_of_no_parameters_give_an_empty_update():
    result = MTSGD()(torch.zeros(2, 0))
    assert result.update.shape == (0,) and torch.isclose(result.weights.sum(), torch.tensor(1.0))
