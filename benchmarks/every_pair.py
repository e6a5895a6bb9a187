"""Every architecture with every optimization method through the training loop, on tiny data.

    python benchmarks/every_pair.py --data synthetic                     # 164 x 65 pairs, about 5 min
    python benchmarks/every_pair.py --data celeba --methods ew --size 64 # 40 tasks at CelebA's size
    python benchmarks/every_pair.py --data qm9 --archs bmtas mmoe --timeout 30
    python benchmarks/every_pair.py --data nyuv2 --device cuda --workers 8  # on a GPU

A robustness sweep rather than a timing: each pair trains one epoch with ``train.fit`` on a
handful of examples written in the layout of ``--data`` (synthetic vectors with 2 tasks;
NYUv2 with 3 dense tasks; Cityscapes with 2 dense tasks on images twice as wide as high; QM9
with 11 regression targets; CelebA with 40 attributes; Office-31 with 3 domains), and is counted as *trained* (finite losses and metrics), *refused* (the
loop's ConfigurationError before training, or the architecture's ValueError for the problem),
*crashed* (any other exception), or *slow* (over ``--timeout`` seconds). As on the command
line, a model that would not fit in memory is refused with its size before it is built
(``reference_impls.memory``). Each architecture runs in a process of its own. The table lists
every crash and slow pair, and the script exits 1 if there is one. Many tasks and real image
sizes are where models that are fine on two tasks blow up (BMTAS's 11^11 joint choices; per
task copies of shared activations). Single thread per process, on the CPU unless ``--device``
names another device. CPU sweeps fork their processes; others start fresh ones ("spawn"), since
a CUDA runtime the parent has touched (asking whether a GPU exists is enough) cannot be used
in a forked child.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reference_impls import data as datasets
from reference_impls import memory, train
from reference_impls.architectures import registry
from reference_impls.train import available_device
from reference_impls.weighting import registry as methods


def write_nyuv2(root: Path, rng: np.random.Generator, size: int) -> None:
    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            normal = rng.normal(size=(size, size, 3))
            arrays = {"image": rng.random((size, size, 3)), "label": rng.integers(-1, 13, (size, size)),
                      "depth": rng.random((size, size, 1)), "normal": normal / np.linalg.norm(normal, axis=-1,
                                                                                                keepdims=True)}
            for folder, array in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array.astype(np.float32))


def write_cityscapes(root: Path, rng: np.random.Generator, size: int) -> None:
    """Cityscapes' layout at size x 2 size, as the preprocessed files are 128 x 256: not square."""
    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            arrays = {"image": rng.random((size, 2 * size, 3)), "label_7": rng.integers(-1, 7, (size, 2 * size)),
                      "depth": rng.random((size, 2 * size, 1))}
            for folder, array in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array.astype(np.float32))


def write_qm9(root: Path, rng: np.random.Generator, size: int) -> None:
    np.savez(root / "qm9.npz", features=rng.normal(size=(48, size)).astype(np.float32),
             targets=rng.normal(size=(48, 11)), target_names=np.array([f"target{k}" for k in range(11)]),
             split=np.array([0] * 32 + [1] * 4 + [2] * 12))


def write_celeba(root: Path, rng: np.random.Generator, size: int) -> None:
    (root / "img_align_celeba").mkdir()
    rows, partition = [], []
    for i in range(18):
        name = f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(root / "img_align_celeba" / name)
        rows.append(name + " " + " ".join(str(v) for v in rng.choice([-1, 1], size=40)))
        partition.append(f"{name} {0 if i < 12 else 1 if i < 14 else 2}\n")
    names = " ".join(f"Attribute_{k}" for k in range(40))
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{names}\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(partition))


def write_office31(root: Path, rng: np.random.Generator, size: int) -> None:
    for domain, count in (("amazon", 4), ("dslr", 3), ("webcam", 3)):
        for label in ("back_pack", "bike", "mug"):
            folder = root / domain / "images" / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"frame_{i:04d}.jpg")


WRITERS = {"nyuv2": write_nyuv2, "cityscapes": write_cityscapes, "qm9": write_qm9, "celeba": write_celeba,
           "office31": write_office31}
# Image side (Cityscapes: height, the width being twice it) or number of input features.
SIZES = {"synthetic": 12, "nyuv2": 16, "cityscapes": 8, "qm9": 11, "celeba": 16, "office31": 16}
#: Constructor options the loop cannot infer, as --method-kw would give them, for K tasks.
OPTIONS = {"epo": lambda k: {"preference": [1.0] * k},
           "pareto_mtl": lambda k: {"preferences": np.eye(k).tolist(), "index": 0},
           "continuous_pareto": lambda k: {"beta": [1.0] + [-1.0 / (k - 1)] * (k - 1)}}


def benchmark(name: str, size: int, root: Path) -> datasets.Benchmark:
    if name == "synthetic":
        return datasets.load("synthetic", None, n_train=32, n_test=16, dim=size, num_sines=2, seed=0)
    WRITERS[name](root, np.random.default_rng(0), size)
    options = {"size": size} if name in ("celeba", "office31") else {}
    return datasets.load(name, root, **options)


class Slow(BaseException):
    """Raised by the alarm; not an Exception, so that no ``except Exception`` on the way swallows it."""


