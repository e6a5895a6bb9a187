"""Do our optimization methods compute what TorchJD and LibMTL compute, given the same inputs?

    python benchmarks/peer_agreement.py                              # TorchJD only
    python benchmarks/peer_agreement.py --libmtl ~/src/LibMTL        # and a LibMTL checkout

Neither library is a dependency of this project: install them into a separate environment,
``torchjd[quadprog_projector]`` plus ``cvxpy`` and ``ecos`` (both peers solve Nash-MTL with
cvxpy, LibMTL asks for the ECOS solver) and ``scipy`` (LibMTL's CAGrad), and point
``--libmtl`` at a source checkout (its PyPI release 1.1.5 lacks most of the methods here).
Results and how to read them: docs/benchmarks-peers.md.

Every method sees the same float64 steps: a K x d gradient matrix (K in ``--tasks``; three
kinds: Gaussian rows, rows that conflict in pairs around a shared direction, and rows whose
norms span a factor of 100), the K loss values and an epoch (for the loss weightings), and two
further samples (for MoDo; the peers' SDMGrad gets the step's matrix as all three mini-batches,
the deterministic problem ours solves). A stateful method sees a case's steps in order through one object
on each side. Where a method visits tasks in a random order, the order is fixed to task order
on every side: ours with ``random_order=False``, the peers by replacing ``torch.randperm`` and
``random.shuffle`` with the identity during their call.

One row per method and peer: the convention factor (ours = factor x theirs: TorchJD's
Aligned-MTL averages where ours and LibMTL's sum), the median and largest relative
difference ||ours - theirs|| / ||theirs||, and, where the method's definition can be checked
on the update alone, that check's residual for each side (0 = exact; see ``RESIDUALS``). So a
disagreement says which side is off, and by how much, not only that the two differ. Methods
that draw random numbers (RLW, GradDrop) are compared in distribution instead (``--draws``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import random
import statistics
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reference_impls.weighting import registry
from reference_impls.weighting.base import LossWeighting
from reference_impls.weighting.cagrad import CAGrad

KINDS = ("gaussian", "conflicting", "scaled")


@dataclass(frozen=True)
class Step:
    """One training step as a method sees it: L_k(θ) = losses_k + g_k·(θ − θ_now), so the task
    losses have the given values and the rows g_k of ``matrix`` as gradients. Step j of a case
    is in epoch j (loss weightings such as DWA look at epoch means). ``samples``: the gradient
    matrices of two more independent mini-batches, for MoDo, which samples twice or three times."""

    matrix: Tensor
    losses: Tensor
    epoch: int
    samples: tuple[Tensor, ...] = ()

    def copy(self) -> Step:
        """Each side gets its own: neither sees what the other may have done to its inputs."""
        return replace(self, matrix=self.matrix.clone(), losses=self.losses.clone(),
                       samples=tuple(sample.clone() for sample in self.samples))


@dataclass(frozen=True)
class Case:
    """``steps``: what one method object sees, in order (all K x d)."""

    kind: str
    steps: tuple[Step, ...]

    @property
    def tasks(self) -> int:
        return self.steps[0].matrix.shape[0]

    @property
    def matrices(self) -> tuple[Tensor, ...]:
        return tuple(step.matrix for step in self.steps)


def gradient_cases(seed: int, tasks: list[int], per_kind: int, dim: int, steps: int) -> list[Case]:
    """``per_kind`` cases of each kind for each K, float64. The matrices come from one seeded
    generator, the loss values (log-normal: positive, of varied scale) from a second and the
    further samples from a third, so the matrices do not depend on what else is drawn."""
    generator = torch.Generator().manual_seed(seed)
    loss_generator = torch.Generator().manual_seed(seed + 1)
    sample_generator = torch.Generator().manual_seed(seed + 2)
    cases = []
    for k in tasks:
        for kind in KINDS:
            for _ in range(per_kind):
                case_steps = tuple(
                    Step(gradient_matrix(kind, k, dim, generator),
                         torch.randn(k, generator=loss_generator, dtype=torch.float64).exp(), epoch,
                         tuple(gradient_matrix(kind, k, dim, sample_generator) for _ in range(2)))
                    for epoch in range(steps))
                cases.append(Case(kind, case_steps))
    return cases


def gradient_matrix(kind: str, tasks: int, dim: int, generator: torch.Generator) -> Tensor:
    rows = torch.randn(tasks, dim, generator=generator, dtype=torch.float64)
    if kind == "conflicting":  # rows alternate around +s and -s: every odd-even pair conflicts
        shared = torch.randn(dim, generator=generator, dtype=torch.float64)
        signs = torch.tensor([(-1.0) ** (k + 1) for k in range(tasks)], dtype=torch.float64)
        return 0.3 * rows + signs[:, None] * shared
    if kind == "scaled":
        return rows * torch.logspace(0, 2, tasks, dtype=torch.float64)[:, None]
    return rows


# --- what the method's definition says about its update -----------------------------------------

def mgda_residual(matrix: Tensor, update: Tensor) -> float:
    """A point d of the rows' convex hull is their min-norm point iff g_k·d >= ||d||² for every k;
    any point of the hull has min_k g_k·d <= ||d||² (d·d is a convex combination of the g_k·d),
    so at the min-norm point the two are equal: |1 − min_k g_k·d / ||d||²|, which also catches
    an update off by a scale."""
    norm_sq = float(update @ update)
    return abs(1.0 - float((matrix @ update).min()) / norm_sq) if norm_sq > 0 else 0.0


def nash_residual(matrix: Tensor, update: Tensor) -> float:
    """Nash-MTL's d = Σ α_k g_k has α_k (g_k·d) = 1 for every k, up to scale: with α = 1 / (G d),
    Gᵀα must point along d; 1 − cos of the two (1 when some g_k·d <= 0)."""
    progress = matrix @ update
    if bool((progress <= 0).any()):
        return 1.0
    implied = matrix.T @ (1.0 / progress)
    return 1.0 - float(implied @ update / (implied.norm() * update.norm()))


def cagrad_gap(matrix: Tensor, update: Tensor, c: float = 0.5) -> float:
    """CAGrad's d maximises min_k g_k·d over the ball ||d − g_0|| <= c||g_0||. Any simplex w gives
    the upper bound F(w) = g_w·g_0 + c||g_0|| ||g_w|| (weak duality); the gap F(w) − min_k g_k·d,
    over ||g_0||², bounds how far d falls short (w from our dual solve; a worse w only widens
    every side's gap). A d outside the ball counts as its distance beyond it, over ||g_0||."""
    mean = matrix.mean(0)
    radius = c * float(mean.norm())
    outside = max(0.0, float((update - mean).norm()) - radius * (1 + 1e-9)) / float(mean.norm())
    weights, _ = CAGrad(c=c).solve_dual(matrix @ matrix.T)
    combined = weights.to(matrix.dtype) @ matrix
    bound = float(combined @ mean) + radius * float(combined.norm())
    return max(0.0, bound - float((matrix @ update).min())) / float(mean @ mean) + outside


def sdmgrad_residual(matrix: Tensor, update: Tensor, lam: float = 0.3) -> float:
    """SDMGrad's update is (g_w + λ g_0) / (1 + λ) with g_w + λ g_0 the min-norm point of the rows
    shifted by λ g_0 (g_0 their mean; see reference_impls/weighting/sdmgrad.py): MGDA's check on
    the shifted rows and (1 + λ) x the update. λ = 0.3 is every side's default."""
    return mgda_residual(matrix + lam * matrix.mean(0), (1 + lam) * update)


RESIDUALS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "mgda": mgda_residual, "nash_mtl": nash_residual, "cagrad": cagrad_gap, "sdmgrad": sdmgrad_residual}


