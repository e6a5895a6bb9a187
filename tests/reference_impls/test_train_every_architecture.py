"""Every architecture trains through the loop with each kind of method, or is refused with a reason.

One epoch on tiny data per (architecture, method) pair, for a method of each kind the loop
drives differently: a loss weighting (EW), a gradient method (PCGrad), GradNorm's balance
step, FAMO's update after the step, and the three methods that read the shared
representation (MGDA-UB, Rep-MTL, RotoGrad). A pair must train to finite losses and metrics,
or raise the loop's ConfigurationError before any update, never crash inside. Running all 64
methods this way once found VTAGML's frozen-encoder representation crashing MGDA-UB and Rep-MTL.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference_impls import data as datasets
from reference_impls import train
from reference_impls.architectures import registry

from .conftest import DEVICES

METHODS = ("ew", "pcgrad", "gradnorm", "famo", "mgda_ub", "rep_mtl", "rotograd")


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> dict[str, datasets.Benchmark]:
    """Synthetic vectors, and a 16 x 16 NYUv2-layout set of 8 + 4 images for dense tasks."""
    root = tmp_path_factory.mktemp("nyuv2")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((16, 16, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, 13, size=(16, 16)).astype(np.float32))
            np.save(root / split / "depth" / f"{i}.npy", rng.random((16, 16, 1)).astype(np.float32))
            normal = rng.normal(size=(16, 16, 3)).astype(np.float32)
            np.save(root / split / "normal" / f"{i}.npy", normal / np.linalg.norm(normal, axis=-1, keepdims=True))
    return {"vector": datasets.load("synthetic", None, n_train=32, n_test=16, dim=12, num_sines=2, seed=0),
            "dense": datasets.load("nyuv2", root)}


@pytest.mark.parametrize("name", registry.available())
@pytest.mark.parametrize("kind", ["vector", "dense"])
@pytest.mark.parametrize("device", DEVICES)
def test_trains_with_each_kind_of_method_or_is_refused(device, name, kind, benchmarks):
    bench = benchmarks[kind]
    torch.manual_seed(0)
    try:
        registry.build(name, bench.problem)
    except ValueError:
        pytest.skip(f"{name} refuses {kind} problems")
    for method in METHODS:
        torch.manual_seed(0)
        model = registry.build(name, bench.problem, **train.seeded(name, {}, 0))
        try:
            metrics, history = train.fit(model, bench, method, epochs=1, lr=1e-3, batch_size=4,
                                         device=torch.device(device), seed=0, label=name, progress=False)
        except train.ConfigurationError:
            continue
        assert all(math.isfinite(v) for v in history["total"]), (method, history)
        assert all(math.isfinite(v) for v in metrics.values()), (method, metrics)
