"""Taskonomy (Zamir et al. 2018): AHP normalisation of transfer losses, the budgeted taxonomy."""

import itertools

import pytest
import torch

from reference_impls.affinity.taskonomy import (
    affinity_matrix,
    ahp_priorities,
    pairwise_ratios,
    principal_eigenvector,
    select_taxonomy,
    served_value,
    win_rates,
)

F64 = torch.float64


def test_win_rates_by_hand():
    losses = torch.tensor([[1.0, 5.0, 2.0, 0.0], [2.0, 1.0, 2.0, 3.0], [0.5, 9.0, 9.0, 9.0]], dtype=F64)
    w = win_rates(losses)
    # 0 beats 1 on images 0 and 3 (a tie on image 2 counts for neither); 1 beats 0 on image 1
    assert w[0, 1].item() == pytest.approx(0.5) and w[1, 0].item() == pytest.approx(0.25)
    assert w[2, 0].item() == pytest.approx(0.25) and w[0, 2].item() == pytest.approx(0.75)
    assert (w.diagonal() == 0).all()


def test_ratios_are_a_reciprocal_comparison_matrix_and_clipping_keeps_them_finite():
    w = torch.tensor([[0.0, 1.0, 0.7], [0.0, 0.0, 0.4], [0.3, 0.6, 0.0]], dtype=F64)
    r = pairwise_ratios(w)
    torch.testing.assert_close(r * r.T, torch.ones(3, 3, dtype=F64))  # r[j, i] = 1 / r[i, j]
    torch.testing.assert_close(r.diagonal(), torch.ones(3, dtype=F64))
    assert r[0, 1].item() == pytest.approx(0.999 / 0.001)  # a source that always wins: large, finite
    assert r[0, 2].item() == pytest.approx(0.7 / 0.3)


def test_consistent_comparisons_give_back_the_scores():
    """Bradley-Terry win rates a_i / (a_i + a_j) make W / W^T = a_i / a_j, consistent in
    Saaty's sense; the principal eigenvector is then a / sum(a) exactly."""
    a = torch.tensor([4.0, 1.0, 2.5, 0.5], dtype=F64)
    w = a[:, None] / (a[:, None] + a[None, :])
    w.fill_diagonal_(0.0)
    torch.testing.assert_close(principal_eigenvector(pairwise_ratios(w)), a / a.sum())


def test_only_the_order_of_the_losses_matters_and_each_target_sums_to_one():
    g = torch.Generator().manual_seed(0)
    quality = torch.tensor([0.0, 0.4, 1.0, 2.0], dtype=F64)[:, None]  # source 0 is best for the target
    losses = quality + torch.randn(4, 200, generator=g, dtype=F64).abs() * 2
    p = ahp_priorities(losses)
    assert p.sum().item() == pytest.approx(1.0) and (p > 0).all()
    assert p.argsort(descending=True).tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(ahp_priorities(torch.exp(3 * losses) + 7), p)  # any increasing transform
    other = 100 * losses[[2, 0, 3, 1]]  # a target whose losses are on another scale
    m = affinity_matrix({"depth": losses, "normals": other})
    assert m.shape == (4, 2)
    torch.testing.assert_close(m[:, 1], p[[2, 0, 3, 1]])
    torch.testing.assert_close(m.sum(dim=0), torch.ones(2, dtype=F64))


# ----------------------------------------------------------------------------------------------
# The taxonomy
# ----------------------------------------------------------------------------------------------

TASKS = ("edges", "normals", "depth", "layout")
TARGETS = ("depth", "layout")
AFFINITY = {
    (("normals",), "depth"): 0.6, (("edges",), "depth"): 0.2, (("layout",), "depth"): 0.1,
    (("normals",), "layout"): 0.3, (("edges",), "layout"): 0.25, (("depth",), "layout"): 0.2,
    (("edges", "normals"), "layout"): 0.55,  # a second-order transfer
}
OWN = {"depth": 0.5, "layout": 0.35}  # little data of their own: transfers can beat them
COST = {"edges": 1.0, "normals": 1.0, "depth": 1.0, "layout": 1.0}


def brute_force(budget, max_order=5):
    """An independent optimum: every supervised set and every assignment of transfers."""
    best = None
    for size in range(len(TASKS) + 1):
        for chosen in itertools.combinations(TASKS, size):
            if sum(COST[t] for t in chosen) > budget:
                continue
            options = []
            for t in TARGETS:
                own = [OWN[t]] if t in chosen else []
                edges = [a for (s, tt), a in AFFINITY.items()
                         if tt == t and set(s) <= set(chosen) and t not in s and len(s) <= max_order]
                options.append(own + edges)
            for pick in itertools.product(*options):
                if best is None or sum(pick) > best:
                    best = sum(pick)
    return best


