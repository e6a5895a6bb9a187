"""Auto-λ: task weights learned by a one-step look-ahead on validation loss.

Shikun Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
Relationships", TMLR 2022, arXiv:2202.03091.

The weights λ solve a bi-level problem: the network trains on sum_k λ_k L_k^train, and
λ is chosen so that the *primary* tasks' validation loss is low after that training.
The inner problem is approximated by one gradient step (a look-ahead):

    θ'(λ)   = θ - η ∇_θ sum_k λ_k L_k^train(θ)
    λ       ← λ - lr_λ ∇_λ sum_{k ∈ primary} L_k^val(θ'(λ))

An auxiliary task gets more weight when a step on it lowers the primary tasks'
validation loss. This small version differentiates through the look-ahead exactly
(second-order autograd); the paper's code approximates the same Hessian-vector product
by finite differences and includes the optimizer's momentum and weight decay in θ' —
both left out here for clarity (without them its λ gradient agreed with ours to about 1e-7
in the audit, lorenmt/auto-lambda). Its look-ahead copy stays in training mode, so batch
norm uses batch statistics there, and its extra forward passes update the main model's
running statistics.

Interface:

    weights = autol.weights(losses)            # λ (detached), for the network step
    autol.meta_backward(params, train_fn, val_fn, inner_lr)   # sets λ.grad
    meta_optimizer.step()                      # an optimizer over autol.parameters()

``params`` maps names to the parameters the look-ahead moves (e.g.
``dict(model.named_parameters())``); ``train_fn(params)`` / ``val_fn(params)`` return the
K training / validation losses for those parameter values, typically via
``torch.func.functional_call``. ``primary_tasks`` (indices) default to all tasks. The
paper initialises λ at 0.1 and trains it with Adam. Which data ``val_fn`` sees is the
caller's choice: the authors' dense-prediction trainer draws its "validation" batch from the
training set (a second loader over it, shuffled differently), not from held-out data.

Checked against the authors' code (github.com/lorenmt/auto-lambda: ``auto_lambda.py``,
``trainer_dense.py``, ``trainer_cifar.py``). There, with d = ∇_θ' of the primary validation
loss, λ's gradient is −η times a central difference of Σ_k λ_k L_k^train's λ-gradient at
θ ± ε d, ε = 0.01 / ||d||, which tends to our exact −η ∇_θ L_k^train(θ) · d. η is the network's
current (scheduled) SGD learning rate; λ starts at 0.1 and takes one Adam step (learning rate
1e-4 for NYUv2, 3e-5 for CityScapes per the README, 3e-4 in the CIFAR trainer) before each
network step, which then uses the new λ. λ is neither clipped nor normalised, here or there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from reference_impls.weighting.base import LossWeighting

LossFunction = Callable[[dict[str, Tensor]], Tensor]


class AutoLambda(LossWeighting):
    """Learned λ updated by the gradient of primary validation loss after a look-ahead."""

    name = "autol"
    training_hook = "meta_backward"

    def __init__(
        self, num_tasks: int, primary_tasks: Sequence[int] | None = None, init: float = 0.1
    ) -> None:
        super().__init__()
        self.task_weights = nn.Parameter(torch.full((num_tasks,), float(init)))
        mask = torch.zeros(num_tasks)
        mask[list(range(num_tasks)) if primary_tasks is None else list(primary_tasks)] = 1.0
        self.register_buffer("primary_mask", mask)

    def weights(self, losses: Tensor, step: int = 0, epoch: int = 0) -> Tensor:
        return self.task_weights.detach().clone().to(losses)  # a copy: the meta step edits λ in place

    def lookahead(
        self, params: dict[str, Tensor], train_fn: LossFunction, inner_lr: float
    ) -> dict[str, Tensor]:
        """θ'(λ) = θ - η ∇_θ sum_k λ_k L_k^train(θ), differentiable in λ."""
        weighted = (self.task_weights * train_fn(params)).sum()
        grads = torch.autograd.grad(weighted, list(params.values()), create_graph=True, allow_unused=True)
        return {name: p if g is None else p - inner_lr * g for (name, p), g in zip(params.items(), grads)}

    def meta_backward(
        self,
        params: dict[str, Tensor],
        train_fn: LossFunction,
        val_fn: LossFunction,
        inner_lr: float,
    ) -> Tensor:
        """Set λ.grad = ∇_λ primary validation loss at θ'(λ); return that loss."""
        val_losses = val_fn(self.lookahead(params, train_fn, inner_lr))
        meta_loss = (self.primary_mask.to(val_losses) * val_losses).sum()
        (self.task_weights.grad,) = torch.autograd.grad(meta_loss, self.task_weights)
        return meta_loss.detach()
