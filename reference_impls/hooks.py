"""How the training loop feeds methods that need more than the task losses each step.

A method names the extra call it needs in its ``training_hook`` class attribute
(``reference_impls/weighting/base.py``). ``reference_impls.train`` drives these, and
refuses any other before the first step (``check_method_is_driven``), so that no method
trains as something else under its own name:

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
  single-task baselines still train on all of it; the run says so on stderr);
* AW ``observe_validation_losses``: before each network step, the task losses of a batch
  from that same held-out tenth, in eval mode and without gradients (``validation_losses``).

The checks that a method fits the model and the data (trainable shared parameters, a
shared representation, scores in [0, 1]) live here too, with the data each hook reads.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, random_split

from reference_impls import data as datasets
from reference_impls.architectures.base import MultiTaskModel
from reference_impls.weighting.base import GradientMethod, LossWeighting
from reference_impls.weighting.continuous_pareto import weighted_hessian_vector_product
from reference_impls.weighting.gradients import gradient_step, per_task_gradients


# The hooks listed above; every other training_hook is refused before the first step.
DRIVEN_HOOKS = {"update", "balance_step", "observe_kpis", "combine", "step", "backward", "rotate", "observe",
                "observe_hvp", "observe_sam_gradients", "observe_second_sample", "groups_per_step",
                "meta_step", "meta_backward", "observe_validation_losses"}
SECOND_ORDER_HOOKS = {"combine", "observe_hvp"}  # methods that differentiate gradients again
REPRESENTATION_HOOKS = {"combine", "backward", "rotate"}  # Rep-MTL, MGDA-UB, RotoGrad: they read z
META_HOOKS = {"meta_step", "meta_backward"}  # bilevel methods (MOML, AutoL): a validation batch per step
VALIDATION_HOOKS = META_HOOKS | {"observe_validation_losses"}  # these train on 90 % and hold out 10 %
VALIDATION_FRACTION = 0.1


class ConfigurationError(ValueError):
    """A method, architecture and data combination this loop cannot train faithfully."""


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


def method_gradient_step(method: GradientMethod, losses: Tensor, model: MultiTaskModel, batch: Batch) -> None:
    """Fill ``.grad`` with the method's update of the shared gradients (and heads' own), by hook."""
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


def batch_scores(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                 specs: Mapping[str, datasets.TaskSpec], tasks: Sequence[str]) -> Tensor:
    """Each task's metric on this batch alone (DTP's KPIs: accuracy, mIoU)."""
    scores = []
    for t in tasks:
        metric = specs[t].metric()
        metric.update(outputs[t], targets[t])
        scores.append(metric.compute())
    return torch.tensor(scores)


def parameters_reached(losses: Tensor) -> list[set[int]]:
    """Per task, the ids of the parameters its loss depends on, read off the autograd graph.

    ``losses`` is ``task_losses``' stack, so each task's own graph starts at one input of
    the stack node; walking ``losses[k]`` instead would pass through the stack and reach
    every task's parameters (autograd then returns zero gradients, not None, for the
    others). Walking the graph computes no gradient.
    """
    roots = [fn for fn, _ in losses.grad_fn.next_functions]
    reached = []
    for root in roots:
        seen, stack, ids = set(), [root], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)  # an AccumulateGrad node holds its parameter
            if leaf is not None:
                ids.add(id(leaf))
            stack.extend(fn for fn, _ in node.next_functions)
        reached.append(ids)
    return reached


def last_shared_weight(model: MultiTaskModel, losses: Tensor) -> Tensor:
    """GradNorm's W: the last-registered shared weight (2-D or more) that every task's loss reaches.

    Registration order follows the forward pass in every model here, so this is the top
    layer of the shared part; biases and norm scales are skipped, as in the paper, which
    takes the weights of one layer. It is looked up at every step because models that
    route inputs (routing networks, sparse experts) reach different shared weights on
    different batches.
    """
    reached = parameters_reached(losses)
    candidates = [p for p in model.shared_parameters() if p.requires_grad and p.ndim >= 2]
    for weight in reversed(candidates):
        if all(id(weight) in ids for ids in reached):
            return weight
    raise ConfigurationError(
        f"method 'gradnorm' needs a shared weight that every task's loss reaches, and architecture "
        f"{getattr(model, 'name', type(model).__name__)!r} has none; pick another method"
    )


class Forward(NamedTuple):
    outputs: dict[str, Tensor]
    representation: Tensor | None = None  # z = encode(x), for Rep-MTL, MGDA-UB and RotoGrad
    rotated: list[Tensor] | None = None  # RotoGrad's R_k z
    intermediate: Mapping[str, object] | None = None  # a model's earlier predictions, to supervise


@contextmanager
def twice_differentiable(model: nn.Module) -> Iterator[None]:
    """Only kernels with a second derivative inside: the math attention kernel, since the fused
    ones have none, and, for a model with an RNN, no cuDNN, since its RNN kernels have none
    (torch 2.11 raised NotImplementedError on CUDA). cuDNN's convolutions do have one and stay
    on for other models; its other settings are left alone, and it is restored after."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = enabled and not any(isinstance(m, nn.RNNBase) for m in model.modules())
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cudnn.enabled = enabled


