"""µ2Net: grow a multitask system by evolving, for each new task, a path of reused or cloned layers.

Gesmundo & Dean, "An Evolutionary Approach to Dynamic Introduction of Tasks in Large-scale
Multitask Learning Systems", arXiv:2205.12755, 2022 (the µ2Net method).

The system is a set of *paths*, one per solved task; a path is a sequence of components
(layers) and a component may sit on the paths of several tasks. Tasks arrive one at a time.
For a new task the method runs a small evolutionary search:

    parent    walk the task's own paths from best score down, and accept path p with
              probability 0.5^(children p already had for this task); if none is accepted do
              the same over the other tasks' paths (the seeds); else pick one at random;
    mutate    the child copies the parent's layout. A component that is still trainable (made
              during this task's search) is cloned; a frozen component (owned by an earlier
              task) is shared by reference, or cloned into a trainable copy with probability µ.
              The head is never taken from another task: a fresh one is made. µ itself mutates
              to a neighbouring value of a grid;
    train     only the child's trainable components are trained, so frozen layers, and with
              them every earlier task, are untouched (no forgetting, no gradient interference);
    select    score = quality · base^(accounted params / reference params), where a component
              shared by n tasks counts 1/n of its parameters for each (the pretrained root is
              not a task: a layer only it and one task use counts in full). The child joins the
              population if it scores at least as well as its parent (any score if the parent
              belongs to another task);
    end task  only the best path is kept, and its components are frozen (locked by the task).

Sources: the parent sampling, the reuse-or-clone rule, head handling, the µ grid mutation,
the score with parameter accounting and the keep-best-and-lock step follow the official
notebook (google-research/google-research, ``muNet/mu2Net.ipynb``: ``PPDecay``, ``Path.clone``,
``ScorerDecay``, ``Path.accounted_num_params``, ``Population.end_task``, ``train_loop``). The
paper's equation numbers could not be consulted here; nothing is cited by number.

Defaults: ``mu_grid`` is the notebook's (0.10 to 0.30 in steps of 0.02, from its auto-tuning
configuration; a path starts at the grid's first value). ``base`` = 0.95 is one of the
notebook's "size scale" settings; its main runs use 1.0, no size penalty at all.

Left out: the ViT layer library and its pretrained weights, residual-adapter insertion and
the other hyperparameter mutations (layer count, learning rate, data augmentation), layers
taken from more distant ancestors, parallel training of a generation and checkpointing,
and the official seed order: the notebook shuffles the other tasks' paths at the start of
each task (skipping private tasks) and rotates the list past an accepted seed, while
``sample_parent`` tries the seeds in the order the tasks arrived. Also left out: the
notebook always clones the final layer norm whatever µ is, copies a cloned layer's optimizer
state with it, and unlocks a task's own layers when the task comes back for another round
(here a task is visited once; its layers stay frozen).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reference_impls.checks import require_finite, require_positive


#: The lock that freezes the pretrained root's components. It is not a task, so it does not
#: share their cost (the official notebook's ``NOT_TRAINABLE``, dropped by ``accounted_num_params``).
PRETRAINED = "<pretrained>"


@dataclass(eq=False)
class Component:
    """One layer of the system; ``locks`` are the tasks that froze it (trainable iff none)."""

    name: str
    module: nn.Module
    locks: set[str] = field(default_factory=set)

    @property
    def trainable(self) -> bool:
        return not self.locks

    def clone(self) -> Component:
        return Component(self.name, copy.deepcopy(self.module).requires_grad_(True))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


@dataclass(eq=False)
class Path:
    """A model for one task: its components applied in order (the last one is the head)."""

    task: str
    components: list[Component]
    parent: Path | None = None
    mu: float = 0.1
    quality: float | None = None
    children: dict[str, int] = field(default_factory=dict)

    def __call__(self, x: Tensor) -> Tensor:
        for component in self.components:
            x = component.module(x)
        return x

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.components if c.trainable for p in c.module.parameters()]

    def accounted_params(self) -> float:
        """Each component's parameters divided by the number of tasks that use it."""
        return sum(c.num_params() / len((c.locks - {PRETRAINED}) | {self.task}) for c in self.components)


