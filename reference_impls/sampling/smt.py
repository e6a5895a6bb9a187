"""Scheduled Multi-Task training (SMT): train the hardest unsolved tasks first, within budgets.

Cho, Park, Lee, Sung, "Hard Tasks First: Multi-Task Reinforcement Learning Through Task
Scheduling", ICML 2024 (PMLR 235).

Training all tasks uniformly lets easy tasks dominate a shared policy. SMT keeps a small
*training pool* of K tasks and moves tasks between four pools by their recent return G_t
against per-task thresholds (a target M_t for "solved", a floor m_t for "unsolvable"):

    stage 1 (until B_1 steps are spent), after each task's turn in the pool:
      G_t ≥ M_t                              → solved pool (never trained again);
      spent_t ≥ budget_t and G_t ≤ m_t       → unsolvable pool (set aside);
      spent_t ≥ budget_t otherwise           → back to the main pool;
    refill the training pool up to K with the main-pool task of *lowest* return
    (hard tasks first; untried tasks count as −∞), giving it budget κ · (B_total − spent);
    stage 2 (the last B_2 steps, or earlier once stage 1 has no task left to train, as
      rl-blox does): cycle over the unsolvable tasks (the main pool if none).

A task far from its target keeps its place until it either reaches the target or uses up
its budget, so the budget flows to hard tasks; the shrinking κ · (remaining budget) keeps
late admissions from monopolising training.

Sources: the pool rules, κ, B_1 and B_2 follow the paper's description as reimplemented in
rl-blox (mlaux1/rl-blox, ``rl_blox/algorithm/smt.py``); the PDF itself was not consulted,
so equations and the algorithm box are not cited by number.

Left out: the reset mechanism (the paper periodically re-initialises key network
parameters to counter simplicity bias: a model-side operation the caller performs when
``stage`` changes or pools move), the RL learner (SAC) and task encoder, and evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from reference_impls.checks import require_finite, require_non_negative


class SMTScheduler:
    """Pool bookkeeping for SMT. Ask ``training_pool()``; tell ``report(task, steps, ret)``."""

    name = "smt"

    def __init__(
        self,
        num_tasks: int,
        solved: Tensor | float,
        unsolvable: Tensor | float,
        b1: int,
        b2: int,
        pool_size: int = 3,
        kappa: float = 0.8,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0 < pool_size <= num_tasks:
            raise ValueError(f"need 0 < pool_size <= num_tasks, got pool_size={pool_size}, num_tasks={num_tasks}")
        require_non_negative(b1=b1, b2=b2)  # b1 = 0 skips stage 1
        if not 0 < kappa <= 1:
            raise ValueError(f"kappa must be in (0, 1], got {kappa}")
        self.solved_at = torch.as_tensor(solved, dtype=torch.float64).expand(num_tasks)
        self.unsolvable_at = torch.as_tensor(unsolvable, dtype=torch.float64).expand(num_tasks)
        self.b1, self.b_total, self.k, self.kappa = b1, b1 + b2, pool_size, kappa
        self.spent_total = 0
        self.spent = [0] * num_tasks
        self.returns = [-math.inf] * num_tasks  # untried tasks are the hardest
        self.budget = [kappa * self.b_total] * num_tasks
        first = torch.randperm(num_tasks, generator=generator)[:pool_size].tolist()
        self.pool = list(first)
        self.main = [t for t in range(num_tasks) if t not in first]
        self.solved_pool: list[int] = []
        self.unsolvable_pool: list[int] = []
        self._stage2_order: list[int] | None = None

    @property
    def stage(self) -> int:
        """2 once B_1 is spent, or earlier when every task is solved or set aside: stage 1 has
        nothing left to train, and the unsolvable tasks get the rest of the budget."""
        return 1 if self.spent_total < self.b1 and (self.pool or self.main) else 2

    def training_pool(self) -> list[int]:
        """Tasks to train in this round, in order."""
        if self.stage == 1:
            return list(self.pool)
        if self._stage2_order is None:
            self._stage2_order = sorted(self.unsolvable_pool or self.main)
        return list(self._stage2_order)

    def report(self, task: int, steps: int, ret: float) -> None:
        """The outcome of one turn on ``task``: environment steps used and the recent return."""
        if not 0 <= task < len(self.spent):
            raise ValueError(f"task must be an index from 0 to {len(self.spent) - 1}, got {task}")
        require_non_negative(steps=steps)
        require_finite(ret=ret)
        in_stage1 = self.stage == 1
        self.spent_total += steps
        self.spent[task] += steps
        self.returns[task] = ret
        if in_stage1:
            self._classify(task)

    def _classify(self, task: int) -> None:
        if task not in self.pool:
            return
        if self.returns[task] >= self.solved_at[task]:
            self._move(task, self.solved_pool)
        elif self.spent[task] >= self.budget[task]:
            hopeless = self.returns[task] <= self.unsolvable_at[task]
            self._move(task, self.unsolvable_pool if hopeless else self.main)

    def _move(self, task: int, to: list[int]) -> None:
        self.pool.remove(task)
        to.append(task)

    def end_round(self) -> None:
        """Refill the training pool with the lowest-return main-pool tasks (hard tasks first)."""
        while len(self.pool) < self.k and self.main:
            hardest = min(self.main, key=lambda t: (self.returns[t], t))
            self.main.remove(hardest)
            self.pool.append(hardest)
            self.budget[hardest] = self.kappa * (self.b_total - self.spent_total)

    def finished(self) -> bool:
        return self.spent_total >= self.b_total or not self.training_pool()
