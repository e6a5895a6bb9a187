"""Standley et al. 2020: exact network selection under a budget, and the higher-order approximation."""

import itertools
import random

import pytest
import torch

from reference_impls.affinity.network_selection import (
    approximate_candidates,
    higher_order_approximation,
    network,
    select_networks,
)
from reference_impls.affinity.task_affinity_grouping import candidate_groups, group_scores, select_groups


def random_candidates(seed: int, k: int):
    """Half-cost singles, full-cost singles and every group, with random losses."""
    rng = random.Random(seed)
    out = [network([t], [rng.uniform(1, 2)], 0.5) for t in range(k)]
    out += [network([t], [rng.uniform(0.8, 1.8)], 1.0) for t in range(k)]
    out += [network(g, [rng.uniform(0.5, 2) for _ in g], 1.0) for g in candidate_groups(k)]
    return out


def brute_force(candidates, k, budget):
    """Independent optimum: every subset of candidates, scored with plain loops."""
    best = float("inf")
    for n in range(1, len(candidates) + 1):
        for chosen in itertools.combinations(candidates, n):
            if sum(c.cost for c in chosen) > budget + 1e-12:
                continue
            per_task = [min((c.losses[c.tasks.index(t)] for c in chosen if t in c.tasks), default=None)
                        for t in range(k)]
            if None not in per_task:
                best = min(best, sum(per_task))
    return best


def test_a_worked_example_overlapping_networks_and_the_budget():
    candidates = [
        network([0, 1, 2], [1.0, 1.0, 1.0]),  # 0: everything together, total 3
        network([0, 1], [0.5, 0.9]),  # 1
        network([1, 2], [0.4, 0.6]),  # 2
        network([2], [0.7], cost=0.5),  # 3: a small single-task network
    ]
    assert select_networks(candidates, 3, 1.0).networks == (0,)
    # 1.5: {0,1} + small {2}: 0.5 + 0.9 + 0.7 = 2.1
    at_1_5 = select_networks(candidates, 3, 1.5)
    assert at_1_5.networks == (1, 3) and at_1_5.total_loss == pytest.approx(2.1) and at_1_5.cost == 1.5
    # 2: the two pairs overlap on task 1, which is read from the better one: 0.5 + 0.4 + 0.6
    at_2 = select_networks(candidates, 3, 2.0)
    assert at_2.networks == (1, 2) and at_2.total_loss == pytest.approx(1.5)
    assert at_2.served_by == (1, 2, 2)


@pytest.mark.parametrize("seed, k, budget", [(0, 3, 1.5), (1, 3, 2.0), (2, 3, 2.5), (3, 4, 2.0)])
def test_the_selection_is_the_optimum_of_an_independent_brute_force(seed, k, budget):
    candidates = random_candidates(seed, k)
    if k == 4:  # keep the brute force small: singles and pairs only, plus the full group
        candidates = [c for c in candidates if len(c.tasks) <= 2 or len(c.tasks) == k]
    selection = select_networks(candidates, k, budget)
    assert selection.total_loss == pytest.approx(brute_force(candidates, k, budget))
    assert selection.cost <= budget
    served = [candidates[c].losses[candidates[c].tasks.index(t)] for t, c in enumerate(selection.served_by)]
    assert sum(served) == pytest.approx(selection.total_loss)
    assert set(selection.served_by) <= set(selection.networks)


def test_more_budget_never_hurts():
    candidates = random_candidates(5, 3)
    totals = [select_networks(candidates, 3, b).total_loss for b in (1.0, 1.5, 2.0, 2.5, 3.0)]
    assert all(a >= b for a, b in zip(totals, totals[1:])) and totals[0] > totals[-1]


def test_on_equal_loss_the_cheaper_selection_wins():
    candidates = [network([0, 1], [1.0, 1.0]), network([0], [1.0], 0.5), network([1], [1.0], 0.5),
                  network([0, 1], [1.0, 1.0], 0.75)]
    assert select_networks(candidates, 2, 2.0).networks == (3,)


def test_costs_fit_with_a_float_tolerance_and_ties_go_to_the_cheaper_then_the_first():
    # 0.1 + 0.2 = 0.30000000000000004 still fits a budget of 0.3
    assert select_networks([network([0], [1.0], 0.1), network([1], [1.0], 0.2)], 2, 0.3).networks == (0, 1)
    # equal loss: two cheap singles (0.8) beat one pair (1.0) although they are more networks
    cheap = [network([0, 1], [1.0, 1.0]), network([0], [1.0], 0.4), network([1], [1.0], 0.4)]
    assert select_networks(cheap, 2, 2.0).networks == (1, 2)
    # equal loss, cost and count: the first in input order
    assert select_networks([network([0, 1], [1.0, 1.0]), network([0, 1], [1.0, 1.0])], 2, 1.0).networks == (0,)


