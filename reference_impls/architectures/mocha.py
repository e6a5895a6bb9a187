"""MOCHA: federated multi-task learning, one linear task per device and a learned task relationship.

Smith, Chiang, Sanjabi & Talwalkar, "Federated Multi-Task Learning", NeurIPS 2017,
arXiv:1705.10467. Every device (node) t holds its own data (X_t, y_t) and its own linear
model w_t, column t of W (d x m). The tasks are tied by a learned relationship: with Omega
the m x m task precision matrix and Sigma = Omega^{-1} the task covariance,

    min_{W, Omega}  sum_t (1/n_t) sum_i hinge(y_ti <w_t, x_ti>)  +  lam/2 tr(W Omega W^T),
    Sigma = Omega^{-1} positive definite with tr(Sigma) = 1.

MOCHA alternates two steps. (1) Omega fixed: the W-problem is solved in the dual, which
splits over the devices. With dual variables alpha_t (one per example; y_ti alpha_ti in
[0, 1] for the hinge loss) and B = [X_t^T alpha_t / n_t]_t (what the devices send), the
dual is D(alpha) = sum_t mean(alpha_t * y_t) - lam/2 tr(W Omega W^T) at W = w(alpha) =
B Sigma / lam. In a round every device, seeing only w_t and Sigma_tt, approximately
maximises its local quadratic subproblem in Delta alpha_t,

    G_t = (1/n_t) <y_t, Delta> - <w_t, X_t^T Delta> / n_t - rho Sigma_tt / (2 lam n_t^2) ||X_t^T Delta||^2,

by coordinate ascent (SDCA: each coordinate moved to its clipped maximiser), and sends
X_t^T Delta / n_t; the server adds them into B. rho = max_t sum_s |Sigma_ts| / Sigma_tt
makes the local models safe to add: the summed G_t never overstate the dual's gain
(tested). A device may do any amount of local work in a round, none at all included
(``local_fraction`` per device: the paper's stragglers and dropped devices). (2) W fixed:
Omega in closed form, Sigma = (W^T W)^{1/2} / tr((W^T W)^{1/2}), the minimiser of
tr(W Sigma^{-1} W^T) over unit-trace positive definite Sigma (tested).

The defining rules come from the authors' MATLAB code (github.com/gingsmith/fmtl):
opt/run_mocha.m (the SDCA step, the server's sum B Sigma / lam, the Omega update, rho, the
start Sigma = I / m), util/compute_primal.m and util/compute_dual.m (the two objectives,
with mean losses per task), and model_driver.m (the defaults: 10 rounds of 100 inner
iterations, half a pass of local SDCA each). The paper's text was not read here; its equation numbers are not cited.

Choices of ours. W is kept equal to w(alpha) = B Sigma / lam with the current Sigma, so the
duality gap stays meaningful; run_mocha.m computes the same W inside a round but keeps W
across an Omega update and adds later changes with the new Sigma. The eigenvalues of
W^T W are always floored at 1e-7 before the square root (the code floors them only when
one is negative). An example with x = 0 is skipped (the code would divide by zero).

:class:`MOCHA` is the same model as a module for the training harness: one column of W per
task output, a bias per task (ours, unpenalised), :meth:`MOCHA.auxiliary_loss` = lam/2
tr(W Omega W^T), and Omega re-estimated from W every ``omega_every`` steps through
:meth:`MOCHA.observe_step_losses`. The harness takes gradient steps on its own task losses
with that penalty; it does not run the devices' dual solvers (:func:`mocha`).

Left out: the federated system itself (communication, asynchrony), losses other than the
hinge in the solver, the paper's other relationship regularisers (clusters, probabilistic
and graph ones), its convergence analysis and experiments. The :class:`MOCHA` defaults
``lam`` (1e-4) and ``omega_every`` (100) are ours; model_driver.m picks lambda by 5-fold
cross-validation over 1e-5 ... 10. The code redraws each device's local fraction at random
every round, here it is fixed; the local solver, coordinate order, server combination, the
Omega / Sigma / rho update and both objectives match it (gingsmith/fmtl).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..checks import require_non_negative, require_positive
from .base import MultiTaskModel


# ----------------------------------------------------------------------------------------------
# The objective and its dual (util/compute_primal.m, util/compute_dual.m)
# ----------------------------------------------------------------------------------------------


def regulariser(w: Tensor, omega: Tensor, lam: float) -> Tensor:
    """lam/2 tr(W Omega W^T): tasks whose weights disagree with Sigma's correlations pay."""
    return lam / 2 * torch.trace(w @ omega @ w.T)


def primal_objective(xs: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor, omega: Tensor, lam: float) -> Tensor:
    """sum_t mean hinge loss of w_t on device t + lam/2 tr(W Omega W^T)."""
    losses = sum((1 - y * (x @ w[:, t])).clamp_min(0).mean() for t, (x, y) in enumerate(zip(xs, ys)))
    return losses + regulariser(w, omega, lam)


