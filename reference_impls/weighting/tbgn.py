"""Task-Balanced Gradient Normalization (Uni-Perceiver v2): unit-norm task gradients, unbiased over task sampling.

Li, Zhu, Jiang, Zhu, Li, Yuan, Wang, Qiao, Wang, Wang, Dai. "Uni-Perceiver v2: A Generalist
Model for Large-Scale Vision and Vision-Language Tasks", CVPR 2023 (arXiv:2211.09808),
Sec. 4.4.

Uni-Perceiver v2 trains with *unmixed* sampling: each iteration draws one task k (with
sampling ratio s_k, Σ s_k = 1) for the whole batch, so that tasks needing large batches get
them. Gradients of different tasks then differ wildly from step to step. The remedy is to
(i) normalise the sampled task's gradient and scale it by a balance coefficient ω_k, and
(ii) let it enter AdamW's moment estimates with weight 1/s_k, which undoes the sampling
ratio. In the paper's notation (its AdamW display in Sec. 4.4, unnumbered; bias correction
and weight decay omitted there; checked in a Markdown transcript of arXiv:2211.09808 found in
the public GitHub index, where β1 and β2 weigh the *new* gradient, the complement of PyTorch's
convention, hence the defaults 0.1 and 0.001):

    g_t = ω_k ∇L_{t,k} / ||∇L_{t,k}||
    m_t = (1 − β1) m_{t−1} + (β1 / s_k) g_t
    n_t = (1 − β2) n_{t−1} + (β2 / s_k) g_t²
    θ_t = θ_{t−1} − α m_t / (√n_t + ε)

With all ω_k = 1 every task contributes equally, however large its loss and however often it
is drawn: E_k[(1/s_k) g_t] = Σ_k ω_k ∇L_k / ||∇L_k|| (tested).

:class:`TaskBalancedGradientNormalization` is the gradient method for this package's
contract. Given all K gradients (mixed batches, as our training loop has) it returns that
expectation, Σ_k ω_k g_k / ||g_k||. With ``unmixed=True`` it draws one task k ~ s and returns
(ω_k / s_k) g_k / ||g_k||, the per-step estimate. :class:`TaskBalancedAdamW` is the optimiser
of the display, for an unmixed training loop that calls ``step(task)``: there the 1/s_k enters
the first and second moments (not the gradient twice).

Defaults: ``betas = (0.1, 0.001)`` are in the display's convention (the weight of the *new*
gradient), i.e. AdamW's customary (0.9, 0.999) (``torch.optim.AdamW``'s defaults) written as
1 − β. The value is ours: the paper's own training hyper-parameters were not at hand to check
(pinned by a test).

Left out: the rest of Uni-Perceiver v2 (region-proposal image encoder, RoBERTa text encoder,
shared decoder with conditional MoEs, and the matching of inputs against candidate targets,
Eqs. (5)-(7)), the distributed "one task for all GPUs" machinery, and AdamW's bias
correction (omitted in the paper's display too). The equation numbers cited are those of the
same transcript (index id 60825296633).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from reference_impls.weighting.base import Aggregation, GradientMethod, check_gradient_matrix


def unit_rows(grads: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to unit norm (zero rows stay zero) and the factors 1/||g_k|| used."""
    norms = grads.norm(dim=1)
    inverse = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(grads.dtype).tiny), torch.zeros_like(norms))
    inverse = torch.nan_to_num(inverse, posinf=0.0)  # subnormal norms: treat as zero
    return grads * inverse[:, None], inverse


class TaskBalancedGradientNormalization(GradientMethod):
    """Σ_k ω_k g_k / ||g_k|| (mixed), or one sampled task's (ω_k / s_k) g_k / ||g_k|| (unmixed)."""

    name = "tbgn"

    def __init__(self, balance: Sequence[float] | None = None, sampling_ratios: Sequence[float] | None = None,
                 unmixed: bool = False, generator: torch.Generator | None = None) -> None:
        self.balance = None if balance is None else torch.tensor(balance, dtype=torch.float64)  # ω_k
        self.ratios = None if sampling_ratios is None else torch.tensor(sampling_ratios, dtype=torch.float64)
        if self.ratios is not None and (self.ratios <= 0).any():
            raise ValueError("sampling ratios must be positive")
        self.unmixed = unmixed
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def _vector(self, values: Tensor | None, k: int, like: Tensor, default: float) -> Tensor:
        if values is None:
            return torch.full((k,), default, dtype=like.dtype, device=like.device)
        if len(values) != k:
            raise ValueError(f"expected {k} per-task values, got {len(values)}")
        return values.to(like.device, like.dtype)

    def __call__(self, grads: Tensor) -> Aggregation:
        check_gradient_matrix(grads)
        k = len(grads)
        unit, inverse = unit_rows(grads)
        balance = self._vector(self.balance, k, grads, 1.0)
        weights = balance * inverse  # ω_k / ||g_k||
        if self.unmixed:
            ratios = self._vector(self.ratios, k, grads, 1.0 / k)
            ratios = ratios / ratios.sum()
            task = int(torch.multinomial(ratios.detach().cpu().double(), 1, generator=self.generator))
            picked = torch.zeros_like(weights)
            picked[task] = weights[task] / ratios[task]  # the 1/s_k compensation
            weights = picked
        return Aggregation(update=weights @ grads, weights=weights)


class TaskBalancedAdamW(torch.optim.Optimizer):
    """AdamW of Sec. 4.4 for unmixed sampling: ``step(task)`` after the sampled task's backward."""

    def __init__(self, params: Iterable[Tensor], sampling_ratios: Sequence[float],
                 balance: Sequence[float] | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.1, 0.001), eps: float = 1e-8, weight_decay: float = 0.0):
        # betas follow the paper's display: the weight of the *new* gradient (PyTorch's 1 − beta).
        ratios = torch.tensor(sampling_ratios, dtype=torch.float64)
        self.ratios = (ratios / ratios.sum()).tolist()
        self.balance = list(balance) if balance is not None else [1.0] * len(self.ratios)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, task: int) -> None:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.sqrt(sum(p.grad.double().square().sum() for p in params)) if params else 0.0
        scale = self.balance[task] / float(norm) if float(norm) > 0 else 0.0
        compensation = 1.0 / self.ratios[task]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = scale * p.grad  # g_t = ω_k ∇L / ||∇L||
                state = self.state[p]
                if not state:
                    state["m"], state["n"] = torch.zeros_like(p), torch.zeros_like(p)
                state["m"].mul_(1 - beta1).add_(g, alpha=beta1 * compensation)
                state["n"].mul_(1 - beta2).add_(g.square(), alpha=beta2 * compensation)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(group["lr"] * state["m"] / (state["n"].sqrt() + group["eps"]))
