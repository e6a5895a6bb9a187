"""AdaMerging: merging coefficients learned by minimising prediction entropy.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024, arXiv:2310.02575.

Task arithmetic merges with one hand-tuned scale for every task and every layer. AdaMerging
gives each task vector its own coefficient and learns the coefficients without labels:
on unlabelled test inputs, the merged model's predictions should be confident, so the
coefficients are chosen to minimise the Shannon entropy of those predictions (the paper
shows entropy and prediction loss are strongly correlated). The paper's two forms, in
its notation (τ_k the task vector of task k, l a layer):

    task-wise:   θ_m   = θ_pre   + Σ_k λ_k τ_k
    layer-wise:  θ_m^l = θ_pre^l + Σ_k λ_k^l τ_k^l
    objective:   min_λ  Σ_k mean_{x ∈ B_k} H(f(x; θ_m)),   H(p) = −Σ_c p_c log p_c

where B_k are unlabelled inputs of task k (the authors' code averages over each batch). As in the authors' code, a "layer" is one
parameter tensor (weight and bias of a linear layer are two layers), the coefficients
start at 0.3 (the task-arithmetic prior) and are clipped to [0, 1] when used, and Adam
updates them. Only the coefficients are learned; ``θ_pre`` and the task vectors are
fixed buffers. The merged model is evaluated at ``θ_m`` with
``torch.func.functional_call``, so gradients reach λ through the weights themselves;
parameters of the model that are not merged (per-task heads in the paper) are used as
they are.

One ``model`` runs every task's batch here; the paper runs task k's batch through the merged
encoder and then task k's own classification head. With a model that maps a batch to
``{task: logits}``, as the architectures of ``reference_impls`` do, pass the batches as
``{task: inputs}``: each task's entropy is read from its own output, over the class
dimension 1, per example and per pixel. With separate single-task models, call
:meth:`AdaMerging.objective` once per task with that task's model and sum the results.

``pretrained`` may be a whole state dict: as in :func:`base.task_vector`, only its
floating-point entries are merged (a batch-norm step counter or a module's extra state
is left to the model), running statistics with the current λ but without gradient.

AdaMerging++ is the same learning on task vectors that TIES-Merging has trimmed and whose
entries disagreeing with the elected sign it has zeroed: pass
``ties.sign_resolved_rows(tau, density)`` (unstacked) as the task vectors.

Left out: the CLIP/ViT encoders and the eight vision tasks of the paper, and its 500-step
schedule (``fit`` takes the number of steps). The authors draw fresh shuffled test batches
every step, two per task (EnnengYang/AdaMerging at cea1165); ``fit`` reuses the batches given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from reference_impls.checks import require_above, require_non_negative
from reference_impls.merging.base import is_weight


def entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy −Σ_c p_c log p_c of softmax(logits) along ``dim`` (the classes)."""
    log_p = torch.log_softmax(logits, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


class AdaMerging(nn.Module):
    """Learnable task-wise (``K``) or layer-wise (``L x K``) merging coefficients."""

    name = "adamerging"

    def __init__(
        self,
        pretrained: Mapping[str, Tensor],
        task_vectors: Sequence[Mapping[str, Tensor]],
        layer_wise: bool = True,
        init: float = 0.3,
        bounds: tuple[float, float] | None = (0.0, 1.0),
    ):
        super().__init__()
        if not task_vectors:
            raise ValueError("need at least one task vector")
        if not math.isfinite(init):
            raise ValueError(f"init must be finite, got {init}")
        if bounds is not None and not bounds[0] <= bounds[1]:
            raise ValueError(f"bounds must be (low, high) with low <= high, got {bounds}")
        self.keys = sorted(k for k, v in pretrained.items() if is_weight(v))
        for k, tv in enumerate(task_vectors):
            missing, extra = sorted(set(self.keys) - set(tv)), sorted(set(tv) - set(self.keys))
            if missing or extra:
                raise ValueError(f"task vector {k} must have exactly the floating-point keys of the pre-trained "
                                 f"weights: missing {missing[:5]}, not weights there {extra[:5]}")
        for i, key in enumerate(self.keys):  # buffers: follow .to(device), never trained
            self.register_buffer(f"theta_{i}", pretrained[key].detach().clone())
            self.register_buffer(f"tau_{i}", torch.stack([tv[key].detach() for tv in task_vectors]))
        rows = len(self.keys) if layer_wise else 1
        self.raw = nn.Parameter(torch.full((rows, len(task_vectors)), float(init)))
        self.bounds = bounds

    def coefficients(self) -> Tensor:
        """λ as an ``L x K`` matrix (task-wise: one row repeated), clipped to ``bounds``."""
        lam = self.raw if self.bounds is None else self.raw.clamp(*self.bounds)
        return lam.expand(len(self.keys), -1)

    def merged_parameters(self) -> dict[str, Tensor]:
        """θ_m^l = θ_pre^l + Σ_k λ_k^l τ_k^l, differentiable in λ."""
        lam = self.coefficients()
        merged = {}
        for i, key in enumerate(self.keys):
            tau = getattr(self, f"tau_{i}")
            weighted = torch.tensordot(lam[i].to(tau.dtype), tau, dims=1)  # Σ_k λ_k τ_k
            merged[key] = getattr(self, f"theta_{i}") + weighted
        return merged

    def predict(self, model: nn.Module, x: Tensor, task: str | None = None) -> Tensor:
        """``model(x)`` evaluated at the merged parameters; ``task``'s output for a multi-task model.

        Merged buffers (batch norm's running statistics) follow λ without passing gradients:
        batch norm does not differentiate its running statistics. They are copies, so a
        forward pass in training mode updates them and not the merge.
        """
        buffers = {name for name, _ in model.named_buffers()}
        merged = {k: v.detach().clone() if k in buffers else v for k, v in self.merged_parameters().items()}
        out = functional_call(model, merged, (x,))
        if not isinstance(out, Mapping):
            return out
        if task is None or task not in out:
            raise ValueError(f"the model returns outputs for tasks {sorted(out)}: name one of them, "
                             f"e.g. by passing the batches as {{task: inputs}} (got task {task!r})")
        return out[task]

    def objective(self, model: nn.Module, batches: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        """Σ over the tasks' unlabelled batches of the mean prediction entropy.

        ``batches`` is a sequence of batches for a model with one output, or ``{task: inputs}``
        for a model that returns ``{task: logits}`` with the classes on dimension 1.
        """
        if isinstance(batches, Mapping):
            return sum(entropy(self.predict(model, x, task), dim=1).mean() for task, x in batches.items())
        return sum(entropy(self.predict(model, x)).mean() for x in batches)

    def fit(self, model: nn.Module, batches: Sequence[Tensor] | Mapping[str, Tensor], steps: int,
            lr: float = 1e-3) -> list[float]:
        """Adam on λ for ``steps`` steps; returns the objective before each step."""
        require_non_negative(steps=steps)
        require_above(0, lr=lr)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(steps):
            loss = self.objective(model, batches)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        return history