def dual_objective(alphas: Sequence[Tensor], ys: Sequence[Tensor], w: Tensor, omega: Tensor, lam: float) -> Tensor:
    """D(alpha) = sum_t mean(alpha_t y_t) - lam/2 tr(W Omega W^T), with W = w(alpha)."""
    return sum((a * y).mean() for a, y in zip(alphas, ys)) - regulariser(w, omega, lam)


def sent_sums(xs: Sequence[Tensor], alphas: Sequence[Tensor]) -> Tensor:
    """B (d x m): column t is X_t^T alpha_t / n_t, all the server knows of device t."""
    return torch.stack([x.T @ a / len(a) for x, a in zip(xs, alphas)], dim=1)


def primal_from_dual(b: Tensor, sigma: Tensor, lam: float) -> Tensor:
    """w(alpha) = B Sigma / lam: the primal point of a dual point (the server's combination)."""
    return b @ sigma / lam


# ----------------------------------------------------------------------------------------------
# A device's local subproblem and its SDCA solver (the inner loop of opt/run_mocha.m)
# ----------------------------------------------------------------------------------------------


def local_subproblem(x: Tensor, y: Tensor, delta: Tensor, w_t: Tensor, sigma_tt: float, rho: float,
                     lam: float) -> Tensor:
    """G_t(Delta): device t's quadratic model of the dual's gain, from w_t and Sigma_tt alone."""
    n = len(y)
    sent = x.T @ delta
    return (y @ delta) / n - (w_t @ sent) / n - rho * sigma_tt / (2 * lam * n * n) * (sent @ sent)