# --- the pairs ---------------------------------------------------------------------------------

Update = Callable[[Step], Tensor]


@dataclass(frozen=True)
class Pair:
    """``ours(K)`` and ``theirs(K)`` each build one method object for a case and return a
    function from a step to the update; ours = ``factor(K)`` x theirs by convention."""

    method: str
    peer: str
    settings: str
    ours: Callable[[int], Update]
    theirs: Callable[[int], Update]
    factor: Callable[[int], float] = lambda tasks: 1.0


def ours(name: str, **settings) -> Callable[[int], Update]:
    """A gradient method of ours: the update from the step's gradient matrix."""
    def build(tasks: int) -> Update:
        method = registry.make(name, **settings)
        return lambda step: method(step.matrix).update
    return build


def ours_loss(make: Callable[[int], LossWeighting], after: bool = False) -> Callable[[int], Update]:
    """A loss weighting of ours: the gradient in θ of the objective it builds from the step's
    losses (``combine``), i.e. Σ_k ∂objective/∂L_k g_k, the update a trainer would apply. With
    ``after`` (FAMO), its ``update`` then gets the losses after the network's step."""
    def build(tasks: int) -> Update:
        weighting = make(tasks)

        def update(step: Step) -> Tensor:
            theta = torch.zeros(step.matrix.shape[1], dtype=step.matrix.dtype, requires_grad=True)
            objective = weighting.combine(step.losses + step.matrix @ theta, step=step.epoch, epoch=step.epoch)
            result = torch.autograd.grad(objective, theta)[0]
            if after:
                weighting.update(losses_after(step))
            return result
        return update
    return build