def forward(model: MultiTaskModel, method: LossWeighting | GradientMethod, x: Tensor) -> Forward:
    """The outputs, and what else the method or the model's training needs from this pass.

    Rep-MTL and MGDA-UB read z = encode(x); RotoGrad's task k head reads R_k z. A model with
    ``forward_with_intermediate`` (PAD-Net, MTI-Net, ATRC, InvPT, DiffusionMTL) also returns
    its intermediate predictions, which the loop supervises (``train.deep_supervision``); for
    the methods that read z, a model keeps them with ``decode_with_intermediate(z)`` (PTA's
    other decoders), and without it has none.
    Methods that differentiate gradients again run ``twice_differentiable`` kernels.
    """
    hook = method.training_hook
    with twice_differentiable(model) if hook in SECOND_ORDER_HOOKS else nullcontext():
        if hook not in REPRESENTATION_HOOKS:
            if callable(getattr(model, "forward_with_intermediate", None)):
                outputs, intermediate = model.forward_with_intermediate(x)
                return Forward(outputs, intermediate=intermediate)
            return Forward(model(x))
        representation = model.encode(x)
        if not representation.requires_grad:  # at the first step, before any update
            raise ConfigurationError(
                f"method {getattr(method, 'name', type(method).__name__)!r} weighs the task gradients of the "
                f"shared representation z = encode(x), but architecture "
                f"{getattr(model, 'name', type(model).__name__)!r} computes z with no trainable parameter "
                "(a frozen encoder), so z has no gradient; use a method that reads the losses or the "
                "parameter gradients instead")
        decode_with_intermediate = getattr(model, "decode_with_intermediate", None)
        if hook != "rotate":
            if callable(decode_with_intermediate):
                outputs, intermediate = decode_with_intermediate(representation)
                return Forward(outputs, representation, intermediate=intermediate)
            return Forward(model.decode(representation), representation)
        rotated = method.rotate(representation)
        if not callable(decode_with_intermediate):
            outputs = {t: model.decode(r)[t] for t, r in zip(model.tasks, rotated)}
            return Forward(outputs, representation, rotated)
        outputs, intermediate = {}, {}
        for t, r in zip(model.tasks, rotated):  # task t's predictions, final and intermediate, read R_t z
            final, earlier = decode_with_intermediate(r)
            outputs[t] = final[t]
            for key, value in earlier.items():
                if key == t and torch.is_tensor(value):
                    intermediate[key] = value
                elif isinstance(value, Mapping) and t in value:
                    intermediate.setdefault(key, {})[t] = value[t]
        return Forward(outputs, representation, rotated, intermediate)


def check_method_is_driven(method: LossWeighting | GradientMethod | type, method_name: str) -> None:
    """Refuse a method that needs a per-step call this loop does not make.

    Without its hook MT-SGD, say, would train as plain MGDA (one particle) while the
    results table printed its name.
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
    """Refuse a method the model cannot serve, before any step is taken.

    Gradient methods act only on the K x d matrix of shared-parameter gradients. Models that
    freeze their backbone (LoRA, adapters, Piggyback) leave d = 0, and training would then
    be plain summed losses under the method's name. Rep-MTL, MGDA-UB and RotoGrad need one
    shared representation z, reached through ``encode``/``decode``.
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


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's previous mode is restored on the way out."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def representation_size(model: MultiTaskModel, bench: datasets.Benchmark, device: torch.device) -> int:
    """Width of a vector representation z = encode(x) (RotoGrad's rotations are dim x dim)."""
    if type(model).encode is MultiTaskModel.encode:
        raise ConfigurationError(f"architecture {getattr(model, 'name', type(model).__name__)!r} has no "
                                 "single shared representation (no encode/decode) to rotate")
    x = bench.train[0][0][None].to(device)
    with evaluating(model):
        z = model.encode(x)
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


