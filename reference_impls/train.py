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

Deep supervision. A model with ``forward_with_intermediate(x) -> (outputs, intermediate)``
(PAD-Net, MTI-Net, ATRC, InvPT, DiffusionMTL) has its intermediate predictions of each
task scored by that task's loss (``deep_supervision``), with weight 1 (the papers' own
weights are not reproduced), and added to the auxiliary loss: trained like the final
predictions, not balanced by the method. Without it those predictors would never learn.

Per-step hooks. Methods that need more than the losses each step (GradNorm, IMTL, MOML,
RotoGrad, ...) are fed by ``reference_impls.hooks``, which lists what it drives and how.
A model that learns from the step's task losses outside gradient descent defines
``observe_step_losses(losses)``, called once per step with the K detached losses of the
step's forward pass, right after that pass and before a gradient method runs the model again
(FS-MTL's perturbed passes, MoDo's half batches), so that the model still knows which of its
choices earned them (the routing network's REINFORCE router and its sampled routes). It must
not change what the pass's graph saved (the router's table is a buffer outside the graph).

Methods whose constructor needs arguments (EPO's preference ray, say) take them from
``--method-kw``. Every ``KEY=VALUE`` option is read as a Python literal where it is one, then
as the type its function declares (``reference_impls.options``): ``per_example=false`` is
``False``, and ``num_experts=zero`` is refused before anything is built.

Memory. Each model is first built and run on the meta device, which allocates nothing, and
refused with its size when training it would need more memory than the device has
(``reference_impls.memory``): some defaults are huge for some data, e.g. AFA for 40 CelebA
attributes at 64 x 64 has 27 billion weights, and PAP's pixel affinities for a batch of 8
NYUv2 images at 288 x 384 are an (8, 110592, 110592) tensor, 391 GB.

Batches. Training batches are reshuffled every epoch. For a model with batch norm, an
epoch's last batch is dropped when it holds a single example, which batch norm cannot
normalise in training (``hooks.skips_a_lone_example``); other models keep every example.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from reference_impls import data as datasets
from reference_impls.options import typed as typed_options
from reference_impls.architectures import registry
from reference_impls.architectures.base import MultiTaskModel
from reference_impls.hooks import (META_HOOKS, VALIDATION_HOOKS, Batch, ConfigurationError, batch_scores,
                                   check_method_fits_model, check_method_fits_tasks, check_method_is_driven,
                                   design_matrices, evaluating, forward, held_out_batches, last_shared_weight,
                                   meta_update, method_gradient_step, method_parameters, representation_size,
                                   shuffled_batches, task_losses, updates_on_batch, validation_losses)
from reference_impls.memory import require_fits
from reference_impls.metrics import delta_m
from reference_impls.weighting.base import GradientMethod, LossWeighting


# ----------------------------------------------------------------------------------------------
# The optimization method
# ----------------------------------------------------------------------------------------------


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
    # A class without a constructor of its own inherits object's or Module's (*args, **kwargs),
    # which would accept any option and drop it: such a method has no options.
    inherited = cls.__init__ in (object.__init__, nn.Module.__init__)
    parameters = [] if inherited else list(inspect.signature(cls.__init__).parameters.items())[1:]
    unknown = sorted(set(options or {}) - {pname for pname, _ in parameters})
    if unknown and not any(param.kind is param.VAR_KEYWORD for _, param in parameters):
        known = [pname for pname, _ in parameters]
        raise ConfigurationError(f"method {name!r} has no option(s) {unknown}; "
                                 + (f"its options are {known}" if known else "it takes none"))
    given = dict(options or {})  # as typed on the command line, for messages
    try:  # command-line text read as the types the constructor declares (options.py)
        options = typed_options(given, [cls.__init__])
    except ValueError as error:
        raise ConfigurationError(f"method {name!r}: --method-kw {error}") from None
    offered = {"num_tasks": num_tasks, "generator": torch.Generator().manual_seed(seed), **options}
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
    with options_blamed(name, given):
        return cls(**kwargs)


@contextlib.contextmanager
def options_blamed(name: str, options: Mapping[str, object] | None):
    """A ValueError (a refused value: c < 0, a preference of the wrong length...) raised while
    ``--method-kw`` options are in play is reported as those options' error, not a traceback.
    Without options the method's own defaults failed: a bug, whose traceback is kept."""
    try:
        yield
    except ConfigurationError:
        raise
    except ValueError as error:
        if not options:
            raise
        shown = " ".join(f"{k}={v!r}" for k, v in options.items())
        raise ConfigurationError(f"method {name!r} --method-kw {shown}: {error}") from error


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------


def auxiliary_loss(model: nn.Module) -> Tensor | None:
    """The model's own regulariser for its last forward pass, if it defines one."""
    method = getattr(model, "auxiliary_loss", None)
    return method() if callable(method) else None


def deep_supervision(intermediate: Mapping[str, object] | None, outputs: Mapping[str, Tensor],
                     targets: Mapping[str, Tensor], specs: Mapping[str, datasets.TaskSpec]) -> Tensor | None:
    """Each intermediate prediction of a task that has a target, scored by that task's loss.

    ``intermediate`` is ``{task: prediction}``, or nested one level (MTI-Net's per-scale
    dicts). A prediction is first brought to the final output's form: a smaller map is
    resized bilinearly, and a map of an image-level task is averaged over space. Predictions
    of auxiliary tasks without targets are skipped. Every term has weight 1.
    """
    flat = [(t, p) for t, p in (intermediate or {}).items() if torch.is_tensor(p)]
    flat += [(t, p) for group in (intermediate or {}).values() if isinstance(group, Mapping) for t, p in group.items()]
    terms = [specs[t].loss(as_output(p, outputs[t]), targets[t]) for t, p in flat if t in targets]
    return torch.stack(terms).sum() if terms else None


def as_output(prediction: Tensor, output: Tensor) -> Tensor:
    """``prediction`` in the shape of the final ``output``: resized or spatially averaged."""
    if prediction.dim() == 4 and output.dim() == 2:
        return prediction.mean(dim=(2, 3))
    if prediction.dim() == 4 and prediction.shape[-2:] != output.shape[-2:]:
        return F.interpolate(prediction, size=output.shape[-2:], mode="bilinear", align_corners=False)
    return prediction


def _gradient_step_with_auxiliary(method: GradientMethod, losses: Tensor, aux: Tensor | None,
                                  model: MultiTaskModel, batch: Batch) -> bool:
    """The method's update of the task gradients, then ``.grad += d aux / dθ`` on top.

    Returns whether the method's own update was finite (checked before the auxiliary term is
    added), so a method that fails on finite losses is named as such, not as a diverged run."""
    params = [p for p in model.parameters() if p.requires_grad]
    aux_grads = [] if aux is None or not aux.requires_grad else (
        torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True))
    method_gradient_step(method, losses, model, batch)  # overwrites .grad
    written = [p.grad.isfinite().all() for p in params if p.grad is not None]
    finite = bool(torch.stack(written).all()) if written else True
    for p, g in zip(params, aux_grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return finite


@dataclass(frozen=True)
class StepLog:
    """What one update logs: detached task losses, the task objective and the auxiliary loss."""

    losses: Tensor
    objective: float
    auxiliary: float
    update_finite: bool = True  # a gradient method's update; a loss weighting's shows in objective

    @property
    def total(self) -> float:
        return self.objective + self.auxiliary


def train_step(model: MultiTaskModel, method: LossWeighting | GradientMethod,
               optimizer: torch.optim.Optimizer, x: Tensor, targets: Mapping[str, Tensor],
               specs: Mapping[str, datasets.TaskSpec], step: int, epoch: int) -> StepLog:
    """One update of ``objective + aux``; the auxiliary loss is not balanced by the method."""
    optimizer.zero_grad(set_to_none=True)
    outputs, representation, rotated, intermediate = forward(model, method, x)
    losses = task_losses(outputs, targets, specs, model.tasks)
    observe = getattr(model, "observe_step_losses", None)
    if callable(observe):  # learns from this pass's losses outside gradient descent; before a method
        observe(losses.detach())  # (FS-MTL, MoDo) runs the model again and it samples other routes
    extra_terms = [a for a in (auxiliary_loss(model), deep_supervision(intermediate, outputs, targets, specs))
                   if a is not None]
    aux = torch.stack(extra_terms).sum() if extra_terms else None
    if isinstance(method, GradientMethod):
        objective = losses.sum()  # logged only: a gradient method has no scalar objective
        batch = Batch(x, targets, specs, representation, rotated)
        update_finite = _gradient_step_with_auxiliary(method, losses, aux, model, batch)
    else:
        update_finite = True
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
    return StepLog(losses.detach(), objective.item(), 0.0 if aux is None else aux.item(), update_finite)


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss: the run stops there instead of finishing with NaNs."""


def check_finite(log: StepLog, tasks: Sequence[str], where: str) -> None:
    """Raise ``TrainingDiverged`` naming what went non-finite: a task's loss, the method's
    objective or update (from finite losses: the method cannot handle them) or the auxiliary loss."""
    losses = log.losses.tolist()
    bad = [f"{t} = {v}" for t, v in zip(tasks, losses) if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"{where}: task loss {', '.join(bad)}; the run diverged (try a smaller --lr)")
    if not (math.isfinite(log.objective) and log.update_finite):  # formatted only then: this runs every step
        shown = ", ".join(f"{t} = {v:.4g}" for t, v in zip(tasks, losses))
        if not math.isfinite(log.objective):
            raise TrainingDiverged(f"{where}: the method's objective is {log.objective} although every task loss "
                                   f"is finite ({shown}): the method cannot weigh these losses")
        raise TrainingDiverged(f"{where}: the method's update is not finite although every task loss is "
                               f"finite ({shown}): the method cannot combine these gradients")
    if not math.isfinite(log.auxiliary):
        raise TrainingDiverged(f"{where}: the model's auxiliary loss is {log.auxiliary}; the run diverged "
                               "(try a smaller --lr or a smaller weight for that loss)")


# ----------------------------------------------------------------------------------------------
# Loop, progress bar, evaluation
# ----------------------------------------------------------------------------------------------


class ProgressBar:
    """A carriage-return text bar on stderr; no dependency."""

    def __init__(self, label: str, total: int, enabled: bool = True, width: int = 24):
        self.label, self.total, self.enabled, self.width = label, max(total, 1), enabled, width
        self.start = time.perf_counter()
        self.last_filled = -1
        self.line_open = False  # a drawn bar not yet ended by a newline

    def show(self, done: int, note: str = "") -> None:
        filled = int(self.width * done / self.total)
        if not self.enabled or (filled == self.last_filled and done < self.total):
            return  # redraw only when the bar grows
        self.last_filled = filled
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        print(f"\r{self.label} |{bar}| {done}/{self.total} {elapsed:5.1f}s {note}", end="", file=sys.stderr)
        self.line_open = done < self.total
        if not self.line_open:
            print(file=sys.stderr)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        """End a bar left mid-line (an error, Ctrl-C), so what follows starts on its own line."""
        if self.line_open:
            print(file=sys.stderr)


def _to(batch, device: torch.device):
    x, targets = batch
    return x.to(device), {t: v.to(device) for t, v in targets.items()}


def evaluate(model: MultiTaskModel, bench: datasets.Benchmark, batch_size: int,
             device: torch.device, label: str = "evaluation") -> dict[str, float]:
    """``{"task/metric": value}`` on the test set; NaN for a task with no valid test entry
    (all ignored), which has no score rather than a score of 0.

    Non-finite predictions stop the run (``TrainingDiverged``): an accuracy reads the argmax
    of NaN logits as a class, so a model that the last update broke would otherwise score."""
    metrics = {t: bench.tasks[t].metric() for t in model.tasks}
    with evaluating(model):
        for batch in DataLoader(bench.test, batch_size=batch_size):
            x, targets = _to(batch, device)
            outputs = model(x)
            for t in model.tasks:
                if not outputs[t].isfinite().all():
                    raise TrainingDiverged(f"{label}: task {t}'s predictions on the test set are not finite; "
                                           f"{_non_finite_parameters(model)}")
                metrics[t].update(outputs[t], targets[t])
    return {f"{t}/{m.name}": m.compute() if m.seen else math.nan for t, m in metrics.items()}


def _non_finite_parameters(model: MultiTaskModel) -> str:
    """Which parameters hold NaN or inf, or that all of them are finite (then the test data overflow)."""
    bad = [name for name, p in model.named_parameters() if not p.isfinite().all()]
    if not bad:
        return "every parameter is finite, so the test inputs make the model overflow"
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"the trained parameters are not finite ({shown}): the last update diverged (try a smaller --lr)"


def require_examples(bench: datasets.Benchmark, label: str) -> None:
    """Refuse an empty training or test set before any training: the first fails inside
    DataLoader, the second would end a finished run with a table of metrics of nothing."""
    for split, examples in (("training", bench.train), ("test", bench.test)):
        if len(examples) == 0:
            raise datasets.DataError(f"{label}: the {split} set is empty (0 examples)")


def training_batches(model: MultiTaskModel, train_set: Dataset, batch_size: int, seed: int, label: str) -> DataLoader:
    """The network's shuffled training batches (``hooks.shuffled_batches`` for the model's tasks)."""
    return shuffled_batches(train_set, batch_size, seed, model.tasks, model, label)


def fit(model: MultiTaskModel, bench: datasets.Benchmark, method_name: str, *, epochs: int,
        lr: float, batch_size: int, device: torch.device, seed: int, label: str,
        progress: bool = True, method_options: Mapping[str, object] | None = None,
        method_lr: float | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Train ``model``; return its test metrics and per-epoch means of what the steps log.

    The method's own parameters (loss weights, log variances, Auto-λ's λ...) train with Adam at
    ``method_lr``, the network's at ``lr``; papers often tune the two apart (Auto-λ: 1e-4 for λ).

    The history has ``task_loss`` (sum of the task losses), ``objective`` (what the method
    minimised), ``auxiliary`` (the model's auxiliary loss, 0 without one) and ``total``.
    """
    require_examples(bench, label)
    model.to(device).train()
    design = functools.cache(lambda: design_matrices(bench.train, model.tasks))  # X and Y, read once
    method = make_method(method_name, len(model.tasks), seed, method_options, facts={
        "dim": lambda: representation_size(model, bench, device),
        "inputs": lambda: design()[0], "labels": lambda: design()[1]})
    check_method_fits_model(method, method_name, model)
    check_method_fits_tasks(method, method_name, {t: bench.tasks[t] for t in model.tasks})
    own = method_parameters(method, device)
    bilevel = method.training_hook in META_HOOKS
    method_lr = lr if method_lr is None else method_lr
    groups = [{"params": list(model.parameters())}] + ([] if bilevel or not own else [{"params": own, "lr": method_lr}])
    optimizer = torch.optim.Adam(groups, lr=lr)
    meta_optimizer = torch.optim.Adam(own, lr=method_lr) if method.training_hook == "meta_backward" else None
    train_set, val_batches = (bench.train, None)
    if method.training_hook in VALIDATION_HOOKS:
        train_set, val_batches = held_out_batches(bench.train, method_name, batch_size, seed,
                                                    "its meta step" if bilevel else "its validation-loss trend",
                                                    model if bilevel else None)
    loader = training_batches(model, train_set, batch_size, seed, label)
    history: dict[str, list[float]] = {"task_loss": [], "objective": [], "auxiliary": [], "total": []}
    step = 0
    with ProgressBar(label, epochs * len(loader), enabled=progress) as bar:
        for epoch in range(epochs):
            sums = dict.fromkeys(history, 0.0)
            for i, batch in enumerate(loader):
                x, targets = _to(batch, device)
                # The first step is where a method first meets the task count and the data, so a
                # value it refuses there (a preference of the wrong length) is an option's error.
                with options_blamed(method_name, method_options) if step == 0 else contextlib.nullcontext():
                    if bilevel:
                        meta_update(method, model, (x, targets), _to(next(val_batches), device), bench.tasks, lr,
                                    meta_optimizer)
                    elif val_batches is not None:  # AW: this step's held-out task losses, before the step
                        method.observe_validation_losses(validation_losses(model, _to(next(val_batches), device),
                                                                           bench.tasks))
                    logs = [train_step(model, method, optimizer, x, targets, bench.tasks, step, epoch)
                            for _ in range(updates_on_batch(method, step))]
                for log in logs:
                    check_finite(log, model.tasks, f"{label}, step {step + 1} (epoch {epoch + 1}, lr {lr:g})")
                log = logs[0]  # the losses of the batch before its first update
                for key, value in zip(history, (log.losses.sum().item(), log.objective, log.auxiliary, log.total)):
                    sums[key] += value
                step += 1
                bar.show(step, f"epoch {epoch + 1}/{epochs} loss {sums['total'] / (i + 1):.4f}")
            for key in history:
                history[key].append(sums[key] / len(loader))
    return evaluate(model, bench, batch_size, device, f"{label}, evaluation"), history