def losses_after(step: Step) -> Tensor:
    """The losses after a network step, for FAMO, the same on both sides: the linear losses
    L_k(θ) after θ moves against the summed gradient Σ_k g_k, as far as halves the smallest
    loss's room (every loss stays at least half of what it was)."""
    drop = step.matrix @ step.matrix.sum(0)
    largest = float(drop.abs().max())
    if largest == 0:
        return step.losses.clone()
    return step.losses - 0.5 * float(step.losses.min()) / largest * drop


def ours_modo(**settings) -> Callable[[int], Update]:
    """MoDo's interface: the step's matrix and the second sample set the weights' step, the third
    sample is what they combine."""
    def build(tasks: int) -> Update:
        method = registry.make("modo", **settings)
        return lambda step: method(step.matrix, step.samples[0], step.samples[1]).update
    return build


def ours_db_mtl(**settings) -> Callable[[int], Update]:
    """DB-MTL's interface: its rows are the gradients of ``DBMTL.log_losses`` of the losses."""
    def build(tasks: int) -> Update:
        method = registry.make("db_mtl", **settings)

        def update(step: Step) -> Tensor:
            log_losses = lambda theta: method.log_losses(step.losses + step.matrix @ theta)  # noqa: E731
            origin = torch.zeros(step.matrix.shape[1], dtype=step.matrix.dtype)
            rows = torch.autograd.functional.jacobian(log_losses, origin)
            return method(rows).update
        return update
    return build


@contextlib.contextmanager
def task_order() -> Iterator[None]:
    """Every shuffle a peer makes during the call leaves tasks in their order."""
    real_randperm, real_shuffle = torch.randperm, random.shuffle
    torch.randperm = lambda n, *args, **kwargs: torch.arange(n)
    random.shuffle = lambda items, *args: None
    try:
        yield
    finally:
        torch.randperm, random.shuffle = real_randperm, real_shuffle


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """LibMTL builds its gradient matrix with ``torch.zeros`` in the default dtype: float32 would
    round float64 gradients before the method sees them."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def torchjd_side(make: Callable[[int], Callable]) -> Callable[[int], Update]:
    """A TorchJD aggregator (``make(K)``) applied to the step's matrix, tasks in order."""
    def build(tasks: int) -> Update:
        aggregator = make(tasks)

        def update(step: Step) -> Tensor:
            with task_order():
                return aggregator(step.matrix)
        return update
    return build


def torchjd_pairs(torchjd: types.ModuleType) -> list[Pair]:
    """``torchjd`` with its ``aggregation`` and ``linalg`` modules loaded (0.18 has every class
    named here)."""
    aggregation, theirs = torchjd.aggregation, torchjd_side
    exact = lambda: torchjd.linalg.QuadprogProjector(norm_eps=0.0, reg_eps=0.0)  # noqa: E731
    return [
        Pair("ew_grad", "TorchJD", "Sum()", ours("ew_grad"), theirs(lambda k: aggregation.Sum())),
        Pair("mgda", "TorchJD", "MGDA() defaults", ours("mgda"), theirs(lambda k: aggregation.MGDA())),
        Pair("mgda", "TorchJD", "MGDA(epsilon=1e-12, max_iters=100000)", ours("mgda"),
             theirs(lambda k: aggregation.MGDA(epsilon=1e-12, max_iters=100_000))),
        Pair("imtl_g", "TorchJD", "IMTLG()", ours("imtl_g"), theirs(lambda k: aggregation.IMTLG())),
        Pair("upgrad", "TorchJD", "UPGrad() defaults", ours("upgrad"), theirs(lambda k: aggregation.UPGrad())),
        Pair("upgrad", "TorchJD", "UPGrad(projector with norm_eps=0, reg_eps=0)", ours("upgrad"),
             theirs(lambda k: aggregation.UPGrad(projector=exact()))),
        Pair("aligned_mtl", "TorchJD", "AlignedMTL()", ours("aligned_mtl"), theirs(lambda k: aggregation.AlignedMTL()),
             factor=float),
        Pair("cagrad", "TorchJD", "CAGrad(c=0.5)", ours("cagrad", c=0.5), theirs(lambda k: aggregation.CAGrad(c=0.5))),
        Pair("config", "TorchJD", "ConFIG()", ours("config"), theirs(lambda k: aggregation.ConFIG())),
        Pair("fairgrad", "TorchJD", "FairGrad(alpha=1)", ours("fairgrad", alpha=1.0),
             theirs(lambda k: aggregation.FairGrad(alpha=1.0))),
        Pair("nash_mtl", "TorchJD", "NashMTL(max_norm=0)", ours("nash_mtl"),
             theirs(lambda k: aggregation.NashMTL(n_tasks=k, max_norm=0.0))),
        Pair("pcgrad", "TorchJD", "PCGrad(), tasks in order", ours("pcgrad", random_order=False),
             theirs(lambda k: aggregation.PCGrad())),
        Pair("gradvac", "TorchJD", "GradVac(beta=0.5), tasks in order", ours("gradvac", beta=0.5, random_order=False),
             theirs(lambda k: aggregation.GradVac(beta=0.5))),
        Pair("excessmtl", "TorchJD", "ExcessMTL() defaults (n_warmup_steps=0)", ours("excessmtl"),
             theirs(lambda k: aggregation.ExcessMTL()), factor=float),
        Pair("excessmtl", "TorchJD", "ExcessMTL(n_warmup_steps=1)", ours("excessmtl"),
             theirs(lambda k: aggregation.ExcessMTL(n_warmup_steps=1)), factor=float),
        Pair("modo", "TorchJD", "MoDoWeighting(gamma=0.1, rho=0) on J1 J2ᵀ, update λᵀ J3",
             ours_modo(gamma=0.1, rho=0.0), product_weighting(lambda: aggregation.MoDoWeighting(gamma=0.1, rho=0.0))),
        Pair("sdmgrad", "TorchJD", "SDMGradWeighting() defaults (lr=10, n_iter=20) on J Jᵀ, one batch",
             ours("sdmgrad"), one_batch(product_weighting(lambda: aggregation.SDMGradWeighting()))),
        Pair("sdmgrad", "TorchJD", "SDMGradWeighting(n_iter=5000) (lr=10) on J Jᵀ, one batch",
             ours("sdmgrad"), one_batch(product_weighting(lambda: aggregation.SDMGradWeighting(n_iter=5000)))),
        Pair("sdmgrad", "TorchJD", "SDMGradWeighting(lr=0.5, n_iter=5000) on J Jᵀ, one batch",
             ours("sdmgrad"), one_batch(product_weighting(lambda: aggregation.SDMGradWeighting(lr=0.5, n_iter=5000)))),
    ]


