"""NTK-adaptive weights for the loss terms of a physics-informed neural network (PINN).

Wang, Yu & Perdikaris, "When and why PINNs fail to train: A neural tangent kernel
perspective", Journal of Computational Physics 449 (2022) 110768, arXiv:2007.14527.

A PINN minimises a sum of mean-squared terms, e.g. a boundary term on the network's
values u(x_b) and a residual term on the PDE residual r(x_r). Under gradient flow each
term's predictions move with its own block of the neural tangent kernel,

    K_ii = J_i J_iᵀ,   J_i = ∂(per-point outputs of term i) / ∂θ   (N_i x P Jacobian),

and the paper shows that a term whose block has a much smaller spectrum converges much
more slowly. The remedy (the weight update of the paper's Algorithm 1) rescales each term
so that all blocks carry the same total spectrum, measured by the trace:

    λ_i = tr(K) / tr(K_ii),   tr(K) = sum_j tr(K_jj),

so that λ_i tr(K_ii) = tr(K) for every term. tr(K_ii) is the squared Frobenius norm of
J_i, i.e. the sum over the term's points of ||∂output/∂θ||². The authors recompute the
weights every so many iterations on fresh points and otherwise keep them fixed (their code
logs the NTK every 100 steps). Equation numbers were not checked against a copy of
the paper's text; the rule above was checked against the authors' code
(PredictiveIntelligenceLab/PINNsNTK, ``lambda = trace sum / trace of the block``).

Interface: ``weights(losses)`` returns the current λ (all 1 before the first update);
``rebalance(term_outputs, params)`` takes, per term, the 1-D tensor of per-point outputs
that the term's mean-squared loss is built from (u at boundary points, r at collocation
points), with graph, and the network parameters, and recomputes λ. A term whose outputs do
not depend on θ (trace 0) cannot be rebalanced and keeps its previous weight. So does a term
whose trace is not finite (it overflowed); tr(K) then sums the other terms only.

Left out: the infinite-width analysis (NTK convergence and spectral-bias results), the
eigenvalue plots, the paper's PDE benchmarks and network sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.weighting.base import LossWeighting
from reference_impls.weighting.gradients import flatten


def output_jacobian(outputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """N x P Jacobian of the N per-point outputs of one term w.r.t. the flattened θ."""
    params = list(params)
    if not outputs.requires_grad:  # a term that does not depend on θ at all
        return torch.zeros(outputs.numel(), sum(p.numel() for p in params), dtype=outputs.dtype, device=outputs.device)
    rows = [
        flatten(torch.autograd.grad(value, params, retain_graph=True, allow_unused=True), params)
        for value in outputs.reshape(-1)
    ]
    return torch.stack(rows) if rows else torch.zeros(0, sum(p.numel() for p in params)).to(outputs)


def ntk_block(outputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Empirical NTK block K_ii = J_i J_iᵀ of one loss term."""
    jacobian = output_jacobian(outputs, params)
    return jacobian @ jacobian.T


def ntk_trace(outputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """tr(K_ii) = ||J_i||_F², without forming the N x N block."""
    return output_jacobian(outputs, params).square().sum()


class PINNsNTK(LossWeighting):
    """Weights λ_i = tr(K) / tr(K_ii) from the per-term blocks of the empirical NTK."""

    name = "pinns_ntk"
    training_hook = "rebalance"  # needs each loss term's per-point outputs, which only a PINN loop has

    def __init__(self, num_terms: int) -> None:
        super().__init__()
        self.register_buffer("lambdas", torch.ones(num_terms))

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return self.lambdas.clone().to(losses)  # a copy, not a view of the state

    def rebalance(self, term_outputs: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """Recompute λ from each term's per-point outputs; returns the new weights."""
        if len(term_outputs) != self.lambdas.numel():
            raise ValueError(f"expected {self.lambdas.numel()} terms, got {len(term_outputs)}")
        traces = torch.stack([ntk_trace(out, params).detach().double() for out in term_outputs])
        usable = torch.isfinite(traces) & (traces > 0)
        if usable.any():
            total = traces[usable].sum()  # tr(K) over the terms that move with θ
            new = total / traces.where(usable, torch.ones_like(traces))  # λ_i = tr(K) / tr(K_ii)
            self.lambdas = torch.where(usable, new, self.lambdas.double()).to(self.lambdas.dtype)
        return self.lambdas.clone()
