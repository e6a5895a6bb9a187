"""Task2Vec: a task embedded as the diagonal Fisher information of a fixed probe network.

Achille, Lam, Tewari, Ravichandran, Maji, Fowlkes, Soatto, Perona, "Task2Vec: Task
Embedding for Meta-Learning", ICCV 2019, arXiv:1902.03545: the Fisher embedding and the
symmetric distance d_sym. Equations are named, not numbered: the paper's numbering could
not be checked here.

A task is a labelled data set. Feed it through one fixed, shared "probe" feature
extractor, fit only a new classifier head on top, and ask which probe weights the task's
predictions are sensitive to. That sensitivity is the Fisher information

    F = E_{x ~ data} E_{y ~ p_w(y|x)} [ ∇_w log p_w(y|x) ∇_w log p_w(y|x)ᵀ ]

with y drawn from the model's own predictive distribution (not the data labels). Task2Vec
keeps its diagonal for the probe's parameters (the head is excluded, so every task gets a
vector of the same length whatever its number of classes) and averages it over the
weights of each filter / unit: one number per filter.

Two embeddings are compared after normalising each coordinate by their sum, so that
filters with large Fisher for every task do not dominate:

    d_sym(F_a, F_b) = d_cos( F_a / (F_a + F_b),  F_b / (F_a + F_b) )

where d_cos is the cosine distance. It is symmetric and zero for identical embeddings.

Here the expectation over y is estimated by Monte Carlo (``samples`` labels per input,
drawn with a ``torch.Generator``) or, for small label sets, computed exactly by summing
over the classes (``samples=None``). Per-example gradients come from ``torch.func``.
Two details of the authors' code (github.com/awslabs/aws-cv-task2vec) differ: its Monte
Carlo estimate squares the gradient of each mini-batch's mean loss rather than per-example
gradients, and its embedding also keeps one entry per channel for 1-D ``weight`` tensors
(normalisation-layer scales), which ``filter_means`` skips along with biases. Also (checked at
c5795e5): its Fisher averages over a class-balanced resample of 10,000 inputs (the weighted
loader its head fit uses too), here over the inputs given; its probe runs in training mode,
so batch norm uses batch statistics; its symmetric distance adds 1e-8 to the denominator,
which pulls small Fisher values towards the plain cosine, while ours is scale-invariant.

Defaults: ``samples=1`` is the authors' Monte Carlo estimate, one label drawn per input per pass
(``montecarlo_fisher``: ``torch.multinomial(..., 1)``, ``epochs`` 1 in ``conf/task2vec/montecarlo.yaml``).
``head_steps=200`` full-batch Adam steps (lr 0.05, a 1e-3 ||W||² penalty on the weight; the head
starts at zero) are ours, for the small
data sets here: the authors' ``_fit_classifier`` runs 10 epochs of mini-batch Adam (lr 4e-4,
weight decay 1e-4) over a 10,000-sample weighted loader, about 1,560 steps.

Left out: the paper's robust variational Fisher estimate (the posterior-variance
approximation it prefers for deep probes), the asymmetric distance for model selection,
MODEL2VEC, and a pre-trained ResNet probe: any fixed ``nn.Module`` without batch-dependent
layers (no BatchNorm in training mode) serves as probe here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from reference_impls.checks import require_above, require_at_least, require_positive


def fit_head(features: Tensor, labels: Tensor, num_classes: int, steps: int = 200,
             lr: float = 0.05, weight_decay: float = 1e-3) -> nn.Linear:
    """A fresh linear classifier on fixed features (the only part trained per task)."""
    require_positive(num_classes=num_classes)
    require_at_least(0, steps=steps, weight_decay=weight_decay)
    require_above(0, lr=lr)
    head = nn.Linear(features.shape[1], num_classes).to(features)
    nn.init.zeros_(head.weight)  # convex problem: a deterministic start is enough
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        optimizer.step()
    return head.requires_grad_(False)


def diagonal_fisher(
    model: nn.Module,
    x: Tensor,
    names: list[str] | None = None,
    samples: int | None = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal of F for the parameters ``names`` of a classifier returning logits.

    ``samples=None`` takes the expectation over y exactly (a sum over classes, weighted by
    p_w(y|x)); an integer draws that many labels per input from p_w(y|x).
    """
    if samples is not None:
        require_positive(samples=samples)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    fixed = {n: p for n, p in params.items() if n not in names}

    def log_likelihood(free: dict[str, Tensor], x_n: Tensor, onehot_n: Tensor) -> Tensor:
        logits = functional_call(model, {**fixed, **free}, (x_n.unsqueeze(0),))
        return (F.log_softmax(logits, dim=-1)[0] * onehot_n).sum()  # log p_w(y|x)

    score = vmap(grad(log_likelihood), in_dims=(None, 0, 0))  # per-example ∇_w log p_w(y|x)
    free = {n: params[n] for n in names}
    with torch.no_grad():
        probs = F.softmax(model(x), dim=-1)
    if samples is None:  # exact: Σ_y p(y|x) (∇ log p)²
        weights, labels = probs.T.reshape(-1), torch.arange(probs.shape[1], device=x.device)
        labels = labels.repeat_interleave(len(x))
        inputs = x.repeat(probs.shape[1], *[1] * (x.dim() - 1))
    else:  # Monte Carlo: y ~ p(y|x), equal weights
        labels = torch.multinomial(probs, samples, replacement=True, generator=generator).T.reshape(-1)
        inputs = x.repeat(samples, *[1] * (x.dim() - 1))
        weights = torch.full_like(labels, 1.0 / samples, dtype=x.dtype)
    grads = score(free, inputs, F.one_hot(labels, probs.shape[1]).to(x.dtype))
    return {n: (weights.view(-1, *[1] * (g.dim() - 1)) * g.square()).sum(0) / len(x)
            for n, g in grads.items()}


