"""The benchmark comparing our gradient methods with TorchJD's and LibMTL's: its test matrices, the
checks that say which side of a disagreement is exact, and its plumbing, with stand-ins for the
two libraries (neither is a dependency of this project)."""

import math
import random
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

from reference_impls.weighting import registry

from .conftest import load_script

peers = load_script("peer_agreement")


def test_cases_hold_each_kind_for_each_task_count_and_repeat_under_a_seed():
    cases = peers.gradient_cases(seed=3, tasks=[2, 5], per_kind=2, dim=16, steps=4)
    assert [(c.tasks, c.kind) for c in cases] == [(k, kind) for k in (2, 5) for kind in peers.KINDS for _ in range(2)]
    assert all(len(c.matrices) == 4 and m.shape == (c.tasks, 16) and m.dtype == torch.float64
               for c in cases for m in c.matrices)
    again = peers.gradient_cases(seed=3, tasks=[2, 5], per_kind=2, dim=16, steps=4)
    assert all(torch.equal(a, b) for c, d in zip(cases, again) for a, b in zip(c.matrices, d.matrices))
    other = peers.gradient_cases(seed=4, tasks=[2, 5], per_kind=2, dim=16, steps=4)
    assert not torch.equal(cases[0].matrices[0], other[0].matrices[0])


def test_conflicting_rows_oppose_their_neighbours_and_scaled_rows_span_a_factor_100():
    generator = torch.Generator().manual_seed(0)
    conflicting = [peers.gradient_matrix("conflicting", 4, 256, generator) for _ in range(20)]
    cosines = [torch.nn.functional.cosine_similarity(m[:-1], m[1:]) for m in conflicting]
    assert all(bool((c < -0.7).all()) for c in cosines)  # 0.3 noise against a unit shared part
    norms = torch.stack([m.norm(dim=1) for m in conflicting])  # ±(shared part) + noise: ||.||² ≈ 1.09 d
    assert norms.min() > 0.85 * (1.09 * 256) ** 0.5 and norms.max() < 1.15 * (1.09 * 256) ** 0.5
    scaled = [peers.gradient_matrix("scaled", 3, 4096, generator) for _ in range(5)]
    for matrix in scaled:
        ratios = matrix.norm(dim=1) / matrix[0].norm()
        assert ratios.tolist() == pytest.approx([1.0, 10.0, 100.0], rel=0.1)
    gaussian = peers.gradient_matrix("gaussian", 3, 4096, generator)
    assert gaussian.norm(dim=1).tolist() == pytest.approx([64.0] * 3, rel=0.05)


def test_loss_values_come_from_their_own_generator_and_each_step_is_an_epoch():
    cases = peers.gradient_cases(seed=5, tasks=[3], per_kind=2, dim=8, steps=3)
    generator = torch.Generator().manual_seed(5)  # the matrices alone, drawn as if no losses were
    expected = [peers.gradient_matrix(kind, 3, 8, generator)
                for kind in peers.KINDS for _case in range(2) for _step in range(3)]
    assert all(map(torch.equal, [m for c in cases for m in c.matrices], expected))
    losses = torch.stack([s.losses for c in cases for s in c.steps])
    assert losses.shape == (18, 3) and bool((losses > 0).all()) and losses.dtype == torch.float64
    assert losses.log().std() == pytest.approx(1.0, abs=0.35)  # log-normal: e^N(0,1)
    assert [[s.epoch for s in c.steps] for c in cases] == [[0, 1, 2]] * 6
    again = peers.gradient_cases(seed=5, tasks=[3], per_kind=2, dim=8, steps=3)
    assert torch.equal(torch.stack([s.losses for c in again for s in c.steps]), losses)
    samples = [m for c in cases for s in c.steps for m in s.samples]  # MoDo's further mini-batches
    assert len(samples) == 36 and all(m.shape == (3, 8) and m.dtype == torch.float64 for m in samples)
    assert all(map(torch.equal, samples, [m for c in again for s in c.steps for m in s.samples]))
    generator = torch.Generator().manual_seed(7)  # seed + 2, the kinds in order
    assert all(map(torch.equal, samples, [peers.gradient_matrix(kind, 3, 8, generator)
                                          for kind in peers.KINDS for _ in range(2 * 3 * 2)]))
    other = peers.gradient_cases(seed=6, tasks=[3], per_kind=2, dim=8, steps=3)
    assert not torch.equal(torch.stack([s.losses for c in other for s in c.steps]), losses)


# --- the checks that decide a disagreement --------------------------------------------------------

def matrices(count=20, tasks=3, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [peers.gradient_matrix(kind, tasks, dim, generator) for _ in range(count) for kind in peers.KINDS]


def test_the_min_norm_check_is_zero_at_mgdas_point_and_one_at_a_vertex_orthogonal_to_another_row():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert peers.mgda_residual(rows, torch.tensor([0.5, 0.5], dtype=torch.float64)) == 0.0
    assert peers.mgda_residual(rows, torch.tensor([1.0, 0.0], dtype=torch.float64)) == pytest.approx(1.0)
    assert peers.mgda_residual(rows, torch.tensor([0.6, 0.4], dtype=torch.float64)) == pytest.approx(1 - 0.4 / 0.52)
    assert peers.mgda_residual(rows, torch.tensor([0.25, 0.25], dtype=torch.float64)) == pytest.approx(1.0)  # half
    assert peers.mgda_residual(rows, torch.zeros(2, dtype=torch.float64)) == 0.0
    for matrix in matrices():
        exact = registry.make("mgda")(matrix).update
        assert peers.mgda_residual(matrix, exact) < 1e-10
        assert peers.mgda_residual(matrix, exact + 0.05 * exact.norm() * matrix[0] / matrix[0].norm()) > 1e-4


def test_the_nash_check_is_zero_at_the_bargaining_point_and_grows_when_it_is_moved():
    for matrix in matrices():
        exact = registry.make("nash_mtl")(matrix).update
        assert peers.nash_residual(matrix, exact) < 1e-10
        assert peers.nash_residual(matrix, 3.0 * exact) < 1e-10  # scale-free: only the direction counts
        moved = exact + 0.1 * exact.norm() * matrix[-1] / matrix[-1].norm()
        assert peers.nash_residual(matrix, moved) > 1e-5
    rows = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    assert peers.nash_residual(rows, torch.tensor([1.0, 0.0], dtype=torch.float64)) == 1.0  # g_2·d < 0
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert peers.nash_residual(orthogonal, torch.tensor([1.0, 0.0], dtype=torch.float64)) == 1.0  # g_2·d = 0


def test_the_cagrad_gap_is_zero_at_cagrads_update_and_measures_a_short_or_outside_update():
    for matrix in matrices():
        exact = registry.make("cagrad", c=0.5)(matrix).update
        assert peers.cagrad_gap(matrix, exact) < 1e-10
        mean = matrix.mean(0)
        assert peers.cagrad_gap(matrix, mean) > 1e-3  # the centre of the ball, never the best point here
    rows = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)  # conflicting: g_0 is not optimal
    mean = rows.mean(0)
    best = registry.make("cagrad", c=0.5)(rows).update
    shortfall = (rows @ best).min() - (rows @ mean).min()
    assert peers.cagrad_gap(rows, mean) == pytest.approx(float(shortfall / (mean @ mean)), rel=1e-9)
    far = best + 2.0 * mean.norm() * torch.tensor([0.0, 1.0], dtype=torch.float64)  # beyond the ball, and
    outside = float(((far - mean).norm() - 0.5 * mean.norm()) / mean.norm())  # g_1·d is still the least
    assert peers.cagrad_gap(rows, far) == pytest.approx(outside, rel=1e-6) and outside > 1.0


