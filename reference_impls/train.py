"""Train any registered architecture with any optimization method; report metrics and Δm.

    python -m reference_impls.train --arch mmoe --method ew --data synthetic --epochs 3 --seed 0 --device cpu

Reading order: the method (a loss weighting or a gradient method from
``reference_impls.weighting.registry``), one training step for each kind, the loop with
its progress bar, evaluation, single-task baselines, and the results table with Δm
(``reference_impls.metrics.delta_m``).

Single-task baselines are one model per task, built with ``--stl-arch`` (default: a
shared-bottom network with one head, i.e. a plain network) and trained with the same
epochs, batch size and learning rate; or they are read from ``--baselines file.json``
(``{"task/metric": value}``, the format ``--save-baselines`` writes).

Auxiliary losses. A model may define ``auxiliary_loss(self) -> Tensor``: a scalar
regulariser computed during its last forward pass (sluice's orthogonality penalty,
DSelect-k's selector entropy, each times a weight the model holds). Models without it
have none. The harness adds it *after* the method has combined the task losses, so it
is not balanced by the MTL method: a loss weighting minimises ``combine(L) + aux``,
and a gradient method's update of the task gradients gets ``d aux / d θ`` added to it.
Each step logs the task objective (``combine(L)``; for gradient methods, which have no
scalar objective, the plain sum of the task losses), the auxiliary loss and their sum.

Per-step hooks. A method that needs one more call each step names it in
``training_hook``; this loop drives these, and refuses any other before training:

* FAMO ``update``: the batch's losses again after the step;
* GradNorm ``balance_step``: after the network's backward with the current weights, on
  the last shared weight matrix every task reaches (``last_shared_weight``);
* DTP ``observe_kpis``: each task's metric on the batch, if it is a score in [0, 1];
* Rep-MTL ``combine``: with the shared representation (models with ``encode``/``decode``);
* continuous Pareto exploration ``observe_hvp``: Hessian-vector products of the batch;
* IMTL ``step``: IMTL-G on the trunk, and the gradients of its loss scales;
* MGDA-UB ``backward``: MGDA on the gradients of the shared representation z;
* RotoGrad ``rotate``: task k's head reads R_k z; its ``backward`` fills every gradient;
* EPO and Pareto MTL ``observe``: the batch's losses, which their weights depend on;
* FS-MTL ``observe_sam_gradients``: every task's gradient at its own sharpness-aware
  perturbation (K more forward/backward passes; batch-norm statistics see them too);
* MoDo ``observe_second_sample``: the batch's two halves as its two independent samples;
* selective group updates ``groups_per_step``: one optimizer step per task group;
* MOML ``meta_step`` and AutoL ``meta_backward``: an upper-level step before each network
  step, on a validation batch from 10 % of the training set held out for them only (the
  single-task baselines still train on all of it; the run says so on stderr).

Methods whose constructor needs arguments (EPO's preference ray, say) take them from
``--method-kw``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, random_split

from reference_impls import data as datasets
from reference_impls.architectures import registry
from reference_impls.architectures.base import MultiTaskModel
from reference_impls.metrics import delta_m
from reference_impls.weighting.base import GradientMethod, LossWeighting


# ----------------------------------------------------------------------------------------------
# The optimization method
# ----------------------------------------------------------------------------------------------


class ConfigurationError(ValueError):
    """A method, architecture and data combination this loop cannot train faithfully."""


class _EqualWeighting(LossWeighting):
    """Fallback when the weighting registry is missing: every task weight is 1."""

    name = "ew"

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return torch.ones_like(losses).detach()


def make_method(name: str, num_tasks: int, seed: int, options: Mapping[str, object] | None = None,
                facts: Mapping[str, Callable[[], object]] | None = None) -> LossWeighting | GradientMethod:
    """Instantiate ``name`` with ``options`` (``--method-kw``), filling ``num_tasks``, a seeded
    ``generator`` and any of ``facts`` (computed only if asked for, e.g. RotoGrad's ``dim``)
    that the constructor takes; refuse a method whose training hook this loop skips."""
    try:
        from reference_impls.weighting import registry as methods
    except ImportError as error:
        print(f"[train] weighting registry unavailable ({error}); using equal weighting", file=sys.stderr)
        return _EqualWeighting()
    cls = methods.methods().get(name)
    if cls is None:
        return methods.make(name)  # raises the registry's KeyError listing known names
    check_method_is_driven(cls, name)
    parameters = list(inspect.signature(cls.__init__).parameters.items())[1:]
    unknown = sorted(set(options or {}) - {pname for pname, _ in parameters})
    if unknown and not any(param.kind is param.VAR_KEYWORD for _, param in parameters):
        raise ConfigurationError(f"method {name!r} has no option(s) {unknown}; its options are "
                                 f"{[pname for pname, _ in parameters]}")
    offered = {"num_tasks": num_tasks, "generator": torch.Generator().manual_seed(seed), **(options or {})}
    kwargs, missing = {}, []
    for pname, param in parameters:
        if pname in offered:
            kwargs[pname] = offered[pname]
        elif pname in (facts or {}):
            kwargs[pname] = facts[pname]()
        elif param.default is inspect.Parameter.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            missing.append(pname)
    if missing:
        raise ConfigurationError(f"method {name!r} needs constructor arguments the harness cannot supply: "
                                 f"{missing}; pass them with --method-kw, e.g. --method-kw {missing[0]}=...")
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------


def task_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                specs: Mapping[str, datasets.TaskSpec], tasks: Sequence[str]) -> Tensor:
    """The K task losses as one 1-D tensor, in the order of ``tasks``."""
    return torch.stack([specs[t].loss(outputs[t], targets[t]) for t in tasks])


@dataclass(frozen=True)
class Batch:
    """One batch and its task losses, so a method can run it again (SAM passes, MoDo's halves)."""

    x: Tensor
    targets: Mapping[str, Tensor]
    specs: Mapping[str, datasets.TaskSpec]
    representation: Tensor | None = None  # z, for the methods that act on it
    rotated: list[Tensor] | None = None  # RotoGrad's R_k z

    def losses(self, model: MultiTaskModel, part: slice = slice(None)) -> Tensor:
        targets = {t: v[part] for t, v in self.targets.items()}
        return task_losses(model(self.x[part]), targets, self.specs, model.tasks)


def _gradient_step(method: GradientMethod, losses: Tensor, model: MultiTaskModel, batch: Batch) -> None:
    """Fill ``.grad`` with the method's update of the shared gradients (and heads' own), by hook."""
    from reference_impls.weighting.gradients import gradient_step, per_task_gradients

    shared = [p for p in model.shared_parameters() if p.requires_grad]
    specific = [p for t in model.tasks for p in model.task_specific_parameters(t) if p.requires_grad]
    hook = method.training_hook
    if hook == "step":  # IMTL: also fills the gradients of its loss scales
        method.step(losses, shared, specific)
        return
    if hook == "backward":  # MGDA-UB: MGDA on ∇_z L_k, then one backward through the encoder
        method.backward(losses, batch.representation, specific)
        return
    if hook == "rotate":  # RotoGrad: heads, scaled backbone gradient and the rotations' loss
        method.backward(losses, batch.representation, batch.rotated)
        return
    if hook == "observe":  # EPO, Pareto MTL: their weights depend on the current losses
        method.observe(losses)
    elif hook == "observe_hvp":  # continuous Pareto exploration: the curvature of Σ α_k L_k
        from reference_impls.weighting.continuous_pareto import weighted_hessian_vector_product
        method.observe_hvp(weighted_hessian_vector_product(losses, shared))
    elif hook == "observe_sam_gradients":  # FS-MTL: task k's gradient at θ + ε_k, for every k
        grads = per_task_gradients(losses, shared)
        method.observe_sam_gradients(method.sam_gradients(lambda: batch.losses(model), shared, grads))
        losses = batch.losses(model)  # same values; the in-place shifts and restore invalidated the graph
    elif hook == "observe_second_sample" and len(batch.x) >= 2:  # MoDo: two halves, two samples
        half = len(batch.x) // 2
        losses, second = batch.losses(model, slice(0, half)), batch.losses(model, slice(half, None))
        method.observe_second_sample(per_task_gradients(second, shared))
        second_heads = torch.autograd.grad(second.sum(), specific, allow_unused=True) if specific else ()
        gradient_step(method, losses, shared, specific)  # shared: λ (G₁ + G₂)/2 by MoDo's rule
        for p, g in zip(specific, second_heads):  # heads: the mean of both halves' gradients
            p.grad = p.grad / 2 if g is None else (p.grad + g) / 2
        return
    gradient_step(method, losses, shared, specific)


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """The model's own regulariser for its last forward pass, if it defines one."""
    method = getattr(model, "auxiliary_loss", None)
    return method() if callable(method) else None


def _gradient_step_with_auxiliary(method: GradientMethod, losses: Tensor, aux: Tensor | None,
                                  model: MultiTaskModel, batch: Batch) -> None:
    """The method's update of the task gradients, then ``.grad += d aux / dθ`` on top."""
    params = [p for p in model.parameters() if p.requires_grad]
    aux_grads = [] if aux is None or not aux.requires_grad else (
        torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True))
    _gradient_step(method, losses, model, batch)  # overwrites .grad
    for p, g in zip(params, aux_grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


@dataclass(frozen=True)
class StepLog:
    """What one update logs: detached task losses, the task objective and the auxiliary loss."""

    losses: Tensor
    objective: float
    auxiliary: float

    @property
    def total(self) -> float:
        return self.objective + self.auxiliary


def batch_scores(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                 specs: Mapping[str, datasets.TaskSpec], tasks: Sequence[str]) -> Tensor:
    """Each task's metric on this batch alone (DTP's KPIs: accuracy, mIoU)."""
    scores = []
    for t in tasks:
        metric = specs[t].metric()
        metric.update(outputs[t], targets[t])
        scores.append(metric.compute())
    return torch.tensor(scores)


def last_shared_weight(model: MultiTaskModel, losses: Tensor) -> Tensor:
    """GradNorm's W: the last-registered shared weight (2-D or more) that every task's loss reaches.

    Registration order follows the forward pass in every model here, so this is the top
    layer of the shared part; biases and norm scales are skipped, as in the paper, which
    takes the weights of one layer. It is looked up at every step because models that
    route inputs (routing networks, sparse experts) reach different shared weights on
    different batches; the cost is K partial backward passes through the top layers.
    """
    candidates = [p for p in model.shared_parameters() if p.requires_grad and p.ndim >= 2]
    for weight in reversed(candidates):
        if all(torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)[0] is not None
               for loss in losses):
            return weight
    raise ConfigurationError(
        f"method 'gradnorm' needs a shared weight that every task's loss reaches, and architecture "
        f"{getattr(model, 'name', type(model).__name__)!r} has none; pick another method"
    )


SECOND_ORDER_HOOKS = {"combine", "observe_hvp"}  # methods that differentiate gradients again
REPRESENTATION_HOOKS = {"combine", "backward", "rotate"}  # Rep-MTL, MGDA-UB, RotoGrad: they read z


def forward(model: MultiTaskModel, method: LossWeighting | GradientMethod, x: Tensor
            ) -> tuple[dict[str, Tensor], Tensor | None, list[Tensor] | None]:
    """(outputs, shared representation z, RotoGrad's rotated copies of z), as the method needs.

    Rep-MTL and MGDA-UB read z = encode(x); RotoGrad's task k head reads R_k z. Methods that
    differentiate gradients again run the math attention kernel: the fused ones have no
    second derivative.
    """
    hook = method.training_hook
    with sdpa_kernel(SDPBackend.MATH) if hook in SECOND_ORDER_HOOKS else nullcontext():
        if hook not in REPRESENTATION_HOOKS:
            return model(x), None, None
        representation = model.encode(x)
        if hook != "rotate":
            return model.decode(representation), representation, None
        rotated = method.rotate(representation)
        outputs = {t: model.decode(r)[t] for t, r in zip(model.tasks, rotated)}
        return outputs, representation, rotated


def train_step(model: MultiTaskModel, method: LossWeighting | GradientMethod,
               optimizer: torch.optim.Optimizer, x: Tensor, targets: Mapping[str, Tensor],
               specs: Mapping[str, datasets.TaskSpec], step: int, epoch: int) -> StepLog:
    """One update of ``objective + aux``; the auxiliary loss is not balanced by the method."""
    optimizer.zero_grad(set_to_none=True)
    outputs, representation, rotated = forward(model, method, x)
    losses = task_losses(outputs, targets, specs, model.tasks)
    aux = auxiliary_loss(model)
    if isinstance(method, GradientMethod):
        objective = losses.sum()  # logged only: a gradient method has no scalar objective
        batch = Batch(x, targets, specs, representation, rotated)
        _gradient_step_with_auxiliary(method, losses, aux, model, batch)
    else:
        if method.training_hook == "observe_kpis":  # DTP: weights from this batch's KPIs
            method.observe_kpis(batch_scores(outputs, targets, specs, model.tasks).to(losses))
        extra = {} if representation is None else {"representation": representation}  # Rep-MTL
        objective = method.combine(losses, step=step, epoch=epoch, **extra)
        total = objective if aux is None else objective + aux
        if method.training_hook == "balance_step":  # GradNorm: network step with w(t), then w(t+1)
            total.backward(retain_graph=True)
            method.balance_step(losses, last_shared_weight(model, losses))
        else:
            total.backward()
    optimizer.step()
    if method.training_hook == "update":  # FAMO: needs the losses after the step
        with torch.no_grad():
            method.update(task_losses(model(x), targets, specs, model.tasks))
    return StepLog(losses.detach(), objective.item(), 0.0 if aux is None else aux.item())


# ----------------------------------------------------------------------------------------------
# Loop, progress bar, evaluation
# ----------------------------------------------------------------------------------------------


class ProgressBar:
    """A carriage-return text bar on stderr; no dependency."""

    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 24):
        self.label, self.total, self.enabled, self.width = label, max(total, 1), enabled, width
        self.start = time.perf_counter()
        self.last_filled = -1

    def show(self, done: int, note: str = "") -> None:
        filled = int(self.width * done / self.total)
        if not self.enabled or (filled == self.last_filled and done < self.total):
            return  # redraw only when the bar grows
        self.last_filled = filled
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        print(f"\r{self.label} |{bar}| {done}/{self.total} {elapsed:5.1f}s {note}", end="", file=sys.stderr)
        if done >= self.total:
            print(file=sys.stderr)


