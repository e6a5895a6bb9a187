import math

import torch
from torch import nn

from reference_impls.weighting.pinns_ntk import PINNsNTK, ntk_block, ntk_trace, output_jacobian


def quadratic_terms(coefficients: torch.Tensor, residual_points: int = 3) -> list[torch.Tensor]:
    """u(x) = a x² + b x + c: boundary outputs u(0), u(1); residual r(x) = u''(x) - 1 = 2a - 1."""
    a, b, c = coefficients

    def u(x: float) -> torch.Tensor:
        return a * x**2 + b * x + c

    boundary = torch.stack([u(0.0), u(1.0)])
    residual = torch.stack([2 * a - 1 for _ in range(residual_points)])
    return [boundary, residual]


def test_jacobian_and_kernel_match_hand_computation():
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    boundary, residual = quadratic_terms(theta)
    # ∂u(0)/∂(a,b,c) = (0,0,1), ∂u(1)/∂(a,b,c) = (1,1,1); ∂r/∂(a,b,c) = (2,0,0) at every point
    assert torch.equal(output_jacobian(boundary, [theta]), torch.tensor([[0.0, 0, 1], [1, 1, 1]], dtype=torch.float64))
    assert torch.equal(ntk_block(boundary, [theta]), torch.tensor([[1.0, 1], [1, 3]], dtype=torch.float64))
    assert torch.equal(ntk_block(residual, [theta]), torch.full((3, 3), 4.0, dtype=torch.float64))
    assert ntk_trace(boundary, [theta]).item() == 4.0 and ntk_trace(residual, [theta]).item() == 12.0


def test_weights_are_total_trace_over_block_trace():
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    method = PINNsNTK(num_terms=2)
    assert torch.equal(method.weights(torch.ones(2)), torch.ones(2))  # before the first update
    lambdas = method.rebalance(quadratic_terms(theta), [theta])
    # tr(K_bb) = 4, tr(K_rr) = 12, tr(K) = 16  ->  λ = (16/4, 16/12)
    assert torch.allclose(lambdas, torch.tensor([4.0, 4.0 / 3.0]))
    assert torch.allclose(method.weights(torch.ones(2, dtype=torch.float64)), torch.tensor([4.0, 4.0 / 3.0], dtype=torch.float64))


def test_weighted_blocks_carry_equal_trace_on_a_network():
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    params = list(net.parameters())
    x = torch.linspace(0, 1, 4, dtype=torch.float64)[:, None]
    terms = [net(x).squeeze(-1), 30.0 * net(x).squeeze(-1).sin(), net(torch.zeros(1, 1, dtype=torch.float64)).reshape(1)]
    lambdas = PINNsNTK(num_terms=3).rebalance(terms, params).double()
    traces = torch.stack([ntk_trace(t, params) for t in terms]).detach()
    assert torch.allclose(lambdas * traces, traces.sum().expand(3))  # λ_i tr(K_ii) = tr(K) for all i
    assert lambdas.argmax() == 2 and lambdas.argmin() == 1  # the slowest block gets the largest weight


def test_scaling_a_term_rescales_its_weight_by_the_inverse_square():
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    boundary, residual = quadratic_terms(theta)
    plain = PINNsNTK(2).rebalance([boundary, residual], [theta])
    scaled = PINNsNTK(2).rebalance([boundary, 10.0 * residual], [theta])
    # tr(K_rr) grows 100x: the ratio λ_r / λ_b falls 100x
    assert math.isclose((scaled[1] / scaled[0]).item(), (plain[1] / plain[0]).item() / 100.0, rel_tol=1e-6)


def test_single_term_and_constant_terms_stay_finite():
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    boundary, _ = quadratic_terms(theta)
    assert torch.allclose(PINNsNTK(1).rebalance([boundary], [theta]), torch.ones(1))  # λ = tr(K)/tr(K) = 1
    method = PINNsNTK(2)
    constant = torch.ones(3, dtype=torch.float64) + 0 * theta.sum().detach()  # does not depend on θ
    lambdas = method.rebalance([boundary, constant], [theta])
    assert torch.isfinite(lambdas).all() and torch.allclose(lambdas, torch.ones(2))  # λ_b = 4/4, constant keeps 1
    assert torch.equal(PINNsNTK(2).rebalance([constant, constant], [theta]), torch.ones(2))
    flat = 0.0 * theta.sum().expand(2)  # has a graph, but a zero Jacobian
    assert torch.equal(PINNsNTK(2).rebalance([flat, flat], [theta]), torch.ones(2))


