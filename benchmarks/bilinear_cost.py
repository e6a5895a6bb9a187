"""What the gather-based bilinear sampler costs against F.grid_sample, in the three models that use it.

    python benchmarks/bilinear_cost.py

``reference_impls/architectures/bilinear.py`` replaces ``F.grid_sample`` in MNC, DeMT and
the 3D-aware model so that second-order methods can differentiate through it (see its
docstring). Each model's dense training step (``arch_step_time.py``'s 8 x 3 x 32 x 32
problem) is timed with our sampler and with ``F.grid_sample`` patched in its place, in
rounds that alternate the two, and the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from reference_impls.architectures import demt, mnc, three_d_aware

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arch_step_time  # noqa: E402 - a sibling script, not a package

USERS = {"mnc": mnc, "demt": demt, "three_d_aware": three_d_aware}


def torch_grid_sample(features, grid, padding_mode="zeros"):
    """``F.grid_sample`` with the arguments ``bilinear.grid_sample`` fixes."""
    return F.grid_sample(features, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=arch_step_time.positive(int), default=10)
    parser.add_argument("--warmup", type=arch_step_time.in_range(int, 0), default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem, batch = arch_step_time.PROBLEMS["dense (8 x 3 x 32 x 32)"]
    samplers = {"gather": {m: m.grid_sample for m in USERS.values()},
                "F.grid_sample": {m: torch_grid_sample for m in USERS.values()}}
    steps = {(name, kind): arch_step_time.build(name, problem, batch, torch.device("cpu"))[0]
             for name in USERS for kind in samplers}
    times = {cell: [] for cell in steps}
    try:
        for i in range(args.warmup + args.steps):
            for (name, kind), step in steps.items():
                for module, sampler in samplers[kind].items():
                    module.grid_sample = sampler
                seconds = step()
                if i >= args.warmup:
                    times[name, kind].append(seconds)
    finally:  # the models keep our sampler, whatever happened
        for module, sampler in samplers["gather"].items():
            module.grid_sample = sampler
    print("| architecture | gather ms/step | F.grid_sample ms/step | ratio |\n|---|---|---|---|")
    for name in USERS:
        ours, theirs = (1000 * statistics.median(times[name, kind]) for kind in samplers)
        print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
    print(f"\ntorch {torch.__version__}, 1 thread, CPU process time, median of {args.steps} steps "
          f"after {args.warmup} warm-up, in rounds")


if __name__ == "__main__":
    main()
