"""Connection strength-based optimization: learn task priority, then keep it.

Jeong & Yoon, "Quantifying Task Priority for Multi-Task Optimization", CVPR 2024,
arXiv:2406.02996 (Sec. 4, Algorithm 1; equation numbers below are the paper's).
Equation numbers are those of the CVPR 2024 paper, a Markdown transcript in the public GitHub
index (file id 68590059326, equations with their tags; its wording matches the CVF Open Access
transcript there, file id 65765646721); every number cited here matched it.

Task priority. A subset θ of the shared parameters "belongs" to the task whose own
gradient step on θ lowers the multi-task loss most (Definition 3, Eq. (3)). That is too
costly to measure, so the paper reads it off the parameters instead: a shared conv layer
followed by a *task-specific* batch norm per task (γ_{k,p}: task k's scale of output
channel p, Var[y]_p its running variance) has, for a kernel W of shape N_O x N_I x K x K,

    s_{p,q}   = (1/K²) Σ_{m,n} W[p, q, m, n]²                          Eq. (4)
    S_p^k     = γ_{k,p}² / (Var_k[y]_p + ε) · Σ_q s_{p,q}              Eq. (6)
    Ŝ_p^k     = S_p^k / Σ_{p'} S_{p'}^k                                 Eq. (7)
    ν(p)      = argmax_k Ŝ_p^k        (channel p's top-priority task)   Eq. (10)

Eq. (7) normalises over the channels of the layer, so each task's strengths sum to one:
a task whose batch norm is simply larger everywhere does not own the whole layer.
Eq. (6) as printed writes Var[y]_p with no task index; with a batch norm per task each
task has its own running variance, and we use task k's (Var_k).

Phase 1 (learning the priority, Eq. (9)): per batch, the shared parameters take one step
per task, in turn, each on that task's loss alone and at the parameters the previous
task's step left; head k takes its step with the shared parameters as task k saw them.
``sequential_task_steps`` does this (K forward/backward passes per batch).

Phase 2 (conserving it, Algorithm 1): the output channels are grouped by ν into CG_1 ..
CG_K. Let G_{i,j} be task j's gradient restricted to the parameters of the channels in
CG_i. The group's own task is the reference: for every j ≠ i with G_{i,i} · G_{i,j} < 0,

    G_{i,j} <- G_{i,j} − (G_{i,i} · G_{i,j} / ||G_{i,i}||²) G_{i,i}

and the update is the sum over tasks of the projected gradients. The dot product is taken
over the whole group at once (all its channels' kernels flattened), as in Algorithm 1,
not channel by channel. Groups belong to one layer: with several prioritised layers, task
i has a group CG_i in each, projected on its own (the authors' code calls its projection
once per conv weight). Parameters outside any prioritised layer (other layers, biases)
get the plain sum of the task gradients.

Mixing (Algorithm 1): each epoch e of E draws P ~ U(0, 1) and uses Phase 1 if P >= e/E,
Phase 2 otherwise, so Phase 2 becomes more likely as training goes on.

Interface. ``ConnectionStrength`` is a ``GradientMethod`` for Phase 2: give it the owner
of every gradient coordinate with ``observe_priority`` (``coordinate_owners`` expands
the channel priority of a conv weight to its flattened coordinates; −1 marks a
coordinate in no group) and, with more than one prioritised layer, the layer of every
coordinate (``layers``, e.g. ``torch.full_like(owners, n)`` for layer n's part; the
default puts all coordinates in one layer), then call it on the K x d matrix of per-task
gradients. Before
any priority is observed every coordinate is in no group and the update is the plain
sum. ``phase(epoch)`` draws the epoch's phase; in Phase 1 the loop calls
``sequential_task_steps`` instead. The training loop in ``reference_impls.train`` has no
task-specific batch norm to read the priority from, so the method names the hook
``observe_priority`` and that loop refuses it rather than train it as plain summation.

Default ``num_epochs`` E = 100 is a placeholder of ours, not the paper's: it is the horizon
of the Phase 1 / Phase 2 schedule and should be set to the run's number of epochs.

Choices where the paper is silent or its code differs: the paper's Algorithm 1 projects
in every Phase 2 step; the authors' released core falls back to the plain sum when all
channels share one top task, which we do not do (one group is still projected onto).
The released core (its README and toy example) also draws P once per batch, not once
per epoch as the paper's text says; we follow the paper. The 1/K² of Eq. (4) cancels in
Eq. (7) and is kept for fidelity. A group whose reference
gradient is zero projects nothing (no conflict can be detected against it).

Checked against the authors' released core, wooseong97/MT-ST-core at f9dcd35 (conn_str.py:
``conn_str``, ``conn_str_grad``, ``conn_str_optim``; example.py): on one conv layer its Phase 2
and ours agree to 1e-15 (3 tasks, 50 random cases, run during the audit). Its Phase 1 runs one
forward pass per task, through that task's batch norm only; ``sequential_task_steps`` calls
``task_losses()`` once per task and uses one of the K losses, so a model that computes every
task in one pass updates each task's batch-norm running statistics K times a batch, and
those statistics feed Eq. (6): compute only the needed task's loss where that matters.

Left out: the HRNet/ResNet/SegNet backbones, MTI-Net decoders, the NYUD-v2,
PASCAL-Context and Cityscapes benchmarks, and the extension to transformer or linear
layers that the paper mentions but does not specify.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from reference_impls.checks import require_above, require_positive
from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


def connection_strength(conv_weight: Tensor, bn_scales: Tensor, bn_variances: Tensor, eps: float = 1e-5) -> Tensor:
    """Ŝ (K x N_O): each task's normalised connection strength to each output channel.

    ``conv_weight``: N_O x N_I x k x k (or N_O x N_I for a linear layer, k = 1);
    ``bn_scales`` / ``bn_variances``: K x N_O, the task-specific batch norms' γ and running
    variance.
    """
    require_above(0, eps=eps)
    weight = conv_weight.detach().reshape(conv_weight.shape[0], conv_weight.shape[1], -1)
    s = weight.square().mean(-1)  # Eq. (4): s_{p,q}, the mean over the k² kernel entries
    strength = bn_scales.detach().square() / (bn_variances.detach() + eps) * s.sum(1)  # Eq. (6)
    total = strength.sum(1, keepdim=True)
    return strength / torch.where(total > 0, total, torch.ones_like(total))  # Eq. (7)


def top_priority(strength: Tensor) -> Tensor:
    """ν(p) = argmax_k Ŝ_p^k for every output channel p (Eq. (10)); ``strength`` is K x N_O."""
    return strength.argmax(0)


def coordinate_owners(channel_priority: Tensor, weight_shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The top-priority task of every coordinate of the flattened weight (row-major, output
    channel first), so a layer's part of the gradient vector can be grouped."""
    return channel_priority.repeat_interleave(math.prod(weight_shape[1:]))