def _to(batch, device: torch.device):
    x, targets = batch
    return x.to(device), {t: v.to(device) for t, v in targets.items()}


def evaluate(model: MultiTaskModel, bench: datasets.Benchmark, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """``{"task/metric": value}`` on the test set."""
    metrics = {t: bench.tasks[t].metric() for t in model.tasks}
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(bench.test, batch_size=batch_size):
            x, targets = _to(batch, device)
            outputs = model(x)
            for t in model.tasks:
                metrics[t].update(outputs[t], targets[t])
    model.train()
    return {f"{t}/{m.name}": m.compute() for t, m in metrics.items()}


# The per-step hooks this loop calls (see LossWeighting.training_hook). In train_step:
# FAMO's update, GradNorm's balance_step, DTP's observe_kpis (tasks scored in [0, 1]),
# Rep-MTL's combine (with the representation); in _gradient_step: IMTL's step, MGDA-UB's
# backward and RotoGrad's rotate (on the representation, see forward), EPO's and
# Pareto MTL's observe (the losses), continuous Pareto's observe_hvp, FS-MTL's
# observe_sam_gradients, MoDo's observe_second_sample (the batch's second half); in fit:
# selective group updates' groups_per_step, MOML's meta_step and AutoL's meta_backward.
DRIVEN_HOOKS = {"update", "balance_step", "observe_kpis", "combine", "step", "backward", "rotate", "observe",
                "observe_hvp", "observe_sam_gradients", "observe_second_sample", "groups_per_step",
                "meta_step", "meta_backward"}


def check_method_is_driven(method: LossWeighting | GradientMethod | type, method_name: str) -> None:
    """Refuse a method that needs a per-step call this loop does not make.

    Without its hook TCDCN would train as plain equal weighting, and RotoGrad as a plain
    rescaling of parameter gradients, while the results table printed their names.
    """
    kind = method if isinstance(method, type) else type(method)
    hook = kind.training_hook
    if hook is not None and hook not in DRIVEN_HOOKS:
        raise ConfigurationError(
            f"method {method_name!r} needs its {kind.__name__}.{hook}() called during "
            "training, which this generic loop does not do; drive it from your own loop "
            f"(see the docstring of {kind.__module__}) or pick another method"
        )


def method_parameters(method: LossWeighting | GradientMethod, device: torch.device) -> list[nn.Parameter]:
    """The method's own learnable state, moved to ``device``, for the model's optimizer.

    A loss weighting is an nn.Module; a gradient method may hold one (IMTL's loss scales).
    """
    modules = [method] if isinstance(method, nn.Module) else [
        m for m in vars(method).values() if isinstance(m, nn.Module)]
    for module in modules:
        module.to(device)
    return [p for module in modules for p in module.parameters()]


def check_method_fits_tasks(method: LossWeighting | GradientMethod, method_name: str,
                            specs: Mapping[str, datasets.TaskSpec]) -> None:
    """DTP reads each task's metric as a KPI in [0, 1]; refuse tasks measured otherwise."""
    if method.training_hook != "observe_kpis":
        return
    for task, spec in specs.items():
        metric = spec.metric()
        if not metric.unit_score:
            raise ConfigurationError(
                f"method {method_name!r} weights tasks by KPIs in [0, 1] (accuracy, mIoU), but task "
                f"{task!r} is measured by {metric.name!r}, which is not one; pick another method or "
                "a benchmark whose tasks are scored that way (celeba)"
            )


def check_method_fits_model(method: LossWeighting | GradientMethod, method_name: str,
                            model: MultiTaskModel) -> None:
    """Refuse a gradient method on a model with no trainable shared parameter.

    Gradient methods act only on the K x d matrix of shared-parameter gradients. Models that
    freeze their backbone (LoRA, adapters, Piggyback) leave d = 0, and training would then
    be plain summed losses under the method's name; say so before any step is taken.
    """
    if isinstance(method, GradientMethod) and not any(p.requires_grad for p in model.shared_parameters()):
        raise ConfigurationError(
            f"gradient method {method_name!r} needs trainable shared parameters, but architecture "
            f"{getattr(model, 'name', type(model).__name__)!r} has none (its shared part is frozen "
            "or absent); use a loss weighting such as 'ew', or unfreeze the shared part "
            "(e.g. --arch-kw freeze_backbone=False where the architecture has that option)"
        )
    if method.training_hook in REPRESENTATION_HOOKS and (type(model).encode is MultiTaskModel.encode
                                                         or callable(getattr(model, "auxiliary_loss", None))):
        raise ConfigurationError(
            f"method {method_name!r} acts on the shared representation, and architecture "
            f"{getattr(model, 'name', type(model).__name__)!r} has no single one (no encode/decode), "
            "or computes an auxiliary loss in forward, which encode/decode skip; use a shared-trunk "
            "architecture such as shared_bottom"
        )


def representation_size(model: MultiTaskModel, bench: datasets.Benchmark, device: torch.device) -> int:
    """Width of a vector representation z = encode(x) (RotoGrad's rotations are dim x dim)."""
    if type(model).encode is MultiTaskModel.encode:
        raise ConfigurationError(f"architecture {getattr(model, 'name', type(model).__name__)!r} has no "
                                 "single shared representation (no encode/decode) to rotate")
    x = bench.train[0][0][None].to(device)
    model.eval()
    with torch.no_grad():
        z = model.encode(x)
    model.train()
    if z.ndim != 2:
        raise ConfigurationError(f"RotoGrad rotates vector representations; this model's is {tuple(z.shape[1:])}")
    return z.shape[1]


def design_matrices(train: Dataset, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(X, Y): inputs as rows and one scalar label column per task (SVD task reweighting)."""
    xs, ys = [], []
    for x, targets in train:
        if any(targets[t].numel() != 1 for t in tasks):
            raise ConfigurationError("SVD task reweighting needs one scalar label per task and example")
        xs.append(x.reshape(-1))
        ys.append(torch.stack([targets[t].reshape(()) for t in tasks]).double())
    return torch.stack(xs), torch.stack(ys)


def updates_on_batch(method: LossWeighting | GradientMethod, step: int) -> int:
    """Optimizer steps on one batch: one, or one per task group (selective group updates)."""
    return method.groups_per_step(step) if method.training_hook == "groups_per_step" else 1


META_HOOKS = {"meta_step", "meta_backward"}  # bilevel methods (MOML, AutoL): a validation batch per step
VALIDATION_FRACTION = 0.1


def validation_split(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, validation): a seeded random ``fraction`` of the training set, at least one example."""
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    rest, val = random_split(train, [len(train) - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return rest, val


def endless(loader: DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def data_for_meta_step(train: Dataset, method_name: str, batch_size: int, seed: int) -> tuple[Dataset, Iterator]:
    """(what the network trains on, endless validation batches) for a bilevel method."""
    rest, val = validation_split(train, VALIDATION_FRACTION, seed)
    print(f"[train] {method_name}: {len(val)} of {len(train)} training examples held out "
          "as validation data for its meta step", file=sys.stderr)
    return rest, endless(DataLoader(val, batch_size=batch_size, shuffle=True,
                                    generator=torch.Generator().manual_seed(seed + 1)))


def meta_update(method: LossWeighting, model: MultiTaskModel, batch: tuple[Tensor, Mapping[str, Tensor]],
                val_batch: tuple[Tensor, Mapping[str, Tensor]], specs: Mapping[str, datasets.TaskSpec],
                lr: float, meta_optimizer: torch.optim.Optimizer | None) -> None:
    """A bilevel method's upper-level step at the current θ, before the network's step.

    The look-ahead θ' = θ − α ∇_θ Σ w_k L_k runs through ``torch.func.functional_call``, so θ
    itself is untouched. MOML updates its logits itself (its own ``inner_lr`` and
    ``meta_lr``); AutoL's λ takes an Adam step with the network's learning rate, which is
    also its look-ahead rate.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def losses_on(data: tuple[Tensor, Mapping[str, Tensor]]) -> Callable[[Mapping[str, Tensor]], Tensor]:
        x, targets = data
        return lambda values: task_losses(functional_call(model, dict(values), (x,)), targets, specs, model.tasks)

    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no second derivative
        if method.training_hook == "meta_step":
            method.meta_step(params, losses_on(batch), losses_on(val_batch))
        else:
            meta_optimizer.zero_grad(set_to_none=True)
            method.meta_backward(params, losses_on(batch), losses_on(val_batch), lr)
            meta_optimizer.step()


def fit(model: MultiTaskModel, bench: datasets.Benchmark, method_name: str, *, epochs: int,
        lr: float, batch_size: int, device: torch.device, seed: int, label: str,
        progress: bool = True, method_options: Mapping[str, object] | None = None,
        ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Train ``model``; return its test metrics and per-epoch means of what the steps log.

    The history has ``task_loss`` (sum of the task losses), ``objective`` (what the method
    minimised), ``auxiliary`` (the model's auxiliary loss, 0 without one) and ``total``.
    """
    model.to(device).train()
    method = make_method(method_name, len(model.tasks), seed, method_options, facts={
        "dim": lambda: representation_size(model, bench, device),
        "inputs": lambda: design_matrices(bench.train, model.tasks)[0],
        "labels": lambda: design_matrices(bench.train, model.tasks)[1]})
    check_method_fits_model(method, method_name, model)
    check_method_fits_tasks(method, method_name, {t: bench.tasks[t] for t in model.tasks})
    own = method_parameters(method, device)
    bilevel = method.training_hook in META_HOOKS
    optimizer = torch.optim.Adam(list(model.parameters()) + ([] if bilevel else own), lr=lr)
    meta_optimizer = torch.optim.Adam(own, lr=lr) if method.training_hook == "meta_backward" else None
    train_set, val_batches = data_for_meta_step(bench.train, method_name, batch_size, seed) if bilevel \
        else (bench.train, None)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    bar = ProgressBar(label, epochs * len(loader), enabled=progress)
    history: dict[str, list[float]] = {"task_loss": [], "objective": [], "auxiliary": [], "total": []}
    step = 0
    for epoch in range(epochs):
        sums = dict.fromkeys(history, 0.0)
        for i, batch in enumerate(loader):
            x, targets = _to(batch, device)
            if val_batches is not None:
                meta_update(method, model, (x, targets), _to(next(val_batches), device), bench.tasks, lr,
                            meta_optimizer)
            logs = [train_step(model, method, optimizer, x, targets, bench.tasks, step, epoch)
                    for _ in range(updates_on_batch(method, step))]
            log = logs[0]  # the losses of the batch before its first update
            for key, value in zip(history, (log.losses.sum().item(), log.objective, log.auxiliary, log.total)):
                sums[key] += value
            step += 1
            bar.show(step, f"epoch {epoch + 1}/{epochs} loss {sums['total'] / (i + 1):.4f}")
        for key in history:
            history[key].append(sums[key] / len(loader))
    return evaluate(model, bench, batch_size, device), history


# ----------------------------------------------------------------------------------------------
# Baselines, table, command line
# ----------------------------------------------------------------------------------------------


def single_task_baselines(bench: datasets.Benchmark, args: argparse.Namespace,
                          device: torch.device) -> dict[str, float]:
    """Train one ``--stl-arch`` model per task with the multi-task run's budget."""
    results: dict[str, float] = {}
    p = bench.problem
    for t in p.tasks:
        torch.manual_seed(args.seed)
        single = registry.Problem((t,), p.input_shape, {t: p.out_dims[t]}, p.dense)
        model = registry.build(args.stl_arch, single, **args.stl_kw)
        metrics, _ = fit(model, bench, "ew", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         device=device, seed=args.seed, label=f"single-task {t}", progress=args.progress)
        results.update(metrics)
    return results


def lower_is_better(bench: datasets.Benchmark) -> dict[str, bool]:
    return {f"{t}/{spec.metric().name}": spec.metric().lower_is_better for t, spec in bench.tasks.items()}


def results_table(multi: Mapping[str, float], single: Mapping[str, float],
                  lower: Mapping[str, bool]) -> str:
    """Markdown table, one row per metric, and the Δm line under it."""
    rows = ["| task / metric | lower is better | single-task | multi-task | Δ (%) |",
            "|---|---|---|---|---|"]
    for key in single:
        change = delta_m({key: multi[key]}, {key: single[key]}, {key: lower[key]})
        rows.append(f"| {key} | {'yes' if lower[key] else 'no'} | {single[key]:.4f} | {multi[key]:.4f} | {change:+.2f} |")
    rows.append(f"\nΔm = {delta_m(multi, single, lower):+.2f} %")
    return "\n".join(rows)


def _keywords(pairs: Sequence[str]) -> dict[str, object]:
    """``["width=16", "k=2"]`` -> ``{"width": 16, "k": 2}`` (values as Python literals)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reference_impls.train", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="shared_bottom", help=f"one of: {', '.join(registry.available())}")
    parser.add_argument("--method", default="ew", help="a name from reference_impls.weighting.registry")
    parser.add_argument("--method-kw", nargs="*", default=[], metavar="KEY=VALUE",
                        help="options for the method's constructor, e.g. preference=[1,2] for epo")
    parser.add_argument("--data", default="synthetic", help="synthetic, nyuv2, cityscapes, celeba, qm9")
    parser.add_argument("--root", default=None, help="data directory (all but synthetic)")
    parser.add_argument("--data-kw", nargs="*", default=[], metavar="KEY=VALUE",
                        help="loader options, e.g. correlation=0.5 n_train=2000")
    parser.add_argument("--arch-kw", nargs="*", default=[], metavar="KEY=VALUE",
                        help="options for the architecture's from_problem, e.g. num_experts=8")
    parser.add_argument("--stl-arch", default="shared_bottom")
    parser.add_argument("--stl-kw", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--baselines", type=Path, default=None, help="JSON {task/metric: value}; skips single-task training")
    parser.add_argument("--save-baselines", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    args.data_kw, args.arch_kw, args.stl_kw, args.method_kw = (
        _keywords(v) for v in (args.data_kw, args.arch_kw, args.stl_kw, args.method_kw))
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    """Everything ``main`` prints, as data: metrics, baselines, Δm, table, loss history."""
    device = torch.device(args.device)
    data_kw = dict(args.data_kw)
    if args.data == "synthetic":
        data_kw.setdefault("seed", args.seed)
    bench = datasets.load(args.data, args.root, **data_kw)
    torch.manual_seed(args.seed)
    model = registry.build(args.arch, bench.problem, **args.arch_kw)
    multi, history = fit(model, bench, args.method, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, device=device, seed=args.seed,
                         label=f"{args.arch}+{args.method}", progress=args.progress, method_options=args.method_kw)
    if args.baselines is not None:
        single = {k: float(v) for k, v in json.loads(args.baselines.read_text()).items()}
    else:
        single = single_task_baselines(bench, args, device)
    if args.save_baselines is not None:
        args.save_baselines.write_text(json.dumps(single, indent=2) + "\n")
    lower = lower_is_better(bench)
    return {"multi_task": multi, "single_task": single, "lower_is_better": lower,
            "delta_m": delta_m(multi, single, lower), "table": results_table(multi, single, lower),
            "train_loss": history["task_loss"], "train_history": history}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    result = run(args)
    print(f"\n{args.arch} + {args.method} on {args.data}, {args.epochs} epochs, seed {args.seed}\n")
    print(result["table"])
    return result


if __name__ == "__main__":
    try:
        main()
    except (ConfigurationError, KeyError) as error:  # a bad choice on the command line, not a bug
        sys.exit(f"error: {error.args[0] if error.args else error}")
