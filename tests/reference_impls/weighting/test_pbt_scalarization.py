"""PBT over scalarization weights (Royer et al. 2023): exploit / explore by hand, search on a toy problem."""

import pytest
import torch
from torch import nn

from reference_impls.weighting.ew import EW
from reference_impls.weighting.pbt_scalarization import PBTScalarization, perturb, truncation_pairs


class Point(nn.Module):
    """Toy shared parameter θ; task k's loss is ||θ - c_k||², so Σ w_k L_k is minimised at Σ w_k c_k."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


CENTERS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
TARGET_W = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)  # the trade-off validation rewards


def validation(model: Point) -> float:
    return float((model.theta.detach() - TARGET_W @ CENTERS).pow(2).sum())


def train(model: Point, weighting, steps: int, lr: float = 0.05) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        losses = (model.theta[None] - CENTERS).pow(2).sum(dim=1)
        optimizer.zero_grad()
        weighting.combine(losses).backward()
        optimizer.step()


def test_population_starts_on_the_simplex_is_seeded_and_uniform_member_is_equal_weighting():
    method = PBTScalarization(3, population_size=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(method.population.sum(dim=1), torch.ones(6, dtype=torch.float64))
    assert (method.population > 0).all() and method.population.std(dim=0).min() > 0.01
    again = PBTScalarization(3, population_size=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(method.population, again.population)
    losses = torch.tensor([0.5, 2.0, 1.0])
    method.population[2] = torch.full((3,), 1 / 3, dtype=torch.float64)
    method.active = 2
    torch.testing.assert_close(method.weights(losses), EW().weights(losses))
    method.active = 0
    torch.testing.assert_close(method.weights(losses), 3 * method.population[0].float())
    with pytest.raises(ValueError):
        PBTScalarization(3, population_size=1)


def test_truncation_selection_by_hand():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.9, float("nan"), 0.2, 0.4, 0.7])  # lower is better
    pairs = truncation_pairs(scores, fraction=0.25, generator=torch.Generator().manual_seed(0))
    # worst two: NaN (member 4) then 0.9 (member 3); best two: 0.1 (member 0) and 0.2 (member 5)
    assert sorted(loser for loser, _ in pairs) == [3, 4]
    assert {donor for _, donor in pairs} <= {0, 5}
    assert truncation_pairs(scores[:3], fraction=0.25) == []  # int(0.75) = 0 members move


def test_explore_multiplies_by_point_eight_or_one_point_two_then_renormalises():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    moved = perturb(w, generator=torch.Generator().manual_seed(3))
    choice = torch.randint(2, (3,), generator=torch.Generator().manual_seed(3))
    scale = torch.tensor([0.8, 1.2], dtype=torch.float64)[choice]
    torch.testing.assert_close(moved, w * scale / (w * scale).sum())
    ratios = moved / w / (moved / w).min()  # every ratio between entries is 1 or 1.5
    assert all(min(abs(r - 1.0), abs(r - 1.5)) < 1e-12 for r in ratios.tolist())
    torch.testing.assert_close(moved.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_exploit_copies_parameters_and_weights_of_a_better_member_only_into_losers():
    torch.manual_seed(0)
    method = PBTScalarization(3, population_size=4, fraction=0.25, generator=torch.Generator().manual_seed(1))
    models = [Point(3) for _ in range(4)]
    for p, model in enumerate(models):
        model.theta.data.fill_(float(p))
    before = method.population.clone()
    pairs = method.exploit_and_explore(torch.tensor([0.1, 0.5, 0.3, 0.9]), models)
    assert pairs == [(3, 0)]
    assert torch.equal(models[3].theta, models[0].theta) and models[3].theta is not models[0].theta
    for p in (0, 1, 2):  # untouched members keep their parameters and weights
        assert torch.equal(models[p].theta, torch.full((3,), float(p), dtype=torch.float64))
        assert torch.equal(method.population[p], before[p])
    ratio = method.population[3] / before[0]
    assert not torch.equal(method.population[3], before[3])
    assert all(min(abs(r - 1.0), abs(r - 1.5)) < 1e-12 for r in (ratio / ratio.min()).tolist())
    with pytest.raises(ValueError):
        method.exploit_and_explore(torch.zeros(3))
    default = PBTScalarization(3, generator=torch.Generator().manual_seed(1))  # 8 members, 25 %
    moved = default.exploit_and_explore(torch.arange(8.0))
    assert sorted(loser for loser, _ in moved) == [6, 7] and {donor for _, donor in moved} <= {0, 1}


def test_population_finds_better_weights_than_uniform_and_than_its_best_starting_point():
    generator = torch.Generator().manual_seed(0)
    method = PBTScalarization(3, population_size=8, fraction=0.25, generator=generator)
    start = method.population.clone()
    models = [Point(3) for _ in range(8)]
    for _ in range(40):
        for p, model in enumerate(models):
            method.active = p
            train(model, method, steps=5)
        method.exploit_and_explore(torch.tensor([validation(m) for m in models]), models)
    scores = torch.tensor([validation(m) for m in models])
    best = int(scores.argmin())
    # distance of a weight vector to the rewarded trade-off
    start_gap = (start - TARGET_W).norm(dim=1).min()
    assert (method.population[best] - TARGET_W).norm() < 0.5 * start_gap
    uniform = Point(3)
    train(uniform, EW(), steps=200)
    assert scores[best] < 0.25 * validation(uniform)
    assert torch.isfinite(method.population).all()


def test_initial_weights_are_dirichlet_one():
    # Dirichlet(1, 1, 1): each entry is Beta(1, 2), with CDF 1 − (1 − x)²
    population = PBTScalarization(3, population_size=4000, generator=torch.Generator().manual_seed(0)).population
    entries = population.flatten().sort().values
    empirical = torch.arange(1, entries.numel() + 1, dtype=torch.float64) / entries.numel()
    assert (empirical - (1 - (1 - entries) ** 2)).abs().max() < 0.02  # Kolmogorov distance


def test_donors_are_drawn_uniformly_from_the_best_fraction_with_the_given_generator():
    scores = torch.arange(400.0)  # best 100: members 0..99; worst 100: 300..399
    pairs = truncation_pairs(scores, generator=torch.Generator().manual_seed(0))
    donors = torch.tensor([donor for _, donor in pairs])
    assert sorted(loser for loser, _ in pairs) == list(range(300, 400)) and donors.max() < 100
    assert donors.unique().numel() > 50  # 100 uniform draws from 100 hit ~63 distinct members
    torch.manual_seed(1)  # the global generator plays no part
    assert truncation_pairs(scores, generator=torch.Generator().manual_seed(0)) == pairs


def test_explore_uses_the_factors_point_eight_and_one_point_two_by_default():
    method = PBTScalarization(40, population_size=4, generator=torch.Generator().manual_seed(0))
    donor = method.population[0].clone()
    assert method.exploit_and_explore(torch.tensor([0.0, 1.0, 2.0, 3.0])) == [(3, 0)]
    ratio = method.population[3] / donor
    ratio = ratio / ratio.min()
    # 40 entries: both factors occur, so the ratios are exactly 1 and 1.2 / 0.8 = 1.5
    assert ((ratio - 1).abs() < 1e-12).any() and ((ratio - 1.5).abs() < 1e-12).any()
    assert (((ratio - 1).abs() < 1e-12) | ((ratio - 1.5).abs() < 1e-12)).all()


def test_documented_bounds_on_population_size_and_fraction():
    """population_size >= 2 and 0 < fraction <= 0.5 (the worst fraction copies the best one, so
    at most half can lose); a fresh method trains member 0, weights K times its simplex point."""
    for size, fraction in [(2, 0.25), (2, 0.5), (8, 0.5), (8, 1e-3)]:
        method = PBTScalarization(3, population_size=size, fraction=fraction,
                                  generator=torch.Generator().manual_seed(0))
        weights = method.weights(torch.ones(3, dtype=torch.float64))
        assert weights.shape == (3,)
        torch.testing.assert_close(weights, 3 * method.population[0])
    for size, fraction in [(1, 0.25), (8, 0.0), (8, 0.6), (8, -0.1)]:
        with pytest.raises(ValueError):
            PBTScalarization(3, population_size=size, fraction=fraction)