def run_pair(arch: str, method: str, bench: datasets.Benchmark, timeout: int,
             device: torch.device = torch.device("cpu")) -> dict[str, object]:
    """One epoch of ``arch`` with ``method`` on ``device``: what happened, and in how many seconds."""
    def expire(*_: object) -> None:
        raise Slow

    start, k = time.perf_counter(), len(bench.problem.tasks)
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        make = lambda: registry.build(arch, bench.problem, **train.seeded(arch, {}, 0))  # noqa: E731
        memory.require_fits(arch, make, device, (4, *bench.problem.input_shape))  # as the CLI does
        try:
            model = make()
        except ValueError as refusal:  # the architecture's own, for this problem
            raise train.ConfigurationError(str(refusal)) from None
        options = OPTIONS[method](k) if method in OPTIONS else {}
        metrics, history = train.fit(model, bench, method, epochs=1, lr=1e-3, batch_size=4, device=device,
                                     seed=0, label=arch, progress=False, method_options=options)
        finite = all(map(math.isfinite, [*history["total"], *metrics.values()]))
        outcome = {"result": "trained" if finite else "crashed", "error": "" if finite else "non-finite loss or metric"}
    except Slow:
        outcome = {"result": "slow", "error": f"over {timeout} s"}
    except train.ConfigurationError as refusal:
        outcome = {"result": "refused", "error": str(refusal)}
    except Exception as error:  # noqa: BLE001 - what the sweep is looking for
        outcome = {"result": "crashed", "error": f"{type(error).__name__}: {error}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return {"arch": arch, "method": method, **outcome, "seconds": round(time.perf_counter() - start, 3)}


def sweep_architecture(arch: str, names: list[str], bench: datasets.Benchmark, timeout: int, device: torch.device,
                       results) -> None:
    """Every method with ``arch``, in a process of its own: what one model leaves allocated
    cannot starve the next, and a process the kernel kills for memory takes one row with it."""
    torch.set_num_threads(1)
    results.send([run_pair(arch, m, bench, timeout, device) for m in names])


def in_processes(archs: list[str], names: list[str], bench: datasets.Benchmark, timeout: int,
                 workers: int, device: torch.device = torch.device("cpu"),
                 finished: Callable[[list[dict[str, object]]], None] = lambda rows: None) -> list[dict[str, object]]:
    """The rows of every architecture, ``workers`` architectures at a time, in input order.
    ``finished`` gets each architecture's rows as soon as its process ends."""
    start = "fork" if device.type == "cpu" else "spawn"
    context, pending, running, rows = multiprocessing.get_context(start), list(archs), [], {}
    while pending or running:
        while pending and len(running) < workers:
            arch, (receive, send) = pending.pop(0), multiprocessing.Pipe(duplex=False)
            process = context.Process(target=sweep_architecture, args=(arch, names, bench, timeout, device, send))
            process.start()
            send.close()
            running.append((arch, process, receive))
        for arch, process, receive in list(running):
            if receive.poll(0.05):
                try:
                    rows[arch] = receive.recv()
                except EOFError:  # the process died without sending
                    pass
            elif process.is_alive():
                continue
            process.join()
            running.remove((arch, process, receive))
            rows.setdefault(arch, [{"arch": arch, "method": m, "result": "crashed", "seconds": None,
                                    "error": f"its process died (exit code {process.exitcode}; killed for memory?)"}
                                   for m in names])
            finished(rows[arch])
    return [row for arch in archs for row in rows[arch]]


def warm_up() -> None:
    """One Adam step here, before any process is forked: the modules PyTorch imports lazily on
    a first step are then imported once, and a timeout cannot cut an import short in a child,
    which leaves the module half made for the child's later pairs."""
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight])
    (weight - 1).square().sum().backward()
    optimizer.step()


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["synthetic", *WRITERS], default="synthetic")
    parser.add_argument("--size", type=int, help="image side, or input features (default: small)")
    parser.add_argument("--archs", nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--timeout", type=int, default=60, help="seconds per pair")
    parser.add_argument("--save", type=Path, help="also write one JSON line per pair here, each architecture's "
                        "lines as soon as it is done (a sweep cut short keeps what it finished)")
    parser.add_argument("--workers", type=int, default=1, help="architectures swept at once, each in a process")
    parser.add_argument("--device", type=available_device, default=torch.device("cpu"),
                        help="where each pair trains: cpu, cuda, cuda:1, ... (default: cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warm_up()
    archs, names = args.archs or registry.available(), args.methods or sorted(methods.methods())
    with tempfile.TemporaryDirectory() as tmp:
        bench = benchmark(args.data, args.size or SIZES[args.data], Path(tmp))
        with contextlib.ExitStack() as stack:
            save = stack.enter_context(args.save.open("w")) if args.save else None

            def finished(arch_rows: list[dict[str, object]]) -> None:
                if save:
                    save.write("".join(json.dumps(r) + "\n" for r in arch_rows))
                    save.flush()
            rows = in_processes(archs, names, bench, args.timeout, args.workers, args.device, finished)
    counts = Counter(r["result"] for r in rows)
    print(f"{args.data}: {len(bench.problem.tasks)} tasks, input {bench.problem.input_shape}; "
          f"{len(archs)} architectures x {len(names)} methods, on {args.device}\n")
    print("| trained | refused | crashed | slow |\n|---|---|---|---|")
    print(f"| {counts['trained']} | {counts['refused']} | {counts['crashed']} | {counts['slow']} |")
    failures = [r for r in rows if r["result"] in ("crashed", "slow")]
    if failures:
        print("\n| architecture | method | result | error |\n|---|---|---|---|")
        for r in failures:
            print(f"| {r['arch']} | {r['method']} | {r['result']} | {str(r['error'])[:200]} |")
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r["result"] in ("crashed", "slow") for r in main()) else 0)
