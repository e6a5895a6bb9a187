"""Lookahead transference: how one task's gradient step changes every other task's loss.

Fifty, Amid, Zhao, Yu, Anil, Finn, "Measuring and Harnessing Transference in Multi-Task
Learning", arXiv 2020, arXiv:2010.15413: the lookahead definition of transference and its
use in IT-MTL ("increased transference"). Equations are named, not numbered: the paper's
numbering could not be checked here.

Transference asks a counterfactual question at the current parameters: had we updated the
shared parameters θ_s with task i's gradient alone, would task j's loss on the same batch
have gone down, and by how much? With the learning rate η of the optimizer,

    θ_{s|i}' = θ_s − η ∇_{θ_s} L_i(θ_s, θ_i)                    (lookahead step on task i)
    Z_{i→j} = 1 − L_j(θ_{s|i}', θ_j) / L_j(θ_s, θ_j)            (transference from i to j)

Z_{i→j} > 0 means task i's step helps task j, Z_{i→j} < 0 that it hurts it. Only the
shared parameters move; every task keeps its own head. The K x K matrix Z is the task
affinity that the paper tracks over training and uses to group tasks.

IT-MTL ("increased transference") uses the same lookahead at every step to choose among a
few candidate updates of the shared parameters, e.g. the plain total-loss gradient and its
PCGrad projection: each candidate is applied for one lookahead step and the one giving the
lowest total loss Σ_j L_j on the batch is the one taken.

The lookahead is evaluated with ``torch.func.functional_call`` on detached copies of the
parameters, so measuring never changes the model, and every evaluation draws the same random
numbers, so that a model that samples in training mode is compared with itself.

Left out: a lookahead through the optimizer's own update (Adam's moments, or the momentum
with which TAG's CelebA code steps); the step here is plain SGD with the given learning rate. The paper's task grouping from the accumulated
affinities (and its successor TAG) is the caller's job. The same authors' TAG code for
Taskonomy (google-research, ``tag/``) divides Z by the learning rate and adds weight decay to
the lookahead step, so its values are about 1/lr times these; Z here is the plain ratio above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from reference_impls.affinity.same_draws import SameDraws
from reference_impls.checks import require_above
from reference_impls.weighting.pcgrad import PCGrad

Params = dict[str, Tensor]
LossFn = Callable[[Mapping[str, Tensor]], Tensor]  # parameters -> the K task losses


def model_losses(
    model: nn.Module,
    x: Tensor,
    targets: Mapping[str, Tensor],
    criteria: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
    seed: int | None = None,
) -> LossFn:
    """The K task losses of ``model`` on one batch, as a function of its parameters.

    Every call runs on fresh copies of the model's buffers, so a forward pass in training
    mode (batch norm's running statistics) leaves the model's own buffers as they were, and
    draws the same random numbers (:class:`SameDraws`, seeded by ``seed``), so two calls
    differ only by their parameters.
    """
    tasks = list(targets)
    same_draws = SameDraws(model, seed)

    def losses(params: Mapping[str, Tensor]) -> Tensor:
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        with same_draws():
            out = functional_call(model, {**buffers, **params}, (x,))
        return torch.stack([criteria[t](out[t], targets[t]) for t in tasks])

    return losses


def detached_parameters(model: nn.Module) -> Params:
    """Copies of the model's parameters that autograd can differentiate without touching it."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def shared_names(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters a lookahead step moves: ``names`` if given, else the trainable
    ones among ``model.shared_parameters()`` where it exists, else every trainable one.

    Frozen weights are left out because training never moves them. An empty set would measure
    nothing and is refused, as are names that are not parameters of the model.
    """
    params = dict(model.named_parameters())
    if names is not None:
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"shared names parameters {type(model).__name__} does not have: {unknown}")
        chosen = list(names)
    elif getattr(model, "shared_parameters", None) is None:
        chosen = [n for n, p in params.items() if p.requires_grad]
    else:
        ids = {id(p) for p in model.shared_parameters() if p.requires_grad}
        chosen = [n for n, p in params.items() if id(p) in ids]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no trainable shared parameters to take a lookahead step on; "
                         "name the parameters to move with shared=[...]")
    return chosen


def shared_gradients(losses: Tensor, params: Params, shared: Sequence[str]) -> Tensor:
    """The K x d matrix of per-task gradients of the shared parameters (flattened)."""
    tensors = [params[n] for n in shared]
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                               for g, t in zip(grads, tensors)]))
    return torch.stack(rows)


def step(params: Params, shared: Sequence[str], update: Tensor, lr: float) -> Params:
    """``θ_s − lr · update`` for the shared parameters; the others are kept as they are."""
    require_above(0, lr=lr)  # 0 would measure no transference at all, a negative lr the opposite step
    moved = {n: p.detach() for n, p in params.items()}
    offset = 0
    for n in shared:
        numel = moved[n].numel()
        moved[n] = moved[n] - lr * update[offset:offset + numel].view_as(moved[n])
        offset += numel
    return moved


def transference_from_gradients(
    loss_fn: LossFn, params: Params, shared: Sequence[str], grads: Tensor, lr: float
) -> Tensor:
    """Z[i, j] = 1 − L_j(after a step on task i) / L_j(now), from the K x d gradients.

    A loss that is 0 before and after counts as unchanged (Z = 0), not as removed (Z = 1).
    """
    with torch.no_grad():
        before = loss_fn({n: p.detach() for n, p in params.items()})
        after = torch.stack([loss_fn(step(params, shared, g, lr)) for g in grads])
    ratio = after / before.clamp_min(torch.finfo(before.dtype).tiny)
    return 1 - torch.where((after == 0) & (before == 0), torch.ones_like(ratio), ratio)


def lookahead_transference(
    model: nn.Module, loss_fn: LossFn, lr: float, shared: Sequence[str] | None = None
) -> Tensor:
    """The K x K transference matrix Z (row i: the task stepped on, column j: the task measured)."""
    params = detached_parameters(model)
    shared = shared_names(model, shared)
    grads = shared_gradients(loss_fn(params), params, shared)
    return transference_from_gradients(loss_fn, params, shared, grads, lr)


# ----------------------------------------------------------------------------------------------
# IT-MTL: take the candidate update with the lowest lookahead total loss
# ----------------------------------------------------------------------------------------------


def default_candidates(grads: Tensor) -> dict[str, Tensor]:
    """The two candidates of IT-MTL with PCGrad: the total-loss gradient and its PCGrad version.

    PCGrad projects each task against the others in index order (not shuffled), so the candidate,
    and IT-MTL's choice, is the same for the same gradients."""
    return {"total": grads.sum(0), "pcgrad": PCGrad(random_order=False)(grads).update}


def lookahead_total_losses(
    loss_fn: LossFn, params: Params, shared: Sequence[str], candidates: Mapping[str, Tensor], lr: float
) -> dict[str, Tensor]:
    """Σ_j L_j after one lookahead step along each candidate update."""
    with torch.no_grad():
        return {name: loss_fn(step(params, shared, u, lr)).sum() for name, u in candidates.items()}


def select_update(
    model: nn.Module,
    loss_fn: LossFn,
    lr: float,
    shared: Sequence[str] | None = None,
    candidates: Callable[[Tensor], dict[str, Tensor]] = default_candidates,
) -> tuple[str, Tensor, dict[str, Tensor]]:
    """IT-MTL's choice: (name, flat update of the shared parameters, lookahead loss of each)."""
    params = detached_parameters(model)
    shared = shared_names(model, shared)
    proposals = candidates(shared_gradients(loss_fn(params), params, shared))
    totals = lookahead_total_losses(loss_fn, params, shared, proposals, lr)
    best = min(totals, key=lambda name: totals[name].item())
    return best, proposals[best], totals
