"""Time the gradient methods: aggregation alone, side by side with TorchJD, and a full step.

    python benchmarks/aggregation_speed.py --quick          # small grid, a few minutes on 2 cores
    python benchmarks/aggregation_speed.py                  # K in {2,5,10,40}, d in {1e4,1e6,1e7}

Four tables (Markdown), all medians over ``--repeats`` runs after one warm-up (``--large-repeats``
runs where K·d >= 1e8, e.g. K = 40 at d = 1e7, where one call takes seconds), float32, on
CUDA when available and otherwise on the CPU:

1. aggregation time per step for every method here, and for the TorchJD aggregator of the
   same name when ``torchjd`` is importable (it is not a dependency of this project: install
   it into a separate environment to compare), on the same matrix, with the ratio
   ours / TorchJD;
2. the K x K weighting step alone (ours vs TorchJD's ``gramian_weighting``) on the same
   Gramian: the only part of a Gramian-based method that differs between the two;
3. Nash-MTL: our Newton solve of (Mα)_k = 1/α_k against the same problem solved with cvxpy
   (when importable), on the K x K Gramian only;
4. a full training step: K backward passes + aggregation (``gradients.gradient_step``)
   against one backward pass of the summed loss, and against TorchJD's own full step
   (``mtl_backward`` + ``jac_to_grad`` with the same aggregator) when it is importable.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from reference_impls.weighting.aligned_mtl import AlignedMTL
from reference_impls.weighting.base import GramianWeighting
from reference_impls.weighting.cagrad import CAGrad
from reference_impls.weighting.ew_grad import EqualWeightingGradient
from reference_impls.weighting.fairgrad import FairGrad
from reference_impls.weighting.graddrop import GradDrop
from reference_impls.weighting.gradients import gradient_step, solve_power_system
from reference_impls.weighting.gradvac import GradVac
from reference_impls.weighting.imtl_g import IMTLG
from reference_impls.weighting.mgda import MGDA
from reference_impls.weighting.moco import MoCo
from reference_impls.weighting.nash_mtl import NashMTL
from reference_impls.weighting.pcgrad import PCGrad
from reference_impls.weighting.rlw_grad import RandomLossWeightingGradient
from reference_impls.weighting.upgrad import UPGrad

OURS: dict[str, Callable[[], Callable]] = {
    "ew_grad": EqualWeightingGradient, "rlw_grad": RandomLossWeightingGradient, "mgda": MGDA,
    "pcgrad": PCGrad, "graddrop": GradDrop, "gradvac": GradVac, "cagrad": CAGrad, "nash_mtl": NashMTL,
    "imtl_g": IMTLG, "aligned_mtl": AlignedMTL, "upgrad": UPGrad, "fairgrad": FairGrad, "moco": MoCo,
}
TORCHJD_NAMES = {  # our name -> TorchJD aggregator class name
    "ew_grad": "Sum", "mgda": "MGDA", "pcgrad": "PCGrad", "graddrop": "GradDrop", "cagrad": "CAGrad",
    "nash_mtl": "NashMTL", "imtl_g": "IMTLG", "aligned_mtl": "AlignedMTL", "upgrad": "UPGrad",
    "fairgrad": "FairGrad", "gradvac": "GradVac", "rlw_grad": "Random",
}
TORCHJD_SETTINGS = {  # same hyper-parameters as our defaults
    "cagrad": lambda k: {"c": 0.5}, "nash_mtl": lambda k: {"n_tasks": k},
    "fairgrad": lambda k: {"alpha": 1.0}, "gradvac": lambda k: {"beta": 0.01},
}


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """One run with Python's garbage collector paused (as ``timeit`` does), so garbage left by
    one contender (cvxpy makes plenty) is not collected on another's clock."""
    gc.disable()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    finally:
        gc.enable()