def incremental_mutation(value: float, grid: list[float], generator: torch.Generator | None = None) -> float:
    """Move to a neighbouring grid value, up or down with equal chance (clamped at the ends)."""
    step = 1 if torch.rand((), generator=generator) < 0.5 else -1
    return grid[min(len(grid) - 1, max(0, grid.index(value) + step))]


class MuNetSystem:
    """Ask ``sample_child(task, make_head)``; train it; tell ``report(child, quality)``."""

    name = "munet"

    def __init__(
        self, root: Path, reference_params: int, base: float = 0.95,
        mu_grid: tuple[float, ...] = (0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.24, 0.26, 0.28, 0.3),
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < base <= 1:
            raise ValueError(f"base must be in (0, 1], got {base}")
        require_positive(reference_params=reference_params)
        if not mu_grid or not all(0 <= mu <= 1 for mu in mu_grid):
            raise ValueError(f"mu_grid must be a non-empty tuple of probabilities in [0, 1], got {mu_grid}")
        for component in root.components:
            component.locks.add(PRETRAINED)  # the pretrained root is frozen from the start
        self.paths: dict[str, list[Path]] = {root.task: [root]}
        self.base, self.reference_params = base, reference_params
        self.mu_grid, self.generator = list(mu_grid), generator

    def score(self, path: Path) -> float:
        """quality · base^(accounted params / reference params): quality traded against size."""
        if path.quality is None:
            return float("-inf")
        return path.quality * self.base ** (path.accounted_params() / self.reference_params)

    def _accept(self, candidates: list[Path], task: str) -> Path | None:
        for path in candidates:
            if torch.rand((), generator=self.generator) < 0.5 ** path.children.get(task, 0):
                return path
        return None

    def sample_parent(self, task: str) -> Path:
        own = sorted(self.paths.get(task, []), key=self.score, reverse=True)
        seeds = [p for t, ps in self.paths.items() if t != task for p in ps]
        parent = self._accept(own, task) or self._accept(seeds, task)
        if parent is None:  # every candidate declined: uniform choice
            pool = own + seeds
            parent = pool[int(torch.randint(len(pool), (), generator=self.generator))]
        return parent

    def _coin(self, probability: float) -> bool:
        return bool(torch.rand((), generator=self.generator) < probability)

    def mutate(self, parent: Path, task: str, make_head: Callable[[], nn.Module]) -> Path:
        """Child layout = parent's; trainable → clone, frozen → share or clone w.p. µ; own head."""
        mu = self.mu_grid[0] if parent.mu not in self.mu_grid else parent.mu
        if self._coin(mu):
            mu = incremental_mutation(mu, self.mu_grid, self.generator)
        *body, head = parent.components
        children = [c.clone() if c.trainable or self._coin(mu) else c for c in body]
        new_head = head.clone() if parent.task == task else Component(head.name, make_head())
        parent.children[task] = parent.children.get(task, 0) + 1
        return Path(task, children + [new_head], parent=parent, mu=mu)

    def sample_child(self, task: str, make_head: Callable[[], nn.Module]) -> Path:
        return self.mutate(self.sample_parent(task), task, make_head)

    def report(self, child: Path, quality: float) -> bool:
        """Keep the child iff it scores at least its parent's score (parent of the same task)."""
        require_finite(quality=quality)
        child.quality = quality
        same_task = child.parent is not None and child.parent.task == child.task
        threshold = self.score(child.parent) if same_task else float("-inf")
        accepted = self.score(child) >= threshold
        if accepted:
            self.paths.setdefault(child.task, []).append(child)
        return accepted

    def end_task(self, task: str) -> Path:
        """Keep only the task's best path and freeze its components for all later tasks."""
        best = max(reversed(self.paths[task]), key=self.score)  # ties: the most recent
        self.paths[task] = [best]
        for component in best.components:
            component.locks.add(task)
        return best
