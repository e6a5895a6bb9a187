"""What one training-harness step does to a model through its auxiliary loss alone."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference_impls import data as datasets
from reference_impls import train
from reference_impls.data.synthetic import mse_loss
from reference_impls.metrics import MeanSquaredError


def moved_by_auxiliary_step(model: nn.Module, x: Tensor, lr: float = 0.1) -> tuple[set[str], float]:
    """(names of the parameters one ``train.train_step`` changes, the auxiliary loss it logged).

    Every target is the model's own output on ``x``, so the task losses and their gradients are
    zero and whatever moves is moved by ``auxiliary_loss()``. The model must be deterministic in
    training mode (same output twice) for that to hold.
    """
    with torch.no_grad():
        targets = {t: o.detach().clone() for t, o in model(x).items()}
    specs = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in model.tasks}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = train.make_method("ew", len(model.tasks), seed=0)
    log = train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=lr), x, targets, specs, 0, 0)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return moved, log.auxiliary
