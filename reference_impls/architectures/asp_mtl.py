"""ASP-MTL: adversarial shared-private multi-task learning.

Liu, Qiu, Huang, "Adversarial Multi-task Learning for Text Classification", ACL 2017
(arXiv:1704.05742). Every task k reads two encoders: one shared by all tasks (features s)
and one private to the task (features h^k); its classifier sees [s, h^k]. Two extra
terms keep the two spaces apart (the adversarial and orthogonality losses of the paper's
adversarial shared-private model, Sec. 4):

* adversarial loss: a task discriminator D reads the shared features of an example and
  guesses which task it came from; D minimises that cross-entropy while the shared
  encoder maximises it, so the shared space keeps only task-invariant information
  (Eq. 13). The min-max is one backward pass through a gradient-reversal layer (Ganin &
  Lempitsky, as the paper's Sec. 4.4 says): identity forward, gradient times -lambda
  backward (tested).
* orthogonality ("difference") loss  sum_k ||S^k^T H^k||_F^2, where the rows of S^k and
  H^k are the shared and private features of task k's examples: it pushes the private
  space to hold what the shared one does not (Eq. 14; tested against a hand computation).
  The TensorFlow re-implementations fudan_mtl_reviews and tensorflow-ASP-MTL instead use
  Domain Separation Networks' version (features centred over the batch, each row scaled to
  unit length, the squared entries averaged), which is far smaller; here the plain sum of
  Eq. 14, so the same orthogonality weight weighs much more.

The task objective is plus ``adversarial_weight`` x the adversarial term plus
``orthogonality_weight`` x the orthogonality term (Eq. 15); :meth:`ASPMTL.auxiliary_loss` returns
those two terms of the last forward pass, which the training harness adds.

Task of origin. In the paper each task has its own data set, so every example has a task
label. Pass it as ``forward(x, task_ids=...)`` (a (B,) long tensor of task indices). With
a plain ``forward(x)`` every example is an input of every task, the task of origin is
undefined and the adversarial term is zero; the orthogonality term then uses all
examples for every task. The training harness calls ``forward(x)``, so under it the
discriminator never trains (:attr:`ASPMTL.training_procedure` says so).

Left out: the paper's LSTM encoders and word embeddings (any encoder fits: the defaults
are the package's small MLP / conv trunks), training on unlabelled data through the
discriminator, and the paper's tuned weights (the defaults 0.05 / 0.01 are the two
TensorFlow re-implementations' values, FrankWork/fudan_mtl_reviews and
ChenglongChen/tensorflow-ASP-MTL, which also put dropout before the discriminator and average
its cross-entropy within each task's batch and sum over tasks, where here it is averaged over
the mixed batch: about 1/K as much for the same weight).

Equation numbers checked in a Markdown transcript of arXiv:1704.05742, found in the public GitHub
index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import MultiTaskModel
from .encoders import head_for, heads_for, trunk_for


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coefficient: float) -> Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coefficient * grad, None


def reverse_gradient(x: Tensor, coefficient: float = 1.0) -> Tensor:
    """Gradient-reversal layer: returns ``x``; multiplies the incoming gradient by -coefficient."""
    return _ReverseGradient.apply(x, coefficient)


def as_rows(features: Tensor) -> Tensor:
    """(B, C) or (B, C, H, W) -> (rows, C): one row per example (and position)."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def orthogonality_penalty(shared: Tensor, private: Tensor) -> Tensor:
    """||S^T H||_F^2 with the rows of S and H the (example, position) feature vectors."""
    return (as_rows(shared).T @ as_rows(private)).pow(2).sum()


class ASPMTL(MultiTaskModel):
    """Shared and private encoders, heads on [shared, private], a task discriminator."""

    name = "asp_mtl"
    equations_checked_in = "a Markdown transcript of arXiv:1704.05742"
    training_procedure = ("each example comes from one task's data set and the task discriminator learns that origin "
                          "adversarially (forward(x, task_ids=...)); without task ids the adversarial term is zero")

    def __init__(
        self,
        tasks: Sequence[str],
        shared_encoder: nn.Module,
        private_encoders: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        discriminator: nn.Module,
        adversarial_weight: float = 0.05,
        orthogonality_weight: float = 0.01,
        reversal: float = 1.0,
    ):
        super().__init__(tasks)
        self.shared_encoder = shared_encoder
        self.private_encoders = nn.ModuleDict({t: private_encoders[t] for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.discriminator = discriminator  # shared features -> K task logits
        self.adversarial_weight = adversarial_weight
        self.orthogonality_weight = orthogonality_weight
        self.reversal = reversal
        self._last_terms: tuple[Tensor, Tensor] | None = None  # set by forward

    @classmethod
    def from_problem(cls, problem, width: int = 16, depth: int = 2, **kw) -> "ASPMTL":
        shape = problem.input_shape
        private = {t: trunk_for(shape, width, depth) for t in problem.tasks}
        discriminator = head_for(shape, width, len(problem.tasks), dense=False)  # image-level
        return cls(problem.tasks, trunk_for(shape, width, depth), private,
                   heads_for(problem, 2 * width), discriminator, **kw)

    def adversarial_loss(self, shared: Tensor, task_ids: Tensor) -> Tensor:
        """Cross-entropy of the discriminator's task guess; reversed on the way to the encoder."""
        logits = self.discriminator(reverse_gradient(shared, self.reversal))
        return F.cross_entropy(logits, task_ids)

    def difference_loss(self, shared: Tensor, privates: Mapping[str, Tensor],
                        task_ids: Tensor | None) -> Tensor:
        """sum_k ||S^k^T H^k||_F^2 over the examples of task k (all examples without ids)."""
        total = shared.new_zeros(())
        for k, t in enumerate(self.tasks):
            rows = slice(None) if task_ids is None else task_ids == k
            total = total + orthogonality_penalty(shared[rows], privates[t][rows])
        return total

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> dict[str, Tensor]:
        shared = self.shared_encoder(x)
        privates = {t: self.private_encoders[t](x) for t in self.tasks}
        outputs = {t: self.heads[t](torch.cat([shared, privates[t]], dim=1)) for t in self.tasks}
        adversarial = shared.new_zeros(()) if task_ids is None else self.adversarial_loss(shared, task_ids)
        self._last_terms = (adversarial, self.difference_loss(shared, privates, task_ids))
        return outputs

    def auxiliary_loss(self) -> Tensor:
        """adversarial_weight x L_adv + orthogonality_weight x L_diff of the last forward pass."""
        if self._last_terms is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass first")
        adversarial, difference = self._last_terms
        return self.adversarial_weight * adversarial + self.orthogonality_weight * difference

    def __getstate__(self) -> dict:
        # the cached terms belong to one forward pass (and its graph): copies start without them
        return {**super().__getstate__(), "_last_terms": None}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.private_encoders[task].parameters()
        yield from self.heads[task].parameters()