def test_the_sdmgrad_check_is_zero_at_its_update_and_tells_it_from_mgdas_and_the_mean():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # shifted: (1.15, 0.15), (0.15, 1.15)
    assert peers.sdmgrad_residual(rows, torch.tensor([0.5, 0.5], dtype=torch.float64)) == pytest.approx(0.0, abs=1e-15)
    vertex = torch.tensor([1.15, 0.15], dtype=torch.float64) / 1.3  # w = (1, 0)
    assert peers.sdmgrad_residual(rows, vertex) == pytest.approx(1 - 0.345 / 1.345)
    for matrix in matrices():
        exact = registry.make("sdmgrad")(matrix).update
        assert peers.sdmgrad_residual(matrix, exact) < 1e-10
        assert peers.sdmgrad_residual(matrix, 1.1 * exact) > 0.05  # a scale is caught
        assert peers.sdmgrad_residual(matrix, exact + 0.05 * exact.norm() * matrix[0] / matrix[0].norm()) > 1e-4
    # MGDA stops at g_1 here (g_1·(g_2 − g_1) > 0), SDMGrad keeps 0.3 / (2 x 1.3) of g_2; shifted by
    # λ g_0 = (0.45, 0.15): (1.45, 0.15) and (2.45, 1.15)
    apart = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    assert peers.sdmgrad_residual(apart, registry.make("sdmgrad")(apart).update) < 1e-14
    mgda = registry.make("mgda")(apart).update  # d = 1.3 g_1: |1 − min_k h_k·d / ||d||²| = 1.885 / 1.69 − 1
    assert peers.sdmgrad_residual(apart, mgda) == pytest.approx(1.885 / 1.69 - 1)
    assert peers.sdmgrad_residual(apart, apart.mean(0)) == pytest.approx(1 - 2.925 / 4.225)  # λ → ∞
    assert peers.sdmgrad_residual(apart, registry.make("sdmgrad", lam=1.0)(apart).update) > 0.05


# --- pairing and comparing ----------------------------------------------------------------------

def step(matrix, losses=None, epoch=0, samples=()):
    losses = torch.ones(len(matrix), dtype=matrix.dtype) if losses is None else losses
    return peers.Step(matrix, losses, epoch, samples)


def pair(theirs, factor=lambda tasks: 1.0, method="ew_grad"):
    return peers.Pair(method, "Stand-in", "settings", peers.ours(method), theirs, factor)


CASES = peers.gradient_cases(seed=1, tasks=[2, 3], per_kind=1, dim=8, steps=2)


def test_a_peer_computing_the_same_update_agrees_exactly_and_a_doubled_one_is_half_off():
    same = peers.compare(pair(lambda k: lambda s: s.matrix.sum(0)), CASES)
    assert same.differences == [0.0] * 12 and same.failures == 0
    doubled = peers.compare(pair(lambda k: lambda s: 2 * s.matrix.sum(0)), CASES)
    assert doubled.differences == pytest.approx([0.5] * 12)


def test_the_convention_factor_scales_the_peer_before_it_is_compared_and_checked():
    averaging = peers.compare(pair(lambda k: lambda s: s.matrix.mean(0), factor=float), CASES)
    assert averaging.differences == pytest.approx([0.0] * 12, abs=1e-15)
    mgda = lambda k: lambda s: registry.make("mgda")(s.matrix).update / 4  # noqa: E731
    checked = peers.compare(pair(mgda, factor=lambda k: 4.0, method="mgda"), CASES)
    assert max(checked.differences) < 1e-12 and max(checked.their_residuals) < 1e-10
    unscaled = peers.compare(pair(mgda, method="mgda"), CASES)
    assert min(unscaled.their_residuals) == pytest.approx(3.0)  # a quarter of the min-norm point is not it
    assert unscaled.our_residuals == checked.our_residuals and len(unscaled.our_residuals) == 12


def test_differences_are_counted_by_the_kind_of_matrix_they_were_measured_on():
    def wrong_when_scaled(tasks):
        def update(s):
            norms = s.matrix.norm(dim=1)
            return s.matrix.sum(0) * (1.5 if norms[-1] > 5 * norms[0] else 1)
        return update
    cases = peers.gradient_cases(seed=1, tasks=[2, 3], per_kind=2, dim=32, steps=2)
    result = peers.compare(pair(wrong_when_scaled), cases)
    assert result.kinds == tuple(c.kind for c in cases for _ in c.matrices)
    exact = peers.Agreement(pair(None, method="pcgrad"), [0.0] * 7 + [1e-6], [], [], 0, kinds=("gaussian",) * 8)
    boundary = peers.Agreement(pair(None, method="mgda"), [2e-6, 1e-6], [], [], 0, kinds=("scaled", "scaled"))
    lines = peers.apart_by_kind([result, exact, boundary]).splitlines()
    assert lines[0] == "| method | peer | peer settings | gaussian | conflicting | scaled |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2:] == ["| ew_grad | Stand-in | settings | 0 of 8 | 0 of 8 | 8 of 8 |",  # pcgrad: nothing apart
                         "| mgda | Stand-in | settings | 0 of 0 | 0 of 0 | 1 of 2 |"]  # 1e-6 itself is not


def test_each_case_gets_one_object_per_side_that_sees_its_steps_in_order():
    seen = []

    def theirs(tasks):
        steps = []
        seen.append(steps)
        return lambda s: steps.append(s.matrix) or s.matrix.sum(0)
    peers.compare(pair(theirs), CASES)
    assert len(seen) == len(CASES)
    assert all(len(steps) == len(case.matrices) and all(map(torch.equal, steps, case.matrices))
               for steps, case in zip(seen, CASES))


def test_both_sides_are_built_for_the_cases_task_count_and_get_copies_of_its_step():
    built, received = {"ours": [], "theirs": []}, []

    def side(name):
        def build(tasks):
            built[name].append(tasks)

            def update(s):
                received.append((name, s))
                result = s.matrix.sum(0) + 0 * s.losses.sum() + s.samples[0].sum(0) - s.samples[1].sum(0)
                s.matrix.mul_(0), s.losses.mul_(0), s.samples[0].mul_(2)  # a careless method overwriting its inputs
                return result
            return update
        return build
    result = peers.compare(peers.Pair("ew_grad", "Stand-in", "settings", side("ours"), side("theirs")), CASES)
    assert built["ours"] == built["theirs"] == [c.tasks for c in CASES]
    assert result.differences == [0.0] * 12  # neither side saw the other's overwritten copy
    originals = [s for c in CASES for s in c.steps]
    assert all(bool(s.matrix.abs().sum() > 0) and bool(s.losses.min() > 0) for s in originals)  # nor did the cases
    assert all(torch.equal(s.samples[0], again.samples[0]) for s, again in zip(originals, [
        s for c in peers.gradient_cases(seed=1, tasks=[2, 3], per_kind=1, dim=8, steps=2) for s in c.steps]))
    assert [name for name, _ in received] == ["ours", "theirs"] * 12
    assert all(r.epoch == s.epoch for (_, r), s in zip(received[::2], originals))