# ----------------------------------------------------------------------------------------------
# Baselines, table, command line
# ----------------------------------------------------------------------------------------------


# Parameters the harness or a loader fills (from the problem, --root, the synthetic loader's sample
# count n), not --arch-kw/--data-kw options.
FILLED_PARAMETERS = frozenset({"self", "cls", "problem", "tasks", "out_dims", "output_dims", "in_channels",
                               "in_dim", "input_dim", "input_shape", "dense", "root", "n"})


def option_names(functions: Sequence[Callable]) -> list[str]:
    """The keyword options ``functions`` take, in signature order, without the filled ones."""
    names: dict[str, None] = {}
    for function in functions:
        for name, param in inspect.signature(function).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and name not in FILLED_PARAMETERS:
                names[name] = None
    return list(names)


def built_from_flags(flags: str, options_flag: str, options: Mapping[str, object], make: Callable[[], object],
                     functions: Sequence[Callable] = ()) -> object:
    """``make()``, with the errors a bad flag causes reported as that flag's error: deliberate
    refusals (ValueError, e.g. an image-only model on vectors; FileNotFoundError with the
    expected layout) always; TypeError, RuntimeError, ArithmeticError and LookupError (an
    unknown option, a value of the wrong type or sign, a size of 0 divided by or indexed) when
    the user passed options, since only they can have caused it. An unknown option is named
    with the options ``functions`` (the builders ``make`` calls) do take."""
    shown = f" {options_flag} " + " ".join(f"{k}={v!r}" for k, v in options.items()) if options else ""
    try:
        return make()
    except (ValueError, FileNotFoundError) as error:
        raise ConfigurationError(f"{flags}{shown}: {error}") from error
    except (TypeError, RuntimeError, ArithmeticError, LookupError) as error:
        if not options and "unexpected keyword argument" not in str(error):
            raise  # not caused by the command line: a bug, keep its traceback
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unknown and functions:
            raise ConfigurationError(f"{flags}{shown}: no option {unknown.group(1)!r}; its options are "
                                     f"{option_names(functions)}") from error
        raise ConfigurationError(f"{flags}{shown or ' ' + options_flag}: {error}") from error


