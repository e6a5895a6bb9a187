"""CelebA attributes: 40 binary tasks on aligned face images.

Layout of the official release (files as distributed, nothing converted):

    <root>/list_attr_celeba.txt      line 1: number of images N
                                     line 2: the 40 attribute names, space separated
                                     then N lines: "<file> v_1 ... v_40", v in {-1, 1}
    <root>/list_eval_partition.txt   N lines "<file> s", s = 0 train, 1 val, 2 test
    <root>/img_align_celeba/<file>   the aligned JPEG images (e.g. 000001.jpg)

The official Google Drive folder keeps the same files in subfolders, Anno/list_attr_celeba.txt,
Eval/list_eval_partition.txt and Img/img_align_celeba/ (after unzipping Img/img_align_celeba.zip);
that layout is read too. torchvision's download is the flat one above.

Images are decoded with Pillow (installed alongside matplotlib; torchvision is not used),
converted to RGB, resized to ``size`` x ``size`` and scaled to [0, 1]. If Pillow is not
importable, reading an image raises an ImportError that says so; the label files are still
parsed. Each attribute is a task with one logit (binary cross-entropy; accuracy).

Both label files are checked line by line when a split is opened; a fault (a count that
disagrees with the lines, a label other than -1/1, a split other than 0/1/2, a file listed
twice, an image listed for the split but absent from the image folder) is a
:class:`DataError` that starts with ``file:line``. Images are decoded only when read, so a
damaged (present but unreadable) image is reported when the loop reaches it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from reference_impls.architectures.registry import Problem
from reference_impls.metrics import Accuracy

from . import Benchmark, DataError, TaskSpec, require

LAYOUT = """  <root>/list_attr_celeba.txt     N, then 40 attribute names, then '<file> ±1 x 40' per image
  <root>/list_eval_partition.txt  '<file> 0|1|2' per image (train/val/test)
  <root>/img_align_celeba/<file>  aligned JPEG images
  (or, as in the official Google Drive folder: <root>/Anno/list_attr_celeba.txt,
   <root>/Eval/list_eval_partition.txt, <root>/Img/img_align_celeba/<file>)"""

# Where each part lives: flat (torchvision) first, then the official Drive folder's subfolders.
PLACES = {"attributes": ("list_attr_celeba.txt", "Anno/list_attr_celeba.txt"),
          "partition": ("list_eval_partition.txt", "Eval/list_eval_partition.txt"),
          "images": ("img_align_celeba", "Img/img_align_celeba")}


def locate(root: Path, part: str) -> Path:
    """The path of ``part`` in whichever of the two layouts holds it; missing from both is the
    usual error with the layout spelled out (naming the flat path)."""
    for relative in PLACES[part]:
        if (root / relative).exists():
            return root / relative
    return require(root / PLACES[part][0], LAYOUT)

SPLITS = {"train": 0, "val": 1, "test": 2}
BINARY = {"-1": 0, "1": 1}  # label as written -> class


def read_attributes(root: Path) -> tuple[list[str], dict[str, list[int]]]:
    """Attribute names and, per file, its 40 labels mapped from {-1, 1} to {0, 1}.

    Every line is checked, and a fault is a :class:`DataError` naming ``file:line``: a label
    other than -1/1 would otherwise become a silent 0 or 1, and a repeated file a lost row."""
    path = locate(root, "attributes")
    lines = _lines(path)
    count, names = _header(path, lines)
    rows = lines[2:]
    while rows and not rows[-1].strip():  # a trailing blank line is not an image
        rows.pop()
    if len(rows) != count:
        raise DataError(f"{path}:1: announces {count} images, but {len(rows)} image lines follow")
    labels, seen = {}, {}
    for number, line in enumerate(rows, start=3):
        fields = line.split()
        if len(fields) != len(names) + 1:
            raise DataError(f"{path}:{number}: expected a file name and {len(names)} values "
                            f"of -1 or 1, got {len(fields)} fields")
        _first_listing(path, number, fields[0], seen)
        labels[fields[0]] = _labels(path, number, names, fields[1:])
    return names, labels


def _lines(path: Path) -> list[str]:
    """The file's lines, split on newlines only so that line numbers match an editor's; a file
    that is not text is a DataError rather than a bare UnicodeDecodeError."""
    try:
        return path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: expected a text file, got undecodable bytes ({error.reason} "
                        f"at byte {error.start})") from None


def _first_listing(path: Path, number: int, name: str, seen: dict[str, int]) -> None:
    """Record that ``name`` is on line ``number``; a second line for it is an error, since a
    dict would keep only the last one and drop the other without a word."""
    if name in seen:
        raise DataError(f"{path}:{number}: {name} is listed twice (first on line {seen[name]})")
    seen[name] = number


def _header(path: Path, lines: list[str]) -> tuple[int, list[str]]:
    """Line 1, the image count, and line 2, the attribute names (distinct: each is a task)."""
    first = lines[0].strip() if lines else ""
    if not (first.isascii() and first.isdigit()):
        raise DataError(f"{path}:1: expected the number of images, got {first!r}")
    names = lines[1].split() if len(lines) > 1 else []
    if not names:
        raise DataError(f"{path}:2: expected the attribute names, space separated, got an empty line")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}:2: attribute names must be distinct, {', '.join(repeated)} repeats")
    return int(first), names


def _labels(path: Path, number: int, names: list[str], values: list[str]) -> list[int]:
    """-1/1 as 0/1. Only these two spellings are accepted: 0 is not a CelebA label, and reading
    it (or 2, or 'x') as a class would train on a corrupted file without a word."""
    for name, value in zip(names, values):
        if value not in BINARY:
            raise DataError(f"{path}:{number}: expected -1 or 1 for {name}, got {value!r}")
    return [BINARY[v] for v in values]


def _partition_rows(root: Path) -> list[tuple[int, str, int]]:
    """``(line, file, split)`` per non-blank line. A split outside 0..2 is an error naming
    ``file:line``, not a file that silently belongs to no split; so is a file listed twice."""
    path = locate(root, "partition")
    rows, seen = [], {}
    for number, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{path}:{number}: expected '<file> <split>' with split 0 (train), 1 (val) "
                            f"or 2 (test), got {line.strip()!r}")
        _first_listing(path, number, fields[0], seen)
        rows.append((number, fields[0], int(fields[1])))
    return rows


def _all_listed(rows: list[tuple[int, str]], found, lacking: str, split: str, partition: Path) -> None:
    """Every file of the split is in ``found`` (the attribute lines, the image folder), else an
    error at the partition line of the first one missing: found now, not mid-training."""
    missing = [(number, file) for number, file in rows if file not in found]
    if missing:
        number, file = missing[0]
        raise DataError(f"{partition}:{number}: {file} {lacking} "
                        f"({len(missing)} of the {split} split lack it)")


def load_image(path: Path, size: int) -> Tensor:
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow ships with matplotlib here
        raise ImportError("reading CelebA images needs Pillow (pip install pillow)") from error
    try:
        with Image.open(require(path, LAYOUT)) as image:
            array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for a damaged file do not all name it
        raise DataError(f"{path}: not a readable image ({error})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


class CelebA(Dataset):
    """Items ``(image (3, size, size), {attribute: 0 or 1})`` for one split."""

    def __init__(self, root: str | Path, split: str = "train", size: int = 64):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if size < 1:
            raise ValueError(f"size must be at least 1 (pixels per side), got {size}")
        self.root, self.size = Path(root), size
        self.attributes, labels = read_attributes(self.root)
        rows = [(n, f) for n, f, s in _partition_rows(self.root) if s == SPLITS[split]]
        self.images = locate(self.root, "images")
        present = {entry.name for entry in os.scandir(self.images)}  # one listing, not one stat per file
        partition = locate(self.root, "partition")
        _all_listed(rows, labels, f"has no line in {locate(self.root, 'attributes').name}", split, partition)
        _all_listed(rows, present, f"is not in {self.images}", split, partition)
        self.files = sorted(f for _, f in rows)
        self.labels = torch.tensor([labels[f] for f in self.files], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = load_image(self.images / self.files[i], self.size)
        return image, {a: self.labels[i, k] for k, a in enumerate(self.attributes)}


def binary_loss(prediction: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(prediction.reshape(target.shape), target.float())


def benchmark(root: str | Path, size: int = 64, test_split: str = "test") -> Benchmark:
    if test_split not in ("val", "test"):  # "train" would test on the training images
        raise ValueError(f"test_split must be val or test, got {test_split!r}")
    train, test = CelebA(root, "train", size), CelebA(root, test_split, size)
    tasks = tuple(train.attributes)
    problem = Problem(tasks, (3, size, size), {t: 1 for t in tasks})
    return Benchmark(problem, train, test, {t: TaskSpec(binary_loss, Accuracy) for t in tasks})