def filter_means(fisher: dict[str, Tensor]) -> Tensor:
    """One number per filter / output unit: the mean Fisher of its weights (biases skipped)."""
    return torch.cat([f.reshape(f.shape[0], -1).mean(1) for f in fisher.values() if f.dim() >= 2])


class Task2Vec:
    """Embeds labelled data sets with one fixed probe feature extractor."""

    def __init__(self, probe: nn.Module, samples: int | None = 1, head_steps: int = 200) -> None:
        if samples is not None:
            require_positive(samples=samples)
        require_positive(head_steps=head_steps)  # an untrained (zero) head gives every task a zero Fisher
        self.probe = probe
        self.samples = samples
        self.head_steps = head_steps

    def embed(self, x: Tensor, y: Tensor, num_classes: int,
              generator: torch.Generator | None = None) -> Tensor:
        """The task's embedding: filter-averaged diagonal Fisher of the probe's weights."""
        with torch.no_grad():
            features = self.probe(x)
        head = fit_head(features, y, num_classes, steps=self.head_steps)
        network = nn.Sequential(self.probe, head)  # shares, never changes, the probe's weights
        names = [f"0.{n}" for n, _ in self.probe.named_parameters()]
        fisher = diagonal_fisher(network, x, names, self.samples, generator)
        return filter_means(fisher)


def symmetric_distance(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """d_sym: cosine distance between the two embeddings, each divided by their sum."""
    total = (a + b).clamp_min(eps)
    return 1 - F.cosine_similarity(a / total, b / total, dim=0, eps=eps)


def distance_matrix(embeddings: list[Tensor]) -> Tensor:
    """K x K matrix of d_sym between task embeddings (zero diagonal, symmetric)."""
    k = len(embeddings)
    out = torch.zeros(k, k, dtype=embeddings[0].dtype, device=embeddings[0].device)
    for i in range(k):
        for j in range(i + 1, k):
            out[i, j] = out[j, i] = symmetric_distance(embeddings[i], embeddings[j])
    return out
