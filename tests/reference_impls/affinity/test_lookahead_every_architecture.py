"""Lookahead transference on every architecture: a tiny step gives the first-order change.

For a step of lr on task i's gradient, Z_ij = lr ⟨g_i, g_j⟩ / L_j + O(lr²), and ETAP's score
is that first-order term per unit lr. Both sides come from the same loss function, so they
agree only if every evaluation sees the same random draws; before that was so, the models
that sample in training mode (Gumbel routers, sampled widths, dropout) were off by up to 1.4e7
times the first-order term (``benchmarks/lookahead_noise.py``). Models without trainable shared
parameters are refused with a reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reference_impls import train
from reference_impls.affinity import etap
from reference_impls.affinity.transference import lookahead_transference, model_losses, shared_names
from reference_impls.architectures import registry
from reference_impls.architectures.registry import Problem

from ..conftest import DEVICES

TASKS = ("a", "b", "c")
PROBLEMS = {"vector": Problem(TASKS, (12,), {"a": 1, "b": 2, "c": 1}),
            "dense": Problem(TASKS, (3, 8, 8), {"a": 1, "b": 2, "c": 1}, dense=True)}
# lr = 1e-7 in float64: small enough for the O(lr²) term (at most 0.9 % of the first-order term
# on these models, TOM's), large enough for rounding, which grows as the step shrinks (0.02 % for
# Polytropon's images); sampling noise was 0.075 to 1.4e7 times the term.
LR, TOLERANCE = 1e-7, 5e-2
# Its gradient is by design not the derivative of its loss, by more than the tolerance. (PEPNet's
# stop-gradient gates, MTL-NAS's straight-through gates and Progressive Nets' detached lateral
# inputs move the first-order term by 0.2 % to 2.5 %: inside it.)
SURROGATE_GRADIENTS = {"mlore": "the generic convolution reads a detached feature"}


def measured(name: str, kind: str, device: str = "cpu"):
    """(Z at lr = LR, LR times ETAP's score), or None where the model is refused."""
    problem = PROBLEMS[kind]
    torch.manual_seed(0)
    try:
        model = registry.build(name, problem, **train.seeded(name, {}, 0)).double().train().to(device)
    except ValueError:
        return None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *problem.input_shape, generator=g, dtype=torch.float64).to(device)
    targets = {t: torch.randn(o.shape, generator=g, dtype=torch.float64).to(device) for t, o in model(x).items()}
    loss_fn = model_losses(model, x, targets, {t: (lambda o, y: (o - y).square().mean()) for t in TASKS})
    try:
        shared_names(model)
    except ValueError as refusal:
        assert "no trainable shared parameters" in str(refusal)
        assert not any(p.requires_grad for p in model.shared_parameters())
        return None
    return lookahead_transference(model, loss_fn, LR), LR * etap.model_affinity_scores(model, loss_fn)


@pytest.mark.parametrize("name", registry.available())
@pytest.mark.parametrize("kind", sorted(PROBLEMS))
@pytest.mark.parametrize("device", DEVICES)
def test_a_tiny_lookahead_step_changes_every_loss_by_its_first_order_term(name, kind, device):
    result = measured(name, kind, device)
    if result is None or name in SURROGATE_GRADIENTS:
        return
    z, first_order = result
    assert torch.isfinite(z).all()
    if not first_order.any():  # shared weights only in an auxiliary loss (GTTN's mixing logits)
        assert not z.any()
        return
    error = (z - first_order).abs().max() / first_order.abs().max()
    assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("name", sorted(SURROGATE_GRADIENTS))
def test_the_surrogate_gradient_models_really_are_off_the_first_order_term(name):
    z, first_order = measured(name, "vector")
    assert (z - first_order).abs().max() / first_order.abs().max() > TOLERANCE, SURROGATE_GRADIENTS[name]


@pytest.mark.parametrize("name", registry.available())
@pytest.mark.parametrize("device", DEVICES)
def test_measuring_leaves_the_models_next_training_draw_as_it_would_have_been(name, device):
    """Also the CUDA generator's, where the model samples on a GPU (it is forked and reseeded there)."""
    torch.manual_seed(0)
    try:
        model = registry.build(name, PROBLEMS["vector"], **train.seeded(name, {}, 0)).double().train().to(device)
    except ValueError:
        return
    x = torch.randn(4, 12, dtype=torch.float64).to(device)
    targets = {t: torch.zeros_like(o) for t, o in copy.deepcopy(model)(x).items()}
    twin = copy.deepcopy(model)
    loss_fn = model_losses(model, x, targets, {t: (lambda o, y: (o - y).square().mean()) for t in TASKS})
    caller = torch.get_rng_state(), (torch.cuda.get_rng_state() if device == "cuda" else None)
    lookahead_transference(model, loss_fn, lr=0.1, shared=[n for n, p in model.named_parameters() if p.requires_grad])
    assert torch.equal(torch.get_rng_state(), caller[0])
    if device == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), caller[1])
    torch.manual_seed(1)
    after = model(x)
    torch.manual_seed(1)
    for task, output in twin(x).items():
        if device == "cpu":
            assert torch.equal(after[task], output), task
        else:  # a GPU may sum in another order each run; another draw would move outputs by far more
            torch.testing.assert_close(after[task], output, rtol=1e-12, atol=1e-12, msg=task)
