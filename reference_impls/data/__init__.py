"""Data for the reference implementations: synthetic tasks and loaders for common benchmarks.

Every loader returns a :class:`Benchmark`: the :class:`~reference_impls.architectures.registry.Problem`
an architecture is built for, train/test datasets whose items are ``(x, {task: target})``,
and per task a loss and a metric. Nothing is downloaded; the real datasets must already be
on disk in the layout each module documents, and a missing file raises an error that
spells that layout out.

A training set may also say how it is batched and split: ``batch_sampler(tasks, batch_size,
generator)`` gives the batches of a model of ``tasks`` and ``validation_split(fraction, seed)``
the part held out by methods that need one; the harness uses them where they exist (Office:
every batch holds images of each domain, see ``office.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from reference_impls.architectures.registry import Problem
from reference_impls.checks import did_you_mean
from reference_impls.metrics import Metric


@dataclass(frozen=True)
class TaskSpec:
    """How one task is trained and measured."""

    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[], Metric]


@dataclass(frozen=True)
class Benchmark:
    problem: Problem
    train: Dataset
    test: Dataset
    tasks: dict[str, TaskSpec]
    extras: dict[str, object] = field(default_factory=dict)  # loader-specific facts


class DataError(ValueError):
    """A data file that exists but does not hold what its layout promises. The message starts
    with the file (and line, for text files) and says what was expected, so the command line
    reports it in one line, whether it surfaces when the data is opened or mid-training."""


def require(path: Path, layout: str) -> Path:
    """Return ``path`` if it exists, else raise an error that shows the expected layout."""
    if not path.exists():
        raise FileNotFoundError(f"missing {path}\nexpected layout:\n{layout}")
    return path


def starts_with(path: Path, signatures: tuple[bytes, ...]) -> bool:
    """Whether the file begins with one of ``signatures`` (True if it cannot be read: the caller's
    own error then says why). For a file np.load refused: numpy takes any file without the .npy
    or zip signature for a pickle and suggests allow_pickle=True, unsafe and beside the point."""
    try:
        with path.open("rb") as file:
            return file.read(max(map(len, signatures))).startswith(signatures)
    except OSError:
        return True


def loader(name: str) -> Callable[..., Benchmark]:
    """The function that builds benchmark ``name``; ``--data-kw`` options are its keywords
    (after the root directory, for the data read from disk)."""
    from . import celeba, dense, office, qm9, synthetic

    loaders = {"synthetic": synthetic.benchmark, "nyuv2": dense.nyuv2_benchmark,
               "cityscapes": dense.cityscapes_benchmark, "celeba": celeba.benchmark, "qm9": qm9.benchmark,
               "office31": office.office31_benchmark, "office_home": office.office_home_benchmark}
    if name not in loaders:
        raise KeyError(f"unknown data {name!r}{did_you_mean(name, loaders)}; available: {', '.join(loaders)}")
    return loaders[name]


def option_functions(name: str) -> list[Callable]:
    """The functions ``--data-kw`` options reach: the loader, and for the synthetic tasks the
    generator its ``**kwargs`` go to (num_sines, noise_std, ...)."""
    from . import synthetic

    build = loader(name)
    return [build, synthetic.correlated_regression] if build is synthetic.benchmark else [build]


def load(name: str, root: str | Path | None = None, **kwargs) -> Benchmark:
    """Benchmark ``name`` (see :func:`loader` for the names) with loader options."""
    build = loader(name)
    if name == "synthetic":
        return build(**kwargs)
    return build(_root(root, name), **kwargs)


def _root(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"data {name!r} is read from disk: pass its root directory")
    return Path(root)
