"""Office-31 and Office-Home: one classification task per domain (multi-input MTL).

Folder layouts as distributed:

    Office-31:   <root>/{amazon,dslr,webcam}/images/<class>/<image>.jpg
    Office-Home: <root>/{Art,Clipart,Product,Real World}/<class>/<image>.jpg

Both are accepted (a domain folder with an ``images`` sub-folder is read through it). The
official Office-Home archive names its fourth domain ``Real World``, with a space; many
copies rename it ``Real_World``. Either folder is read, and the task is called ``Real_World``.
Classes are the sorted union of class-folder names over the domains, so a class has the
same index in every domain. Each domain has its *own* inputs (multi-input MTL): :func:`domains`
gives one dataset per task. :func:`benchmark` fits them to the single-input loop of
``reference_impls.train`` without changing what is learned. Its datasets hold every domain's
images, each labelled for its own domain's task and :data:`NOT_THIS_DOMAIN` for the others,
whose loss and accuracy skip it; and :class:`DomainBatches` makes every training batch hold
``batch_size`` images of each domain, as a multi-input loop draws one batch per task. Task k's
loss then depends only on domain k's images, as in LibMTL's multi-input mode. One difference
remains: batch norm normalises the domains' images together, where a loop that runs the
model once per domain normalises each alone.
There is no official train/test split; :func:`split` makes a seeded one.

Images are decoded with Pillow (see ``celeba.load_image``); files other than .jpg, .jpeg,
.png are ignored.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler, Subset

from reference_impls.architectures.registry import Problem
from reference_impls.metrics import Accuracy

from . import Benchmark, TaskSpec, require
from .celeba import load_image

LAYOUT = """  <root>/<domain>/images/<class>/<image>   (Office-31: amazon, dslr, webcam)
  <root>/<domain>/<class>/<image>          (Office-Home: Art, Clipart, Product, Real World or Real_World)"""
OFFICE_31 = ("amazon", "dslr", "webcam")
OFFICE_HOME = ("Art", "Clipart", "Product", "Real_World")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _class_root(root: Path, domain: str) -> Path:
    spaced = root / domain.replace("_", " ")  # the archive's "Real World" for the task Real_World
    folder = spaced if not (root / domain).exists() and spaced.is_dir() else require(root / domain, LAYOUT)
    return folder / "images" if (folder / "images").is_dir() else folder


class DomainImages(Dataset):
    """Items ``(image (3, size, size), class index)`` of one domain."""

    def __init__(self, folder: Path, classes: list[str], size: int):
        self.size = size
        self.items = [
            (path, index)
            for index, name in enumerate(classes) if (folder / name).is_dir()
            for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.items:
            raise FileNotFoundError(f"no images under {folder}\nexpected layout:\n{LAYOUT}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        return load_image(path, self.size), label


def domains(root: str | Path, names: tuple[str, ...] = OFFICE_31, size: int = 64
            ) -> tuple[dict[str, DomainImages], list[str]]:
    """One dataset per domain and the shared, sorted class list."""
    root = Path(root)
    folders = {d: _class_root(root, d) for d in names}
    classes = sorted({p.name for f in folders.values() for p in f.iterdir() if p.is_dir()})
    return {d: DomainImages(f, classes, size) for d, f in folders.items()}, classes


def split(dataset: Dataset, test_fraction: float = 0.2, seed: int = 0) -> tuple[Subset, Subset]:
    """A seeded random train/test split of one domain."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(order) - int(round(test_fraction * len(order)))
    return Subset(dataset, order[:cut]), Subset(dataset, order[cut:])


# ----------------------------------------------------------------------------------------------
# The domains as one benchmark for the single-input training loop
# ----------------------------------------------------------------------------------------------

NOT_THIS_DOMAIN = -1  # an image's label for every task but its own domain's