def sequential_task_steps(task_losses: Callable[[], Tensor], optimizer: torch.optim.Optimizer, num_tasks: int,
                          task_parameters: Sequence[Iterable[nn.Parameter]] | None = None) -> Tensor:
    """Phase 1, Eq. (9): one optimizer step per task, in order, each on that task's loss at
    the parameters the previous task's step left. ``task_losses()`` runs the batch again and
    returns the K losses. Returns the K losses each step was taken on.

    Task k's step must leave the other tasks' heads alone. A parameter the step's loss does
    not reach has no gradient, and optimizers skip it; but a loss picked out of a stacked
    tensor sends explicit zeros back into every head, which weight decay, momentum or Adam
    then move. ``task_parameters`` (the K tasks' own parameters, e.g. from
    ``task_specific_parameters``) clears those gradients before each step."""
    require_positive(num_tasks=num_tasks)
    own = None if task_parameters is None else [list(params) for params in task_parameters]
    if own is not None and len(own) != num_tasks:
        raise ValueError(f"task_parameters needs one group per task: {num_tasks} tasks, {len(own)} groups")
    seen = []
    for k in range(num_tasks):
        optimizer.zero_grad(set_to_none=True)
        loss = task_losses()[k]
        loss.backward()
        for other in ([] if own is None else own[:k] + own[k + 1:]):
            for param in other:
                param.grad = None  # another task's head: no step
        optimizer.step()
        seen.append(loss.detach())
    return torch.stack(seen)


