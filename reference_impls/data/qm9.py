"""QM9 molecular property regression, from a documented ``.npz`` of features and targets.

The community loaders (LibMTL, Nash-MTL) read QM9 through PyTorch Geometric, whose
processed files need torch_geometric to unpickle; that is a heavy dependency we do not
take. Instead this loader reads one NumPy archive that any featurisation can produce:

    <root>/qm9.npz with arrays
        features      float (N, F)  one fixed-length vector per molecule
        targets       float (N, T)  one column per property
        target_names  str   (T,)    e.g. mu, alpha, homo, lumo, r2, zpve, U0, U, H, G, cv
        split         int   (N,)    optional: 0 train, 1 val, 2 test

``python -m reference_impls.data.qm9_convert RAW_DIR ROOT`` makes this archive from the public
download (``gdb9.sdf``, ``gdb9.sdf.csv``; see ``qm9_convert.py``) with Coulomb-matrix features.

Without ``split`` a seeded 80/10/10 permutation is used. Targets are standardised with the
training mean and standard deviation (stored on the benchmark so numbers can be mapped
back); each property is a task with an MSE loss and mean absolute error (in standardised
units) as metric. Graph neural networks are out of scope: the inputs are vectors.

The archive is checked on reading: shapes that disagree, NaN/inf values, split values other
than 0/1/2, fewer than 2 training molecules or a file that is not an .npz raise a
:class:`DataError` that starts with the archive's path.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from reference_impls.architectures.registry import Problem
from reference_impls.metrics import MeanAbsoluteError

from . import Benchmark, DataError, TaskSpec, require, starts_with
from .synthetic import TensorTasks, mse_loss

# What np.load raises for a file that is not a readable archive (zlib: a damaged compressed member).
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip's directory

LAYOUT = """  <root>/qm9.npz with arrays features (N, F) float, targets (N, T) float,
  target_names (T,) str, and optionally split (N,) int (0 train, 1 val, 2 test)"""


def read(root: str | Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The archive's arrays, checked against the layout, with ``split`` filled in if absent.

    Every fault is a :class:`DataError` that starts with the archive's path: without the checks
    a bad archive fails later inside torch or numpy, or trains on NaN without a word."""
    path = require(Path(root) / "qm9.npz", LAYOUT)
    data = _arrays(path)
    missing = {"features", "targets", "target_names"} - set(data)
    if missing:
        raise DataError(f"{path}: lacks array(s) {', '.join(sorted(missing))} (has: {', '.join(data) or 'none'}); "
                        "expected features (N, F), targets (N, T), target_names (T,), optionally split (N,)")
    _check_shapes(path, data)
    for key in ("features", "targets"):
        _check_finite(path, key, data[key])
    n = len(data["features"])
    if "split" in data:
        _check_split(path, data["split"], n)
    else:
        data["split"] = seeded_split(n, seed)
    train = int((data["split"] == 0).sum())
    if train < 2:
        raise DataError(f"{path}: {train} of {n} molecules are in the training split (split 0), need at "
                        "least 2: targets are standardised by the training rows' standard deviation")
    return data


def seeded_split(n: int, seed: int) -> np.ndarray:
    """0 (train) for 80% of the rows, 1 (val) and 2 (test) for 10% each, by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    split = np.zeros(n, dtype=np.int64)
    split[order[int(0.8 * n) : int(0.9 * n)]] = 1
    split[order[int(0.9 * n) :]] = 2
    return split


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the archive; a file np.load cannot read as an .npz is a DataError."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except READ_ERRORS as error:
        if not starts_with(path, ZIP_SIGNATURES + (np.lib.format.MAGIC_PREFIX,)):
            raise DataError(f"{path}: not a readable .npz archive (it is not a zip file, which every .npz is; "
                            "numpy.savez writes one)") from None
        raise DataError(f"{path}: not a readable .npz archive ({type(error).__name__}: {error})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # np.load also opens a bare .npy
        raise DataError(f"{path}: expected an .npz archive of named arrays, got a single .npy array")
    with loaded:
        try:
            return {k: loaded[k] for k in loaded.files}
        except READ_ERRORS as error:  # a damaged member, or an object array (needs pickle)
            raise DataError(f"{path}: an array could not be read ({type(error).__name__}: {error})") from None


def _check_shapes(path: Path, data: dict[str, np.ndarray]) -> None:
    """features (N, F) and targets (N, T) of real numbers, target_names (T,) distinct."""
    features, targets, names = data["features"], data["targets"], data["target_names"]
    for key, array, ndim in (("features", features, 2), ("targets", targets, 2), ("target_names", names, 1)):
        if array.ndim != ndim:
            raise DataError(f"{path}: expected {key} with {ndim} dimension(s), got shape {array.shape}")
    for key, array in (("features", features), ("targets", targets)):
        if array.dtype.kind not in "biuf":  # bool, int, unsigned, float
            raise DataError(f"{path}: expected {key} of real numbers, got dtype {array.dtype}")
    if targets.shape[0] != features.shape[0]:
        raise DataError(f"{path}: features has {features.shape[0]} rows (shape {features.shape}) but targets "
                        f"has {targets.shape[0]} (shape {targets.shape}); expected one row per molecule in both")
    if targets.shape[1] != names.shape[0]:
        raise DataError(f"{path}: targets has {targets.shape[1]} columns (shape {targets.shape}) but "
                        f"target_names has {names.shape[0]} names; expected one name per column")
    names = [str(name) for name in names.tolist()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: target_names must be distinct (each is a task), {', '.join(repeated)} repeats")


def _check_finite(path: Path, key: str, array: np.ndarray) -> None:
    """NaN or inf would make every loss (and the standardisation of targets) NaN."""
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataError(f"{path}: {key} holds {int(bad.sum())} non-finite values (NaN or inf), "
                        f"the first in row {row}; expected finite numbers")


def _check_split(path: Path, split: np.ndarray, n: int) -> None:
    """One of 0 (train), 1 (val), 2 (test) per molecule: other values would drop rows silently."""
    if split.shape != (n,):
        raise DataError(f"{path}: expected split of shape ({n},), one entry per molecule, got shape {split.shape}")
    wrong = ~np.isin(split, (0, 1, 2))
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        raise DataError(f"{path}: split values must be 0 (train), 1 (val) or 2 (test), got {split[row].item()!r} "
                        f"in row {row} ({int(wrong.sum())} rows wrong)")


def benchmark(root: str | Path, seed: int = 0, test_split: int = 2) -> Benchmark:
    if test_split not in (1, 2):  # 0 would test on the training rows
        raise ValueError(f"test_split must be 1 (val) or 2 (test), got {test_split!r}")
    data = read(root, seed)
    x = torch.as_tensor(data["features"], dtype=torch.float32)
    y = torch.as_tensor(data["targets"], dtype=torch.float32)
    train_rows = torch.as_tensor(data["split"] == 0)
    mean, std = y[train_rows].mean(0), y[train_rows].std(0).clamp_min(1e-8)
    y = (y - mean) / std
    names = tuple(str(s) for s in data["target_names"])

    def subset(rows):
        return TensorTasks(x[rows], {t: y[rows, k] for k, t in enumerate(names)})

    problem = Problem(names, (x.shape[1],), {t: 1 for t in names})
    tasks = {t: TaskSpec(mse_loss, MeanAbsoluteError) for t in names}
    test_rows = torch.as_tensor(data["split"] == test_split)
    extras = {"target_mean": mean, "target_std": std}  # to undo the standardisation
    return Benchmark(problem, subset(train_rows), subset(test_rows), tasks, extras)