class DomainTargets(Dataset):
    """The domains' images in one dataset: item i is ``(image, {domain: label})`` with the
    class index for the image's own domain and ``NOT_THIS_DOMAIN`` for every other."""

    def __init__(self, parts: dict[str, Dataset]):
        self.parts, self.names = parts, tuple(parts)
        self.starts = list(itertools.accumulate((len(d) for d in parts.values()), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        k = bisect.bisect_right(self.starts, i) - 1
        domain = self.names[k]
        image, label = self.parts[domain][i - self.starts[k]]
        return image, {d: torch.tensor(label if d == domain else NOT_THIS_DOMAIN) for d in self.names}

    def indices(self, domain: str) -> range:
        k = self.names.index(domain)
        return range(self.starts[k], self.starts[k + 1])

    def batch_sampler(self, tasks: Sequence[str] | None, batch_size: int, generator: torch.Generator) -> DomainBatches:
        """What the training loop draws its batches with, for a model of ``tasks`` (None: all)."""
        return DomainBatches([self.indices(t) for t in tasks or self.names], batch_size, generator)

    def validation_split(self, fraction: float, seed: int) -> tuple[DomainTargets, DomainTargets]:
        """(rest, validation) for the methods that hold data out: ``fraction`` of each domain,
        at least one image of a domain that has two, so every task keeps both parts."""
        rest, held = {}, {}
        for k, (domain, data) in enumerate(self.parts.items()):
            n_val = min(len(data) - 1, max(1, round(fraction * len(data))))
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + k)).tolist()
            rest[domain], held[domain] = Subset(data, order[n_val:]), Subset(data, order[:n_val])
        return DomainTargets(rest), DomainTargets(held)


class DomainBatches(Sampler[list[int]]):
    """Each batch: ``batch_size`` images of every domain (all of a domain with fewer), shuffled
    per domain. An epoch is as many batches as the largest domain fills; a smaller domain is
    reshuffled and drawn again when it runs out, as a multi-input loop cycles its loaders."""

    def __init__(self, domains: Sequence[range], batch_size: int, generator: torch.Generator):
        self.domains, self.batch_size, self.generator = list(domains), batch_size, generator

    def __len__(self) -> int:
        return math.ceil(max(len(d) for d in self.domains) / self.batch_size)

    @property
    def batch_examples(self) -> int:
        """Images in every batch: the same count each step."""
        return sum(min(self.batch_size, len(d)) for d in self.domains)

    def _shuffled(self, domain: range) -> Iterator[int]:
        while True:
            yield from (domain[i] for i in torch.randperm(len(domain), generator=self.generator).tolist())

    def __iter__(self) -> Iterator[list[int]]:
        streams = [(self._shuffled(d), min(self.batch_size, len(d))) for d in self.domains if len(d)]
        for _ in range(len(self)):
            yield [i for stream, n in streams for i in itertools.islice(stream, n)]


def domain_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over this domain's images only; 0 (with a graph) for a batch without one."""
    mine = target != NOT_THIS_DOMAIN
    if not mine.any():
        return prediction.sum() * 0.0
    return F.cross_entropy(prediction[mine], target[mine].long())


def benchmark(root: str | Path, names: Sequence[str] = OFFICE_31, size: int = 64,
              test_fraction: float = 0.2, seed: int = 0) -> Benchmark:
    """One classification task per domain; each domain split into train and test by ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if size < 1:  # Pillow's error for it would be blamed on the first image
        raise ValueError(f"size must be at least 1 (pixels per side), got {size}")
    parts, classes = domains(root, tuple(names), size)
    halves = {d: split(data, test_fraction, seed) for d, data in parts.items()}
    for d, (train, test) in halves.items():
        if not len(train) or not len(test):
            raise ValueError(f"domain {d} has {len(parts[d])} image(s): too few for a train and a test part "
                             f"with test_fraction {test_fraction}")
    problem = Problem(tuple(parts), (3, size, size), {d: len(classes) for d in parts})
    spec = TaskSpec(loss=domain_loss, metric=partial(Accuracy, ignore_index=NOT_THIS_DOMAIN))
    return Benchmark(problem, DomainTargets({d: h[0] for d, h in halves.items()}),
                     DomainTargets({d: h[1] for d, h in halves.items()}), {d: spec for d in parts},
                     extras={"classes": classes})


def office31_benchmark(root: str | Path, size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> Benchmark:
    """Office-31: amazon, dslr, webcam; 31 classes."""
    return benchmark(root, OFFICE_31, size, test_fraction, seed)


def office_home_benchmark(root: str | Path, size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> Benchmark:
    """Office-Home: Art, Clipart, Product, Real_World; 65 classes."""
    return benchmark(root, OFFICE_HOME, size, test_fraction, seed)