def test_differences_are_relative_even_for_small_updates():
    tiny = [peers.Case("gaussian", tuple(peers.Step(1e-4 * s.matrix, s.losses, s.epoch) for s in c.steps))
            for c in CASES]
    doubled = peers.compare(pair(lambda k: lambda s: 2 * s.matrix.sum(0)), tiny)
    assert doubled.differences == pytest.approx([0.5] * 12)


def test_a_peer_that_raises_is_counted_with_its_last_message_and_the_rest_still_compared():
    calls = iter(range(100))

    def theirs(tasks):
        return lambda s: s.matrix.sum(0) if next(calls) % 3 else (_ for _ in ()).throw(ValueError("solver gave up"))
    result = peers.compare(pair(theirs), CASES)
    assert result.failures == 4 and result.failure == "ValueError: solver gave up"
    assert result.differences == [0.0] * 8


def test_peers_see_tasks_in_order_and_the_shuffles_come_back_afterwards_even_after_an_error():
    real_randperm, real_shuffle = torch.randperm, random.shuffle
    with peers.task_order():
        assert torch.randperm(5).tolist() == [0, 1, 2, 3, 4]
        items = [3, 1, 2]
        random.shuffle(items)
        assert items == [3, 1, 2]
    assert torch.randperm is real_randperm and random.shuffle is real_shuffle
    with pytest.raises(KeyError), peers.task_order():
        raise KeyError
    assert torch.randperm is real_randperm and random.shuffle is real_shuffle


def test_the_table_shows_conventions_spreads_and_failures():
    agreements = [
        peers.Agreement(pair(None, factor=float, method="aligned_mtl"), [1e-16, 3e-16, 2e-15], [], [], 0),
        peers.Agreement(pair(None, method="mgda"), [0.5, 1e-6, 1.1e-6], [1e-15], [0.25], 2, "ValueError: x"),
    ]
    lines = peers.table(agreements).splitlines()
    assert lines[0] == ("| method | peer | peer settings | ours = x · theirs | difference: median / largest |"
                        " steps apart by > 1e-06 | residual, ours | residual, theirs | peer failed |")
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| aligned_mtl | Stand-in | settings | K | 3.0e-16 / 2.0e-15 | 0 of 3 | - | - |  |"
    assert lines[3] == ("| mgda | Stand-in | settings | 1 | 1.1e-06 / 5.0e-01 | 2 of 3 | 1.0e-15 / 1.0e-15 |"
                        " 2.5e-01 / 2.5e-01 | 2 |")
    assert len(lines) == 4 and lines[1].count("|") == lines[0].count("|") == 10


def run_steps(build, steps):
    update = build(len(steps[0].matrix))
    return [update(s) for s in steps]


def loss_steps(tasks=3, dim=5, epochs=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [step(torch.randn(tasks, dim, generator=generator, dtype=torch.float64),
                 torch.rand(tasks, generator=generator, dtype=torch.float64) + 0.5, epoch) for epoch in range(epochs)]


def test_a_loss_weighting_update_is_the_gradient_of_its_objective_through_the_losses():
    steps = loss_steps()
    for s, update in zip(steps, run_steps(peers.ours_loss(lambda k: registry.make("ew")), steps)):
        assert torch.allclose(update, s.matrix.sum(0), rtol=1e-14, atol=0)
    for s, update in zip(steps, run_steps(peers.ours_loss(lambda k: registry.make("gls")), steps)):
        geometric = s.losses.prod() ** (1 / 3)  # ∂(Π L)^(1/K)/∂L_k = G / (K L_k)
        assert torch.allclose(update, (geometric / (3 * s.losses)) @ s.matrix, rtol=1e-12, atol=0)
    dwa = run_steps(peers.ours_loss(lambda k: registry.make("dwa", temperature=2.0)), steps)
    assert torch.allclose(dwa[0], steps[0].matrix.sum(0)) and torch.allclose(dwa[1], steps[1].matrix.sum(0))
    ratios = steps[1].losses / steps[0].losses  # epoch 2 weighs by the change from epoch 0 to epoch 1
    weights = 3 * torch.softmax(ratios / 2.0, dim=0)
    assert torch.allclose(dwa[2], weights @ steps[2].matrix, rtol=1e-12, atol=0)
    assert not torch.allclose(dwa[2], steps[2].matrix.sum(0), rtol=1e-3)
    uw = run_steps(peers.ours_loss(lambda k: registry.make("uw", num_tasks=k, init_log_variance=-0.5)), steps)
    assert torch.allclose(uw[0], 0.5 * math.exp(0.5) * steps[0].matrix.sum(0), rtol=1e-6, atol=0)  # 1 / (2σ²)


def test_the_losses_after_a_step_follow_the_summed_gradient_and_stay_above_half():
    for s in loss_steps(seed=4) + [step(torch.randn(3, 5, dtype=torch.float64) * 1e3, torch.rand(3) + 0.1)]:
        after = peers.losses_after(s)
        drop = s.matrix @ s.matrix.sum(0)
        assert torch.allclose(s.losses - after, 0.5 * s.losses.min() / drop.abs().max() * drop, rtol=1e-12, atol=0)
        assert bool((after >= 0.5 * s.losses - 1e-12).all()) and not torch.equal(after, s.losses)
    still = step(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(peers.losses_after(still), still.losses)


def test_famo_moves_its_logits_with_the_losses_after_each_step():
    steps = loss_steps(seed=5)
    make = lambda k: registry.make("famo", num_tasks=k, lr=0.025, gamma=1e-3, logit_optimizer="adam")  # noqa: E731
    updates = run_steps(peers.ours_loss(make, after=True), steps)
    direct = make(3)
    for s, update in zip(steps, updates):
        weights = direct.weights(s.losses)
        assert torch.allclose(update, weights.to(s.matrix) @ s.matrix, rtol=1e-12, atol=0)
        direct.update(peers.losses_after(s))
    frozen = run_steps(peers.ours_loss(make), steps)  # without the updates the logits stay at 0
    assert torch.allclose(frozen[0], updates[0]) and not torch.allclose(frozen[2], updates[2], rtol=1e-4)
    paired = next(p for p in peers.libmtl_pairs(lambda name: AbsWeighting, dim=5) if p.method == "famo")
    assert all(map(torch.equal, run_steps(paired.ours, steps), updates))  # the pairing's side updates too


def test_db_mtl_gets_the_gradients_of_the_log_losses_in_its_state_across_steps():
    steps = loss_steps(seed=1)
    updates = run_steps(peers.ours_db_mtl(beta=0.5, beta_sigma=0.5), steps)
    direct = registry.make("db_mtl", beta=0.5, beta_sigma=0.5)
    for s, update in zip(steps, updates):
        assert torch.allclose(update, direct(s.matrix / (s.losses + 1e-8)[:, None]).update, rtol=1e-12, atol=0)


def test_modo_steps_its_weights_with_two_samples_and_combines_the_third():
    generator = torch.Generator().manual_seed(2)
    draw = lambda: torch.randn(3, 5, generator=generator, dtype=torch.float64)  # noqa: E731
    steps = [step(draw(), samples=(draw(), draw())) for _ in range(3)]
    direct = registry.make("modo", gamma=0.3, rho=0.1)
    for s, update in zip(steps, run_steps(peers.ours_modo(gamma=0.3, rho=0.1), steps)):
        assert torch.equal(update, direct(s.matrix, s.samples[0], s.samples[1]).update)
    weighting = []
    torchjd_side = peers.product_weighting(lambda: lambda product: weighting.append(product) or torch.full((3,), 1 / 3,
                                                                                                 dtype=torch.float64))
    assert torch.allclose(torchjd_side(3)(steps[0]), steps[0].samples[1].mean(0))
    assert torch.equal(weighting[0], steps[0].matrix @ steps[0].samples[0].T)  # J1 J2ᵀ


def test_one_batch_gives_a_three_batch_method_the_steps_matrix_three_times():
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    s = step(matrix, samples=(torch.randn(3, 5, generator=generator, dtype=torch.float64),) * 2)
    products = []
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    build = peers.one_batch(peers.product_weighting(lambda: lambda product: products.append(product) or weights))
    assert torch.equal(build(3)(s), weights @ matrix)
    assert torch.equal(products[0], matrix @ matrix.T)  # J Jᵀ: the Gramian
    assert not torch.equal(s.samples[0], matrix)  # the step itself is left as it was


def test_sgd_built_during_the_call_gets_the_learning_rate_and_keeps_its_other_options():
    real_sgd, weight = torch.optim.SGD, torch.zeros(2, requires_grad=True)
    with peers.sgd_learning_rate(0.5):
        by_keyword = torch.optim.SGD([weight], lr=5, momentum=0.5)
        by_position = torch.optim.SGD([weight], 5, 0.25)
        unset = torch.optim.SGD([weight], momentum=0.5, nesterov=True)
    assert isinstance(by_keyword, real_sgd) and torch.optim.SGD is real_sgd
    assert [(o.defaults["lr"], o.defaults["momentum"]) for o in (by_keyword, by_position, unset)] == [
        (0.5, 0.5), (0.5, 0.25), (0.5, 0.5)] and unset.defaults["nesterov"]
    with pytest.raises(KeyError), peers.sgd_learning_rate(0.5):
        raise KeyError
    assert torch.optim.SGD is real_sgd


def test_libmtls_sdmgrad_rows_differ_in_the_inner_learning_rate_only_where_they_say_so():
    built = []

    class InnerSGD(AbsWeighting):
        def backward(self, losses, **settings):
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5, momentum=0.5)
            built.append((optimizer.defaults["lr"], optimizer.defaults["momentum"], settings["SDMGrad_niter"]))
            super().backward(losses, weights=[1.0] * self.task_num)
    pairs = [p for p in peers.libmtl_pairs(lambda name: InnerSGD, dim=5) if p.method == "sdmgrad"]
    matrix = peers.gradient_matrix("gaussian", 3, 5, torch.Generator().manual_seed(0))
    for p in pairs:
        assert torch.allclose(p.theirs(3)(step(matrix, samples=(2 * matrix, 3 * matrix))), matrix.sum(0))  # one batch
    assert built == [(5, 0.5, 20), (0.5, 0.5, 5000)] and torch.optim.SGD.__module__ == "torch.optim.sgd"


def test_libmtls_loss_buffer_holds_the_mean_losses_of_each_finished_epoch():
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 2.0], [3.0, 6.0], [5.0, 7.0]))
    seen = {0: [a, b], 1: [c]}
    assert peers.epoch_means(seen, 2, before=0).tolist() == [[0.0], [0.0]]
    assert peers.epoch_means(seen, 2, before=1).tolist() == [[2.0], [4.0]]
    assert peers.epoch_means(seen, 2, before=3).tolist() == [[2.0, 5.0, 0.0], [4.0, 7.0, 0.0]]