def seeded(arch: str, options: Mapping[str, object], seed: int) -> dict[str, object]:
    """``--arch-kw`` options plus ``seed``, for architectures that draw masks, routes or noise
    from a generator of their own (TRL's masks, Gumbel samples): without it every ``--seed``
    would share them. A seed given in ``--arch-kw`` wins."""
    options = dict(options)
    if registry.takes_option(arch, "seed"):
        options.setdefault("seed", seed)
    return options


def typed_arch_options(arch: str, arch_kw: Mapping[str, object]) -> dict[str, object]:
    """``arch_kw`` as the types architecture ``arch``'s builders declare (see options.py)."""
    return typed_options(arch_kw, registry.builders(arch))


def procedure_note(arch: str, model: nn.Module) -> str | None:
    """Says so when the paper trains this architecture by more than one loop over the task
    losses (``MultiTaskModel.training_procedure``): this run trains the network only."""
    procedure = getattr(model, "training_procedure", None)
    if not procedure:
        return None
    extra = " and its auxiliary loss" if callable(getattr(model, "auxiliary_loss", None)) else ""
    return f"{arch}: in the paper, {procedure}; this run trains the network on the task losses{extra} only"


def single_task_model(bench: datasets.Benchmark, task: str, args: argparse.Namespace) -> nn.Module:
    """A ``--stl-arch`` model for ``task`` alone."""
    p = bench.problem
    single = registry.Problem((task,), p.input_shape, {task: p.out_dims[task]}, p.dense)
    arch = args.stl_arch or "shared_bottom"
    stl_kw = seeded(arch, args.stl_kw, args.seed)
    make = lambda: registry.build(arch, single, **typed_arch_options(arch, stl_kw))  # noqa: E731
    require_fits(f"--stl-arch {arch}", make, torch.device(args.device), (args.batch_size, *p.input_shape))
    return built_from_flags(f"--stl-arch {arch}", "--stl-kw", args.stl_kw, make, registry.builders(arch))