def one_batch(build: Callable[[int], Update]) -> Callable[[int], Update]:
    """A method that takes three mini-batches (SDMGrad), given the step's matrix as all three: its
    product of two samples' Jacobians is then the Gramian, and its problem the deterministic one
    our SDMGrad solves (ours leaves out the double sampling)."""
    def wrapped(tasks: int) -> Update:
        update = build(tasks)
        return lambda step: update(replace(step, samples=(step.matrix, step.matrix)))
    return wrapped


@contextlib.contextmanager
def sgd_learning_rate(lr: float) -> Iterator[None]:
    """Every ``torch.optim.SGD`` built during the call gets learning rate ``lr``: LibMTL's SDMGrad
    builds its inner optimiser with a fixed one (5) inside ``backward``."""
    real_sgd = torch.optim.SGD

    def sgd(params, _given_lr=None, *args, **options):
        """torch.optim.SGD's signature: the given lr, by position or by name, is replaced."""
        options.pop("lr", None)
        return real_sgd(params, lr, *args, **options)
    torch.optim.SGD = sgd
    try:
        yield
    finally:
        torch.optim.SGD = real_sgd


def with_sgd_learning_rate(lr: float, build: Callable[[int], Update]) -> Callable[[int], Update]:
    def wrapped(tasks: int) -> Update:
        update = build(tasks)

        def step_update(step: Step) -> Tensor:
            with sgd_learning_rate(lr):
                return update(step)
        return step_update
    return wrapped


def product_weighting(make: Callable[[], Callable]) -> Callable[[int], Update]:
    """TorchJD's MoDo and SDMGrad are weightings of the product J1 J2ᵀ of two samples' Jacobians;
    their user combines a third sample with the weights."""
    def build(tasks: int) -> Update:
        weighting = make()
        return lambda step: weighting(step.matrix @ step.samples[0].T) @ step.samples[1]
    return build


