import math

import torch

from reference_impls.toy.regression import assign_gradient, make_problem, task_gradients
from reference_impls.weighting.db_mtl import DBMTL


def test_first_step_matches_hand_computation():
    grads = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    result = DBMTL(beta=0.5)(grads)
    # ĝ = 0.5 * g  -> norms (2.5, 0.5); α = 2.5; update = 2.5 * (0.6, 0.8) + 2.5 * (0, 1)
    assert torch.allclose(result.update, torch.tensor([1.5, 4.5]))
    assert torch.allclose(result.weights, torch.tensor([1.0, 5.0]))


def test_every_task_contributes_the_largest_norm():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 6, generator=generator) * torch.tensor([[1.0], [10.0], [0.1]])
    method = DBMTL(beta=0.0)  # no averaging: ĝ = g
    result = method(grads)
    contributions = result.weights[:, None] * grads
    assert torch.allclose(contributions.norm(dim=1), grads.norm(dim=1).max().expand(3))


def test_moving_average_and_log_losses():
    method = DBMTL(beta=0.9)
    first, second = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    method(first)
    method(second)
    # ĝ = 0.9 * (0.1 * first) + 0.1 * second
    assert torch.allclose(method.grad_averages, torch.tensor([[0.09, 0.1]]))
    assert torch.allclose(DBMTL.log_losses(torch.tensor([1.0, torch.e])), torch.tensor([0.0, 1.0]))


def test_second_step_weights_and_combines_the_averages_not_the_rows():
    """At step 2, ĝ is no longer parallel to g: weights α/||ĝ_k|| and the update Σ w_k ĝ_k use ĝ."""
    method = DBMTL(beta=0.5)
    method(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))                  # ĝ = (1, 0), (0, 1)
    result = method(torch.tensor([[0.0, 6.0], [0.0, 8.0]]))         # ĝ = (0.5, 3), (0, 4.5)
    norms = torch.tensor([37.0**0.5 / 2, 4.5])
    assert torch.allclose(result.weights, norms.max() / norms)
    assert torch.allclose(result.update, result.weights[0] * torch.tensor([0.5, 3.0]) + torch.tensor([0.0, 4.5]))


def test_permutation_single_task_and_zero_gradients():
    grads = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    order = torch.tensor([2, 0, 1])
    a, b = DBMTL()(grads), DBMTL()(grads[order])
    assert torch.allclose(a.update, b.update) and torch.allclose(a.weights[order], b.weights)
    assert torch.allclose(DBMTL(beta=0.0)(torch.tensor([[2.0, 0.0]])).update, torch.tensor([2.0, 0.0]))
    assert torch.all(torch.isfinite(DBMTL()(torch.zeros(2, 3)).update))


def test_training_reduces_total_loss():
    problem = make_problem(0)
    method = DBMTL()
    shared = problem.shared_parameters()
    heads = list(problem.model.heads.parameters())
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=0.02)
    initial = problem.losses().sum().item()
    for _ in range(200):
        log_losses = DBMTL.log_losses(problem.losses())
        optimizer.zero_grad()
        update = method(task_gradients(log_losses, shared)).update
        log_losses.sum().backward(inputs=heads)  # heads train on sum_k log L_k
        assign_gradient(shared, update)
        optimizer.step()
    assert problem.losses().sum().item() < 0.2 * initial


def test_beta_decays_as_beta_over_t_to_the_sigma():
    method = DBMTL(beta=0.8, beta_sigma=1.0)  # β_t = 0.8 / t: 0.8, 0.4, 0.8/3
    g1, g2, g3 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    for g in (g1, g2, g3):
        method(g)
    first = 0.2 * g1
    second = 0.4 * first + 0.6 * g2
    third = (0.8 / 3) * second + (1 - 0.8 / 3) * g3
    assert method.step == 3
    assert torch.allclose(method.grad_averages, third)


def test_log_losses_add_eps_inside_the_log():
    # log(L + ε): a zero loss gives log ε, not -inf
    assert torch.allclose(DBMTL.log_losses(torch.tensor([0.0]), eps=1e-3), torch.tensor([math.log(1e-3)]))


def test_defaults_are_libmtls_beta_and_sigma():
    # β = 0.9, σ = 0 (β_t = 0.9 every step): ĝ = 0.1 g_1 after one call, 0.9·0.1 g_1 + 0.1 g_2 after two.
    method = DBMTL()
    first, second = torch.tensor([[10.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 10.0], [4.0, 0.0]])
    assert torch.allclose(method(first).update, torch.tensor([1.0, 1.0]))  # rows (1, 0), (0, 0.2)
    method(second)
    assert torch.allclose(method.grad_averages, torch.tensor([[0.9, 1.0], [0.4, 0.18]]))


def test_tiny_gradients_use_norm_plus_eps_in_the_denominator():
    """α / (||ĝ_k|| + ε) with ε = 1e-8 (LibMTL's form), visible once ||ĝ_k|| is near ε."""
    grads = torch.tensor([[3e-8, 4e-8], [0.0, 1e-9], [6.0, 8.0]], dtype=torch.float64)
    result = DBMTL(beta=0.5)(grads)
    norms = torch.tensor([2.5e-8, 0.5e-9, 5.0], dtype=torch.float64)  # of ĝ = 0.5 g
    expected = norms.max() / (norms + 1e-8)
    assert torch.allclose(result.weights, expected, rtol=1e-12, atol=0)
    assert torch.allclose(result.update, expected @ (0.5 * grads), rtol=1e-12, atol=0)