def single_task_baselines(bench: datasets.Benchmark, args: argparse.Namespace,
                          device: torch.device) -> dict[str, float]:
    """Train one ``--stl-arch`` model per task with the multi-task run's budget."""
    results: dict[str, float] = {}
    for t in bench.problem.tasks:
        torch.manual_seed(args.seed)
        model = single_task_model(bench, t, args)
        metrics, _ = fit(model, bench, "ew", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         device=device, seed=args.seed, label=f"single-task {t}", progress=args.progress)
        results.update(metrics)
    return results


def lower_is_better(bench: datasets.Benchmark) -> dict[str, bool]:
    return {f"{t}/{spec.metric().name}": spec.metric().lower_is_better for t, spec in bench.tasks.items()}


def delta_m_if_defined(multi: Mapping[str, float], single: Mapping[str, float],
                       lower: Mapping[str, bool]) -> float | None:
    """Δm, or None where a single-task value leaves it undefined: 0 (an accuracy of 0 on a small
    test set) or NaN (a task with no valid test entry). The run has finished by then, and its
    table is still worth printing; ``why_undefined`` says which."""
    if any(math.isnan(multi[k]) or math.isnan(single[k]) for k in single):
        return None  # a diverged run stops before this, so NaN is a task without a score
    try:
        return delta_m(multi, single, lower)
    except (ZeroDivisionError, ValueError):
        return None