def median_seconds(*fns: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Median time of each function over ``repeats`` rounds.

    The contenders alternate round by round, so a change in the machine's load (shared cores)
    hits all of them alike. A call that takes under 50 ms is preceded by an untimed call of
    the same function, so every contender is timed with warm caches rather than right after
    the other one evicted them (which costs sub-millisecond calls several times their time).
    """
    last = [timed(fn, device) for fn in fns]  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for index, fn in enumerate(fns):
            if last[index] < 0.05:
                timed(fn, device)
            last[index] = timed(fn, device)
            times[index].append(last[index])
    return [statistics.median(column) for column in times]


def torchjd_aggregators() -> dict[str, Callable[[], Callable]]:
    try:
        import torchjd.aggregation as jd
    except ImportError:
        return {}
    found = {ours: getattr(jd, name) for ours, name in TORCHJD_NAMES.items() if hasattr(jd, name)}
    if hasattr(jd, "DualProj"):
        found["dualproj (TorchJD only)"] = jd.DualProj
    return found


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def make_torchjd(theirs: dict[str, Callable], name: str, k: int) -> Callable:
    return theirs[name](**TORCHJD_SETTINGS.get(name, lambda k: {})(k))


def aggregation_table(tasks: list[int], dims: list[int], repeats: int, large_repeats: int, device: torch.device) -> None:
    theirs = torchjd_aggregators()
    print("\n### Aggregation time per step (median)\n")
    print("| K | d | method | ours | TorchJD | ours / TorchJD |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for d in dims:
        for k in tasks:
            matrix = torch.randn(k, d, generator=generator).to(device)
            runs = large_repeats if k * d >= 10**8 else repeats
            for name in sorted(set(OURS) | set(theirs)):
                ours_method = OURS[name]() if name in OURS else None  # built once, as TorchJD's
                contenders = [lambda: ours_method(matrix)] if name in OURS else []
                if name in theirs:
                    try:
                        aggregator = make_torchjd(theirs, name, k)
                        aggregator(matrix)
                        contenders.append(lambda: aggregator(matrix))
                    except Exception as error:  # e.g. a missing optional solver of TorchJD
                        print(f"<!-- TorchJD {name} failed: {type(error).__name__}: {error} -->")
                times = median_seconds(*contenders, repeats=runs, device=device)
                ours = times[0] if name in OURS else None
                jd = times[-1] if len(contenders) == 2 or name not in OURS else None
                ratio = f"{ours / jd:.2f}" if ours is not None and jd else "n/a"
                print(f"| {k} | {d:.0e} | {name} | {fmt(ours)} | {fmt(jd)} | {ratio} |", flush=True)


def weighting_table(tasks: list[int], dim: int, repeats: int, device: torch.device) -> None:
    """Only the part that differs between the two libraries: K weights from the K x K Gramian.

    Both compute the Gramian G Gᵀ and the combination wᵀG with the same two matrix products,
    which is nearly all of the time at large d; this times the rest on its own, with little
    noise."""
    theirs = torchjd_aggregators()
    if not theirs:  # the table compares the two; without TorchJD it would be an empty header
        print("\n(torchjd not importable: the Gramian-only comparison is skipped)")
        return
    print(f"\n### Weights from the K x K Gramian only (Gramian of a K x {dim:.0e} float32 matrix; median)\n")
    print("| K | method | ours | TorchJD | ours / TorchJD |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for k in tasks:
        matrix = torch.randn(k, dim, generator=generator).to(device)
        gramian = matrix @ matrix.T
        for name in sorted(set(OURS) & set(theirs)):
            if not isinstance(OURS[name](), GramianWeighting):
                continue
            weighting = getattr(make_torchjd(theirs, name, k), "gramian_weighting", None)
            if weighting is None:
                continue
            ours_method = OURS[name]()
            ours, jd = median_seconds(lambda: ours_method.weights_from_gramian(gramian), lambda: weighting(gramian), repeats=repeats, device=device)
            print(f"| {k} | {name} | {fmt(ours)} | {fmt(jd)} | {ours / jd:.2f} |", flush=True)


def nash_cvxpy(gramian: torch.Tensor):
    """The same Nash system as a convex program for cvxpy: min ½αᵀMα − Σ log α."""
    import cvxpy as cp
    import numpy as np

    matrix = gramian.double().cpu().numpy()
    matrix = (matrix + matrix.T) / 2 + 1e-12 * np.eye(len(matrix))
    alpha = cp.Variable(len(matrix))
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(alpha, cp.psd_wrap(matrix)) - cp.sum(cp.log(alpha))))
    problem.solve()
    solution = np.asarray(alpha.value)
    return float(np.abs(solution * (matrix @ solution) - 1).max())


def nash_table(tasks: list[int], repeats: int, device: torch.device) -> None:
    try:
        import cvxpy  # noqa: F401
    except ImportError:
        print("\n(cvxpy not importable: Nash-MTL solver comparison skipped)")
        return
    print("\n### Nash-MTL solve on the K x K Gramian: Newton (ours) vs cvxpy (median)\n")
    print("| K | ours | ours residual | cvxpy | cvxpy residual | cvxpy / ours |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(1)
    for k in tasks:
        grads = torch.randn(k, 4 * k, generator=generator).to(device)
        gramian = grads @ grads.T
        ours, theirs = median_seconds(lambda: solve_power_system(gramian, 1.0), lambda: nash_cvxpy(gramian), repeats=repeats, device=device)
        residual = solve_power_system(gramian, 1.0).residual
        theirs_residual = nash_cvxpy(gramian)
        print(f"| {k} | {fmt(ours)} | {residual:.1e} | {fmt(theirs)} | {theirs_residual:.1e} | {theirs / ours:.1f} |", flush=True)


def torchjd_step(aggregator: Callable, losses: list[torch.Tensor], features: torch.Tensor, shared_params: list) -> None:
    """TorchJD's full step: Jacobian of the K losses w.r.t. the shared parameters, then aggregate."""
    from torchjd.autojac import jac_to_grad, mtl_backward

    mtl_backward(losses, features=features, shared_params=shared_params)
    jac_to_grad(shared_params, aggregator)


def full_step_table(tasks: list[int], hidden: int, methods: list[str], repeats: int, device: torch.device) -> None:
    theirs = torchjd_aggregators()
    print("\n### Full step: K backward passes + aggregation vs one backward of Σ L_k (median)\n")
    print("| K | d (shared) | method | gradient_step (ours) | TorchJD step | ours / TorchJD | sum-loss backward | ours / sum-loss |")
    print("|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(2)
    for k in tasks:
        shared = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()).to(device)
        heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(k)]).to(device)
        inputs = torch.randn(64, hidden, generator=generator).to(device)
        targets = torch.randn(64, k, generator=generator).to(device)
        shared_params, head_params = list(shared.parameters()), list(heads.parameters())
        d = sum(p.numel() for p in shared_params)

        def forward() -> tuple[list[torch.Tensor], torch.Tensor]:
            z = shared(inputs)
            return [((head(z).squeeze(-1) - targets[:, i]) ** 2).mean() for i, head in enumerate(heads)], z

        for name in methods:
            method = OURS[name]()
            contenders = [lambda: sum(forward()[0]).backward(), lambda: gradient_step(method, forward()[0], shared_params, head_params)]
            if name in theirs:
                aggregator = make_torchjd(theirs, name, k)
                contenders.append(lambda: torchjd_step(aggregator, *forward(), shared_params))
            baseline, step, *jd = median_seconds(*contenders, repeats=repeats, device=device)
            jd = jd[0] if jd else None
            ratio = f"{step / jd:.2f}" if jd else "n/a"
            print(f"| {k} | {d:.1e} | {name} | {fmt(step)} | {fmt(jd)} | {ratio} | {fmt(baseline)} | {step / baseline:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: d in {1e4, 1e5}, hidden 256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--large-repeats", type=int, default=5, help="repeats where K·d >= 1e8 (seconds per call)")
    parser.add_argument("--step-repeats", type=int, default=5, help="repeats for the full-step table")
    parser.add_argument("--tables", nargs="+", default=["aggregation", "weighting", "nash", "step"],
                        choices=["aggregation", "weighting", "nash", "step"], help="which tables to run")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5, 10, 40])
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = args.dims or ([10_000, 100_000] if args.quick else [10_000, 1_000_000, 10_000_000])
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} dtype=float32")
    if "aggregation" in args.tables:
        aggregation_table(args.tasks, dims, args.repeats, args.large_repeats, device)
    if "weighting" in args.tables:
        weighting_table(args.tasks, dims[0], args.repeats, device)
    if "nash" in args.tables:
        nash_table(args.tasks, args.repeats, device)
    if "step" in args.tables:
        methods = ["ew_grad", "mgda", "pcgrad", "upgrad", "cagrad", "nash_mtl"]
        full_step_table(args.tasks, 256 if args.quick else 1024, methods, args.step_repeats, device)


if __name__ == "__main__":
    main()
