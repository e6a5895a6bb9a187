"""What BMTAS's resource loss costs as the number of tasks grows, up to the limit it accepts.

    python benchmarks/bmtas_resource_loss.py [--layers 3] [--repeats 5]

The loss sums over all T^T joint choices of copies in every layer (``reference_impls.
architectures.bmtas``), so its cost grows faster than exponentially in the number of tasks T;
the model refuses more than ``MAX_TASKS`` tasks. For each T from 2 to that limit the table
gives the joint choices and partitions per layer, the bytes of the tables the model builds
once (which partition each joint choice induces, which partitions refine which), the time
to build the model, and the median over ``--repeats`` of one resource loss with its
backward pass. Process CPU time on one thread, so a busy machine's waiting does not count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reference_impls.architectures.bmtas import BMTAS, MAX_TASKS


def table_bytes(model: BMTAS) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def measure(tasks: int, layers: int, repeats: int) -> dict[str, float]:
    names = tuple(f"t{i}" for i in range(tasks))
    start = time.process_time()
    model = BMTAS(names, [torch.nn.Linear(2, 2)] * layers, {t: torch.nn.Identity() for t in names})
    built = time.process_time() - start
    with torch.no_grad():
        model.alphas.normal_(generator=torch.Generator().manual_seed(0))
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        model.resource_loss().backward()
        seconds.append(time.process_time() - start)
    return {"choices": tasks**tasks, "partitions": len(model._partitions), "bytes": table_bytes(model),
            "build_s": built, "loss_ms": 1000 * statistics.median(seconds)}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tasks", type=int, default=MAX_TASKS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"BMTAS resource loss, {args.layers} layers, median of {args.repeats} (process CPU time, 1 thread)\n")
    print("| tasks | joint choices per layer | partitions | tables (bytes) | build (s) | loss + backward (ms) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for tasks in range(2, args.max_tasks + 1):
        row = measure(tasks, args.layers, args.repeats)
        rows.append(row)
        print(f"| {tasks} | {row['choices']} | {row['partitions']} | {row['bytes']} | {row['build_s']:.3f} "
              f"| {row['loss_ms']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