def test_a_network_sorts_its_tasks_and_keeps_each_loss_with_its_task():
    made = network([2, 0], [0.7, 0.1], 0.5)
    assert made.tasks == (0, 2) and made.losses == (0.1, 0.7) and made.cost == 0.5


def test_the_higher_order_approximation_averages_the_pairs_inside_the_group():
    pairs = {(0, 1): (1.0, 2.0), (0, 2): (3.0, 4.0), (1, 2): (5.0, 6.0), (0, 3): (7.0, 8.0),
             (1, 3): (9.0, 10.0), (2, 3): (11.0, 12.0)}
    assert higher_order_approximation(pairs, (2, 0, 1)) == pytest.approx(((1 + 3) / 2, (2 + 5) / 2, (4 + 6) / 2))
    full = higher_order_approximation(pairs, range(4))
    assert full[3] == pytest.approx((8 + 10 + 12) / 3)
    assert higher_order_approximation(pairs, (1, 3)) == (9.0, 10.0)  # a pair is its own estimate
    singles = [network([t], [float(t)], 0.5) for t in range(4)]
    candidates = approximate_candidates(singles, pairs, 4)
    assert len(candidates) == 4 + 6 + 5  # singles, pairs, then 4 triples and the whole set
    assert candidates[-1].tasks == (0, 1, 2, 3) and candidates[-1].losses == pytest.approx(full)
    priced = approximate_candidates(singles, pairs, 4, cost=2.0)  # the singles keep their own cost
    assert [c.cost for c in priced] == [0.5] * 4 + [2.0] * 11


def test_hoa_selects_like_the_full_table_when_groups_behave_like_their_pairs():
    """If every group's loss is the mean of its pairs', selecting on HOA equals selecting on the truth."""
    rng = random.Random(7)
    pairs = {g: (rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)) for g in itertools.combinations(range(4), 2)}
    singles = [network([t], [rng.uniform(0.8, 1.6)], 0.5) for t in range(4)]
    truth = singles + [network(g, higher_order_approximation(pairs, g)) for g in candidate_groups(4)]
    for budget in (1.0, 2.0, 3.0):
        assert select_networks(approximate_candidates(singles, pairs, 4), 4, budget).total_loss == \
            pytest.approx(select_networks(truth, 4, budget).total_loss)


@pytest.mark.parametrize("seed, n", [(0, 2), (1, 3)])
def test_tag_is_this_search_with_unit_costs_and_minus_the_affinity_score_as_the_loss(seed, n):
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    candidates = [network(g, [-group_scores(z, g)[a].item() for a in g]) for g in candidate_groups(4)]
    ours = select_networks(candidates, 4, float(n))
    tag = select_groups(z, n)
    assert -ours.total_loss / 4 == pytest.approx(tag.score)
    assert sorted(candidates[c].tasks for c in ours.networks) == list(tag.groups)


@pytest.mark.parametrize("call, message", [
    (lambda: select_networks([network([0], [1.0])], 2, 1.0), "solves all 2 tasks"),
    (lambda: select_networks([network([0, 1], [1.0, 1.0], 1.0)], 2, 0.5), "solves all 2 tasks"),
    (lambda: select_networks([network([0, 2], [1.0, 1.0])], 2, 1.0), "outside 0..1"),
    (lambda: select_networks([network([0], [1.0])], 1, 0.0), "budget"),
    # NaN compares false with every cost, so it must be refused up front, not let every network fit
    (lambda: select_networks([network([0], [1.0])], 1, float("nan")), "budget must be above 0, got nan"),
    (lambda: network([0, 0], [1.0, 1.0]), "distinct tasks"),
    (lambda: network([0, 1], [1.0]), "one finite loss per task"),
    (lambda: network([0], [float("nan")]), "one finite loss per task"),
    (lambda: network([0], [1.0], 0.0), "cost"),
    (lambda: higher_order_approximation({}, (0, 1)), "no pair network"),
    (lambda: higher_order_approximation({}, (0,)), "two or more distinct tasks"),
    (lambda: higher_order_approximation({(0, 1): (1.0, 1.0)}, (0, 1, 1)), "two or more distinct tasks"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
