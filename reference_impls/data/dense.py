"""NYUv2 and Cityscapes in the pre-processed ``.npy`` layout of MTAN (Liu et al., CVPR 2019),
also used by LibMTL. One file per image and modality, numbered from 0:

    <root>/train/image/0.npy ... <root>/val/image/<n-1>.npy   (H, W, 3) float, RGB in [0, 1]
    <root>/<split>/label/<i>.npy      NYUv2: (H, W) class ids 0..12, -1 = unlabelled
    <root>/<split>/label_7/<i>.npy    Cityscapes: (H, W) class ids 0..6, -1 = unlabelled
                                      (LibMTL's copy, "cityscapes2", names this folder label)
    <root>/<split>/depth/<i>.npy      (H, W, 1) float, 0 = no measurement
    <root>/<split>/normal/<i>.npy     NYUv2 only: (H, W, 3) float surface normals

(MTAN's files are 288 x 384 for NYUv2 and 128 x 256 for Cityscapes; any size works here, as
long as every image of both splits has it: the model is built for one input shape.)
``downsample=N`` (``--data-kw downsample=4``) trains at 1/N of that size: each image is the
mean of its N x N blocks, each target the pixel at a block's centre (an average would blend
class ids, and missing depths with measured ones); a remainder of rows or columns is cut off.
Models with attention or affinities over every pixel need it: their memory grows with the
square of the pixel count (``reference_impls.memory`` says so before training).
The number of items is the number of ``image/*.npy`` files. Channels-last arrays become
channels-first tensors; labels become integer tensors. No augmentation is applied.

Tasks, losses and metrics follow the MTAN setup: segmentation (cross-entropy ignoring -1;
mIoU), depth (L1 over pixels with depth; absolute error), normals (1 − cosine over
labelled pixels; mean angular error in degrees).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from reference_impls.architectures.registry import Problem
from reference_impls.metrics import IGNORE_INDEX, MeanAbsoluteError, MeanAngularError, MeanIoU

from . import Benchmark, DataError, TaskSpec, require, starts_with

LAYOUT = """  <root>/{train,val}/image/<i>.npy    (H, W, 3) float RGB in [0, 1], i = 0..n-1
  <root>/{train,val}/<label folder>/<i>.npy  (H, W) class ids, -1 unlabelled
      (label for NYUv2 with 13 classes; label_7, or label in LibMTL's copy, for Cityscapes with 7)
  <root>/{train,val}/depth/<i>.npy    (H, W, 1) float, 0 = missing
  <root>/{train,val}/normal/<i>.npy   (H, W, 3) float (NYUv2 only)
  (the pre-processed layout of MTAN / LibMTL)"""


# Per task: the array shape each file must have, given the image's (H, W).
TARGET_SHAPES = {"segmentation": lambda h, w: (h, w), "depth": lambda h, w: (h, w, 1),
                 "normal": lambda h, w: (h, w, 3)}


class DenseNpy(Dataset):
    """Items ``(image (3, H, W), {task: target})`` read from ``<root>/<split>/<folder>/<i>.npy``.

    Opening checks that every folder holds the same files 0.npy .. (n-1).npy; ``check_shapes``
    reads every file's header; reading an item checks the image's size against image 0's, each
    array's shape against the image, that images, depths and normals are finite, and the class
    ids against ``num_classes``. Each failure is a :class:`DataError` naming the file.
    """

    def __init__(self, root: str | Path, split: str, folders: dict[str, str], num_classes: int,
                 downsample: int = 1):
        if downsample < 1:
            raise ValueError(f"downsample must be at least 1 (1 keeps the files' size), got {downsample}")
        self.path = Path(root) / split
        self.folders, self.num_classes, self.downsample = folders, num_classes, downsample  # task -> folder
        self.length = len(numbered_files(require(self.path / "image", LAYOUT)))
        if self.length == 0:
            raise FileNotFoundError(f"no .npy files in {self.path / 'image'}\nexpected layout:\n{LAYOUT}")
        for folder in folders.values():
            found = numbered_files(require(self.path / folder, LAYOUT))
            if len(found) != self.length:
                missing = sorted(set(range(self.length)) - set(found)) or [self.length]
                raise DataError(f"{self.path / folder / f'{missing[0]}.npy'}: expected one file per image, "
                                f"{self.length} in image/, found {len(found)} in {folder}/")
        self.size = self._image(0, header_only=True)[0].shape[:2]  # every image must have image 0's (H, W)
        if min(self.size) < downsample:
            raise DataError(f"{self.path / 'image' / '0.npy'}: downsample={downsample} leaves no pixel of a "
                            f"{self.size[0]} x {self.size[1]} image")

    def _image(self, i: int, header_only: bool = False) -> tuple[np.ndarray, Path]:
        array, path = self._array("image", i, header_only)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise DataError(f"{path}: expected an (H, W, 3) RGB image, got shape {array.shape}")
        if array.dtype.kind != "f":  # 0-255 pixels would train silently at 255 times the layout's scale
            raise DataError(f"{path}: expected float RGB values in [0, 1], got dtype {array.dtype}; "
                            f"for 0-255 pixels save image.astype(np.float32) / 255")
        return array, path

    def _check_size(self, image: np.ndarray, path: Path) -> None:
        if image.shape[:2] != self.size:  # batches stack images: a different size fails there, opaquely
            raise DataError(f"{path}: expected an image of {self.size[0]} x {self.size[1]} like image 0, "
                            f"got {image.shape[0]} x {image.shape[1]}")

    def _check_target_shape(self, task: str, array: np.ndarray, path: Path, i: int) -> None:
        expected = TARGET_SHAPES[task](*self.size)
        if array.shape != expected:
            raise DataError(f"{path}: expected shape {expected} to match image {i}, got {array.shape}")

    def __len__(self) -> int:
        return self.length

    def _array(self, folder: str, i: int, header_only: bool = False) -> tuple[np.ndarray, Path]:
        """The array of ``<folder>/<i>.npy``; with ``header_only`` a memory map, which reads just
        the header (and checks the file is as long as the header says)."""
        path = require(self.path / folder / f"{i}.npy", LAYOUT)
        try:
            return np.load(path, allow_pickle=False, mmap_mode="r" if header_only else None), path
        except (ValueError, OSError, EOFError) as error:  # looked into only now: _array runs for every item read
            if not starts_with(path, (np.lib.format.MAGIC_PREFIX,)):
                raise DataError(f"{path}: not a valid .npy file (it does not start with the .npy signature; "
                                "numpy.save writes one)") from None
            raise DataError(f"{path}: not a readable .npy array ({error})") from None

    def check_shapes(self) -> None:
        """Every file's shape, from its header alone: a bad file late in the test split would
        otherwise be found only when the trained model is evaluated, and the run lost."""
        for i in range(self.length):
            array, path = self._image(i, header_only=True)
            self._check_size(array, path)
            for task, folder in self.folders.items():
                self._check_target_shape(task, *self._array(folder, i, header_only=True), i)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        array, path = self._image(i)
        self._check_size(array, path)
        image = torch.from_numpy(np.moveaxis(self._block_means(finite(array, path)), -1, 0).astype(np.float32))
        targets = {}
        for task, folder in self.folders.items():
            array, path = self._array(folder, i)
            self._check_target_shape(task, array, path, i)
            if task != "segmentation":  # class ids are checked as integers below
                finite(array, path)
            array = self._block_centres(array)
            if task == "segmentation":
                targets[task] = torch.from_numpy(self._class_ids(array, path))
            else:  # depth (H, W, 1) and normal (H, W, 3): channels first
                targets[task] = torch.from_numpy(np.moveaxis(array, -1, 0).astype(np.float32))
        return image, targets

    def _block_means(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) -> (H // N, W // N, 3): the mean of each N x N block."""
        n = self.downsample
        h, w = self.size[0] // n, self.size[1] // n
        return image[: h * n, : w * n].reshape(h, n, w, n, -1).mean(axis=(1, 3)) if n > 1 else image

    def _block_centres(self, target: np.ndarray) -> np.ndarray:
        """(H, W, ...) -> (H // N, W // N, ...): the pixel at each N x N block's centre."""
        n = self.downsample
        h, w = self.size[0] // n, self.size[1] // n
        return target[n // 2 :: n, n // 2 :: n][:h, :w] if n > 1 else target

    def _class_ids(self, array: np.ndarray, path: Path) -> np.ndarray:
        """Integer class ids in -1 .. num_classes - 1 (-1 unlabelled), else an error naming the file:
        an out-of-range id would fail inside the loss, on a GPU as an opaque device assert."""
        ids = array.astype(np.int64)
        wrong = (ids != array) | (ids < IGNORE_INDEX) | (ids >= self.num_classes)
        if wrong.any():
            raise DataError(f"{path}: class ids must be integers from {IGNORE_INDEX} to {self.num_classes - 1}, "
                            f"found {array[wrong].flat[0]} ({int(wrong.sum())} pixels)")
        return ids


def finite(array: np.ndarray, path: Path) -> np.ndarray:
    """``array``, if it holds no NaN or inf: one would make the loss NaN and the run stop as
    'diverged', or put NaN into a test metric, with the file never named."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected real numbers, got dtype {array.dtype}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise DataError(f"{path}: holds {int(bad.sum())} non-finite value(s) (NaN or inf); expected finite numbers")
    return array


def numbered_files(folder: Path) -> list[int]:
    """The i of every ``<i>.npy`` in ``folder``: an error names a file not numbered so, or a gap."""
    numbers = []
    for path in folder.glob("*.npy"):
        if not path.stem.isdigit():
            raise DataError(f"{path}: files must be named 0.npy, 1.npy, ... (one per image)")
        numbers.append(int(path.stem))
    numbers.sort()
    for expected, number in enumerate(numbers):
        if number != expected:
            raise DataError(f"{folder / f'{expected}.npy'}: missing; files must be numbered 0 .. n-1 "
                            f"without gaps ({len(numbers)} files, highest {numbers[-1]}.npy)")
    return numbers


def segmentation_loss(prediction: Tensor, target: Tensor) -> Tensor:
    # cross_entropy's mean over no labelled pixel is 0/0 = NaN: a batch without labels adds 0 instead
    if not (target != IGNORE_INDEX).any():
        return prediction.sum() * 0
    return F.cross_entropy(prediction, target.long(), ignore_index=IGNORE_INDEX)


def depth_loss(prediction: Tensor, target: Tensor) -> Tensor:
    valid = target != 0
    return (prediction - target).abs()[valid].mean() if valid.any() else prediction.sum() * 0


def normal_loss(prediction: Tensor, target: Tensor) -> Tensor:
    valid = target.abs().sum(1) > 0
    cosine = (F.normalize(prediction, dim=1) * target).sum(1)
    return (1 - cosine[valid]).mean() if valid.any() else prediction.sum() * 0


def _benchmark(root: str | Path, folders: dict[str, str], num_classes: int, downsample: int) -> Benchmark:
    train = DenseNpy(root, "train", folders, num_classes, downsample)
    test = DenseNpy(root, "val", folders, num_classes, downsample)
    image, _ = train[0]  # also checks the first item's files now, before any training
    test[0]
    train.check_shapes()
    test.check_shapes()
    if test.size != train.size:
        raise DataError(f"{test.path / 'image' / '0.npy'}: validation images are {test.size[0]} x {test.size[1]}, "
                        f"training images {train.size[0]} x {train.size[1]}; the model is built for one size")
    out_dims = {"segmentation": num_classes, "depth": 1, "normal": 3}
    tasks_all = {
        "segmentation": TaskSpec(segmentation_loss, partial(MeanIoU, num_classes)),
        "depth": TaskSpec(depth_loss, partial(MeanAbsoluteError, ignore_zero=True)),
        "normal": TaskSpec(normal_loss, MeanAngularError),
    }
    names = tuple(folders)
    problem = Problem(names, tuple(image.shape), {t: out_dims[t] for t in names}, dense=True)
    return Benchmark(problem, train, test, {t: tasks_all[t] for t in names})


def nyuv2_benchmark(root: str | Path, num_classes: int = 13, downsample: int = 1) -> Benchmark:
    """NYUv2: segmentation (13 classes), depth, surface normals, at 1/``downsample`` of the files' size."""
    folders = {"segmentation": "label", "depth": "depth", "normal": "normal"}
    return _benchmark(root, folders, num_classes, downsample)


def cityscapes_benchmark(root: str | Path, label_folder: str | None = None, num_classes: int | None = None,
                         downsample: int = 1) -> Benchmark:
    """Cityscapes: segmentation, depth. The labels are read from ``label_folder``: by default
    MTAN's ``label_7``, or ``label`` where only that exists (LibMTL's copy of the same 7-class
    files). ``num_classes`` defaults to 19 for MTAN's ``label_19`` and to 7 otherwise. Images
    are read at 1/``downsample`` of the files' size."""
    if label_folder is None:
        label_folder = "label" if not (Path(root) / "train" / "label_7").exists() and (
            Path(root) / "train" / "label").is_dir() else "label_7"
    if num_classes is None:
        num_classes = 19 if label_folder == "label_19" else 7
    return _benchmark(root, {"segmentation": label_folder, "depth": "depth"}, num_classes, downsample)
