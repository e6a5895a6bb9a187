"""What Unified-IO's key-value cache saves: one training step with and without it.

    python benchmarks/decoding_cache.py [--steps 5] [--warmup 1] [--odd]

Unified-IO and Unified-IO 2 decode their answers token by token (``soft_decode``). With the
cache (the default) each decoder block keeps the keys and values of the earlier positions;
without it (``cache=False``) every step reruns the decoder over the whole prefix. Both give
the same numbers (tests/reference_impls/architectures/test_unified_io.py). A step is
``arch_step_time.py``'s: forward, the sum of squared outputs, backward and Adam, in process
CPU time on one thread; the two variants of each model run in alternating rounds and the
medians and their ratio are printed. Problems: ``arch_step_time.py``'s dense one (32 x 32
images: 64 answer tokens of 4 x 4 patches) and 48 x 48 images (144 tokens); ``--odd`` adds
17 x 23 images, which no patch size above 1 tiles (391 tokens; about 20 s a step without
the cache on the project's CPU machine).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

from reference_impls.architectures import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arch_step_time  # noqa: E402 - a sibling script, not a package

MODELS = ("unified_io", "unified_io_2")


def dense(height: int, width: int) -> registry.Problem:
    """``arch_step_time.py``'s dense tasks on 3-channel images of another size."""
    return registry.Problem(("seg", "depth"), (3, height, width), {"seg": 5, "depth": 1}, dense=True)


PROBLEMS = {"dense (8 x 3 x 32 x 32)": arch_step_time.PROBLEMS["dense (8 x 3 x 32 x 32)"],
            "dense (2 x 3 x 48 x 48)": (dense(48, 48), 2)}
ODD = {"dense (2 x 3 x 17 x 23)": (dense(17, 23), 2)}


def uncached(model: torch.nn.Module) -> None:
    """Make ``model``'s forward pass decode without the cache."""
    model.soft_decode = functools.partial(model.soft_decode, cache=False)


def build(name: str, problem: registry.Problem, batch: int, cache: bool):
    torch.manual_seed(0)
    model = registry.build(name, problem)
    if not cache:
        uncached(model)
    return arch_step_time.step_for(model, problem, batch, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=arch_step_time.positive(int), default=5)
    parser.add_argument("--warmup", type=arch_step_time.in_range(int, 0), default=1)
    parser.add_argument("--odd", action="store_true", help="also time 17 x 23 images (391 answer tokens)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of {args.steps} steps after {args.warmup} warm-up, "
          "process CPU time, the two variants in alternating rounds")
    print("| model | problem | answer tokens | with cache ms/step | without ms/step | without / with |")
    print("|---|---|---|---|---|---|")
    for label, (problem, batch) in (PROBLEMS | ODD if args.odd else PROBLEMS).items():
        for name in MODELS:
            steps = {cache: build(name, problem, batch, cache) for cache in (True, False)}
            times = {cache: [] for cache in steps}
            for i in range(args.warmup + args.steps):
                for cache, step in steps.items():
                    seconds = step()
                    if i >= args.warmup:
                        times[cache].append(seconds)
            with_cache, without = (1000 * statistics.median(times[c]) for c in (True, False))
            tokens = registry.build(name, problem).target_length(problem.tasks[0])
            print(f"| {name} | {label} | {tokens} | {with_cache:.1f} | {without:.1f} | {without / with_cache:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