def why_undefined(multi: Mapping[str, float], single: Mapping[str, float]) -> str:
    """The reason ``delta_m_if_defined`` gave None, naming the metrics at fault."""
    unscored = [k for k in single if math.isnan(single[k]) or math.isnan(multi[k])]
    if unscored:
        return f"{', '.join(unscored)} had no valid test entry (every target ignored), so no score"
    return f"the single-task value of {', '.join(k for k in single if single[k] == 0)} is 0"


def results_table(multi: Mapping[str, float], single: Mapping[str, float],
                  lower: Mapping[str, bool]) -> str:
    """Markdown table, one row per metric, and the Δm line under it."""
    rows = ["| task / metric | lower is better | single-task | multi-task | Δ (%) |",
            "|---|---|---|---|---|"]
    for key in single:
        change = delta_m_if_defined({key: multi[key]}, {key: single[key]}, {key: lower[key]})
        shown = "undefined" if change is None else f"{change:+.2f}"
        rows.append(f"| {key} | {'yes' if lower[key] else 'no'} | {single[key]:.4f} | {multi[key]:.4f} | {shown} |")
    overall = delta_m_if_defined(multi, single, lower)
    rows.append(f"\nΔm = {overall:+.2f} %" if overall is not None else f"\nΔm undefined: {why_undefined(multi, single)}")
    return "\n".join(rows)