def test_budgeted_taxonomy_by_hand():
    one = select_taxonomy(TASKS, TARGETS, AFFINITY, OWN, COST, budget=1.0)
    assert one.supervised == ("normals",) and one.value == pytest.approx(0.6 + 0.3)
    two = select_taxonomy(TASKS, TARGETS, AFFINITY, OWN, COST, budget=2.0)
    assert two.supervised == ("edges", "normals")  # the pair serves layout through the second-order transfer
    assert two.served_by == {"depth": (("normals",), "depth"), "layout": (("edges", "normals"), "layout")}
    assert two.value == pytest.approx(0.6 + 0.55)
    first_order = select_taxonomy(TASKS, TARGETS, AFFINITY, OWN, COST, budget=2.0, max_order=1)
    assert first_order.value == pytest.approx(brute_force(2.0, max_order=1))
    assert select_taxonomy(TASKS, TARGETS, AFFINITY, OWN, COST, budget=0.5) is None  # nothing affordable serves
    served, value = served_value({"normals", "depth"}, TARGETS, AFFINITY, OWN, {}, max_order=5)
    assert served["depth"] is None and value == pytest.approx(0.5 + 0.3)  # supervised: its own network, not a transfer


def test_the_selection_is_the_optimum_and_respects_the_budget():
    values = []
    for budget in (1.0, 2.0, 3.0, 4.0):
        chosen = select_taxonomy(TASKS, TARGETS, AFFINITY, OWN, COST, budget)
        assert sum(COST[t] for t in chosen.supervised) <= budget
        for t, transfer in chosen.served_by.items():  # every transfer reads supervised sources only
            assert (t in chosen.supervised) if transfer is None else set(transfer[0]) <= set(chosen.supervised)
        assert chosen.value == pytest.approx(brute_force(budget))
        values.append(chosen.value)
    assert values == sorted(values)  # more budget never hurts (the whole budget need not be spent)
    weighted = select_taxonomy(TASKS, TARGETS, AFFINITY, OWN, COST, 1.0, importance={"layout": 20.0})
    assert weighted.supervised == ("layout",)  # layout's own network is worth most now


def test_supervising_a_task_that_adds_nothing_is_not_chosen():
    """Equal value: the smaller supervised set wins, whatever budget is left over."""
    affinity = {(("normals",), "depth"): 0.6, (("edges",), "depth"): 0.2, (("layout",), "depth"): 0.1}
    chosen = select_taxonomy(TASKS, ("depth",), affinity, {"depth": 0.5}, COST, budget=2.0)
    assert chosen.supervised == ("normals",) and chosen.value == pytest.approx(0.6)
    assert chosen.served_by == {"depth": (("normals",), "depth")}


def test_of_two_equally_good_transfers_the_first_listed_serves_the_target():
    affinity = {(("edges",), "depth"): 0.4, (("normals",), "depth"): 0.4, (("layout",), "depth"): 0.1}
    chosen = select_taxonomy(TASKS, ("depth",), affinity, {"depth": 0.1}, COST, budget=2.0)
    assert chosen.supervised == ("edges",) and chosen.served_by == {"depth": (("edges",), "depth")}
    served, value = served_value({"edges", "normals"}, ("depth",), affinity, {"depth": 0.1}, {}, max_order=5)
    assert served == {"depth": (("edges",), "depth")} and value == pytest.approx(0.4)


def test_every_affordable_set_is_searched_up_to_supervising_all_tasks():
    """Exhaustive search: a set that supervises every task is found when only it serves every target, and a
    costly set listed first does not hide a cheaper one of the same size."""
    own = {"a": 0.7, "b": 0.4}
    everything = select_taxonomy(("a", "b"), ("a", "b"), {}, own, {"a": 1.0, "b": 1.0}, budget=2.0)
    assert everything.supervised == ("a", "b") and everything.value == pytest.approx(0.7 + 0.4)
    affinity = {(("x",), "t"): 0.9, (("y",), "t"): 0.5}
    cheaper = select_taxonomy(("x", "y"), ("t",), affinity, {}, {"x": 5.0, "y": 1.0}, budget=1.0)
    assert cheaper.supervised == ("y",) and cheaper.value == pytest.approx(0.5)  # x is over the budget
