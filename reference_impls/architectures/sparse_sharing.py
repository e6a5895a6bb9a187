"""Sparse sharing: every task a binary-masked subnetwork of one shared base network.

Sun, Shao, Li, Liu, Yan, Qiu, Huang, "Learning Sparse Sharing Architectures for Multiple
Tasks", AAAI 2020, arXiv:1911.05034.

One over-parameterised base network with weights θ is shared by all tasks; task t uses
only the subnetwork θ ⊙ M_t picked out by its binary mask M_t. Where masks overlap the
weights are shared, where they do not they are private, so the sharing is decided per
weight instead of per layer: all-ones masks give hard sharing, disjoint masks separate
networks. The method has two phases (the paper's method section, checked against the
authors' code):

1. Masks, one task at a time, by iterative magnitude pruning (IMP) from the same random
   initialisation θ_0: train the subnetwork on task t alone, drop the ``rate`` fraction of
   its kept weights with the smallest magnitude (one ranking over all layers together),
   reset the kept weights to θ_0, repeat. With ``rounds`` rounds down to a final density
   ρ, each round removes ``1 − ρ^(1/rounds)`` of what is left (:func:`iterative_magnitude_pruning`).
2. Multi-task training from θ_0: a batch of task t updates only the weights in M_t, since
   t's output is computed with θ ⊙ M_t (so dL_t/dθ = (dL_t/d(θ ⊙ M_t)) ⊙ M_t, masked
   entries get exactly 0, tested). Entries in several masks get gradient from every task
   that keeps them. The authors' loop updates on one task's batch at a time;
   :meth:`forward` returns every task's output, so the usual summed loss also works.

Phase 1 is the paper's Algorithm 1, which prunes a rate alpha of the remaining weights per
round until the density is at most S; ``rounds`` and ``final_density`` give the same schedule by its
final density. The paper numbers no equation of the method: Eqs. (1)-(3) are the hard and
hierarchical sharing it compares with, Eq. (4) the masks' overlap ratio of its analysis
(checked in the AAAI copy on the first author's site, txsun1997/txsun1997.github.io,
papers/aaai2020.pdf).

Biases are not pruned (shared by all tasks, as in the authors' code), every task has its
own head. The base network is any stack of ``nn.Linear`` / ``nn.Conv2d`` layers each
followed by a ReLU (what ``trunk_for`` builds).

Left out: choosing each task's mask among the pruning rounds by validation score (the
paper keeps every round's mask and picks the best; here the last round's mask is used),
the optional multi-task warm-up before pruning, and the paper's sequence-labelling
networks (BiLSTM / CNN encoders). The official code prunes only the LSTM and char-CNN
weights (word embeddings and output layers stay dense; here the trunk's input layer is
pruned too) and defaults to a final density of 0.1 in 10 rounds (20 in its run script).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import backbone_layers, conv_geometry, heads_for, run_layer, trunk_for
from .registry import Problem


class Snapshot(nn.Module):
    """Copies of parameters as buffers: they follow ``.to()`` and are in the state_dict."""

    def __init__(self, parameters: Iterable[nn.Parameter]):
        super().__init__()
        for i, p in enumerate(parameters):
            self.register_buffer(f"p{i}", p.detach().clone())


class SparseLayer(nn.Module):
    """A linear or convolution layer whose weight each task sees through its own mask."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, num_tasks: int):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.geometry = conv_geometry(layer)
        masks = torch.ones(num_tasks, *self.weight.shape, dtype=torch.bool)
        self.register_buffer("masks", masks)  # masks[k] = M_k for this layer

    def forward(self, x: Tensor, k: int) -> Tensor:
        w = self.weight * self.masks[k]  # θ ⊙ M_k: the gradient is masked the same way
        return run_layer(self.geometry, x, w, self.bias)


class SparseSharing(MultiTaskModel):
    """A masked base network (one mask per task) and one head per task."""

    name = "sparse_sharing"
    equations_checked_in = "txsun1997/txsun1997.github.io, papers/aaai2020.pdf"
    training_procedure = "each task's mask comes from iterative magnitude pruning (prune(), rewind()) before joint training"

    def __init__(self, tasks: Sequence[str], backbone: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        layers = backbone_layers(backbone, purpose="mask")
        self.layers = nn.ModuleList(SparseLayer(m, len(self.tasks)) for m in layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.initial = Snapshot(self.parameters())  # θ_0, saved with the model for rewind()

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2) -> "SparseSharing":
        return cls(problem.tasks, trunk_for(problem.input_shape, width, depth), heads_for(problem, width))

    def masks(self, task: str) -> list[Tensor]:
        """M_task, one boolean tensor per layer."""
        k = self.tasks.index(task)
        return [layer.masks[k] for layer in self.layers]

    def density(self, task: str) -> float:
        """Fraction of the base network's weights that ``task`` keeps."""
        masks = self.masks(task)
        return sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)

    @torch.no_grad()
    def prune(self, task: str, rate: float) -> None:
        """Drop the ``rate`` fraction of ``task``'s kept weights with the smallest magnitude."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        k = self.tasks.index(task)
        scores = torch.cat([
            torch.where(layer.masks[k], layer.weight.abs(), torch.inf).flatten() for layer in self.layers
        ])  # one ranking over all layers; pruned entries never come back
        n_drop = round(rate * torch.isfinite(scores).sum().item())
        dropped = torch.zeros_like(scores, dtype=torch.bool)
        dropped[scores.topk(n_drop, largest=False).indices] = True
        for layer, part in zip(self.layers, dropped.split([la.weight.numel() for la in self.layers])):
            layer.masks[k] &= ~part.view_as(layer.weight)

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset every parameter to its initial value θ_0 (masks are kept)."""
        for p, initial in zip(self.parameters(), self.initial.buffers(), strict=True):
            p.copy_(initial)

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        k = self.tasks.index(task)
        for layer in self.layers:
            x = torch.relu(layer(x, k))
        return self.heads[task](x)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.forward_task(x, t) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # The weight tensors are shared objects; which entries a task uses is in its mask.
        return self.heads[task].parameters()


def iterative_magnitude_pruning(
    model: SparseSharing,
    task: str,
    train: Callable[[SparseSharing, str], None],
    rounds: int,
    final_density: float,
) -> None:
    """Phase 1 for one task: ``rounds`` of train -> prune -> rewind to θ_0.

    ``train(model, task)`` fits the current subnetwork on ``task`` alone (a fresh optimiser
    each call). Afterwards the parameters are back at θ_0 and ``task``'s mask keeps about
    ``final_density`` of the weights.
    """
    if rounds < 1 or not 0.0 < final_density <= 1.0:
        raise ValueError("need rounds >= 1 and final_density in (0, 1]")
    rate = 1.0 - final_density ** (1.0 / rounds)  # per round, as in the authors' code
    for _ in range(rounds):
        train(model, task)
        model.prune(task, rate)
        model.rewind()
