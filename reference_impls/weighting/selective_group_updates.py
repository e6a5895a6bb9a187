"""Selective task group updates, grouped by proximal inter-task affinity.

Jeong & Yoon, "Selective Task Group Updates for Multi-Task Optimization", ICLR 2025,
arXiv:2502.11986 (code: github.com/wooseong97/sel-update-mtl).

Instead of one step on the sum of all task losses, every batch is used for several
optimizer steps, one per *group* of tasks, taken in random order; each step follows only
its group's loss. Which tasks share a group is decided from a running measure of how an
update for one group changes the other tasks' losses on the same batch, the proximal
inter-task affinity. When group G has just been stepped on, with L_t the loss of task t
before that step and L_t' after it (the next forward pass on the same batch),

    a_t = (1 - L_t' / L_t) / |G|                      relative loss drop of t, per member
    A[s, t] <- (1 - β) A[s, t] + β · a_t              for every s in G and every task t

with two special cases for pairs inside G: a task's own entry A[s, s] is only updated
when a_s >= 0, and for s ≠ t both in G with a_s, a_t of opposite signs the entry
receives -max(a_s, a_t) (the pair pulls apart). β is small (1e-3 in the authors' configs,
1e-4 for Taskonomy).

Regrouping: the affinity is normalised by each target task's self-affinity
(column t divided by A[t, t]), symmetrised, and clustered with affinity propagation
(Frey & Dueck, Science 2007; preference = median similarity), whose exemplars define the
groups. During a warm-up the initial grouping (one task per group) is used.

These rules follow the authors' code (``form_task_affinity`` in ``utils/train_utils.py``,
wooseong97/sel-update-mtl; the affinity update agreed exactly in the audit) as it reads: its
normalisation, ``X[:, i] /= X[i, i]`` in place, divides a column by an entry of that same
column, so under PyTorch (1.13.1, its pinned version, as now) only the entries on and above
the diagonal are divided and the rows below stay raw. Its clustering therefore sees
(A[s, t] / A[t, t] + A[t, s]) / 2 for s < t, and its groups equalled ours in 79 of 181 random
4-task cases (5 of 187 with 11 tasks), against 173 of 174 with the intended normalisation;
ours is the intended per-column one. The equation numbers of the paper were not checked
against its text. The clustering there
is scikit-learn's ``AffinityPropagation``; here it is a short re-implementation of the
same message passing (damping 0.5, the authors' 50 stable iterations for convergence),
with a ~1e-16 relative random jitter to break exact ties, drawn from a fixed seed (theirs
is scikit-learn's, about 1e-7 relative on their float32 matrix, unseeded; with an odd number of
tasks the median preference equals a similarity, so ties arise at every regrouping), so
near-ties may resolve differently from scikit-learn. Two guards the code does not
have: no regrouping while some task's self-affinity is not positive (the normalisation
divides by it), and the groups are kept when the clustering does not converge (the code
retries with a longer convergence window). Also not carried over: scikit-learn's last
pass, which re-picks each cluster's exemplar as the member with the largest summed
similarity to the others and then reassigns the members, so memberships can differ.
One bookkeeping difference from the released loop: there the loss change since the
previous forward pass (the effect of the group stepped on just before) is recorded under
the group about to be stepped on; here it is credited to the group whose step caused
it, which is how the affinity is defined.

Interface (a ``LossWeighting`` whose weights are a 0/1 mask over the tasks):

    for step, batch in enumerate(loader):
        for _ in range(method.groups_per_step(step)):
            losses = task_losses(model, batch)
            mask = method.weights(losses, step=step)        # the group to step on now
            optimizer.zero_grad(); (mask * losses).sum().backward(); optimizer.step()

Each call records the affinity of the previously stepped group from the new losses, then
returns the next group's mask. With one group the group is stepped on twice per batch,
as in the authors' code, so that its effect on itself can be measured.

Left out: the theoretical analysis, the group-size loss normalisation option
(``group_norm``, off in the authors' configs), the vision transformer benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_impls.checks import require_non_negative
from reference_impls.weighting.base import LossWeighting


def affinity_propagation(
    similarity: Tensor, preference: float | None = None, damping: float = 0.5,
    max_iter: int = 200, convergence_iter: int = 50, generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Clusters of the n points of an n x n similarity matrix (Frey & Dueck message passing).

    Returns the clusters as sorted index lists, or [] if the exemplars did not settle.
    """
    n = similarity.shape[0]
    if n == 1:
        return [[0]]
    s = similarity.double().clone()
    s.fill_diagonal_(float(s.flatten().quantile(0.5)) if preference is None else preference)
    # a relative jitter of ~1e-16 breaks exact ties (e.g. two equally good exemplars), as scikit-learn does
    noise = torch.randn(n, n, generator=generator or torch.Generator().manual_seed(0), dtype=torch.float64)
    s += (torch.finfo(torch.float64).eps * s + 100 * torch.finfo(torch.float64).tiny) * noise.to(s.device)
    responsibility, availability = torch.zeros_like(s), torch.zeros_like(s)
    rows = torch.arange(n, device=s.device)
    history: list[Tensor] = []
    for _ in range(max_iter):
        # r(i,k) = s(i,k) - max_{k' != k} [a(i,k') + s(i,k')]
        scores = availability + s
        top2 = scores.topk(2, dim=1)
        best_other = top2.values[:, :1].expand(n, n).clone()
        best_other[rows, top2.indices[:, 0]] = top2.values[:, 1]
        responsibility = damping * responsibility + (1 - damping) * (s - best_other)
        # a(i,k) = min(0, r(k,k) + sum_{i' not in {i,k}} max(0, r(i',k))),  a(k,k) = sum_{i' != k} max(0, r(i',k))
        positive = responsibility.clamp(min=0)
        positive.fill_diagonal_(0)
        positive += torch.diag(responsibility.diagonal())
        new_availability = positive.sum(dim=0, keepdim=True) - positive
        self_availability = new_availability.diagonal().clone()
        new_availability = new_availability.clamp(max=0)
        new_availability[rows, rows] = self_availability
        availability = damping * availability + (1 - damping) * new_availability
        history.append((availability + responsibility).diagonal() > 0)
        if len(history) >= convergence_iter and all(torch.equal(history[-1], h) for h in history[-convergence_iter:]):
            break
    else:
        return []
    exemplars = history[-1].nonzero().flatten()
    if exemplars.numel() == 0:
        return []
    nearest = exemplars[s[:, exemplars].argmax(dim=1)]
    nearest[exemplars] = exemplars  # an exemplar belongs to its own cluster
    return [sorted((nearest == e).nonzero().flatten().tolist()) for e in exemplars]