# --- the two libraries, through stand-ins ----------------------------------------------------------

class Recording:
    """Stands in for a TorchJD class: keeps its settings; sums the rows, or reports the order
    ``torch.randperm`` gives it (PCGrad, GradVac shuffle with it)."""

    def __init__(self, name, **settings):
        self.name, self.settings = name, settings

    def __call__(self, matrix):
        order = torch.randperm(len(matrix)).to(matrix.dtype)
        return matrix.sum(0) if self.name not in ("PCGrad", "GradVac") else order


def stand_in_torchjd():
    made = []

    def factory(name):
        return lambda **settings: made.append(Recording(name, **settings)) or made[-1]
    names = ["Sum", "MGDA", "IMTLG", "UPGrad", "AlignedMTL", "CAGrad", "ConFIG", "FairGrad", "NashMTL", "PCGrad",
             "GradVac", "ExcessMTL", "Random", "GradDrop", "MoDoWeighting", "SDMGradWeighting"]
    aggregation = SimpleNamespace(**{name: factory(name) for name in names})
    linalg = SimpleNamespace(QuadprogProjector=lambda **settings: ("projector", settings))
    return SimpleNamespace(aggregation=aggregation, linalg=linalg), made


def test_torchjd_is_called_with_tasks_in_order_and_ours_with_random_order_off():
    torchjd, _ = stand_in_torchjd()
    pcgrad = next(p for p in peers.torchjd_pairs(torchjd) if p.method == "pcgrad")
    assert pcgrad.theirs(6)(step(torch.zeros(6, 2, dtype=torch.float64))).tolist() == [0, 1, 2, 3, 4, 5]
    gradvac = next(p for p in peers.torchjd_pairs(torchjd) if p.method == "gradvac")
    matrix = peers.gradient_matrix("conflicting", 5, 8, torch.Generator().manual_seed(0))
    ordered = registry.make("gradvac", beta=0.5, random_order=False)
    assert torch.equal(gradvac.ours(5)(step(matrix)), ordered(matrix).update)
    assert torch.equal(next(p for p in peers.torchjd_pairs(torchjd) if p.method == "pcgrad").ours(5)(step(matrix)),
                       registry.make("pcgrad", random_order=False)(matrix).update)


class AbsWeighting(torch.nn.Module):
    """Stands in for LibMTL's base class as its methods use it: per-task gradients of the shared
    parameters by autograd, flattened into a matrix in the *default* dtype (as LibMTL's are)."""

    def init_param(self):
        self.steps = 0

    def update_w(self, losses):  # FAMO's second call, after the network's step
        self.told_after = losses

    def backward(self, losses, **settings):
        if losses.ndim == 2:  # three mini-batches (MoDo): the update combines the last one's gradients
            self.batches = len(losses)
            losses = losses[-1]
        params = list(self.get_share_params())
        grads = torch.zeros(self.task_num, sum(p.numel() for p in params))
        for k in range(self.task_num):
            grads[k] = torch.cat([g.flatten() for g in torch.autograd.grad(losses[k], params, retain_graph=True)])
        self.zero_grad_share_params()
        self.grads_shape = tuple(grads.shape)
        self.steps += 1
        weights = torch.tensor(settings["weights"], dtype=grads.dtype) * self.steps
        params[0].grad.copy_((weights @ grads).view_as(params[0]))
        items = list(range(self.task_num))
        random.shuffle(items)
        self.last_order = items


def test_the_libmtl_probe_gives_the_method_exactly_our_rows_and_reads_its_update_back():
    probe = peers.libmtl_probe(AbsWeighting, tasks=3, dim=5)
    matrix = peers.gradient_matrix("scaled", 3, 5, torch.Generator().manual_seed(2)) * 1e-3
    update = probe.update(step(matrix, samples=(2 * matrix, 3 * matrix)), weights=[1.0, -2.0, 0.5])
    assert not hasattr(probe, "batches")  # K losses of the step's own matrix, not three batches
    assert update.dtype == torch.float64
    assert torch.allclose(update, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) @ matrix, rtol=1e-14, atol=0)
    assert probe.last_order == [0, 1, 2] and torch.get_default_dtype() == torch.float32
    again = probe.update(step(matrix), weights=[1.0, 0.0, 0.0])  # the same object: its state carries over
    assert torch.allclose(again, 2 * matrix[0], rtol=1e-14, atol=0)
    assert probe.task_name == ["task0", "task1", "task2"] and probe.rep_grad is False
    assert probe.grads_shape == (3, 5)  # the method sees the K x d rows, nothing more