def libmtl_probe(weighting: type, tasks: int, dim: int, three_batches: bool = False):
    """A LibMTL weighting object wired to one shared parameter θ (d,) at 0, whose task losses
    L_k = losses_k + g_k·θ have the step's values and exactly its rows g_k as gradients: its
    ``backward`` leaves its update in θ.grad, as in a LibMTL trainer it leaves it in the
    encoder's gradients. As LibMTL's trainer does, the probe sets ``epoch`` before each step and
    keeps ``train_loss_buffer`` (column e: the mean losses of epoch e, once e is over)."""
    class Probe(weighting):
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.task_name = tasks, [f"task{k}" for k in range(tasks)]
            self.device, self.rep_grad, self.epoch = torch.device("cpu"), False, 0
            self.encoder = torch.nn.Linear(dim, 1, bias=False)  # θ = its weight row
            self.seen: dict[int, list[Tensor]] = {}  # epoch -> the losses of its steps
            self.decoders: dict[str, torch.nn.Module] = {}  # heads: none (MoDo rescales their gradients)
            self.init_param()

        def get_share_params(self):
            return self.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            self.encoder.zero_grad(set_to_none=False)

        def update(self, step: Step, **settings) -> Tensor:
            self.epoch = step.epoch
            self.train_loss_buffer = epoch_means(self.seen, tasks, before=step.epoch)
            theta = self.encoder.weight
            theta.data.zero_()
            theta.grad = torch.zeros_like(theta)
            with task_order(), default_dtype(step.matrix.dtype):
                self.backward(self.losses(step, theta[0]), **settings)
            self.seen.setdefault(step.epoch, []).append(step.losses)
            return theta.grad[0].detach().to(step.matrix.dtype).clone()

        def losses(self, step: Step, theta: Tensor) -> Tensor:
            """The K losses, or for a method that takes three mini-batches (MoDo) a 3 x K stack:
            the step's matrix and its two further samples, with the same values."""
            batches = (step.matrix, *step.samples) if three_batches else (step.matrix,)
            stacked = torch.stack([step.losses + matrix @ theta for matrix in batches])
            return stacked if three_batches else stacked[0]
    with default_dtype(torch.float64):  # the state init_param makes, too
        return Probe()


def epoch_means(seen: dict[int, list[Tensor]], tasks: int, before: int) -> np.ndarray:
    """LibMTL's ``train_loss_buffer``: K x epochs, column e the mean losses of epoch e for the
    epochs before ``before`` (0 where an epoch had no step)."""
    buffer = np.zeros((tasks, max(before, 1)))
    for epoch, losses in seen.items():
        if epoch < before:
            buffer[:, epoch] = torch.stack(losses).mean(0).numpy()
    return buffer


def import_libmtl(checkout: Path) -> Callable[[str], type]:
    """LibMTL's weighting classes from a source checkout. Two shims, for this torch and no graph
    library: LibMTL/trainer.py imports torch_geometric at the top (its graph data loaders), and
    Aligned_MTL calls ``torch.symeig``, removed from torch in 2.0 (``torch.linalg.eigh`` is its
    replacement, with the same ascending eigenvalues). A third for NumPy 2: SDMGrad calls
    ``np.alltrue``, removed in NumPy 2.0 (``np.all`` is the same function)."""
    sys.path.insert(0, str(checkout))
    sys.modules.setdefault("torch_geometric", types.ModuleType("torch_geometric"))
    torch.symeig = lambda matrix, eigenvectors=True: torch.linalg.eigh(matrix)
    if not hasattr(np, "alltrue"):
        np.alltrue = np.all
    return lambda name: getattr(importlib.import_module(f"LibMTL.weighting.{name}"), name)


def libmtl_side(weighting: Callable[[str], type], name: str, dim: int, three_batches: bool = False,
                after: bool = False, **settings) -> Callable[[int], Update]:
    """LibMTL's method ``name`` through a probe: its update for the step, with ``settings`` as
    the keyword arguments LibMTL's trainer passes to ``backward``."""
    def build(tasks: int) -> Update:
        probe = libmtl_probe(weighting(name), tasks, dim, three_batches)

        def update(step: Step) -> Tensor:
            result = probe.update(step, **settings)
            if after:  # as LibMTL's trainer does for FAMO after the optimiser's step
                with default_dtype(step.matrix.dtype):
                    probe.update_w(losses_after(step))
            return result
        return update
    return build