class ConnectionStrength(GradientMethod):
    """Phase 2: project conflicting gradients onto each channel group's top-priority task."""

    name = "connection_strength"
    training_hook = "observe_priority"  # the owners of the coordinates, from task-specific batch norms

    def __init__(self, num_epochs: int = 100, generator: torch.Generator | None = None) -> None:
        require_positive(num_epochs=num_epochs)
        self.num_epochs = num_epochs
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.owners: Tensor | None = None
        self.layers: Tensor | None = None
        self._phases: dict[int, int] = {}

    def phase(self, epoch: int) -> int:
        """1 or 2 for this epoch: P ~ U(0, 1), Phase 1 if P >= e / E (drawn once per epoch)."""
        if epoch not in self._phases:
            draw = float(torch.rand((), generator=self.generator, device=self.generator.device))
            self._phases[epoch] = 1 if draw >= epoch / self.num_epochs else 2
        return self._phases[epoch]

    def observe_priority(self, owners: Tensor, layers: Tensor | None = None) -> None:
        """The top-priority task (0..K-1) of every gradient coordinate, −1 for none, and the
        prioritised layer (0, 1, ...) each coordinate belongs to (default: one layer)."""
        for what, ids in (("owner", owners), ("layer", layers)):
            if ids is not None and ids.ndim != 1:
                raise ValueError(f"expected one {what} per gradient coordinate, got shape {tuple(ids.shape)}")
        self.owners = owners.long()
        self.layers = None if layers is None else layers.long()

    def __call__(self, grads: Tensor, owners: Tensor | None = None, layers: Tensor | None = None) -> Aggregation:
        check_gradient_matrix(grads)
        k, d = grads.shape
        if owners is None:
            owners, layers = self.owners, self.layers
        if owners is None:
            owners = torch.full((d,), -1, dtype=torch.long, device=grads.device)
        owners = owners.long().to(grads.device)
        for what, ids in (("owners", owners), ("layers", layers)):
            if ids is not None and ids.shape != (d,):
                raise ValueError(f"expected {d} coordinate {what}, got shape {tuple(ids.shape)}")
        # One group per (layer, task): group g = layer * K + task, the task of group g is g % K.
        group_of, num_groups = owners, k
        if layers is not None:
            layers = layers.long().to(grads.device)
            if (layers < 0).any():
                raise ValueError("layer ids must be non-negative")
            num_groups = (int(layers.max()) + 1) * k if d else k
            group_of = torch.where(owners >= 0, layers * k + owners, -1)
        groups = torch.arange(num_groups, device=grads.device)
        masks = (group_of[None, :] == groups[:, None]).to(grads.dtype)  # G x d: CG_g
        task_of = groups % k
        references = grads[task_of] * masks  # row g: its task's gradient, zero outside CG_g
        dots = grads @ references.T  # [j, g] = G_{g,j} · G_{g,own}
        norms = references.square().sum(1)
        conflict = (dots < 0) & (torch.arange(k, device=grads.device)[:, None] != task_of[None, :])
        conflict &= (norms > 0)[None, :]
        safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        coefficients = torch.where(conflict, dots / safe_norms, torch.zeros_like(dots))  # [j, g]
        # Σ_j of the projected rows: the sum, minus every removed component c_{j,g} G_{g,own}
        update = grads.sum(0) - coefficients.sum(0) @ references
        return Aggregation(update=update)