class SelectiveGroupUpdates(LossWeighting):
    """One optimizer step per task group per batch; groups from proximal inter-task affinity."""

    name = "selective_group_updates"
    training_hook = "groups_per_step"

    def __init__(
        self, num_tasks: int, decay: float = 1e-3, warmup_steps: int = 100,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.decay = decay
        require_non_negative(warmup_steps=warmup_steps)
        self.warmup_steps = warmup_steps
        self.generator = generator
        self.register_buffer("affinity", torch.zeros(num_tasks, num_tasks, dtype=torch.float64))
        self.groups: list[list[int]] = [[k] for k in range(num_tasks)]
        self._queue: list[list[int]] = []
        self._step: int | None = None
        self._last_group: list[int] | None = None
        self._last_losses: Tensor | None = None

    # -- grouping -----------------------------------------------------------------------------

    def normalized_affinity(self) -> Tensor:
        """Column t divided by A[t, t], then symmetrised: the similarity that is clustered."""
        scaled = self.affinity / self.affinity.diagonal()[None, :]
        return (scaled + scaled.T) / 2

    def regroup(self) -> list[list[int]]:
        """Cluster the tasks by affinity; keep the current groups if that is not possible yet."""
        if (self.affinity.diagonal() > 0).all():
            clusters = affinity_propagation(self.normalized_affinity())
            if clusters:
                self.groups = clusters
        return self.groups

    def groups_per_step(self, step: int) -> int:
        """How many optimizer steps ``step``'s batch gets (one per group, at least two)."""
        if step != self._step:
            self._start_step(step)
        return len(self._queue)

    def _start_step(self, step: int) -> None:
        groups = self.regroup() if step >= self.warmup_steps else self.groups
        order = torch.randperm(len(groups), generator=self.generator).tolist()
        self._queue = [groups[i] for i in order] * (2 if len(groups) == 1 else 1)
        self._step, self._last_group, self._last_losses = step, None, None

    # -- affinity tracking --------------------------------------------------------------------

    def record(self, group: list[int], before: Tensor, after: Tensor) -> None:
        """Update A[s, :] for every s in ``group`` from the losses before / after its step."""
        before, after = before.detach().double().cpu(), after.detach().double().cpu()
        valid = before > 0
        drop = torch.where(valid, 1 - after / before.where(valid, 1.0), 0.0) / len(group)  # a_t
        members = set(group)
        for s in group:
            for t in range(self.num_tasks):
                if not valid[t] or (t in members and not valid[s]):
                    continue
                value = drop[t]
                if t == s and value < 0:
                    continue  # a task's own entry only records progress
                if t in members and t != s and drop[t] * drop[s] < 0:
                    value = -torch.maximum(drop[t], drop[s])  # opposite effects inside the group
                self.affinity[s, t] = (1 - self.decay) * self.affinity[s, t] + self.decay * value

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        if step != self._step:
            self._start_step(step)
        elif self._last_group is not None and self._last_losses is not None:
            self.record(self._last_group, self._last_losses, losses)
        if not self._queue:  # more calls than groups on this batch: another round
            self._queue = list(self.groups)
        group = self._queue.pop(0)
        self._last_group, self._last_losses = group, losses.detach().clone()
        mask = torch.zeros_like(losses.detach())
        mask[group] = 1.0
        return mask
