"""How far sampling noise throws lookahead transference off, with and without common draws.

    python benchmarks/lookahead_noise.py [--lr 1e-7] [--archs NAME ...]

For every architecture on a 3-task problem (vectors and 8 x 8 images, float64, training
mode), the lookahead transference Z at a step of ``--lr`` is compared with its first-order
term lr <g_i, g_j> / L_j (ETAP's score times lr), as the relative error
max |Z - first order| / max |first order|. Two loss functions, side by side in one run:

* ``fresh``: each evaluation draws new random numbers (what ``model_losses`` did before
  :class:`reference_impls.affinity.same_draws.SameDraws`);
* ``same``: ``model_losses`` as it is, every evaluation from one random state.

The table lists the models that sample in training mode (among nine ``fresh`` evaluations at
the same parameters, two differ); the last lines give the median, smallest and largest error
of each column over them.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from reference_impls import train
from reference_impls.affinity import etap
from reference_impls.affinity.transference import LossFn, lookahead_transference, model_losses, shared_names
from reference_impls.architectures import registry
from reference_impls.architectures.registry import Problem

TASKS = ("a", "b", "c")
PROBLEMS = {"vector": Problem(TASKS, (12,), {"a": 1, "b": 2, "c": 1}),
            "dense": Problem(TASKS, (3, 8, 8), {"a": 1, "b": 2, "c": 1}, dense=True)}


def mse(output: Tensor, target: Tensor) -> Tensor:
    return (output - target).square().mean()


def fresh_draw_losses(model, x: Tensor, targets: Mapping[str, Tensor]) -> LossFn:
    """The K losses with new random numbers at every call (buffers copied, as model_losses does)."""
    def losses(params: Mapping[str, Tensor]) -> Tensor:
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        out = functional_call(model, {**buffers, **params}, (x,))
        return torch.stack([mse(out[t], targets[t]) for t in TASKS])
    return losses


def relative_error(model, loss_fn: LossFn, lr: float) -> float:
    first_order = lr * etap.model_affinity_scores(model, loss_fn)
    z = lookahead_transference(model, loss_fn, lr)
    return ((z - first_order).abs().max() / first_order.abs().max()).item()


def errors(name: str, kind: str, lr: float) -> tuple[float, float] | None:
    problem = PROBLEMS[kind]
    torch.manual_seed(0)
    try:
        model = registry.build(name, problem, **train.seeded(name, {}, 0)).double().train()
        shared_names(model)
    except ValueError:  # refused at this size, or no trainable shared parameters
        return None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *problem.input_shape, generator=g, dtype=torch.float64)
    targets = {t: torch.randn(o.shape, generator=g, dtype=torch.float64) for t, o in model(x).items()}
    same, fresh = model_losses(model, x, targets, {t: mse for t in TASKS}), fresh_draw_losses(model, x, targets)
    params = {n: p.detach() for n, p in model.named_parameters()}
    first = fresh(params)
    if all(torch.equal(first, fresh(params)) for _ in range(8)):
        return None  # draws nothing at random in training mode (or draws that never change a loss)
    return relative_error(model, fresh, lr), relative_error(model, same, lr)


def main(argv: list[str] | None = None) -> list[tuple[str, str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-7)
    parser.add_argument("--archs", nargs="+", default=registry.available(), choices=registry.available(),
                        metavar="ARCH", help="architectures to try (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = [(kind, name, *result) for kind in PROBLEMS for name in args.archs
            if (result := errors(name, kind, args.lr)) is not None]
    print(f"lookahead step {args.lr:g}; relative error of Z against its first-order term")
    print(f"{'data':7} {'architecture':24} {'fresh':>10} {'same':>10}")
    for kind, name, fresh, same in rows:
        print(f"{kind:7} {name:24} {fresh:10.2e} {same:10.2e}")
    for label, column in (("fresh", 2), ("same", 3)):
        values = [row[column] for row in rows]
        if values:
            print(f"{label}: median {statistics.median(values):.2e}, smallest {min(values):.2e}, "
                  f"largest {max(values):.2e} over {len(rows)} models")
    return rows


if __name__ == "__main__":
    main()
