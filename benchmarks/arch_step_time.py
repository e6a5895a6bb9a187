"""Time of one training step for every registered architecture, on the CPU or a GPU.

    python benchmarks/arch_step_time.py                 # default: vector and dense-image problems
    python benchmarks/arch_step_time.py --threads 1 --steps 20
    python benchmarks/arch_step_time.py --device cuda   # wall time between CUDA synchronisations

Each architecture is built with its own defaults (``registry.build``) for two small
problems: two regression tasks on 100-d vectors (batch 64) and two dense tasks on
3 x 32 x 32 images (batch 8). A step is forward, the sum of the task losses, backward and
an Adam update. On the CPU the table reports the median process CPU time per step
(``time.process_time``, so waiting for a busy machine does not count) after warm-up
steps. On a GPU the CPU clock would miss the kernels still queued, so a step is the wall
time (``time.perf_counter``) from one ``torch.cuda.synchronize`` to the next. Every model is built first, and each round then runs one step of every model in
turn, so a slow spell of the machine lands on all rows alike instead of on the rows that
happened to be timed during it. An architecture that cannot be built for a problem (e.g. image-only designs on
vectors) is reported with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reference_impls.architectures import registry
from reference_impls.train import available_device, in_range, positive

PROBLEMS = {
    "vector (64 x 100)": (registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}), 64),
    "dense (8 x 3 x 32 x 32)": (registry.Problem(("seg", "depth"), (3, 32, 32), {"seg": 5, "depth": 1}, dense=True), 8),
}


def clock(device: torch.device):
    """The seconds counter for ``device``: process CPU time, or wall time at a synchronised GPU."""
    if device.type == "cpu":
        return time.process_time

    backend = getattr(torch, device.type)  # torch.cuda, torch.mps, ...: each has synchronize()

    def synchronised() -> float:
        backend.synchronize()
        return time.perf_counter()
    return synchronised


def build(name: str, problem: registry.Problem, batch: int, device: torch.device):
    """(one-step closure, None), or (None, why the architecture refuses the problem)."""
    try:
        torch.manual_seed(0)
        model = registry.build(name, problem)
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        return None, f"n/a ({type(error).__name__}: {str(error).splitlines()[0][:60]})"
    return step_for(model, problem, batch, device), None


def step_for(model: torch.nn.Module, problem: registry.Problem, batch: int, device: torch.device):
    """A closure running one timed training step of ``model`` on a fixed random batch."""
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *problem.input_shape, device=device)
    now = clock(device)

    def step() -> float:
        start = now()
        outputs = model(x)
        loss = sum(outputs[t].float().pow(2).mean() for t in problem.tasks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return now() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive(int), default=10)
    parser.add_argument("--warmup", type=in_range(int, 0), default=2)
    parser.add_argument("--threads", type=positive(int), default=1)
    parser.add_argument("--device", type=available_device, default=torch.device("cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = {(name, p): build(name, problem, batch, args.device)
             for name in registry.available() for p, (problem, batch) in PROBLEMS.items()}
    steps = {cell: step for cell, (step, _) in cells.items() if step is not None}
    times = {cell: [] for cell in steps}
    for i in range(args.warmup + args.steps):  # rounds: one step of every cell, side by side
        for cell, step in steps.items():
            seconds = step()
            if i >= args.warmup:
                times[cell].append(seconds)
    print(f"| architecture | class | {' | '.join(f'{k} ms/step' for k in PROBLEMS)} |")
    print("|---|---|" + "---|" * len(PROBLEMS))
    for name in registry.available():
        cls = registry.get(name)
        row = [f"{1000 * statistics.median(times[name, p]):.1f}" if (name, p) in times else cells[name, p][1]
               for p in PROBLEMS]
        where = f"{cls.__module__.replace('.', '/')}.py:{cls.__qualname__}"
        print(f"| {name} | {where} | {' | '.join(row)} |")
    where = "process CPU time" if args.device.type == "cpu" else \
        f"wall time between synchronisations of {args.device}" + \
        (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda" else "")
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps "
          f"after {args.warmup} warm-up, in rounds over all models, {where}")


if __name__ == "__main__":
    main()