def libmtl_pairs(weighting: Callable[[str], type], dim: int) -> list[Pair]:
    def theirs(name: str, **options) -> Callable[[int], Update]:
        return libmtl_side(weighting, name, dim, **options)

    return [
        Pair("mgda", "LibMTL", "MGDA, mgda_gn='none'", ours("mgda"), theirs("MGDA", mgda_gn="none")),
        Pair("imtl_g", "LibMTL", "IMTL (loss scales at their start, 1)", ours("imtl_g"), theirs("IMTL")),
        Pair("upgrad", "LibMTL", "UPGrad, norm_eps=reg_eps=1e-4 (its defaults)", ours("upgrad"),
             theirs("UPGrad", UPGrad_norm_eps=1e-4, UPGrad_reg_eps=1e-4)),
        Pair("upgrad", "LibMTL", "UPGrad, norm_eps=0, reg_eps=0", ours("upgrad"),
             theirs("UPGrad", UPGrad_norm_eps=0.0, UPGrad_reg_eps=0.0)),
        Pair("aligned_mtl", "LibMTL", "Aligned_MTL", ours("aligned_mtl"), theirs("Aligned_MTL")),
        Pair("cagrad", "LibMTL", "CAGrad, calpha=0.5, rescale=0", ours("cagrad", c=0.5),
             theirs("CAGrad", calpha=0.5, rescale=0)),
        Pair("fairgrad", "LibMTL", "FairGrad, alpha=1", ours("fairgrad", alpha=1.0),
             theirs("FairGrad", FairGrad_alpha=1.0)),
        Pair("nash_mtl", "LibMTL", "Nash_MTL, max_norm=0, optim_niter=20", ours("nash_mtl"),
             theirs("Nash_MTL", update_weights_every=1, optim_niter=20, max_norm=0.0)),
        Pair("pcgrad", "LibMTL", "PCGrad, tasks in order", ours("pcgrad", random_order=False), theirs("PCGrad")),
        Pair("gradvac", "LibMTL", "GradVac, beta=0.5, whole model, tasks in order",
             ours("gradvac", beta=0.5, random_order=False), theirs("GradVac", GradVac_beta=0.5, GradVac_group_type=0)),
        Pair("excessmtl", "LibMTL", "ExcessMTL, robust_step_size=1", ours("excessmtl"),
             theirs("ExcessMTL", robust_step_size=1.0)),
        # loss-based: the losses' values matter, not only their gradients
        Pair("ew", "LibMTL", "EW", ours_loss(lambda k: registry.make("ew")), theirs("EW")),
        Pair("gls", "LibMTL", "GLS", ours_loss(lambda k: registry.make("gls")), theirs("GLS")),
        Pair("uw", "LibMTL", "UW (log-variances start at -0.5 on both sides)",
             ours_loss(lambda k: registry.make("uw", num_tasks=k, init_log_variance=-0.5)), theirs("UW")),
        Pair("dwa", "LibMTL", "DWA, T=2", ours_loss(lambda k: registry.make("dwa", temperature=2.0)),
             theirs("DWA", T=2.0)),
        Pair("db_mtl", "LibMTL", "DB_MTL, DB_beta=0.9, DB_beta_sigma=0", ours_db_mtl(beta=0.9, beta_sigma=0.0),
             theirs("DB_MTL", DB_beta=0.9, DB_beta_sigma=0.0)),
        Pair("modo", "LibMTL", "MoDo, gamma=0.1, rho=0 (three mini-batches)", ours_modo(gamma=0.1, rho=0.0),
             theirs("MoDo", three_batches=True, MoDo_gamma=0.1, MoDo_rho=0.0)),
        Pair("famo", "LibMTL", "FAMO, w_lr=0.025, w_gamma=1e-3 (Adam on the logits)",
             ours_loss(lambda k: registry.make("famo", num_tasks=k, lr=0.025, gamma=1e-3, logit_optimizer="adam"),
                       after=True),
             theirs("FAMO", after=True, FAMO_w_lr=0.025, FAMO_w_gamma=1e-3)),
        Pair("sdmgrad", "LibMTL", "SDMGrad, lamda=0.3, niter=20 (inner SGD lr 5), one batch", ours("sdmgrad"),
             one_batch(theirs("SDMGrad", three_batches=True, SDMGrad_lamda=0.3, SDMGrad_niter=20))),
        Pair("sdmgrad", "LibMTL", "SDMGrad, lamda=0.3, niter=5000, inner SGD lr set to 0.5, one batch",
             ours("sdmgrad"), with_sgd_learning_rate(0.5, one_batch(
                 theirs("SDMGrad", three_batches=True, SDMGrad_lamda=0.3, SDMGrad_niter=5000)))),
    ]


# --- comparing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Agreement:
    pair: Pair
    differences: list[float]
    our_residuals: list[float]
    their_residuals: list[float]
    failures: int  # steps on which the peer raised (its message is kept in ``failure``)
    failure: str = ""
    kinds: tuple[str, ...] = ()  # the kind of matrix each difference was measured on


def compare(pair: Pair, cases: list[Case]) -> Agreement:
    """Both sides over every case's steps in order; the peer's update times the factor is what
    ours is measured against and what its residual is computed on."""
    residual = RESIDUALS.get(pair.method)
    differences, ours_r, theirs_r, failures, failure, kinds = [], [], [], 0, "", []
    for case in cases:
        our_step, their_step = pair.ours(case.tasks), pair.theirs(case.tasks)
        for step in case.steps:
            matrix = step.matrix
            mine = our_step(step.copy())
            try:
                theirs = pair.factor(case.tasks) * their_step(step.copy())
            except Exception as error:  # a peer's solver giving up is a result, not a crash
                failures, failure = failures + 1, f"{type(error).__name__}: {error}"
                continue
            differences.append(float((mine - theirs).norm() / theirs.norm().clamp_min(1e-300)))
            kinds.append(case.kind)
            if residual is not None:
                ours_r.append(residual(matrix, mine))
                theirs_r.append(residual(matrix, theirs))
    return Agreement(pair, differences, ours_r, theirs_r, failures, failure, tuple(kinds))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1e} / {max(values):.1e}" if values else "-"