def validation_split(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, validation): a seeded random ``fraction`` of the training set, at least one example,
    and never all of it: at least one example is left to train on. A dataset with its own
    ``validation_split`` (Office: per domain) splits itself."""
    own = getattr(train, "validation_split", None)
    if callable(own):  # a dataset that splits itself (Office: per domain)
        return own(fraction, seed)
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    rest, val = random_split(train, [len(train) - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return rest, val


def endless(loader: DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def skips_a_lone_example(model: nn.Module, examples: int, batch_size: int, label: str,
                         split: str = "training") -> bool:
    """Whether an epoch's last batch must be dropped because it holds one example.

    Batch norm cannot normalise a single value per channel in training, so a model with
    one fails on such a batch (65 examples in batches of 64). Dropping it loses one example
    per epoch, a different one each time since batches are shuffled; any other model keeps it.
    """
    if not any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        return False
    if batch_size < 2 or examples < 2:
        raise ConfigurationError(f"{label}: batch norm needs at least 2 examples per {split} batch, "
                                 f"got --batch-size {batch_size} and {examples} {split} examples")
    return examples % batch_size == 1


def shuffled_batches(dataset: Dataset, batch_size: int, seed: int, tasks: Sequence[str] | None,
                     model: nn.Module | None, label: str, split: str = "training") -> DataLoader:
    """Seeded shuffled batches; or, for a dataset that draws its own (Office's one batch per
    domain, ``batch_sampler(tasks, batch_size, generator)``), those. ``model``: given when the
    batches run through it in training mode, so that none holds a lone batch-norm example."""
    generator = torch.Generator().manual_seed(seed)
    own = getattr(dataset, "batch_sampler", None)
    if callable(own):
        sampler = own(tasks, batch_size, generator)
        if model is not None:  # refuses batches of 1
            skips_a_lone_example(model, sampler.batch_examples, sampler.batch_examples, label, split)
        return DataLoader(dataset, batch_sampler=sampler)
    lone = model is not None and skips_a_lone_example(model, len(dataset), batch_size, label, split)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=lone)


def held_out_batches(train: Dataset, method_name: str, batch_size: int, seed: int,
                     use: str = "its meta step", model: nn.Module | None = None) -> tuple[Dataset, Iterator]:
    """(what the network trains on, endless validation batches) for a method that reads them.

    ``model``: given when the validation batches run through it in training mode (a bilevel
    method's look-ahead), so they follow the training batches' rule for batch norm."""
    if len(train) < 2:
        raise ConfigurationError(f"{method_name} holds out part of the training set as validation data, which "
                                 f"needs at least 2 training examples; there are {len(train)}")
    rest, val = validation_split(train, VALIDATION_FRACTION, seed)
    print(f"[train] {method_name}: {len(val)} of {len(train)} training examples held out "
          f"as validation data for {use}", file=sys.stderr)
    # tasks None: Office's validation batches come from every domain
    return rest, endless(shuffled_batches(val, batch_size, seed + 1, None, model, method_name, "validation"))


def validation_losses(model: MultiTaskModel, val_batch: tuple[Tensor, Mapping[str, Tensor]],
                      specs: Mapping[str, datasets.TaskSpec]) -> Tensor:
    """The K task losses of a held-out batch (AW's signal): eval mode, no gradient, no trace in θ."""
    x, targets = val_batch
    with evaluating(model):
        return task_losses(model(x), targets, specs, model.tasks)


def meta_update(method: LossWeighting, model: MultiTaskModel, batch: tuple[Tensor, Mapping[str, Tensor]],
                val_batch: tuple[Tensor, Mapping[str, Tensor]], specs: Mapping[str, datasets.TaskSpec],
                lr: float, meta_optimizer: torch.optim.Optimizer | None) -> None:
    """A bilevel method's upper-level step at the current θ, before the network's step.

    The look-ahead θ' = θ − α ∇_θ Σ w_k L_k runs through ``torch.func.functional_call``, so θ
    itself is untouched. MOML updates its logits itself (its own ``inner_lr`` and
    ``meta_lr``); AutoL's λ takes a step of ``meta_optimizer`` (Adam at ``--method-lr``, by
    default the network's rate), and its look-ahead uses the network's rate ``lr``.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def losses_on(data: tuple[Tensor, Mapping[str, Tensor]]) -> Callable[[Mapping[str, Tensor]], Tensor]:
        x, targets = data
        return lambda values: task_losses(functional_call(model, dict(values), (x,)), targets, specs, model.tasks)

    with twice_differentiable(model):  # the look-ahead is differentiated twice
        if method.training_hook == "meta_step":
            method.meta_step(params, losses_on(batch), losses_on(val_batch))
        else:
            meta_optimizer.zero_grad(set_to_none=True)
            method.meta_backward(params, losses_on(batch), losses_on(val_batch), lr)
            meta_optimizer.step()
