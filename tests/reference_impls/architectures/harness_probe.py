"""One step of the training harness on a model, with mean-squared-error tasks, for tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference_impls import data as datasets
from reference_impls import hooks, train
from reference_impls.data.synthetic import mse_loss
from reference_impls.metrics import MeanSquaredError


def mse_specs(tasks) -> dict[str, datasets.TaskSpec]:
    return {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in tasks}


def harness_step(model: nn.Module, x: Tensor, targets: dict[str, Tensor], method: str = "ew",
                 lr: float = 0.1) -> train.StepLog:
    """``train.train_step`` with ``method`` (its own parameters optimised too) and plain SGD."""
    made = train.make_method(method, len(model.tasks), 0, facts={"dim": lambda: model.encode(x).shape[1]})
    parameters = [*model.parameters(), *hooks.method_parameters(made, x.device)]
    return train.train_step(model, made, torch.optim.SGD(parameters, lr=lr), x, targets, mse_specs(model.tasks), 0, 0)


def moved_by_auxiliary_step(model: nn.Module, x: Tensor, lr: float = 0.1) -> tuple[set[str], float]:
    """(names of the parameters one ``train.train_step`` changes, the auxiliary loss it logged).

    Every target is the model's own output on ``x``, so the task losses and their gradients are
    zero and whatever moves is moved by ``auxiliary_loss()``. The model must be deterministic in
    training mode (same output twice) for that to hold.
    """
    with torch.no_grad():
        targets = {t: o.detach().clone() for t, o in model(x).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = harness_step(model, x, targets, lr=lr)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return moved, log.auxiliary