def available_device(text: str) -> torch.device:
    """``--device``: a device this machine has; otherwise a one-line error, not a traceback
    from deep inside the first ``.to(device)``."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    backend = getattr(torch, device.type, None)
    if device.type == "meta":
        raise argparse.ArgumentTypeError("the meta device holds no data to train on")
    if hasattr(backend, "is_available") and not backend.is_available():
        raise argparse.ArgumentTypeError(f"{device.type} is not available on this machine (no such device, "
                                         f"or this PyTorch build lacks it); use --device cpu")
    if device.index is not None and hasattr(backend, "device_count") and device.index >= backend.device_count():
        raise argparse.ArgumentTypeError(f"{text} does not exist: this machine has {backend.device_count()} "
                                         f"{device.type} device(s), numbered from 0")
    return device


def in_range(kind: type, low: float, high: float = float("inf"), low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: ``kind(text)`` within [low, high] (or (low, high] if ``low_open``).
    ``float`` reads ``inf`` and ``nan`` too; neither is a usable setting (an infinite rate
    diverges at the first step), so both are refused whatever the bounds."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            spelled = text.strip().lstrip("+-").lower() in ("inf", "infinity", "nan")
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}"
                                             + ("" if spelled else f" (too large: read as {value})"))
        if not (value > low if low_open else value >= low) or not value <= high:
            bounds = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}" + (f" and <= {high}" if high < float("inf") else "")
                                             + f", got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: ``kind(text)`` that must be > 0."""
    return in_range(kind, 0, low_open=True)