APART = 1e-6  # a relative difference above this is more than rounding or a solver's tolerance


def table(agreements: list[Agreement]) -> str:
    lines = ["| method | peer | peer settings | ours = x · theirs | difference: median / largest |"
             f" steps apart by > {APART:g} | residual, ours | residual, theirs | peer failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in agreements:
        factor = "K" if a.pair.factor(7) == 7.0 else f"{a.pair.factor(7):g}"
        apart = f"{sum(d > APART for d in a.differences)} of {len(a.differences)}"
        lines.append(f"| {a.pair.method} | {a.pair.peer} | {a.pair.settings} | {factor} | {spread(a.differences)} |"
                     f" {apart} | {spread(a.our_residuals)} | {spread(a.their_residuals)} | {a.failures or ''} |")
    return "\n".join(lines)


def apart_by_kind(agreements: list[Agreement]) -> str:
    """Where the steps apart come from: one row per pairing with any, one column per kind."""
    lines = [f"| method | peer | peer settings | {' | '.join(KINDS)} |", "|---|---|---|" + "---|" * len(KINDS)]
    for a in agreements:
        if any(d > APART for d in a.differences):
            counts = [(sum(d > APART for d, k in zip(a.differences, a.kinds) if k == kind), a.kinds.count(kind))
                      for kind in KINDS]
            lines.append(f"| {a.pair.method} | {a.pair.peer} | {a.pair.settings} | "
                         + " | ".join(f"{apart} of {total}" for apart, total in counts) + " |")
    return "\n".join(lines)


# --- random methods: compared in distribution ---------------------------------------------------
# RLW and GradDrop draw fresh random numbers at every call, from streams no two libraries share, so
# one step's updates differ by design. Each side is instead called ``draws`` times on one matrix,
# and the draws are compared as samples (two-sample z of the mean of every coordinate and of its
# square) and against the method's definition.

def random_pairs(torchjd: types.ModuleType | None, weighting: Callable[[str], type] | None, dim: int) -> list[Pair]:
    pairs = []
    if torchjd is not None:
        pairs += [Pair("rlw_grad", "TorchJD", "Random()", ours("rlw_grad"),
                       torchjd_side(lambda k: torchjd.aggregation.Random())),
                  Pair("graddrop", "TorchJD", "GradDrop() (f = identity, no leak)", ours("graddrop"),
                       torchjd_side(lambda k: torchjd.aggregation.GradDrop()))]
    if weighting is not None:
        pairs.append(Pair("rlw_grad", "LibMTL", "RLW", ours("rlw_grad"), libmtl_side(weighting, "RLW", dim)))
    return pairs


def draws_of(build: Callable[[int], Update], step: Step, draws: int) -> Tensor:
    """``draws`` updates of one method object on the same step, draws x d."""
    update = build(len(step.matrix))
    return torch.stack([update(step.copy()) for _ in range(draws)])


def moment_z(first: Tensor, second: Tensor) -> float:
    """Largest |z| of two-sample tests of equal means, over the coordinates of two samples of
    updates (draws x d) and of their squares. Coordinates that do not vary (the same value in
    every draw) count as equal when they agree to 1e-12 of the samples' scale."""
    largest = 0.0
    for a, b in ((first, second), (first.square(), second.square())):
        floor = 1e-12 * float(torch.cat([a, b]).abs().max())
        spread = (a.var(0) / len(a) + b.var(0) / len(b) + floor ** 2).sqrt()
        largest = max(largest, float(((a.mean(0) - b.mean(0)).abs() / spread).max()))
    return largest


def sign_purity_z(matrix: Tensor, draws: Tensor) -> float:
    """GradDrop keeps a coordinate's positive entries (and drops its negative ones) with
    probability P = ½ (1 + Σ_k g_k / Σ_k |g_k|), else the reverse; largest |z| of the observed
    frequency against P, over the coordinates where P is strictly between 0 and 1."""
    positive, negative = matrix.clamp_min(0).sum(0), matrix.clamp_max(0).sum(0)
    purity = 0.5 * (1 + (positive + negative) / (positive - negative))
    kept_positive = ((draws - positive).abs() < (draws - negative).abs()).to(matrix.dtype).mean(0)
    random = (purity > 0) & (purity < 1)
    spread = (purity * (1 - purity) / len(draws)).sqrt()
    return float(((kept_positive - purity).abs() / spread)[random].max())


def rlw_z(matrix: Tensor, draws: Tensor, seed: int = 0) -> float:
    """RLW's update is Σ_k λ_k g_k with λ = softmax(z), z ~ N(0, I_K): the draws against as many
    updates built that way from an independent generator."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.softmax(torch.randn(len(draws), len(matrix), generator=generator, dtype=matrix.dtype), dim=1)
    return moment_z(draws, weights @ matrix)


DEFINITIONS: dict[str, Callable[[Tensor, Tensor], float]] = {"graddrop": sign_purity_z, "rlw_grad": rlw_z}


@dataclass(frozen=True)
class Sampled:
    pair: Pair
    between: float  # largest |z|, ours against theirs
    ours: float  # largest |z|, ours against the definition
    theirs: float


def compare_in_distribution(pair: Pair, cases: list[Case], draws: int) -> Sampled:
    """On the first step of the first case of each K and kind: the largest |z| of each check."""
    between, mine, theirs = 0.0, 0.0, 0.0
    firsts = {(case.tasks, case.kind): case.steps[0] for case in reversed(cases)}
    definition = DEFINITIONS[pair.method]
    for step in firsts.values():
        ours_draws = draws_of(pair.ours, step, draws)
        their_draws = pair.factor(len(step.matrix)) * draws_of(pair.theirs, step, draws)
        between = max(between, moment_z(ours_draws, their_draws))
        mine = max(mine, definition(step.matrix, ours_draws))
        theirs = max(theirs, definition(step.matrix, their_draws))
    return Sampled(pair, between, mine, theirs)


def sampled_table(results: list[Sampled], draws: int, matrices: int, dim: int) -> str:
    lines = [f"Random methods, {draws} draws on each of {matrices} matrices: the largest |z| over the"
             f" coordinates ({2 * dim} tests per matrix for the samples, {dim} or fewer for GradDrop's"
             " definition); values up to about 4 are chance.", "",
             "| method | peer | peer settings | ours against theirs | definition, ours | definition, theirs |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.pair.method} | {r.pair.peer} | {r.pair.settings} |"
              f" {r.between:.1f} | {r.ours:.1f} | {r.theirs:.1f} |" for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--per-kind", type=int, default=10, help="cases of each kind for each K")
    parser.add_argument("--steps", type=int, default=3, help="matrices per case (stateful methods see them in order)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--libmtl", type=Path, help="a LibMTL source checkout (the folder holding LibMTL/)")
    parser.add_argument("--only", nargs="+", help="our method names to compare (default: every pair)")
    parser.add_argument("--draws", type=int, default=2000, help="calls per matrix for the random methods")
    args = parser.parse_args(argv)
    if args.libmtl is not None and not (args.libmtl / "LibMTL" / "weighting").is_dir():
        parser.error(f"--libmtl {args.libmtl}: no LibMTL/weighting/ folder there (give the checkout's top folder)")

    pairs, torchjd, weighting = [], None, None
    try:
        importlib.import_module("torchjd.aggregation"), importlib.import_module("torchjd.linalg")
        torchjd = importlib.import_module("torchjd")
        pairs += torchjd_pairs(torchjd)
    except ImportError as error:
        print(f"TorchJD not compared: {error}")
    if args.libmtl is not None:
        weighting = import_libmtl(args.libmtl)
        pairs += libmtl_pairs(weighting, args.dim)
    chosen = lambda p: args.only is None or p.method in args.only  # noqa: E731
    pairs = [p for p in pairs if chosen(p)]
    sampled = [p for p in random_pairs(torchjd, weighting, args.dim) if chosen(p)]
    if not pairs and not sampled:
        sys.exit("nothing to compare: install torchjd or give --libmtl (and check --only)")

    cases = gradient_cases(args.seed, args.tasks, args.per_kind, args.dim, args.steps)
    print(f"{len(cases)} cases x {args.steps} steps, K in {args.tasks}, d = {args.dim}, float64, seed {args.seed}\n")
    agreements = [compare(pair, cases) for pair in pairs]
    if agreements:
        print(table(agreements))
        print(f"\nSteps apart by > {APART:g}, by kind of matrix:\n")
        print(apart_by_kind(agreements))
    for a in agreements:
        if a.failures:
            print(f"\n{a.pair.peer} {a.pair.settings}: failed on {a.failures} steps; last: {a.failure}")
    if sampled:
        results = []
        for pair in sampled:  # the libraries draw from torch's global generator: seed it for each pair,
            torch.manual_seed(args.seed)  # so no pair's draws depend on what ran before it
            results.append(compare_in_distribution(pair, cases, args.draws))
        print("\n" + sampled_table(results, args.draws, len(args.tasks) * len(KINDS), args.dim))


if __name__ == "__main__":
    main()