def test_libmtls_famo_is_told_the_losses_after_each_step_as_its_trainer_does():
    told = []

    class AfterStep(AbsWeighting):
        def backward(self, losses, **settings):
            super().backward(losses, weights=[1.0] * self.task_num)

        def update_w(self, losses):
            told.append((losses.clone(), torch.get_default_dtype()))
    probe_side = peers.libmtl_pairs(lambda name: AfterStep, dim=5)
    famo = next(p for p in probe_side if p.method == "famo")
    other = next(p for p in probe_side if p.method == "gls")
    steps = loss_steps(seed=6)
    for build in (famo.theirs, other.theirs):
        update = build(3)
        for s in steps:
            update(s)
    assert len(told) == 3  # FAMO only
    assert all(torch.equal(losses, peers.losses_after(s)) and dtype == torch.float64
               for (losses, dtype), s in zip(told, steps))


def test_the_probe_hands_a_three_batch_method_each_sample_as_a_batch_of_losses():
    seen = []

    class ThreeBatches(AbsWeighting):
        def backward(self, losses, **settings):
            seen.append(torch.stack([torch.autograd.grad(row.sum(), self.encoder.weight, retain_graph=True)[0][0]
                                     for batch in losses for row in batch[:, None]]).view(3, 2, 4))
            super().backward(losses, weights=[1.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    matrices = [torch.randn(2, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    probe = peers.libmtl_probe(ThreeBatches, tasks=2, dim=4, three_batches=True)
    update = probe.update(step(matrices[0], samples=tuple(matrices[1:])))
    assert torch.allclose(seen[0], torch.stack(matrices)) and probe.batches == 3
    assert torch.allclose(update, matrices[2].sum(0)) and probe.decoders == {}


def test_the_probe_sets_the_epoch_and_loss_buffer_as_libmtls_trainer_does_and_passes_the_losses():
    seen = []

    class LossReader(AbsWeighting):
        def backward(self, losses, **settings):
            seen.append((self.epoch, self.train_loss_buffer.copy(), losses.detach().clone()))
            super().backward(losses, weights=[1.0, 1.0])
    probe = peers.libmtl_probe(LossReader, tasks=2, dim=3)
    steps = [step(torch.ones(2, 3, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), epoch)
             for v, epoch in (([1.0, 2.0], 0), ([3.0, 4.0], 0), ([5.0, 8.0], 1), ([1.0, 1.0], 2))]
    for s in steps:
        probe.update(s)
    assert [epoch for epoch, _, _ in seen] == [0, 0, 1, 2]
    assert [buffer.tolist() for _, buffer, _ in seen] == [[[0.0], [0.0]], [[0.0], [0.0]], [[2.0], [3.0]],
                                                          [[2.0, 5.0], [3.0, 8.0]]]
    assert all(torch.equal(losses, s.losses) for (_, _, losses), s in zip(seen, steps))


@pytest.fixture
def fake_libmtl(tmp_path, monkeypatch):
    """A checkout holding LibMTL/weighting/Probe_Me.py; the modules it adds are removed after."""
    folder = tmp_path / "LibMTL" / "weighting"
    folder.mkdir(parents=True)
    (tmp_path / "LibMTL" / "__init__.py").write_text("import torch_geometric\n")
    (folder / "__init__.py").write_text("")
    (folder / "Probe_Me.py").write_text("import torch\nclass Probe_Me:\n    symeig = staticmethod(torch.symeig)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "torch_geometric", raising=False)
    monkeypatch.setattr(torch, "symeig", None, raising=False)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_libmtl_loads_from_a_checkout_with_a_graph_library_stub_and_a_symeig_shim(fake_libmtl):
    weighting = peers.import_libmtl(fake_libmtl)
    probe_me = weighting("Probe_Me")
    assert probe_me.__name__ == "Probe_Me" and isinstance(sys.modules["torch_geometric"], ModuleType)
    matrix = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    values, vectors = probe_me.symeig(matrix, eigenvectors=True)
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, matrix) and values[0] < values[1]


def test_libmtl_gets_numpy_1s_alltrue_back_under_numpy_2(fake_libmtl, monkeypatch):
    monkeypatch.setattr(np, "alltrue", None, raising=False)  # so that the test's changes are undone
    monkeypatch.delattr(np, "alltrue")  # as in NumPy 2
    peers.import_libmtl(fake_libmtl)
    assert np.alltrue is np.all
    monkeypatch.setattr(np, "alltrue", own := lambda values: True)
    peers.import_libmtl(fake_libmtl)
    assert np.alltrue is own  # a NumPy that has it keeps its own


# (peer, the settings shown) -> (our method, our settings, their class, their settings, ours = x · theirs at K = 4)
EXPECTED_PAIRS = {
    ("TorchJD", "Sum()"): ("ew_grad", {}, "Sum", {}, 1),
    ("TorchJD", "MGDA() defaults"): ("mgda", {}, "MGDA", {}, 1),
    ("TorchJD", "MGDA(epsilon=1e-12, max_iters=100000)"):
        ("mgda", {}, "MGDA", {"epsilon": 1e-12, "max_iters": 100_000}, 1),
    ("TorchJD", "IMTLG()"): ("imtl_g", {}, "IMTLG", {}, 1),
    ("TorchJD", "UPGrad() defaults"): ("upgrad", {}, "UPGrad", {}, 1),
    ("TorchJD", "UPGrad(projector with norm_eps=0, reg_eps=0)"):
        ("upgrad", {}, "UPGrad", {"projector": ("projector", {"norm_eps": 0.0, "reg_eps": 0.0})}, 1),
    ("TorchJD", "AlignedMTL()"): ("aligned_mtl", {}, "AlignedMTL", {}, 4),  # TorchJD averages, we sum
    ("TorchJD", "CAGrad(c=0.5)"): ("cagrad", {"c": 0.5}, "CAGrad", {"c": 0.5}, 1),
    ("TorchJD", "ConFIG()"): ("config", {}, "ConFIG", {}, 1),
    ("TorchJD", "FairGrad(alpha=1)"): ("fairgrad", {"alpha": 1.0}, "FairGrad", {"alpha": 1.0}, 1),
    ("TorchJD", "NashMTL(max_norm=0)"): ("nash_mtl", {}, "NashMTL", {"n_tasks": 4, "max_norm": 0.0}, 1),
    ("TorchJD", "PCGrad(), tasks in order"): ("pcgrad", {"random_order": False}, "PCGrad", {}, 1),
    ("TorchJD", "GradVac(beta=0.5), tasks in order"):
        ("gradvac", {"beta": 0.5, "random_order": False}, "GradVac", {"beta": 0.5}, 1),
    ("TorchJD", "ExcessMTL() defaults (n_warmup_steps=0)"): ("excessmtl", {}, "ExcessMTL", {}, 4),
    ("TorchJD", "ExcessMTL(n_warmup_steps=1)"): ("excessmtl", {}, "ExcessMTL", {"n_warmup_steps": 1}, 4),
    ("TorchJD", "MoDoWeighting(gamma=0.1, rho=0) on J1 J2ᵀ, update λᵀ J3"):
        ("modo", {"gamma": 0.1, "rho": 0.0}, "MoDoWeighting", {"gamma": 0.1, "rho": 0.0}, 1),
    ("TorchJD", "SDMGradWeighting() defaults (lr=10, n_iter=20) on J Jᵀ, one batch"):
        ("sdmgrad", {}, "SDMGradWeighting", {}, 1),
    ("TorchJD", "SDMGradWeighting(n_iter=5000) (lr=10) on J Jᵀ, one batch"):
        ("sdmgrad", {}, "SDMGradWeighting", {"n_iter": 5000}, 1),
    ("TorchJD", "SDMGradWeighting(lr=0.5, n_iter=5000) on J Jᵀ, one batch"):
        ("sdmgrad", {}, "SDMGradWeighting", {"lr": 0.5, "n_iter": 5000}, 1),
    ("LibMTL", "MGDA, mgda_gn='none'"): ("mgda", {}, "MGDA", {"mgda_gn": "none"}, 1),
    ("LibMTL", "IMTL (loss scales at their start, 1)"): ("imtl_g", {}, "IMTL", {}, 1),
    ("LibMTL", "UPGrad, norm_eps=reg_eps=1e-4 (its defaults)"):
        ("upgrad", {}, "UPGrad", {"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4}, 1),
    ("LibMTL", "UPGrad, norm_eps=0, reg_eps=0"):
        ("upgrad", {}, "UPGrad", {"UPGrad_norm_eps": 0.0, "UPGrad_reg_eps": 0.0}, 1),
    ("LibMTL", "Aligned_MTL"): ("aligned_mtl", {}, "Aligned_MTL", {}, 1),
    ("LibMTL", "CAGrad, calpha=0.5, rescale=0"): ("cagrad", {"c": 0.5}, "CAGrad", {"calpha": 0.5, "rescale": 0}, 1),
    ("LibMTL", "FairGrad, alpha=1"): ("fairgrad", {"alpha": 1.0}, "FairGrad", {"FairGrad_alpha": 1.0}, 1),
    ("LibMTL", "Nash_MTL, max_norm=0, optim_niter=20"):
        ("nash_mtl", {}, "Nash_MTL", {"update_weights_every": 1, "optim_niter": 20, "max_norm": 0.0}, 1),
    ("LibMTL", "PCGrad, tasks in order"): ("pcgrad", {"random_order": False}, "PCGrad", {}, 1),
    ("LibMTL", "GradVac, beta=0.5, whole model, tasks in order"):
        ("gradvac", {"beta": 0.5, "random_order": False}, "GradVac", {"GradVac_beta": 0.5, "GradVac_group_type": 0}, 1),
    ("LibMTL", "ExcessMTL, robust_step_size=1"): ("excessmtl", {}, "ExcessMTL", {"robust_step_size": 1.0}, 1),
    ("LibMTL", "EW"): ("ew", {}, "EW", {}, 1),
    ("LibMTL", "GLS"): ("gls", {}, "GLS", {}, 1),
    ("LibMTL", "UW (log-variances start at -0.5 on both sides)"):
        ("uw", {"num_tasks": 4, "init_log_variance": -0.5}, "UW", {}, 1),
    ("LibMTL", "DWA, T=2"): ("dwa", {"temperature": 2.0}, "DWA", {"T": 2.0}, 1),
    ("LibMTL", "DB_MTL, DB_beta=0.9, DB_beta_sigma=0"):
        ("db_mtl", {"beta": 0.9, "beta_sigma": 0.0}, "DB_MTL", {"DB_beta": 0.9, "DB_beta_sigma": 0.0}, 1),
    ("LibMTL", "MoDo, gamma=0.1, rho=0 (three mini-batches)"):
        ("modo", {"gamma": 0.1, "rho": 0.0}, "MoDo", {"MoDo_gamma": 0.1, "MoDo_rho": 0.0}, 1),
    ("LibMTL", "FAMO, w_lr=0.025, w_gamma=1e-3 (Adam on the logits)"):
        ("famo", {"num_tasks": 4, "lr": 0.025, "gamma": 1e-3, "logit_optimizer": "adam"}, "FAMO",
         {"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3}, 1),
    ("LibMTL", "SDMGrad, lamda=0.3, niter=20 (inner SGD lr 5), one batch"):
        ("sdmgrad", {}, "SDMGrad", {"SDMGrad_lamda": 0.3, "SDMGrad_niter": 20}, 1),
    ("LibMTL", "SDMGrad, lamda=0.3, niter=5000, inner SGD lr set to 0.5, one batch"):
        ("sdmgrad", {}, "SDMGrad", {"SDMGrad_lamda": 0.3, "SDMGrad_niter": 5000}, 1),
}


def test_every_pairing_gives_each_side_the_settings_its_row_shows(monkeypatch):
    """What each row of the table says it compares is what runs: our method and settings (our
    registry, recorded), the library's class and settings (stand-ins, recorded), the factor."""
    made, real_make = [], registry.make
    monkeypatch.setattr(peers.registry, "make", lambda name, **settings: made.append((name, settings))
                        or real_make(name, **settings))
    torchjd, constructed = stand_in_torchjd()
    called, loss_shapes, three_batches = [], [], set()

    def weighting(name):
        class Recorder(AbsWeighting):
            def backward(self, losses, **settings):
                called.append((name, settings))
                loss_shapes.append(tuple(losses.shape))
                super().backward(losses, weights=[1.0] * self.task_num)
        return Recorder
    seen = {}
    for p in peers.torchjd_pairs(torchjd) + peers.libmtl_pairs(weighting, dim=5):
        generator = torch.Generator().manual_seed(0)
        s = step(peers.gradient_matrix("gaussian", 4, 5, generator), torch.rand(4, dtype=torch.float64) + 0.5,
                 samples=tuple(peers.gradient_matrix("gaussian", 4, 5, generator) for _ in range(2)))
        p.ours(4)(s)
        p.theirs(4)(s)
        theirs = (constructed[-1].name, constructed[-1].settings) if p.peer == "TorchJD" else called[-1]
        seen[(p.peer, p.settings)] = (p.method, made[-1][1], *theirs, p.factor(4))
        assert made[-1][0] == p.method
        if p.peer == "LibMTL" and loss_shapes.pop() == (3, 4):
            three_batches.add(p.settings)
    assert seen == EXPECTED_PAIRS
    assert three_batches == {"MoDo, gamma=0.1, rho=0 (three mini-batches)",  # the others get K losses
                             "SDMGrad, lamda=0.3, niter=20 (inner SGD lr 5), one batch",
                             "SDMGrad, lamda=0.3, niter=5000, inner SGD lr set to 0.5, one batch"}


def stand_in_torchjd_imported(monkeypatch):
    torchjd, _ = stand_in_torchjd()
    for name, module in (("torchjd", torchjd), ("torchjd.aggregation", torchjd.aggregation),
                         ("torchjd.linalg", torchjd.linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    return torchjd


def test_main_compares_every_pair_the_stand_in_torchjd_offers(monkeypatch, capsys):
    stand_in_torchjd_imported(monkeypatch)
    peers.main(["--tasks", "2", "--per-kind", "1", "--steps", "1", "--dim", "4", "--only", "ew_grad", "mgda"])
    out = capsys.readouterr().out
    assert out.startswith("3 cases x 1 steps, K in [2], d = 4, float64, seed 0\n")
    first, by_kind = out.split("Steps apart by > 1e-06, by kind of matrix:")
    rows = [line for line in first.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0:3] for r in rows] == [["| ew_grad", "TorchJD", "Sum()"],
                                                   ["| mgda", "TorchJD", "MGDA() defaults"],
                                                   ["| mgda", "TorchJD", "MGDA(epsilon=1e-12, max_iters=100000)"]]
    assert rows[0].split(" | ")[4:6] == ["0.0e+00 / 0.0e+00", "0 of 3"]  # the stand-in sums, as ew_grad does
    # ... and not as MGDA does (its rows are not orthogonal): both MGDA pairings are listed by kind
    assert [line.split(" | ")[:3] for line in by_kind.strip().splitlines()[2:]] == [
        ["| mgda", "TorchJD", "MGDA() defaults"], ["| mgda", "TorchJD", "MGDA(epsilon=1e-12, max_iters=100000)"]]


def test_main_without_any_peer_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchjd", None)  # import fails
    with pytest.raises(SystemExit, match="install torchjd or give --libmtl"):
        peers.main(["--tasks", "2"])
    assert "TorchJD not compared" in capsys.readouterr().out


def test_main_refuses_a_libmtl_folder_without_the_package(tmp_path, capsys):
    with pytest.raises(SystemExit):
        peers.main(["--libmtl", str(tmp_path)])
    assert f"--libmtl {tmp_path}: no LibMTL/weighting/ folder there" in capsys.readouterr().err


def test_main_runs_the_documented_grid_by_default_and_takes_an_integer_seed(monkeypatch, capsys):
    stand_in_torchjd_imported(monkeypatch)
    asked = []
    monkeypatch.setattr(peers, "gradient_cases", lambda *args: asked.append(args) or CASES)
    peers.main(["--only", "ew_grad"])
    peers.main(["--only", "ew_grad", "--seed", "7"])
    assert asked == [(0, [2, 3, 5], 10, 64, 3), (7, [2, 3, 5], 10, 64, 3)]  # seed, tasks, per kind, d, steps
    assert capsys.readouterr().out.startswith("6 cases x 3 steps, K in [2, 3, 5], d = 64, float64, seed 0\n")


def test_main_reports_how_often_a_peer_failed_and_its_last_message(monkeypatch, capsys):
    torchjd = stand_in_torchjd_imported(monkeypatch)

    def failing(**settings):
        return lambda matrix: (_ for _ in ()).throw(RuntimeError("no convergence"))
    monkeypatch.setattr(torchjd.aggregation, "Sum", failing)
    peers.main(["--only", "ew_grad", "--tasks", "2", "--per-kind", "1", "--steps", "2", "--dim", "3"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith("TorchJD Sum(): failed on 6 steps; last: RuntimeError: no convergence")
    assert "| ew_grad | TorchJD | Sum() | 1 | - | 0 of 0 | - | - | 6 |" in out


LIBMTL_EW = '''import torch


class EW(torch.nn.Module):
    """As LibMTL's: the plain sum of the losses, back-propagated."""

    def init_param(self):
        pass

    def backward(self, losses, **settings):
        losses.sum().backward()
'''


LIBMTL_RLW = '''import torch


class RLW(torch.nn.Module):
    """As LibMTL's: softmax of fresh normal draws as the loss weights."""

    def init_param(self):
        pass

    def backward(self, losses, **settings):
        (torch.softmax(torch.randn(len(losses)), dim=0) @ losses).backward()
'''


def test_main_compares_a_libmtl_checkout_next_to_torchjd(fake_libmtl, monkeypatch, capsys):
    (fake_libmtl / "LibMTL" / "weighting" / "EW.py").write_text(LIBMTL_EW)
    (fake_libmtl / "LibMTL" / "weighting" / "RLW.py").write_text(LIBMTL_RLW)
    stand_in_torchjd_imported(monkeypatch)
    peers.main(["--libmtl", str(fake_libmtl), "--only", "ew", "ew_grad", "rlw_grad", "--tasks", "2", "3",
                "--per-kind", "1", "--steps", "2", "--dim", "3", "--draws", "20"])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("| ew")] == [
        "| ew_grad | TorchJD | Sum() | 1 | 0.0e+00 / 0.0e+00 | 0 of 12 | - | - |  |",
        "| ew | LibMTL | EW | 1 | 0.0e+00 / 0.0e+00 | 0 of 12 | - | - |  |"]
    assert [line.split(" | ")[:3] for line in lines if line.startswith("| rlw_grad")] == [
        ["| rlw_grad", "TorchJD", "Random()"], ["| rlw_grad", "LibMTL", "RLW"]]


# --- random methods, compared in distribution -----------------------------------------------------

def samples(method, matrix, draws=2000, seed=0, **settings):
    made = registry.make(method, generator=torch.Generator().manual_seed(seed), **settings)
    return torch.stack([made(matrix).update for _ in range(draws)])


MATRIX = peers.gradient_matrix("conflicting", 3, 16, torch.Generator().manual_seed(3))


def test_samples_of_one_distribution_agree_and_a_shift_or_a_wider_spread_shows():
    first, second = samples("rlw_grad", MATRIX, seed=1), samples("rlw_grad", MATRIX, seed=2)
    assert peers.moment_z(first, first) == 0.0
    assert peers.moment_z(first, second) < 5
    assert peers.moment_z(first, second + 0.25 * second.std(0)) > 5  # a shift of a quarter of a spread (z ≈ 8)
    widened = second.mean(0) + 1.2 * (second - second.mean(0))  # same mean, 20 % wider
    assert peers.moment_z(first, widened) > 5


def test_coordinates_that_never_vary_count_as_equal_only_when_they_agree():
    steady = torch.ones(50, 2, dtype=torch.float64)
    assert peers.moment_z(steady, steady + 1e-15) == pytest.approx(0.0, abs=1e-2)
    assert peers.moment_z(steady, steady + 1e-6) > 100
    large = 1000 * steady  # the allowance scales with the values: 1e-12 of 1000
    assert peers.moment_z(large, large + 1e-11) < 0.1


def test_each_coordinate_is_tested_against_its_own_spread():
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randn(2000, 2, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 100.0])
                     for _ in range(2))
    second[:, 0] += 0.5  # half a spread in the narrow coordinate: z ≈ 16 against its own spread
    assert peers.moment_z(first, second) > 10


def test_draws_come_from_one_object_each_on_its_own_copy_of_the_step():
    matrix = MATRIX.clone()
    built = []

    def careless(tasks):
        built.append(tasks)

        def update(s):
            result = s.matrix.sum(0) * s.losses.sum()
            s.matrix.mul_(2), s.losses.mul_(2)
            return result
        return update
    draws = peers.draws_of(careless, step(matrix), draws=4)
    assert built == [3] and torch.equal(matrix, MATRIX)
    assert torch.equal(draws, torch.stack([3 * MATRIX.sum(0)] * 4))  # each call saw the original step


def test_the_keep_frequency_is_measured_in_binomial_standard_errors():
    column = torch.tensor([[2.0], [-2.0]], dtype=torch.float64)  # P = ½
    draws = torch.tensor([[2.0]] * 60 + [[-2.0]] * 40, dtype=torch.float64)  # kept positive 60 times in 100
    assert peers.sign_purity_z(column, draws) == pytest.approx(0.1 / (0.25 / 100) ** 0.5)  # 2.0
    skewed = torch.tensor([[3.0], [-1.0]], dtype=torch.float64)  # P = ¾
    assert peers.sign_purity_z(skewed, torch.tensor([[3.0]] * 60 + [[-1.0]] * 40, dtype=torch.float64)) == \
        pytest.approx(0.15 / (0.75 * 0.25 / 100) ** 0.5)


def test_graddrop_keeps_the_positive_entries_as_often_as_its_purity_says():
    ours = samples("graddrop", MATRIX)
    assert peers.sign_purity_z(MATRIX, ours) < 5
    squared = samples("graddrop", MATRIX, purity_transform=lambda p: p * p)  # another keep rule
    assert peers.sign_purity_z(MATRIX, squared) > 5
    one_sign = torch.cat([MATRIX, MATRIX.abs()[:, :2]], dim=1)  # two coordinates with P = 1: no test there
    assert peers.sign_purity_z(one_sign, samples("graddrop", one_sign)) < 5


def test_rlw_draws_are_checked_against_softmax_normal_weights():
    ours = samples("rlw_grad", MATRIX)
    assert peers.rlw_z(MATRIX, ours) < 5
    torch.manual_seed(1)
    first = peers.rlw_z(MATRIX, ours)
    torch.manual_seed(2)
    assert peers.rlw_z(MATRIX, ours) == first  # its reference draws come from a generator of its own
    generator = torch.Generator().manual_seed(4)
    flatter = torch.softmax(0.5 * torch.randn(2000, 3, generator=generator, dtype=torch.float64), dim=1) @ MATRIX
    assert peers.rlw_z(MATRIX, flatter) > 5


def random_stand_ins():
    """TorchJD's Random and GradDrop, and LibMTL's RLW, as stand-ins drawing as the real ones do."""
    def rlw_weights(tasks):
        return torch.softmax(torch.randn(tasks, dtype=torch.float64), dim=0)

    def graddrop(matrix):
        made = registry.make("graddrop", generator=torch.Generator().manual_seed(int(torch.randint(10**6, ()))))
        return made(matrix).update

    aggregation = SimpleNamespace(Random=lambda: lambda matrix: rlw_weights(len(matrix)) @ matrix,
                                  GradDrop=lambda: graddrop)

    class RLW(AbsWeighting):
        def backward(self, losses, **settings):
            (rlw_weights(self.task_num) @ losses).backward()
    return SimpleNamespace(aggregation=aggregation), lambda name: {"RLW": RLW}[name]


def test_random_pairs_cover_rlw_and_graddrop_and_agree_in_distribution():
    torchjd, weighting = random_stand_ins()
    pairs = peers.random_pairs(torchjd, weighting, dim=4)
    assert [(p.method, p.peer, p.settings) for p in pairs] == [
        ("rlw_grad", "TorchJD", "Random()"), ("graddrop", "TorchJD", "GradDrop() (f = identity, no leak)"),
        ("rlw_grad", "LibMTL", "RLW")]
    assert peers.random_pairs(None, None, dim=4) == []
    assert [p.peer for p in peers.random_pairs(None, weighting, dim=4)] == ["LibMTL"]
    cases = peers.gradient_cases(seed=0, tasks=[3], per_kind=1, dim=4, steps=1)
    torch.manual_seed(0)
    for p in pairs:
        result = peers.compare_in_distribution(p, cases, draws=300)
        assert max(result.between, result.ours, result.theirs) < 5


def test_each_kind_and_task_count_is_sampled_once_on_its_first_step():
    cases = peers.gradient_cases(seed=0, tasks=[2, 3], per_kind=2, dim=4, steps=2)
    seen = []

    def side(tasks):
        return lambda s: seen.append(s.matrix) or s.matrix.sum(0)
    p = peers.Pair("rlw_grad", "Stand-in", "settings", side, side)
    result = peers.compare_in_distribution(p, cases, draws=3)
    firsts = {(c.tasks, c.kind): c.steps[0].matrix for c in reversed(cases)}
    assert len(seen) == 2 * 3 * len(firsts) and len(firsts) == 6
    assert all(any(torch.equal(m, f) for f in firsts.values()) for m in seen)
    assert {id(f) for f in firsts.values()} == {id(c.steps[0].matrix) for c in cases[::2]}
    assert result.between == 0.0  # identical draws on both sides


def test_the_largest_z_is_over_the_matrices_and_the_peer_is_scaled_by_its_factor(monkeypatch):
    cases = peers.gradient_cases(seed=0, tasks=[2, 3], per_kind=1, dim=4, steps=1)
    checks = iter([0.25, 0.5] + [0.125, 0.125] * 5)  # (ours, theirs) on the first matrix, then less
    monkeypatch.setitem(peers.DEFINITIONS, "rlw_grad", lambda matrix, draws: next(checks))

    def ours(tasks):
        return lambda s: s.matrix.sum(0)  # ours sums, theirs averages: factor K
    theirs = lambda tasks: lambda s: s.matrix.mean(0)  # noqa: E731
    result = peers.compare_in_distribution(peers.Pair("rlw_grad", "Stand-in", "-", ours, theirs, float), cases, 5)
    assert (result.between, result.ours, result.theirs) == (0.0, 0.25, 0.5)


def test_the_random_table_says_how_many_draws_and_tests_it_took_the_largest_z_over():
    p = peers.Pair("graddrop", "Stand-in", "settings", None, None)
    text = peers.sampled_table([peers.Sampled(p, 1.234, 2.0, 3.96)], draws=500, matrices=9, dim=16)
    assert text.splitlines() == [
        "Random methods, 500 draws on each of 9 matrices: the largest |z| over the coordinates (32 tests per"
        " matrix for the samples, 16 or fewer for GradDrop's definition); values up to about 4 are chance.",
        "", "| method | peer | peer settings | ours against theirs | definition, ours | definition, theirs |",
        "|---|---|---|---|---|---|", "| graddrop | Stand-in | settings | 1.2 | 2.0 | 4.0 |"]


def test_main_samples_the_random_methods_with_the_seed_and_draws_it_is_given(monkeypatch, capsys):
    torchjd, _ = random_stand_ins()
    for name, module in (("torchjd", torchjd), ("torchjd.aggregation", torchjd.aggregation),
                         ("torchjd.linalg", SimpleNamespace())):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(peers, "torchjd_pairs", lambda torchjd: [])  # only the random pairs here
    drawn = []
    real = peers.compare_in_distribution
    monkeypatch.setattr(peers, "compare_in_distribution",
                        lambda pair, cases, draws: drawn.append((torch.randn(()), draws)) or real(pair, cases, 50))
    peers.main(["--only", "graddrop", "--tasks", "2", "--per-kind", "1", "--steps", "1", "--dim", "4", "--seed", "3"])
    peers.main(["--only", "graddrop", "--tasks", "2", "--per-kind", "1", "--steps", "1", "--dim", "4", "--seed", "3",
                "--draws", "7"])
    out = capsys.readouterr().out
    assert [d for _, d in drawn] == [2000, 7]
    assert "\n\nRandom methods, 7 draws on each of 3 matrices: the largest |z|" in out
    assert torch.equal(drawn[0][0], drawn[1][0])  # the global generator seeded by --seed, before sampling
    torch.manual_seed(3)
    assert torch.equal(drawn[0][0], torch.randn(()))  # ... right before it
    assert "| method | peer | peer settings | ours =" not in out  # no deterministic pairing was run
    assert out.count("| graddrop | TorchJD | GradDrop() (f = identity, no leak) |") == 2
