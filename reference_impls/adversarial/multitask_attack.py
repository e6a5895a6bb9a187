"""Multi-Task Adversarial Attack (MTA): one perturbation generator for several target tasks.

Guo, Xu, Lin, Zhang, "Multi-Task Adversarial Attack", arXiv 2020
(https://arxiv.org/abs/2011.09824; authors' given names not verified).

Instead of training one perturbation generator per attacked task, MTA trains a single
generator with an encoder shared by all tasks and one decoder per task. Decoder t emits the
perturbation δ_t for task t's target model; the shared encoder is what makes the attack
cheaper to store and run for many tasks, and lets what fools one task help fool the others.
The generator reads either the clean image (a per-instance perturbation δ_t(x)) or one fixed
noise input (a universal perturbation δ_t, the same for every image), and serves
non-targeted and targeted attacks:

    δ_t = P_ε( D_t(E(x)) )                            shared encoder E, task decoder D_t
    P_ε(r) = r · min(1, ε / ‖r‖_p)                    scale into the ℓ_p ball of radius ε
    non-targeted:  L = Σ_t w_t · −log(1 − p_t(y_t | x + δ_t))
    targeted:      L = Σ_t w_t · −log p_t(ŷ_t | x + δ_t)

where p_t is target model t's softmax, y_t the label to move away from (true or clean
prediction) and ŷ_t the attacker's chosen label. The generator's parameters are trained on
L by gradient descent; the target models stay fixed.

Verification: only the catalogue entry (title, arXiv link, initials) and the design in
one sentence (shared encoder, task-specific decoders, per-instance and universal,
targeted and non-targeted) could be checked; the paper's text, its equation numbers and
any official code were not found. The norm projection P_ε (scaling, as in Poursaeed et
al.'s generative adversarial perturbations, CVPR 2018) and the two losses above are
standard choices written here as ours, not the paper's equations; no equation numbers are
cited for that reason.

Left out: the paper's generator backbone (a ResNet-style encoder-decoder), its datasets
(Office-31, NYUv2 as far as we know) and dense-task losses other than per-pixel
classification; any task weighting beyond fixed w_t.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference_impls.checks import require_above, require_all_tasks, require_at_least, require_positive
from reference_impls.metrics import IGNORE_INDEX as IGNORE
from reference_impls.architectures.encoders import conv_head, trunk_for


def project_to_ball(raw: Tensor, epsilon: float, p: float = float("inf")) -> Tensor:
    """P_ε: scale each example's ``raw`` (batch first) down into the ℓ_p ball of radius ε.

    Scaling (rather than clipping) keeps the direction the decoder chose; examples already
    inside the ball are left alone, and a zero perturbation stays zero.
    """
    require_above(0, epsilon=epsilon)  # a negative radius would flip the perturbation
    norms = raw.flatten(1).norm(p=p, dim=1).clamp_min(torch.finfo(raw.dtype).tiny)
    scale = (epsilon / norms).clamp(max=1.0)
    return raw * scale.view(-1, *([1] * (raw.ndim - 1)))


def task_decoder(input_shape: Sequence[int], width: int) -> nn.Module:
    """D_t: maps the shared code back to input space (a linear layer or a per-pixel head)."""
    if len(input_shape) == 1:
        return nn.Linear(width, input_shape[0])
    return conv_head(width, input_shape[0], hidden_channels=width)


class MultiTaskAttack(nn.Module):
    """Shared encoder E, decoders D_t; ``forward(x) -> {task: δ_t}`` with ‖δ_t‖_p ≤ ε."""

    name = "mta"

    def __init__(self, tasks: Sequence[str], input_shape: Sequence[int], epsilon: float,
                 p: float = float("inf"), width: int = 16, depth: int = 2,
                 universal: bool = False, generator: torch.Generator | None = None,
                 weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"need at least one task and unique names, got {list(tasks)}")
        if not 0 < epsilon < float("inf"):
            raise ValueError(f"epsilon must be finite and above 0, got {epsilon}")
        require_at_least(1, p=p)  # below 1 the ℓ_p "ball" is no norm ball; p = 0 ignores the scaling
        require_positive(width=width)
        if weights is not None:  # 0 leaves a task alone; a negative weight would protect it
            require_at_least(0, **{f"weights[{t}]": w for t, w in weights.items()})
        self.tasks = tuple(tasks)
        self.epsilon, self.p = float(epsilon), float(p)
        self.encoder = trunk_for(input_shape, width, depth)  # E, shared by all tasks
        self.decoders = nn.ModuleDict({t: task_decoder(input_shape, width) for t in self.tasks})
        self.weights = {t: 1.0 for t in self.tasks} if weights is None else dict(weights)
        self.universal = universal
        # A universal attack feeds E one fixed noise input instead of the image.
        noise = torch.rand(1, *input_shape, generator=generator) * 2 - 1 if universal else None
        self.register_buffer("noise", noise)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        source = self.noise.to(x.dtype) if self.universal else x
        code = self.encoder(source)  # one pass through the shared encoder for all tasks
        deltas = {t: project_to_ball(self.decoders[t](code), self.epsilon, self.p) for t in self.tasks}
        return {t: d.expand_as(x) for t, d in deltas.items()}

    def perturb(self, x: Tensor) -> dict[str, Tensor]:
        """Task t's adversarial input x + δ_t."""
        return {t: x + d for t, d in self(x).items()}

    def loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor],
             targeted: bool = False) -> Tensor:
        """Σ_t w_t ℓ_t on the targets' logits for x + δ_t (class axis 1, per pixel allowed).

        Non-targeted: −log(1 − p(y)), which is 0 once the label's probability is gone, so a
        task already fooled stops pulling the shared encoder. Targeted: cross-entropy to the
        attacker's label. Positions labelled ``IGNORE`` (unlabelled pixels) are left out of
        the mean; a task with none labelled adds 0.
        """
        require_all_tasks("outputs", outputs, self.tasks)
        require_all_tasks("labels", labels, self.tasks)
        total = next(iter(outputs.values())).new_zeros(())
        for t in self.tasks:
            labelled = labels[t] != IGNORE
            index = labels[t].masked_fill(~labelled, 0).unsqueeze(1)
            log_p = F.log_softmax(outputs[t], dim=1).gather(1, index).squeeze(1)
            if targeted:
                term = -log_p
            else:
                term = -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
            mean = torch.where(labelled, term, 0).sum() / labelled.sum().clamp_min(1)
            total = total + self.weights[t] * mean
        return total

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Decoder D_t; every other parameter (the encoder) is shared."""
        yield from self.decoders[task].parameters()
