"""Rotation prediction as a second task, and as a label-free estimate of test accuracy.

Deng, Gould, Zheng, "What Does Rotation Prediction Tell Us about Classifier Accuracy under
Varying Testing Environments?", ICML 2021, arXiv:2106.05961.

The network is a shared backbone with two heads: the usual task head(s) and a 4-way head
that says by how much the input image was rotated (0, 90, 180 or 270 degrees). Both are
trained together; the rotation labels cost nothing, since the network rotates its own
inputs. The paper's finding is what makes the second head useful after training: across
many test sets with different distribution shifts, the accuracy of the rotation head and
the accuracy of the classifier move together almost linearly. So one fits a straight
line, classification accuracy against rotation accuracy, on shifted sets whose labels are
known, and then reads off the classifier's accuracy on a new, unlabelled test set from the
rotation accuracy alone, which needs no labels.

Sources, all from the authors' release (github.com/Simon4Yan/Accuracy-estimation-with-
self-supervision, owner Weijian Deng, the paper's first author; its README names the paper):

- the model: ``utils/densenet.py`` puts two linear layers on the same pooled features,
  ``fc`` for the classes and ``fc_ss`` with 4 outputs for the rotation;
- the training step: ``train.py`` scores the classifier on the batch as it is, then
  rotates every image of the batch by an angle drawn uniformly from the four
  (``rotate_batch(input, 'rand')``), runs the network again on the rotated copy, scores
  the rotation head with cross-entropy on the drawn angle, and minimises the plain sum of
  the two losses (weight 1 each);
- the rotations: ``utils/rotation.py`` turns an image by 90 degrees as "flip the width
  axis, then swap height and width", which is ``torch.rot90(x, 1, dims=(-2, -1))``; label
  k means k quarter turns;
- rotation accuracy: ``test_many.py`` shows every test image in all four rotations
  (``rotate_batch(inputs, 'expand')``) and counts the fraction of the 4N predictions that
  are right;
- the fit: ``test_many.py`` computes the Pearson and Spearman correlation of the two
  accuracies over 500 synthetic test sets and fits an ordinary least-squares line
  (scikit-learn ``LinearRegression``) from rotation accuracy to classification accuracy,
  then predicts the accuracy on CIFAR-10.1 from its rotation accuracy.

Here :class:`RotationPrediction` is the network: ``forward`` returns the task outputs only,
and in training mode ``encode`` also runs the rotated copy, whose rotation loss (times
``rotation_weight``, 1 as in the authors' code) is the model's ``auxiliary_loss()``, so
``python -m reference_impls.train`` minimises exactly the authors' sum. After training,
:func:`rotation_accuracy` and :func:`fit_accuracy_estimator` give the estimate.

Left out: the DenseNet-40-12 backbone (here the small convolutional trunk of
``encoders.py``), CIFAR-10 and the 500 synthetic test sets the authors generate from its
test set with image transformations and new backgrounds (``generate_synthetic_sets.py``),
the robust (Huber) regression that ``test_many.py`` fits beside the least-squares line,
the Spearman correlation, and the paper's variant that trains the backbone on the
classification loss alone and only the rotation head on the rotation loss. Our choices:
several tasks share the one rotation head (the paper has a single classifier), and the
rotation head reads the pooled encoder output, so dense tasks work too; the encoder runs
twice per training step, once on the batch and once on its rotated copy, as in the
authors' ``train.py``. Rotating a non-square image changes its shape, and rotating a 1x1
image does nothing, so both are refused (the paper's images are 32x32).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_at_least, require_positive
from .base import MultiTaskModel
from .encoders import heads_for, pooled_head, trunk_for

NUM_ROTATIONS = 4  # 0, 90, 180 and 270 degrees


def rotate(images: Tensor, quarter_turns: int) -> Tensor:
    """Every image of ``(B, C, H, W)`` turned by ``quarter_turns`` x 90 degrees, as the
    authors' ``tensor_rot_90`` (flip the width axis, then swap height and width) repeated."""
    return torch.rot90(images, quarter_turns, dims=(-2, -1))


