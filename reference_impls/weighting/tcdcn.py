"""Task-wise early stopping of auxiliary tasks (TCDCN).

Zhang, Luo, Loy & Tang, "Facial Landmark Detection by Deep Multi-task Learning", ECCV 2014
(doi:10.1007/978-3-319-10599-4_7, pp. 94-108; the authors' extended report is arXiv:1408.3967,
which replaces early stopping by dynamic task coefficients and is *not* what is implemented here).

The Tasks-Constrained Deep Convolutional Network trains one main task (facial landmark
regression, r) together with auxiliary tasks a ∈ A (head pose, gender, glasses, smile) on one
shared network, minimising

    L = L_r + Σ_{a ∈ A} λ_a L_a,

where λ_a is the fixed importance of auxiliary task a. Auxiliary tasks converge at different
rates and start to over-fit at different times; once one has stopped helping, it is switched
off for the rest of training (its λ_a becomes 0) while the main task goes on. The paper's
rule: with E_tr^a(j) and E_val^a(j) the training and validation errors of task a at
evaluation j and t the current evaluation, task a is stopped when

    k · med_{j=t-k..t} E_tr^a(j)                          E_val^a(t) − min_{j≤t} E_tr^a(j)
    ─────────────────────────────────────────────────  ·  ─────────────────────────────────  >  ε.
    Σ_{j=t-k..t} E_tr^a(j) − k · med_{j=t-k..t} E_tr^a(j)        λ_a · min_{j≤t} E_tr^a(j)

The first factor is the *training trend* over a strip of the last k + 1 evaluations: small
while the training error still falls fast (values above the median pull the sum up), large
once it has flattened (a flat strip gives exactly k). The second is the *generalisation gap*:
the validation error relative to the best training error so far, divided by the task's
importance, so an important task is harder to stop. The main task is never stopped.

Sources and choices. The paper's numbered text could not be consulted here, so no equation
number is cited; the rule above is written as we recall the ECCV paper, and its structure
(median-over-sum trend times relative gap, per auxiliary task, against a threshold) matches
a third-party re-implementation (lidc54/tcdcn, MXNet, ``tools/unity.py: crita``) and the
secondary summaries we could read. The first author's release (zhzhanp/TCDCN-face-alignment)
is a test-time Matlab tool in protected p-code with a trained model and no training code,
so it cannot settle the rule. Points where we chose:

- the minimum in the second factor is over the *training* errors, as the paper describes the
  factor as the generalisation error compared to the training error; the re-implementation
  above takes the minimum of the validation errors instead (Prechelt's generalisation loss),
  available here as ``reference="validation"``;
- the strip holds the k + 1 values j = t−k … t, as the index range reads; nothing is stopped
  before k + 1 evaluations have been reported; the median of an even number of values is the
  mean of the two middle ones;
- a trend denominator that is not positive (a sudden drop below the strip's median) and a
  best error of 0 are limits the paper does not discuss: the first is read as a training
  error still falling (no stop), the second as an infinite gap unless the validation error
  is 0 too (then no gap);
- ε and k have no published defaults that we could check; k = 5 and ε = 1 are ours.

Interface: ``weights`` / ``combine`` every step (main task 1, active auxiliary tasks λ_a,
stopped ones 0), and ``observe_errors(train_errors, val_errors)`` after each evaluation
(an epoch, say) with the K tasks' training and validation errors. The training loop in
``reference_impls.train`` has no validation pass per epoch and refuses this method rather
than train it as fixed weighting.

Left out: the TCDCN network (four conv layers on 40×40 faces, shared fc layer), the facial
data sets and the training schedule; this module is the weighting and stopping rule only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from reference_impls.checks import require_above, require_at_least, require_positive
from reference_impls.weighting.base import LossWeighting


class TaskWiseEarlyStopping(LossWeighting):
    """Main task weight 1, auxiliary weights λ_a until the stopping criterion switches them off."""

    name = "tcdcn"
    training_hook = "observe_errors"  # training and validation errors after every evaluation

    def __init__(self, main_task: int = 0, importance: float | Sequence[float] = 1.0, strip: int = 5,
                 threshold: float = 1.0, reference: str = "training") -> None:
        super().__init__()
        require_at_least(0, main_task=main_task)
        require_positive(strip=strip)
        importances = [importance] if isinstance(importance, (int, float)) else list(importance)
        require_above(0, **{f"importance[{i}]" if len(importances) > 1 else "importance": value
                            for i, value in enumerate(importances)})
        require_above(0, threshold=threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        if reference not in ("training", "validation"):
            raise ValueError(f"reference must be 'training' or 'validation', got {reference!r}")
        self.main_task, self.strip, self.threshold, self.reference = main_task, strip, threshold, reference
        self.importances = importances  # one value for every auxiliary task, or one per task (K)
        # Sized on first use (K is only known then); empty buffers reload from checkpoints.
        self.register_buffer("stopped", torch.empty(0, dtype=torch.bool))
        self.register_buffer("recent_train", torch.empty(0))  # (k + 1) x K, oldest row first
        self.register_buffer("best_train", torch.empty(0))  # min_{j≤t} E_tr(j)
        self.register_buffer("best_val", torch.empty(0))  # min_{j≤t} E_val(j)
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))

    def _importance(self, num_tasks: int) -> list[float]:
        if len(self.importances) == 1:
            return self.importances * num_tasks
        if len(self.importances) != num_tasks:
            raise ValueError(f"importance has {len(self.importances)} entries for {num_tasks} tasks")
        return self.importances

    def _check_tasks(self, num_tasks: int) -> None:
        if not self.main_task < num_tasks:
            raise ValueError(f"main_task {self.main_task} is not one of the {num_tasks} tasks")
        if self.stopped.numel() == 0:
            self.stopped = torch.zeros(num_tasks, dtype=torch.bool, device=self.stopped.device)

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        num_tasks = losses.numel()
        self._check_tasks(num_tasks)
        lam = torch.tensor(self._importance(num_tasks), dtype=losses.dtype, device=losses.device)
        is_main = torch.arange(num_tasks, device=losses.device) == self.main_task
        active = lam.masked_fill(self.stopped.to(losses.device), 0.0)  # a stopped task: λ_a = 0
        return torch.where(is_main, torch.ones_like(lam), active)  # L = L_r + Σ_a λ_a L_a

    def observe_errors(self, train_errors: Tensor, val_errors: Tensor) -> Tensor:
        """Record evaluation t's errors, stop the auxiliary tasks past the threshold, and return
        the K criterion values (NaN until a full strip of k + 1 evaluations has been seen)."""
        train, val = train_errors.detach().flatten(), val_errors.detach().flatten()
        if train.shape != val.shape:
            raise ValueError(f"train_errors {tuple(train.shape)} and val_errors {tuple(val.shape)} differ")
        num_tasks = train.numel()
        self._check_tasks(num_tasks)
        if self.recent_train.numel() == 0:  # first evaluation: size the history
            self.recent_train = torch.zeros(self.strip + 1, num_tasks, dtype=train.dtype, device=train.device)
            self.best_train = torch.full_like(train, math.inf)
            self.best_val = torch.full_like(train, math.inf)
        self.recent_train = torch.cat([self.recent_train[1:], train[None].to(self.recent_train)])
        self.best_train = torch.minimum(self.best_train, train.to(self.best_train))
        self.best_val = torch.minimum(self.best_val, val.to(self.best_val))
        self.observed += 1
        if self.observed < self.strip + 1:
            return torch.full_like(train, math.nan)
        criterion = self.criterion(val.to(self.best_train))
        auxiliary = torch.arange(num_tasks, device=criterion.device) != self.main_task
        self.stopped = self.stopped | (auxiliary & (criterion > self.threshold)).to(self.stopped.device)
        return criterion.to(train)

    def criterion(self, val: Tensor) -> Tensor:
        """The stopping measure of every task from the stored strip and the current E_val(t)."""
        k, strip = self.strip, self.recent_train
        k_median = k * torch.quantile(strip, 0.5, dim=0)  # k · med_{j=t-k..t} E_tr(j)
        spread = strip.sum(0) - k_median  # Σ_{j=t-k..t} E_tr(j) − k · med
        falling = spread <= 0  # a sudden drop below the median: still falling, never a stop
        trend = torch.where(falling, torch.zeros_like(spread), k_median / spread.where(~falling, 1.0))
        best = self.best_train if self.reference == "training" else self.best_val  # min_{j≤t} E(j)
        lam = torch.tensor(self._importance(val.numel()), dtype=val.dtype, device=val.device)
        excess = val - best
        limit = torch.where(excess > 0, torch.full_like(excess, math.inf), torch.zeros_like(excess))
        gap = torch.where(best > 0, excess / (lam * best.where(best > 0, 1.0)), limit)  # best 0: the limit
        return torch.where(trend > 0, trend * gap, torch.zeros_like(gap))  # trend 0: never a stop (no 0·inf)
