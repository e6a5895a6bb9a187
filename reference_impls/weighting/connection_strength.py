"""Connection strength-based optimization: learn task priority, then keep it.

Jeong & Yoon, "Quantifying Task Priority for Multi-Task Optimization", CVPR 2024,
arXiv:2406.02996 (Sec. 4, Algorithm 1; equation numbers below are the paper's).

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
not channel by channel. Parameters outside any prioritised layer (other layers, biases)
get the plain sum of the task gradients.

Mixing (Algorithm 1): each epoch e of E draws P ~ U(0, 1) and uses Phase 1 if P >= e/E,
Phase 2 otherwise, so Phase 2 becomes more likely as training goes on.

Interface. ``ConnectionStrength`` is a ``GradientMethod`` for Phase 2: give it the owner
of every gradient coordinate with ``observe_priority`` (``coordinate_owners`` expands
the channel priority of a conv weight to its flattened coordinates; −1 marks a
coordinate in no group), then call it on the K x d matrix of per-task gradients. Before
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

Left out: the HRNet/ResNet/SegNet backbones, MTI-Net decoders, the NYUD-v2,
PASCAL-Context and Cityscapes benchmarks, and the extension to transformer or linear
layers that the paper mentions but does not specify.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

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


def sequential_task_steps(task_losses: Callable[[], Tensor], optimizer: torch.optim.Optimizer, num_tasks: int) -> Tensor:
    """Phase 1, Eq. (9): one optimizer step per task, in order, each on that task's loss at
    the parameters the previous task's step left. ``task_losses()`` runs the batch again and
    returns the K losses. Returns the K losses each step was taken on."""
    require_positive(num_tasks=num_tasks)
    seen = []
    for k in range(num_tasks):
        optimizer.zero_grad(set_to_none=True)  # heads of other tasks get no gradient: no step
        loss = task_losses()[k]
        loss.backward()
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
        self._phases: dict[int, int] = {}

    def phase(self, epoch: int) -> int:
        """1 or 2 for this epoch: P ~ U(0, 1), Phase 1 if P >= e / E (drawn once per epoch)."""
        if epoch not in self._phases:
            draw = float(torch.rand((), generator=self.generator, device=self.generator.device))
            self._phases[epoch] = 1 if draw >= epoch / self.num_epochs else 2
        return self._phases[epoch]

    def observe_priority(self, owners: Tensor) -> None:
        """The top-priority task (0..K-1) of every gradient coordinate, −1 for none."""
        if owners.ndim != 1:
            raise ValueError(f"expected one owner per gradient coordinate, got shape {tuple(owners.shape)}")
        self.owners = owners.long()

    def __call__(self, grads: Tensor, owners: Tensor | None = None) -> Aggregation:
        check_gradient_matrix(grads)
        k, d = grads.shape
        owners = self.owners if owners is None else owners.long()
        if owners is None:
            owners = torch.full((d,), -1, dtype=torch.long, device=grads.device)
        if owners.shape != (d,):
            raise ValueError(f"expected {d} coordinate owners, got shape {tuple(owners.shape)}")
        tasks = torch.arange(k, device=grads.device)
        masks = (owners.to(grads.device)[None, :] == tasks[:, None]).to(grads.dtype)  # K x d: CG_i
        references = grads * masks  # row i: G_{i,i}, zero outside CG_i
        dots = grads @ references.T  # [j, i] = G_{i,j} · G_{i,i}
        norms = references.square().sum(1)  # ||G_{i,i}||²
        conflict = (dots < 0) & (tasks[:, None] != tasks[None, :]) & (norms > 0)[None, :]
        safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        coefficients = torch.where(conflict, dots / safe_norms, torch.zeros_like(dots))  # [j, i]
        # Σ_j of the projected rows: the sum, minus every removed component c_{j,i} G_{i,i}
        update = grads.sum(0) - coefficients.sum(0) @ references
        return Aggregation(update=update)