def local_sdca(x: Tensor, y: Tensor, alpha: Tensor, w_t: Tensor, sigma_tt: float, rho: float, lam: float,
               order: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Coordinate ascent on G_t over ``order``: (new alpha_t, X_t^T Delta / n_t to send).

    Each step moves one dual variable to the maximiser of G_t along it, clipped to the
    hinge loss's box y_i alpha_i in [0, 1]; ``local_change`` is the device's own view of how
    w_t moves (Sigma_tt X_t^T Delta / (lam n_t)), scaled by rho when it is read back.
    """
    n = len(y)
    alpha = alpha.clone()
    local_change, sent = torch.zeros_like(w_t), torch.zeros_like(w_t)
    norms = (x * x).sum(dim=1)
    for i in order:
        if norms[i] == 0:
            continue
        old = alpha[i].clone()  # a copy: alpha[i] is a view that the next line overwrites
        margin = y[i] * (x[i] @ (w_t + rho * local_change))
        scaled = lam * n * (1 - margin) / (sigma_tt * rho * norms[i]) + old * y[i]
        alpha[i] = y[i] * scaled.clamp(0, 1)
        step = (alpha[i] - old) * x[i]
        local_change = local_change + sigma_tt * step / (lam * n)
        sent = sent + step / n
    return alpha, sent


def sweep_order(n: int, fraction: float, generator: torch.Generator | None = None) -> list[int]:
    """floor(fraction n) coordinates, cycling through a random permutation (as the code does)."""
    perm = torch.randperm(n, generator=generator)
    steps = int(fraction * n)
    return perm[torch.arange(1, steps + 1) % n].tolist()


# ----------------------------------------------------------------------------------------------
# The relationship step (the end of the outer loop of opt/run_mocha.m)
# ----------------------------------------------------------------------------------------------


def relationship(w: Tensor, floor: float = 1e-7) -> tuple[Tensor, Tensor]:
    """(Sigma, Omega): Sigma = (W^T W)^{1/2} / tr, Omega = Sigma^{-1}, eigenvalues floored."""
    values, vectors = torch.linalg.eigh(w.T @ w)
    root = values.clamp_min(floor).sqrt()
    scale = root.sum()
    sigma = vectors @ torch.diag(root / scale) @ vectors.T
    omega = vectors @ torch.diag(scale / root) @ vectors.T
    return (sigma + sigma.T) / 2, (omega + omega.T) / 2


def safe_rho(sigma: Tensor) -> float:
    """rho = max_t sum_s |Sigma_ts| / Sigma_tt: large enough that the devices' steps add up safely."""
    return (sigma.abs().sum(dim=1) / sigma.diagonal()).max().item()


# ----------------------------------------------------------------------------------------------
# The whole method
# ----------------------------------------------------------------------------------------------


@dataclass
class MochaRun:
    """W, the task covariance Sigma and precision Omega it was solved with, the dual
    variables, and the primal and dual objectives after every round (before its Omega update)."""

    w: Tensor
    sigma: Tensor
    omega: Tensor
    alphas: list[Tensor]
    primal: list[float] = field(default_factory=list)
    dual: list[float] = field(default_factory=list)


def mocha(xs: Sequence[Tensor], ys: Sequence[Tensor], lam: float, rounds: int = 10, inner: int = 100,
          local_fraction: float | Sequence[float] = 0.5, update_omega: bool = True,
          generator: torch.Generator | None = None) -> MochaRun:
    """MOCHA on m devices with labels in {-1, +1}: ``rounds`` Omega updates, each after
    ``inner`` rounds of local SDCA (``local_fraction`` of a pass per device, one value or
    one per device) and the server's combination."""
    require_positive(rounds=rounds, inner=inner)
    m = len(xs)
    fractions = [local_fraction] * m if isinstance(local_fraction, (int, float)) else list(local_fraction)
    require_non_negative(**{f"local_fraction[{t}]": f for t, f in enumerate(fractions)})
    ref = xs[0]
    sigma = torch.eye(m, dtype=ref.dtype, device=ref.device) / m
    omega = torch.eye(m, dtype=ref.dtype, device=ref.device) * m
    alphas = [torch.zeros(len(y), dtype=ref.dtype, device=ref.device) for y in ys]
    run = MochaRun(w=ref.new_zeros(ref.shape[1], m), sigma=sigma, omega=omega, alphas=alphas)
    for h in range(rounds):
        rho = safe_rho(sigma)
        for _ in range(inner):
            w = primal_from_dual(sent_sums(xs, alphas), sigma, lam)
            for t, (x, y) in enumerate(zip(xs, ys)):  # in parallel on the devices
                order = sweep_order(len(y), fractions[t], generator)
                alphas[t], _ = local_sdca(x, y, alphas[t], w[:, t], sigma[t, t].item(), rho, lam, order)
        w = primal_from_dual(sent_sums(xs, alphas), sigma, lam)
        run.w, run.sigma, run.omega, run.alphas = w, sigma, omega, alphas
        run.primal.append(primal_objective(xs, ys, w, omega, lam).item())
        run.dual.append(dual_objective(alphas, ys, w, omega, lam).item())
        if update_omega and h < rounds - 1:
            sigma, omega = relationship(w)
    return run


# ----------------------------------------------------------------------------------------------
# The model for the training harness
# ----------------------------------------------------------------------------------------------


class MOCHA(MultiTaskModel):
    """Linear tasks (one column of W per output), lam/2 tr(W Omega W^T), Omega re-estimated from W."""

    name = "mocha"
    training_procedure = ("each device solves its local dual subproblem by coordinate ascent "
                          "(mocha.local_sdca()) and the server re-estimates Omega in closed form between "
                          "rounds (mocha.relationship(), mocha.mocha()); in the loop, update_omega() runs "
                          "every omega_every steps")

    def __init__(self, tasks: Sequence[str], in_dim: int, out_dims: Mapping[str, int],
                 lam: float = 1e-4, omega_every: int = 100):
        super().__init__(tasks)
        require_non_negative(lam=lam)
        require_positive(omega_every=omega_every)
        self.weights = nn.ParameterDict({t: nn.Parameter(0.1 * torch.randn(in_dim, out_dims[t])) for t in self.tasks})
        self.biases = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_dims[t])) for t in self.tasks})
        columns = sum(out_dims[t] for t in self.tasks)
        self.register_buffer("sigma", torch.eye(columns) / columns)  # the code's start: Sigma = I / m
        self.register_buffer("omega", torch.eye(columns) * columns)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.lam, self.omega_every = lam, omega_every

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "MOCHA":
        if problem.is_image:
            raise ValueError("MOCHA is a linear model on vector features; image inputs are not supported")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, **kwargs)  # width: unused

    def weight_matrix(self) -> Tensor:
        """W (d x columns): the task weights side by side."""
        return torch.cat([self.weights[t] for t in self.tasks], dim=1)

    def auxiliary_loss(self) -> Tensor:
        """lam/2 tr(W Omega W^T) with the current Omega (a buffer: only W is trained by it)."""
        return regulariser(self.weight_matrix(), self.omega, self.lam)

    @torch.no_grad()
    def update_omega(self) -> None:
        """The closed-form relationship step from the current W."""
        sigma, omega = relationship(self.weight_matrix().detach())
        self.sigma.copy_(sigma)
        self.omega.copy_(omega)

    def observe_step_losses(self, losses: Tensor) -> None:
        """Count the step; every ``omega_every``-th one re-estimates Omega (the losses are not read,
        and the pass's graph does not hold Omega)."""
        self.steps += 1
        if int(self.steps) % self.omega_every == 0:
            self.update_omega()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: x @ self.weights[t] + self.biases[t] for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.weights[task]  # the columns of W are coupled only through the penalty
        yield self.biases[task]
