"""AdaMV-MoE: task-routed sparse experts whose number per task grows while it helps.

Chen, Chen, Du, Rashwan, Yang, Chen, Wang, Li, "AdaMV-MoE: Adaptive Multi-Task Vision
Mixture-of-Experts", ICCV 2023, pp. 17346-17357 (no arXiv version; official code:
google-research/google-research, folder moe_mtl).

A multi-task vision MoE (here, as in the paper, a ViT whose MLP blocks are sparse mixtures of
experts) routes every task through the same pool of N expert MLPs with its own router, and
activates k_t experts per token for task t. Earlier MTL MoEs fix k for every task; AdaMV-MoE
sets each task's k_t from its training dynamics, so a hard task can get more capacity than an
easy one without a manual search.

**Task-routed MoE layer** (V-MoE routing, one router per task, as ``Router_cls`` /
``Router_det`` in the official ``MTLMlpMoeBlock``). For token x of task t,

    logits   = x W_t                               (bias-free, one W_t per task and MoE layer)
    g_t(x)   = softmax(logits + ε),  ε ~ N(0, (σ/N)²) while training, ε = 0 in eval mode
    G_t(x)   = g_t(x) on its k_t largest entries, 0 elsewhere       (not renormalised)
    MoE_t(x) = Σ_i G_t(x)_i E_i(x)

Because the kept weights are not renormalised (V-MoE's top-k dispatch), the router gets a
gradient from the task loss even at k_t = 1 (tested); attention, layer norms and experts
are shared, the routers and heads belong to their task. Each task gets V-MoE's two
auxiliary balancing losses per MoE layer, over the tokens of the batch:

    importance = CV(Σ_x g_t(x) without noise)²                     CV = std / mean over experts
    load       = CV(mean_x P(expert i stays in the top k_t if ε were drawn again))²,
                 P = 1 - Φ((k_t-th largest noisy logit - clean logit_i) / (σ/N))   (training only)

The load term needs the noise: with ``noise_std`` = 0 it is left out, as in V-MoE's router, which
is a jump in the loss's value but not in its gradient (as σ -> 0+, P tends to 0 or 1 for every
expert away from the threshold, a piecewise constant whose gradient vanishes). The losses are
returned per task by :meth:`AdaMVMoE.forward_with_aux` (summed over the MoE layers, as the
official code sums them, so the default weight gives its objective at any depth);
:meth:`AdaMVMoE.auxiliary_loss` gives ``balance_weight`` times their sum over the tasks for
the last forward pass, which the training harness adds to the objective. The default weight
1.0 is the official router's default for both losses (its experiment configurations were not
in the code we read).

**Adaptive expert selection** (the ``aes`` training mode of the official trainer, which
keeps ``current_k`` per task and the best validation loss per task in its train state).
Every few thousand steps the task losses are measured on held-out data and
:meth:`AdaMVMoE.adapt_expert_counts` updates each task's k_t:

    if L_t < best_t:                        best_t, best_step_t = L_t, step   (and the last
                                            increase, if any, is kept)
    elif step - best_step_t > patience:     k_t + 1 if the last change was not an increase;
                                            k_t - 1 and k_t frozen for good if it was

So k_t starts small (2 in the code), grows by one whenever the task's validation loss has
stalled for longer than ``patience`` steps, and the first increase that the next
validation does not reward is undone and ends the search (tested on a scripted loss
sequence). Different tasks end with different k_t (tested).

Choices where the official code is particular: the code keeps one "last change was an
increase" flag and one "stop" switch for both of its tasks (one task's revert freezes the
other's count as well); here both are kept per task, which is what a per-task capacity
needs. The code also refuses any change, revert included, once k reaches 8; here only
increases stop at ``max_k`` (default N), and an increase to ``max_k`` can still be undone.
The code checks every 2000 steps with a patience of 5000 steps; the caller chooses when to
call :meth:`~AdaMVMoE.adapt_expert_counts`, and ``patience`` is in the caller's step units.
Where the MoE layers sit is a configuration of the code; here every other block (the odd
ones, as in V-MoE) has one. The paper's own text was not available to us, so no equation
numbers are cited: the mechanism above is read from the official code and the abstract.

Left out: the UViT / ViT backbones and their ImageNet pretraining, the Mask R-CNN detection
and segmentation heads, the separate ImageNet and COCO batches per task (here every task
reads the same input), the loss weighting by the ratio of the tasks' learning rates, the
EMA of the weights, mixup / cutmix, the TAPS variant of the expert layers, and V-MoE's
dispatch details: tokens are routed in fixed-size groups (one group here: the whole batch)
and each expert has a capacity, beyond which tokens are dropped (none is dropped here). The k_t are
kept in the model's state_dict, so a checkpoint restores each task's capacity. The official
model also gives each task its own patch and position embedding (one tokenizer here) and ends
with a shared LayerNorm; its adaptive selection starts with best step 40000 and best losses of
100.0, so k cannot change before step 45000 (google-research moe_mtl).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import require_at_least, require_non_negative, require_positive
from .base import MultiTaskModel
from . import m3vit
from .diffusionmtl import gaussian_noise
from .houlsby_adapters import Tokenizer, feed_forward, token_heads
from .registry import Problem


def squared_cv(values: Tensor) -> Tensor:
    """(std / mean)² over the last dimension (population std, as in V-MoE's auxiliary losses)."""
    return (values.std(dim=-1, unbiased=False) / values.mean(dim=-1)).square()


class NoisyTopKTaskMoE(nn.Module):
    """N shared expert MLPs; one bias-free router per task keeps its k_t best experts per token."""

    def __init__(self, width: int, tasks: Sequence[str], num_experts: int, noise_std: float = 1.0):
        super().__init__()
        self.num_experts, self.noise_std = num_experts, noise_std
        self.experts = nn.ModuleList(feed_forward(width) for _ in range(num_experts))
        self.routers = nn.ModuleDict({t: nn.Linear(width, num_experts, bias=False) for t in tasks})

    def route(self, x: Tensor, task: str, k: int,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(G_t(x), auxiliary loss)`` for tokens ``x`` of shape ``(M, width)``; G_t is ``(M, N)``."""
        logits = self.routers[task](x)
        sigma = self.noise_std / self.num_experts
        noisy = self.training and sigma > 0
        noisy_logits = logits + sigma * gaussian_noise(logits, generator) if noisy else logits
        gates = torch.softmax(noisy_logits, dim=-1)
        top, index = gates.topk(k, dim=-1)
        combine = torch.zeros_like(gates).scatter(-1, index, top)  # kept as they are: no renormalising
        aux = squared_cv(torch.softmax(logits, dim=-1).sum(0))  # importance loss
        if noisy:  # load loss: chance of staying in the top k if the noise were drawn again
            threshold = noisy_logits.topk(k, dim=-1).values[:, -1:]
            p = 0.5 * torch.erfc((threshold - logits) / (sigma * math.sqrt(2)))  # 1 - Φ(z)
            aux = aux + squared_cv(p.mean(0))
        return combine, aux

    def forward(self, x: Tensor, task: str, k: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        tokens = x.reshape(-1, x.shape[-1])
        combine, aux = self.route(tokens, task, k, generator)
        experts = torch.stack([expert(tokens) for expert in self.experts], dim=1)  # (M, N, width)
        # An expert outside a token's top k has weight exactly 0 there, so it gets no gradient from it.
        return torch.einsum("mn,mnw->mw", combine, experts).view_as(x), aux


class Block(m3vit.Block):
    """M3ViT's block (shared attention; a dense MLP or a task-routed MoE) with this file's
    noisy top-k MoE, which takes the task's k and returns its balancing loss too."""

    def forward(self, h: Tensor, task: str, k: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        a = self.norm1(h)
        h = h + self.attention(a, a, a, need_weights=False)[0]
        if self.moe is None:
            return h + self.mlp(self.norm2(h)), None
        out, aux = self.moe(self.norm2(h), task, k, generator)
        return h + out, aux


class ExpertCountSchedule(nn.Module):
    """Each task's k_t and the bookkeeping of adaptive expert selection, saved as extra state."""

    def __init__(self, tasks: Sequence[str], initial_k: int, max_k: int, patience: int):
        super().__init__()
        self.tasks, self.max_k, self.patience = tuple(tasks), max_k, patience
        self.k = {t: initial_k for t in self.tasks}
        self.best_loss = {t: math.inf for t in self.tasks}
        self.best_step = {t: 0 for t in self.tasks}
        self.just_increased = {t: False for t in self.tasks}
        self.frozen = {t: False for t in self.tasks}

    def update(self, step: int, validation_losses: Mapping[str, float]) -> dict[str, int]:
        for t in self.tasks:
            loss = float(validation_losses[t])
            if loss < self.best_loss[t]:
                self.best_loss[t], self.best_step[t], self.just_increased[t] = loss, step, False
            elif step - self.best_step[t] > self.patience and not self.frozen[t]:
                if self.just_increased[t]:  # the extra expert did not pay off: undo it, stop searching
                    self.k[t] -= 1
                    self.frozen[t] = True
                elif self.k[t] < self.max_k:  # stalled: one more expert for this task
                    self.k[t] += 1
                    self.just_increased[t] = True
        return dict(self.k)

    def get_extra_state(self) -> dict[str, Any]:
        return {"k": dict(self.k), "best_loss": dict(self.best_loss), "best_step": dict(self.best_step),
                "just_increased": dict(self.just_increased), "frozen": dict(self.frozen)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for key, values in state.items():
            setattr(self, key, dict(values))


class AdaMVMoE(MultiTaskModel):
    """Tokenizer, blocks alternating dense MLP / task-routed MoE, one token head per task;
    each task activates its own, adaptively chosen, number of experts."""

    name = "adamv_moe"
    per_pass_attributes = ("_last_aux",)
    training_procedure = ("each task's number of active experts is adapted during training by "
                          "adapt_expert_counts() from periodic validation losses")

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        heads: Mapping[str, nn.Module],
        width: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        num_experts: int = 4,
        initial_k: int = 2,
        max_k: int | None = None,
        patience: int = 5000,
        noise_std: float = 1.0,
        balance_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__(tasks)
        require_positive(depth=depth, num_heads=num_heads, num_experts=num_experts, initial_k=initial_k)
        max_k = num_experts if max_k is None else max_k
        require_positive(max_k=max_k)
        require_non_negative(patience=patience)
        require_at_least(0, noise_std=noise_std, balance_weight=balance_weight)
        if not initial_k <= max_k <= num_experts:
            raise ValueError(f"need initial_k <= max_k <= num_experts, got initial_k={initial_k}, "
                             f"max_k={max_k}, num_experts={num_experts}")
        self.generator, self.balance_weight = generator, balance_weight
        self._last_aux: dict[str, Tensor] | None = None  # per task, set by forward
        self.tokenizer = tokenizer
        self.blocks = nn.ModuleList(
            Block(width, num_heads, NoisyTopKTaskMoE(width, self.tasks, num_experts, noise_std) if i % 2 else None)
            for i in range(depth)
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.schedule = ExpertCountSchedule(self.tasks, initial_k, max_k, patience)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_tokens: int = 10,
                     **kw: object) -> AdaMVMoE:
        tokenizer = Tokenizer(problem.input_shape, width, num_tokens)
        return cls(problem.tasks, tokenizer, token_heads(problem, width, tokenizer), width, depth, **kw)

    @property
    def experts_per_task(self) -> dict[str, int]:
        """k_t: how many experts each task activates per token now."""
        return dict(self.schedule.k)

    def adapt_expert_counts(self, step: int, validation_losses: Mapping[str, float]) -> dict[str, int]:
        """Adaptive expert selection after a validation at ``step``; returns the new k_t."""
        return self.schedule.update(step, validation_losses)

    def task_forward(self, x: Tensor, task: str) -> tuple[Tensor, Tensor]:
        """``task``'s output and its balancing loss summed over the MoE layers."""
        h, aux = self.tokenizer(x), []
        for block in self.blocks:
            h, block_aux = block(h, task, self.schedule.k[task], self.generator)
            if block_aux is not None:
                aux.append(block_aux)
        aux_loss = torch.stack(aux).sum() if aux else h.new_zeros(())
        return self.heads[task](h), aux_loss

    def forward_with_aux(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``({task: output}, {task: importance + load loss})``."""
        paths = {t: self.task_forward(x, t) for t in self.tasks}
        self._last_aux = {t: p[1] for t, p in paths.items()}
        return {t: p[0] for t, p in paths.items()}, dict(self._last_aux)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_with_aux(x)[0]

    def auxiliary_loss(self) -> Tensor:
        """``balance_weight`` x the tasks' balancing losses (importance + load) of the last forward pass."""
        if self._last_aux is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass first")
        return self.balance_weight * torch.stack(list(self._last_aux.values())).sum()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            if block.moe is not None:
                yield from block.moe.routers[task].parameters()
        yield from self.heads[task].parameters()
