"""Recon: find the shared layers whose task gradients conflict most, and give each task its own copy.

Shi, Li, Zhang, Chen & Wu, "Recon: Reducing Conflicting Gradients From the Root For Multi-Task
Learning", ICLR 2023, arXiv:2302.11289 (OpenReview ivwZO-HnzG_), checked against the authors'
code (github.com/moukamisama/Recon: ``models/recon_model.py`` records the cosines,
``scripts/cal_conflict_scores.py`` turns them into scores, ``archs/modules_recon.py`` branches
the layers). Equation, definition and algorithm numbers were checked in a Markdown conversion of
arXiv:2302.11289v1 in the GitHub file index (index id 66070755917). Notation: the paper has T
tasks, n shared layers and turns its top K layers task-specific; here K is the number of tasks
and k the number of layers selected.

The method in our words. Gradient surgery (PCGrad, CAGrad, ...) repairs conflicting task
gradients at every step; Recon instead removes the layers where the conflict comes from.

1. Train the ordinary shared model for a while (with any gradient method). At every step and
   for every shared layer l (its weight and bias together), compute the cosine between the
   gradients of each pair of tasks i < j restricted to that layer (layer-wise conflict,
   Definition 2; a pair conflicts when the cosine is below 0, Definition 1).
2. The *S-conflict score* of layer l is the number of (step, pair) events with
   cos(g_i^l, g_j^l) < S, for a threshold S (0 or slightly negative, e.g. −0.02 and −0.1 in
   the authors' scripts). Definition 3 counts the pairs of one step, for −1 < S <= 0, and
   Algorithm 1 sums those counts over the steps; the paper's Appendix B uses S = 0, −0.02,
   −0.05 or −0.1 depending on the data set.
3. Rank the layers by score, take the top k and turn each into K task-specific copies; then
   train the modified model from scratch (Algorithm 1). (``make_task_specific`` copies the
   layer it is given, so pass a freshly built model to start from scratch; the authors' code
   rebuilds the network and initialises each copy independently, where the copies here start
   equal, as the paper's analysis in Sec. 4.2, Eqs. 3-7, assumes.)

After step 3 a task-specific copy receives gradient from its own task only (the copies' update
in Eq. 3, against the shared update of Eq. 4), so no conflict can arise there; the remaining
shared layers stay shared.

Where it lives. Recon is a one-off architecture edit driven by gradient statistics, not a rule
for combining the K x d matrix at each step, so it is neither a ``GradientMethod`` nor a
registered architecture: ``ReconScores`` is the accumulator you feed each step's K x d matrix
(with ``layer_slices`` mapping the flattened d back to layers) while training with any method,
and ``make_task_specific`` turns any ``MultiTaskModel`` into a ``ReconModel`` with the selected
layers copied per task. A zero gradient has no direction: its cosines count as 0 (the authors'
``F.normalize`` gives the same).

Left out: the authors' branched modules compute the layers before the first copied one once and
then split the activations into K streams; ``ReconModel`` runs the whole base model once per
task with that task's copies switched in, which gives the same outputs and gradients at up to K
times the cost for deterministic layers (dropout before the first copy draws K masks instead of
one, and batch norm's running statistics update K times a step). Also left out: the authors'
restriction of the scores to a window of epochs (their scripts' window spans the whole record,
so it changes nothing there). Scores and ranking agreed exactly with moukamisama/Recon in the
audit, for thresholds 0, -0.02 and -0.1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from reference_impls.architectures.base import MultiTaskModel
from reference_impls.weighting.base import check_gradient_matrix


# ----------------------------------------------------------------------------------------------
# 1-2. Conflict scores
# ----------------------------------------------------------------------------------------------


def layer_slices(named_params: Iterable[tuple[str, Tensor]]) -> dict[str, slice]:
    """Layer name -> its columns of the flattened gradient, in parameter order.

    A layer is the module that owns the parameters (``encoder.0.weight`` and ``encoder.0.bias``
    form layer ``encoder.0``), as the authors group weight and bias. Each layer's parameters must
    be adjacent in the order given, as ``named_parameters`` lists them.
    """
    layers: dict[str, slice] = {}
    offset, previous = 0, None
    for name, param in named_params:
        layer = name.rsplit(".", 1)[0] if "." in name else name
        if layer in layers and layer != previous:
            raise ValueError(f"parameters of layer {layer!r} are not adjacent")
        start = layers[layer].start if layer in layers else offset
        offset += param.numel()
        layers[layer], previous = slice(start, offset), layer
    return layers


def pair_cosines(block: Tensor) -> Tensor:
    """Cosines of all row pairs i < j of a K x m block; pairs with a zero row give 0."""
    squared = (block * block).sum(1, keepdim=True)
    units = torch.where(squared > 0, block / squared.sqrt(), 0)
    rows, cols = torch.triu_indices(len(block), len(block), offset=1, device=block.device)
    return (units @ units.T)[rows, cols]


def conflict_counts(grads: Tensor, layers: dict[str, slice], threshold: float = 0.0) -> Tensor:
    """Per layer, the number of task pairs whose gradients on that layer have cosine < S."""
    check_gradient_matrix(grads)
    work = grads.detach().to(torch.float64)
    work = work / work.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)  # scale-free
    return torch.stack([(pair_cosines(work[:, cols]) < threshold).sum() for cols in layers.values()])


class ReconScores:
    """Running S-conflict score of every shared layer; ``record`` each step's K x d matrix."""

    def __init__(self, layers: dict[str, slice], threshold: float = 0.0) -> None:
        self.layers = dict(layers)
        self.threshold = float(threshold)  # S
        self.counts = torch.zeros(len(self.layers), dtype=torch.long)

    @classmethod
    def for_model(cls, model: MultiTaskModel, threshold: float = 0.0) -> "ReconScores":
        """Scores over the model's shared parameters, in the order of ``model.shared_parameters()``."""
        names = {id(p): n for n, p in model.named_parameters()}
        return cls(layer_slices((names[id(p)], p) for p in model.shared_parameters()), threshold)

    def record(self, grads: Tensor) -> Tensor:
        """Add this step's conflicts (grads: K x d over the shared parameters); return them."""
        width = max((s.stop for s in self.layers.values()), default=0)
        if grads.shape[-1] != width:
            raise ValueError(f"gradient has {grads.shape[-1]} columns, the layers cover {width}")
        counts = conflict_counts(grads, self.layers, self.threshold).cpu()
        self.counts += counts
        return counts

    def scores(self) -> dict[str, int]:
        return {name: int(c) for name, c in zip(self.layers, self.counts)}

    def ranking(self) -> list[str]:
        """Layers by descending score; equal scores keep the model's order (stable sort)."""
        order = torch.sort(-self.counts, stable=True).indices.tolist()
        names = list(self.layers)
        return [names[i] for i in order]

    def select(self, top_k: int) -> list[str]:
        return self.ranking()[:top_k]