def require_square(images: Tensor) -> None:
    """Quarter turns of a non-square image change its shape, so a batch could not be stacked."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation prediction needs a batch of square images (B, C, S, S), got {tuple(images.shape)}")


def rotate_each(images: Tensor, labels: Tensor) -> Tensor:
    """Image i turned by ``labels[i]`` quarter turns (the authors' ``rotate_batch_with_labels``)."""
    require_square(images)
    turned = torch.stack([rotate(images, k) for k in range(NUM_ROTATIONS)])  # (4, B, C, S, S)
    return turned[labels.to(images.device), torch.arange(len(images), device=images.device)]


def all_rotations(images: Tensor) -> tuple[Tensor, Tensor]:
    """The batch in each of the four rotations, stacked (4B images), and their labels
    (the authors' ``rotate_batch(..., 'expand')``: first all unturned, then all at 90, ...)."""
    require_square(images)
    turned = torch.cat([rotate(images, k) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(len(images))
    return turned, labels


class RotationPrediction(MultiTaskModel):
    """Shared ``encoder``, one head per task, and a 4-way ``rotation_head`` on the same features."""

    name = "rotation_prediction"
    per_pass_attributes = ("_last_rotation_loss",)

    def __init__(
        self,
        tasks: Sequence[str],
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        rotation_head: nn.Module,
        rotation_weight: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(tasks)
        if set(heads) != set(self.tasks):
            raise ValueError(f"need one head per task {self.tasks}, got heads for {sorted(heads)}")
        require_at_least(0, rotation_weight=rotation_weight)
        self.encoder = encoder
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.rotation_head = rotation_head
        self.rotation_weight = rotation_weight
        self.generator = torch.Generator().manual_seed(seed)  # draws the angles; CPU, same on every device
        self._last_rotation_loss: Tensor | None = None

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2, **kwargs) -> "RotationPrediction":
        require_positive(width=width, depth=depth)
        shape = tuple(problem.input_shape)
        if len(shape) != 3 or shape[1] != shape[2] or shape[1] < 2:
            raise ValueError(f"rotation prediction needs square images of side at least 2 (C, S, S), got {shape}: "
                             "a quarter turn changes a non-square image's shape and leaves a 1x1 image unchanged")
        encoder = trunk_for(shape, width, depth)
        return cls(problem.tasks, encoder, heads_for(problem, width), pooled_head(width, NUM_ROTATIONS), **kwargs)

    def rotation_logits(self, images: Tensor) -> Tensor:
        """Scores of the four angles, ``(B, 4)``, from the shared features."""
        return self.rotation_head(self.encoder(images))

    def rotation_loss(self, images: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the rotation head on ``images`` turned by ``labels`` quarter turns."""
        return F.cross_entropy(self.rotation_logits(rotate_each(images, labels)), labels.to(images.device))

    def encode(self, x: Tensor) -> Tensor:
        """The shared features of ``x``; in training mode also the rotation loss of a copy of
        ``x`` with one random angle per image, kept for :meth:`auxiliary_loss`."""
        if self.training:
            labels = torch.randint(NUM_ROTATIONS, (len(x),), generator=self.generator)
            self._last_rotation_loss = self.rotation_loss(x, labels)
        else:
            self._last_rotation_loss = None
        return self.encoder(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def auxiliary_loss(self) -> Tensor:
        """``rotation_weight`` x the rotation loss of the last training-mode pass."""
        if self._last_rotation_loss is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass in training mode first")
        return self.rotation_weight * self._last_rotation_loss

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()


@torch.no_grad()
def rotation_accuracy(model: RotationPrediction, images: Tensor) -> float:
    """Fraction of right angle predictions over every image in all four rotations; needs no labels."""
    turned, labels = all_rotations(images)
    return (model.rotation_logits(turned).argmax(dim=1) == labels).float().mean().item()


@dataclass(frozen=True)
class AccuracyEstimator:
    """The least-squares line ``accuracy ≈ slope · rotation accuracy + intercept`` and the
    Pearson correlation of the sets it was fitted on (how far to trust it)."""

    slope: float
    intercept: float
    pearson: float

    def predict(self, rotation_acc: float | Tensor) -> float | Tensor:
        """The estimated accuracy of a test set with rotation accuracy ``rotation_acc``."""
        return self.slope * rotation_acc + self.intercept


def fit_accuracy_estimator(rotation_accs: Sequence[float] | Tensor, accs: Sequence[float] | Tensor) -> AccuracyEstimator:
    """Fit accuracy on rotation accuracy over labelled (shifted) test sets, one pair per set."""
    r = torch.as_tensor(rotation_accs, dtype=torch.float64).reshape(-1)
    a = torch.as_tensor(accs, dtype=torch.float64).reshape(-1)
    if len(r) != len(a) or len(r) < 2:
        raise ValueError(f"need at least two test sets with one accuracy of each kind, got {len(r)} and {len(a)}")
    dr, da = r - r.mean(), a - a.mean()
    if not dr.pow(2).sum() > 0:
        raise ValueError("the rotation accuracies are all equal, so no line can be fitted")
    slope = (dr * da).sum() / dr.pow(2).sum()
    intercept = a.mean() - slope * r.mean()
    spread = (dr.pow(2).sum() * da.pow(2).sum()).sqrt()
    pearson = (dr * da).sum() / spread if spread > 0 else torch.tensor(float("nan"))
    return AccuracyEstimator(slope.item(), intercept.item(), pearson.item())
