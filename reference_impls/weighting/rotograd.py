"""RotoGrad: per-task rotations of the shared representation plus gradient scaling.

Javaloy & Valera, "RotoGrad: Gradient Homogenization in Multitask Learning", ICLR 2022,
arXiv:2103.02631.

RotoGrad acts on the shared representation z (B x d), not on the parameters. It
homogenises the task gradients w.r.t. z in two ways:

* Magnitude. With g_k the task-k gradient w.r.t. z and g_k^0 its value at the first
  step, each task's convergence ratio c_k = ||g_k|| / ||g_k^0|| gives the share
  α_k = c_k / sum_j c_j. The backbone receives

      sum_k C · g_k / ||g_k||,   C = sum_k α_k ||g_k||,

  so all tasks push with comparable force, and a task that converged less (larger
  ratio) gets a larger share.
  Norms are clamped at ``eps``, so a task whose gradient is zero adds nothing and the
  update stays finite.
* Direction. Task k's head sees r_k = R_k z with R_k orthogonal (here the Cayley
  map of a skew-symmetric S_k = A_k - A_kᵀ, R_k = (I - S_k)⁻¹ (I + S_k), which starts
  at the identity and is cheaper than a matrix exponential; the authors' library,
  adrianjav/rotograd at f924985, parametrises R_k with geotorch's matrix exponential).
  R_k is trained, separately from the network, so that the task's gradient rotated back
  into z-space, R_kᵀ ∇_{r_k} L_k, points like the consensus direction v (the mean of the
  unit task gradients, scaled to their mean norm): the rotation loss is
  sum_k mean_b || R_k v_b - ∇_{r_k} L_k ||², in which v and ∇_{r_k} L_k are held fixed:
  only R_k v carries a gradient to the rotations. The authors' library scales v to the norm of
  the mean gradient instead; the best rotations are the same, only the step sizes of the
  rotation updates differ.

Left out: rotating only a sub-space of z, the burn-in period (the library takes the
reference norms g_k^0 afresh after 20 steps; here they stay those of the first step), the
loss normalisation option of the authors' library, and the RotoGrad-Norm variant
(GradNorm-style target).

Checked against the authors' library, adrianjav/rotograd (rotograd/rotograd.py:
RotateOnly._rep_grad and RotoGrad._rep_grad; README.md). Two more differences: the
library builds each R_k with geotorch's ``orthogonal``, which overwrites the identity it
is given with a random (Haar) rotation, so its rotations do not start at the identity as
ours do; and its README advises a smaller learning rate for the rotations than for the
network, which here is up to the optimizer the caller builds around ``rotation_parameters()``.

Interface:

    rotograd = RotoGrad(dim, num_tasks)         # optimizer also gets rotograd.rotation_parameters()
    z = backbone(x)
    reps = rotograd.rotate(z)                   # K tensors R_k z, leaves detached from z
    losses = torch.stack([loss_k(head_k(r_k)) for ...])
    rotograd.backward(losses, z, reps)          # fills grads of heads, backbone and R_k
    optimizer.step()

``backward`` runs one backward pass through the heads (which yields ∇_{r_k} L_k on the
leaves), sends the scaled combination into the backbone through z, and back-propagates
the rotation loss into the rotation parameters. Calling the object on a K x d matrix of
representation gradients applies the magnitude scaling alone (a ``GradientMethod``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


class TaskRotations(nn.Module):
    """K orthogonal d x d matrices from the Cayley map of S_k = A_k - A_kᵀ."""

    def __init__(self, dim: int, num_tasks: int) -> None:
        super().__init__()
        self.generators = nn.Parameter(torch.zeros(num_tasks, dim, dim))  # A_k

    def matrices(self) -> Tensor:
        skew = self.generators - self.generators.transpose(1, 2)  # S_k
        identity = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(identity - skew, identity + skew)  # K x d x d, orthogonal


class RotoGrad(GradientMethod):
    """Scale representation gradients by convergence share; learn per-task rotations."""

    name = "rotograd"
    training_hook = "rotate"  # heads read R_k z, and backward() fills the gradients

    def __init__(self, dim: int, num_tasks: int, eps: float = 1e-15) -> None:
        self.rotations = TaskRotations(dim, num_tasks)
        self.eps = eps
        self.initial_norms: Tensor | None = None

    def rotation_parameters(self) -> list[nn.Parameter]:
        return list(self.rotations.parameters())

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        norms = grads.norm(dim=1).clamp_min(self.eps)
        if self.initial_norms is None:
            self.initial_norms = norms.detach().clone()
        ratios = norms / self.initial_norms.to(norms)  # c_k
        shares = ratios / ratios.sum().clamp_min(self.eps)  # α_k
        common = (shares * norms).sum()  # C
        weights = common / norms
        return Aggregation(update=weights @ grads, weights=weights)

    def rotate(self, z: Tensor) -> list[Tensor]:
        """Task inputs r_k = R_k z as fresh leaves (the backbone is reached via ``backward``)."""
        rotations = self.rotations.matrices().detach().to(z)
        return [(z.detach() @ rotation.T).requires_grad_() for rotation in rotations]

    def backward(self, losses: Tensor, z: Tensor, reps: list[Tensor]) -> None:
        """Heads: plain gradients. Backbone: scaled sum. Rotations: alignment loss."""
        losses.sum().backward()  # each L_k reaches only r_k, so r_k.grad = ∇_{r_k} L_k
        rotations = self.rotations.matrices().to(z)  # differentiable cast: z may be float64 or elsewhere
        rep_grads = torch.stack([rep.grad for rep in reps])  # K x B x d
        task_grads = torch.einsum("kbd,kde->kbe", rep_grads, rotations.detach())  # R_kᵀ ∇r_k
        update = self(task_grads.flatten(1)).update.view_as(z)
        z.backward(update)
        unit = task_grads / task_grads.flatten(1).norm(dim=1).clamp_min(self.eps)[:, None, None]
        consensus = unit.mean(dim=0) * task_grads.flatten(1).norm(dim=1).mean()  # v
        rotated_consensus = torch.einsum("bd,ked->kbe", consensus, rotations)  # R_k v
        rotation_loss = ((rotated_consensus - rep_grads) ** 2).sum(dim=2).mean(dim=1).sum()
        rotation_loss.backward()