# ----------------------------------------------------------------------------------------------
# 3. Turning the selected layers into per-task copies
# ----------------------------------------------------------------------------------------------


class TaskCopies(nn.Module):
    """One copy of a layer per task; ``active`` says whose copy ``forward`` uses."""

    def __init__(self, layer: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        self.copies = nn.ModuleDict({t: copy.deepcopy(layer) for t in tasks})  # same start as the shared layer
        self.active: str = tasks[0]

    def forward(self, *args, **kwargs):
        return self.copies[self.active](*args, **kwargs)


class ReconModel(MultiTaskModel):
    """``base`` with some layers replaced by ``TaskCopies``; task t's output uses t's copies."""

    def __init__(self, base: MultiTaskModel, layer_names: Sequence[str]) -> None:
        super().__init__(base.tasks)
        self.base = base
        self.layer_names = tuple(layer_names)
        for name in self.layer_names:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            layer = getattr(parent, child, None)
            if not isinstance(layer, nn.Module) or isinstance(layer, TaskCopies):
                raise ValueError(f"{name!r} is not a (not yet copied) submodule of the model")
            setattr(parent, child, TaskCopies(layer, self.tasks))

    def switches(self) -> list[TaskCopies]:
        return [self.base.get_submodule(name) for name in self.layer_names]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not self.layer_names:
            return self.base(x)
        outputs = {}
        for task in self.tasks:  # one pass per task, its own copies switched in
            for switch in self.switches():
                switch.active = task
            outputs[task] = self.base(x)[task]
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for switch in self.switches():
            yield from switch.copies[task].parameters()
        yield from self.base.task_specific_parameters(task)


def make_task_specific(model: MultiTaskModel, layer_names: Sequence[str]) -> ReconModel:
    """Step 3: a copy of ``model`` whose ``layer_names`` (from ``ReconScores.select``) are per task."""
    return ReconModel(copy.deepcopy(model), layer_names)