def read_baselines(path: Path) -> dict[str, float]:
    """``--baselines``: a JSON object {task/metric: number}, or an error naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object {{task/metric: value}}, got {type(raw).__name__}")
        values = {str(k): float(v) for k, v in raw.items()}
        bad = {k: v for k, v in values.items() if not 0 <= v < math.inf}
        if bad:  # Δm divides by them: refuse now, not after training
            raise ValueError(f"single-task values must be finite and >= 0, got {bad}")
        return values
    except (OSError, ValueError, TypeError) as error:
        raise ConfigurationError(f"--baselines {path}: {error}") from error


def _keywords(pairs: Sequence[str]) -> dict[str, object]:
    """``["width=16", "k=2"]`` -> ``{"width": 16, "k": 2}``: values as Python literals, or
    the text itself; ``options.typed`` then reads them as their function declares. A flag
    given twice adds to its pairs (``action="extend"``), so a key given twice is an error,
    not a silent override."""
    out = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not key or not equals:
            raise ConfigurationError(f"expected KEY=VALUE, got {pair!r}")
        if key in out:
            raise ConfigurationError(f"{key} is given twice")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _method_names() -> list[str]:
    try:
        from reference_impls.weighting import registry as methods
    except ImportError:  # as make_method: the loop still runs equal weighting
        return ["ew"]
    return list(methods.methods())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reference_impls.train", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="shared_bottom", help=f"one of: {', '.join(registry.available())} (default: %(default)s)")
    parser.add_argument("--method", default="ew", help=f"one of: {', '.join(_method_names())} (default: %(default)s)")
    parser.add_argument("--method-kw", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="options for the method's constructor, e.g. preference=[1,2] for epo")
    parser.add_argument("--data", default="synthetic", help="synthetic, nyuv2, cityscapes, celeba, qm9, office31, office_home (default: %(default)s)")
    parser.add_argument("--root", default=None, help="data directory (all but synthetic)")
    parser.add_argument("--data-kw", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="loader options, e.g. correlation=0.5 n_train=2000")
    parser.add_argument("--arch-kw", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="options for the architecture's from_problem, e.g. num_experts=8")
    parser.add_argument("--stl-arch", default=None,
                        help="architecture of the single-task baselines, one model per task (default: shared_bottom)")
    parser.add_argument("--stl-kw", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="options for the single-task architecture, as --arch-kw")
    parser.add_argument("--baselines", type=Path, default=None, help="JSON {task/metric: value}; skips single-task training")
    parser.add_argument("--save-baselines", type=Path, default=None,
                        help="write the single-task metrics to this JSON file, for --baselines next time")
    parser.add_argument("--epochs", type=positive(int), default=3, help="epochs, for every model trained (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive(int), default=64, help="examples per step (default: %(default)s)")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--method-lr", type=positive(float), default=None,
                        help="learning rate of the method's own parameters, e.g. loss weights (default: --lr)")
    parser.add_argument("--seed", type=in_range(int, 0, 2**63 - 1), default=0, help="seeds the synthetic data, the batch order, the models (initial weights, and the masks, routes or noise an architecture draws itself) and the method (default: %(default)s)")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, mps, ... (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("data_kw", "arch_kw", "stl_kw", "method_kw"):
        try:
            setattr(args, name, _keywords(getattr(args, name)))
        except ConfigurationError as error:
            parser.error(f"argument --{name.replace('_', '-')}: {error}")
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    """Everything ``main`` prints, as data: metrics, baselines, Δm, table, loss history."""
    device = torch.device(args.device)  # parse_args already checked it; run() may get a Namespace directly
    single = read_baselines(args.baselines) if args.baselines is not None else None  # fail before training
    if args.save_baselines is not None:
        check_writable(args.save_baselines)
    if single is not None and (args.stl_arch is not None or args.stl_kw):
        raise ConfigurationError("--stl-arch/--stl-kw choose how the single-task baselines are trained; "
                                 "with --baselines none are trained, so drop one or the other")
    data_kw = dict(args.data_kw)
    if args.data == "synthetic":
        data_kw.setdefault("seed", args.seed)
    data_functions = datasets.option_functions(args.data)
    bench = built_from_flags(f"--data {args.data}", "--data-kw", args.data_kw, lambda: datasets.load(
        args.data, args.root, **typed_options(data_kw, data_functions)), data_functions)
    require_examples(bench, f"--data {args.data}")
    lower = lower_is_better(bench)
    if single is not None and set(single) != set(lower):
        raise ConfigurationError(f"--baselines {args.baselines}: has {sorted(single)}, but --data {args.data} "
                                 f"reports {sorted(lower)}")
    if single is None:  # a bad --stl-arch, or batches it cannot train on, fail before training
        first = single_task_model(bench, bench.problem.tasks[0], args)
        for t in bench.problem.tasks:  # every baseline is this architecture: the batch-norm rule is the same
            shuffled_batches(bench.train, args.batch_size, args.seed, [t], first, f"single-task {t}")
    torch.manual_seed(args.seed)
    arch_kw = seeded(args.arch, args.arch_kw, args.seed)
    make = lambda: registry.build(args.arch, bench.problem, **typed_arch_options(args.arch, arch_kw))  # noqa: E731
    require_fits(f"--arch {args.arch}", make, device, (args.batch_size, *bench.problem.input_shape))
    model = built_from_flags(f"--arch {args.arch}", "--arch-kw", args.arch_kw, make, registry.builders(args.arch))
    note = procedure_note(args.arch, model)
    if note:
        print(f"[train] {note}", file=sys.stderr)
    multi, history = fit(model, bench, args.method, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, device=device, seed=args.seed,
                         label=f"{args.arch}+{args.method}", progress=args.progress, method_options=args.method_kw,
                         method_lr=getattr(args, "method_lr", None))
    if single is None:
        single = single_task_baselines(bench, args, device)
    if args.save_baselines is not None:  # whole or not at all: write beside it, then rename
        partial = args.save_baselines.with_name(args.save_baselines.name + ".partial")
        try:
            partial.write_text(json.dumps(single, indent=2) + "\n", encoding="utf-8")
            partial.replace(args.save_baselines)
        finally:  # a failed write leaves no half-written file beside it
            partial.unlink(missing_ok=True)
    return {"multi_task": multi, "single_task": single, "lower_is_better": lower,
            "delta_m": delta_m_if_defined(multi, single, lower), "table": results_table(multi, single, lower),
            "train_loss": history["task_loss"], "train_history": history, "note": note}


def check_writable(path: Path) -> None:
    """``--save-baselines``: refuse before training what would fail after it (no such
    directory, a directory in the file's place, no permission to write there)."""
    if not path.parent.is_dir():
        raise ConfigurationError(f"--save-baselines {path}: no directory {path.parent}")
    if path.is_dir():
        raise ConfigurationError(f"--save-baselines {path}: is a directory; give a file name")
    probe = path.with_name(path.name + ".partial")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ConfigurationError(f"--save-baselines {path}: cannot write there ({error.strerror})") from None


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    result = run(args)
    print(f"\n{args.arch} + {args.method} on {args.data}, {args.epochs} epochs, seed {args.seed}\n")
    print(result["table"])
    if result["note"]:
        print(f"\nNote: {result['note']}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ConfigurationError, KeyError, datasets.DataError, TrainingDiverged) as error:  # not a bug
        sys.exit(f"error: {error.args[0] if error.args else error}")
