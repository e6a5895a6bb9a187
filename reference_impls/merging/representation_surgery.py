"""Representation Surgery: per-task modules that remove the merged model's representation bias.

Yang, Shen, Wang, Guo, Chen, Wang, Tao, "Representation Surgery for Multi-Task Model
Merging", ICML 2024, arXiv:2402.02705.

A merged encoder (task arithmetic, TIES, AdaMerging, ...) produces features that drift away
from those each individual fine-tuned encoder would produce for the same input: the
"representation bias". Surgery leaves the merged weights alone and learns, for each task,
a small module that estimates that bias from the merged feature and subtracts it:

    z_t = f(x; θ_merged)                 (frozen)
    ẑ_t = z_t − Up_t(ReLU(Down_t(z_t)))   (Down: d → r, Up: r → d, no biases)
    min over Down_t, Up_t of  | ẑ_t − f(x; θ_t) |_1   on unlabelled inputs x of task t

The target f(x; θ_t) is the individual model's feature, so no labels are needed. As in the
authors' code, Down_t starts from PyTorch's default (Kaiming-uniform) initialisation and
Up_t at zero, so training starts from the merged model unchanged; the L1 loss is the mean
absolute difference and Adam updates only the surgery modules (the task's classification
head then reads ẑ_t).

Left out: the CLIP/ViT encoders, the eight vision tasks and their heads; the paper's
rank r = 16 and lr 1e-3 are defaults here / arguments of ``fit``; its 500 iterations take two
batches, so two Adam steps, per task each (``fit`` takes 500 steps by default). The
paper's equation numbers were not checked (the rule above follows the authors' code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from reference_impls.checks import require_above, require_non_negative, require_positive

Encoder = Callable[[Tensor], Tensor]


class RepresentationSurgery(nn.Module):
    """One Down/Up bottleneck per task; ``forward(z, t)`` returns the corrected feature."""

    name = "representation_surgery"

    def __init__(self, num_tasks: int, feature_dim: int, rank: int = 16) -> None:
        super().__init__()
        require_positive(num_tasks=num_tasks, feature_dim=feature_dim, rank=rank)
        self.down = nn.ModuleList([nn.Linear(feature_dim, rank, bias=False) for _ in range(num_tasks)])
        self.up = nn.ModuleList([nn.Linear(rank, feature_dim, bias=False) for _ in range(num_tasks)])
        for up in self.up:
            nn.init.zeros_(up.weight)  # start as the identity map: ẑ = z

    def bias(self, z: Tensor, task: int) -> Tensor:
        """The estimated representation bias Up_t(ReLU(Down_t(z)))."""
        return self.up[task](torch.relu(self.down[task](z)))

    def forward(self, z: Tensor, task: int) -> Tensor:
        return z - self.bias(z, task)

    def objective(self, merged: Encoder, individual: Encoder, x: Tensor, task: int) -> Tensor:
        """Mean |ẑ_t − z_t^individual| on unlabelled ``x``; both encoders stay frozen."""
        with torch.no_grad():
            z_merged, z_target = merged(x), individual(x)
        return (self(z_merged, task) - z_target).abs().mean()

    def fit(self, merged: Encoder, individuals: list[Encoder], inputs: list[Tensor],
            steps: int = 500, lr: float = 1e-3) -> list[float]:
        """Adam on the surgery modules only; one step per task per iteration; returns losses."""
        return fit_per_task(self, merged, individuals, inputs, steps, lr)


def fit_per_task(surgery: nn.Module, merged, individuals, inputs, steps: int, lr: float) -> list[float]:
    """Adam on ``surgery``'s parameters, one step on ``surgery.objective`` per task per iteration.

    Returns the loss summed over tasks at each iteration. Shared by both Surgery papers.
    """
    require_non_negative(steps=steps)
    require_above(0, lr=lr)
    if len(individuals) != len(inputs):
        raise ValueError(f"need one batch of inputs per task: {len(individuals)} individual models, "
                         f"{len(inputs)} batches")
    optimizer = torch.optim.Adam(surgery.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        total = 0.0
        for task, (individual, x) in enumerate(zip(individuals, inputs, strict=True)):
            loss = surgery.objective(merged, individual, x, task)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append(total)
    return history