def test_a_term_that_stops_depending_on_theta_keeps_its_previous_weight():
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    boundary, residual = quadratic_terms(theta)
    method = PINNsNTK(num_terms=2)
    method.rebalance([boundary, residual], [theta])  # λ = (4, 4/3), as above
    constant = torch.ones(3, dtype=torch.float64)
    lambdas = method.rebalance([boundary, constant], [theta])
    # only the boundary term moves with θ now: λ_b = 4/4 = 1, the residual term keeps 4/3
    assert torch.allclose(lambdas, torch.tensor([1.0, 4.0 / 3.0]))


def test_training_a_poisson_pinn_lowers_the_loss():
    """-u'' = π² sin(πx) on [0, 1], u(0) = u(1) = 0 (solution sin(πx)), λ recomputed every 50 steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).double()
    params = list(net.parameters())
    x_r = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)[:, None].requires_grad_(True)
    x_b = torch.tensor([[0.0], [1.0]], dtype=torch.float64)

    def term_outputs() -> list[torch.Tensor]:
        u = net(x_r)
        du = torch.autograd.grad(u.sum(), x_r, create_graph=True)[0]
        d2u = torch.autograd.grad(du.sum(), x_r, create_graph=True)[0]
        residual = (-d2u - math.pi**2 * torch.sin(math.pi * x_r)).squeeze(-1)
        return [net(x_b).squeeze(-1), residual]

    method = PINNsNTK(num_terms=2)

    def losses() -> torch.Tensor:
        return torch.stack([out.square().mean() for out in term_outputs()])

    initial = losses().sum().item()
    for step in range(300):
        if step % 50 == 0:
            method.rebalance(term_outputs(), params)
        grads = torch.autograd.grad(method.combine(losses()), params)
        with torch.no_grad():  # plain gradient descent (torch.optim's first step imports torch._dynamo, ~3 s)
            for p, g in zip(params, grads):
                p -= 2e-3 * g
    assert losses().sum().item() < 0.1 * initial
    assert not torch.allclose(method.lambdas, torch.ones(2))


def test_a_term_with_an_overflowing_trace_keeps_its_weight_and_stays_out_of_the_total():
    # ||J||² = (1e200)² overflows to inf: that term keeps λ = 1, and tr(K) is the boundary's 4 alone.
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    boundary, _ = quadratic_terms(theta)
    huge = 1e200 * theta[:1]
    lambdas = PINNsNTK(num_terms=2).rebalance([boundary, huge], [theta])
    assert torch.equal(lambdas, torch.ones(2))


def test_terms_without_theta_or_without_points_have_zero_jacobians_of_the_right_shape():
    """A term that does not depend on θ has an N x P zero Jacobian (and an N x N zero kernel
    block); a term with no points (an empty batch) has a 0 x P one. Both keep the outputs' dtype."""
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    constant = torch.ones(4, dtype=torch.float64)
    jacobian = output_jacobian(constant, [theta])
    assert torch.equal(jacobian, torch.zeros(4, 3, dtype=torch.float64)) and jacobian.dtype == torch.float64
    assert torch.equal(ntk_block(constant, [theta]), torch.zeros(4, 4, dtype=torch.float64))
    empty = torch.zeros(0, dtype=torch.float64) * theta.sum()
    assert empty.requires_grad
    jacobian = output_jacobian(empty, [theta])
    assert jacobian.shape == (0, 3) and jacobian.dtype == torch.float64
    assert ntk_trace(empty, [theta]).item() == 0.0


def test_weights_do_not_depend_on_a_common_scale_of_the_terms():
    """λ_i = tr(K) / tr(K_ii) is invariant when every term is multiplied by the same c (all traces
    scale by c²), including scales that push every trace below 1."""
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    reference = PINNsNTK(2).rebalance(quadratic_terms(theta), [theta])
    for c in (1e-3, 0.1, 10.0):
        scaled = PINNsNTK(2).rebalance([c * term for term in quadratic_terms(theta)], [theta])
        assert torch.allclose(scaled, reference, rtol=1e-12, atol=0)
    assert not torch.allclose(reference, torch.ones(2))  # the check is not vacuous
