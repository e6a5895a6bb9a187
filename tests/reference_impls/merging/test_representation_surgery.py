"""Representation Surgery: starts as identity, L1 objective, frozen backbone, bias reduced."""

import inspect
import math

import pytest
import torch
from torch import nn

from reference_impls.merging.base import task_vector
from reference_impls.merging.representation_surgery import RepresentationSurgery
from reference_impls.merging.task_arithmetic import TaskArithmetic


def encoders(seed=0, d_in=6, d=8, k=2):
    """A pre-trained tanh encoder, k perturbed 'fine-tuned' copies and their task-arithmetic merge."""
    torch.manual_seed(seed)
    pre = nn.Sequential(nn.Linear(d_in, d), nn.Tanh())
    state = {n: v.detach().clone() for n, v in pre.state_dict().items()}
    tuned = []
    for _ in range(k):
        model = nn.Sequential(nn.Linear(d_in, d), nn.Tanh())
        model.load_state_dict({n: v + 0.8 * torch.randn_like(v) for n, v in state.items()})
        tuned.append(model)
    merged = nn.Sequential(nn.Linear(d_in, d), nn.Tanh())
    taus = [task_vector(m.state_dict(), state) for m in tuned]
    merged.load_state_dict(TaskArithmetic(scale=0.5)(state, taus))
    return merged, tuned


def test_starts_as_identity_and_follows_the_formula():
    surgery = RepresentationSurgery(num_tasks=2, feature_dim=5, rank=3)
    z = torch.randn(4, 5)
    assert torch.equal(surgery(z, 1), z)
    with torch.no_grad():
        surgery.up[0].weight.normal_()
    expected = z - torch.relu(z @ surgery.down[0].weight.T) @ surgery.up[0].weight.T
    torch.testing.assert_close(surgery(z, 0), expected)
    assert torch.equal(surgery(z, 1), z)  # modules are per task
    with torch.no_grad():  # task 1 reads its own Down and Up, not task 0's
        surgery.up[1].weight.normal_()
    expected = z - torch.relu(z @ surgery.down[1].weight.T) @ surgery.up[1].weight.T
    torch.testing.assert_close(surgery(z, 1), expected)


def test_objective_is_the_mean_l1_distance():
    surgery = RepresentationSurgery(num_tasks=1, feature_dim=4, rank=2)
    x = torch.randn(3, 4)
    target = torch.randn(3, 4)
    value = surgery.objective(lambda v: v, lambda v: target, x, 0)
    torch.testing.assert_close(value, (x - target).abs().mean())
    assert torch.allclose(value, nn.L1Loss()(x, target))


def test_parameter_count_is_two_bias_free_matrices_per_task():
    surgery = RepresentationSurgery(num_tasks=3, feature_dim=10, rank=4)
    assert sum(p.numel() for p in surgery.parameters()) == 3 * 2 * 10 * 4


def test_merged_backbone_is_frozen_and_surgery_reduces_the_bias():
    merged, tuned = encoders()
    before = {n: v.clone() for n, v in merged.state_dict().items()}
    surgery = RepresentationSurgery(num_tasks=2, feature_dim=8, rank=8)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(64, 6, generator=g) for _ in tuned]
    history = surgery.fit(merged, tuned, inputs, steps=60, lr=2e-2)
    assert history[-1] < 0.7 * history[0]
    for n, v in merged.state_dict().items():
        assert torch.equal(v, before[n])
    assert all(p.grad is None for p in merged.parameters())
    assert all(p.grad is None for m in tuned for p in m.parameters())
    surgery.zero_grad()
    surgery.objective(merged, tuned[0], inputs[0], 0).backward()
    assert all(p.grad is not None for p in (surgery.down[0].weight, surgery.up[0].weight))
    assert surgery.up[1].weight.grad is None  # task 1's module is untouched by task 0's loss
    for t, (model, x) in enumerate(zip(tuned, inputs)):
        with torch.no_grad():
            raw = (merged(x) - model(x)).abs().mean()
            fixed = (surgery(merged(x), t) - model(x)).abs().mean()
        assert fixed < raw


@pytest.mark.parametrize("name", ["num_tasks", "feature_dim", "rank"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_below_one_are_refused_when_built(name, value):
    sizes = {"num_tasks": 2, "feature_dim": 4, "rank": 2, name: value}
    with pytest.raises(ValueError, match=f"{name} must be at least 1, got {value}"):
        RepresentationSurgery(**sizes)


@pytest.mark.parametrize("kwargs, message", [({"steps": -1}, "steps must be at least 0"),
                                             ({"lr": 0.0}, "lr must be above 0, got 0.0")])
def test_fit_refuses_bad_steps_and_learning_rates(kwargs, message):
    surgery = RepresentationSurgery(num_tasks=1, feature_dim=4, rank=2)
    with pytest.raises(ValueError, match=message):
        surgery.fit(lambda v: v, [lambda v: 2 * v], [torch.randn(3, 4)], **kwargs)


def test_paper_defaults_and_kaiming_uniform_down():
    """Rank 16, 500 steps at lr 1e-3; Down keeps PyTorch's default init, uniform in ±1/sqrt(d)."""
    surgery = RepresentationSurgery(num_tasks=1, feature_dim=256)
    assert surgery.down[0].weight.shape == (16, 256)
    defaults = inspect.signature(RepresentationSurgery.fit).parameters
    assert (defaults["steps"].default, defaults["lr"].default) == (500, 1e-3)
    w, bound = surgery.down[0].weight.detach(), 1 / math.sqrt(256)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


def test_fit_history_sums_the_tasks_losses_of_each_iteration():
    surgery = RepresentationSurgery(num_tasks=2, feature_dim=4, rank=2)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3, 4, generator=g) for _ in range(2)]
    history = surgery.fit(lambda v: v, [lambda v: 2 * v, lambda v: 3 * v], inputs, steps=1)
    # at the start ẑ = z: |z − 2z| for task 0 and |z − 3z| for task 1
    assert history[0] == pytest.approx((inputs[0].abs().mean() + 2 * inputs[1].abs().mean()).item())


@pytest.mark.parametrize("batches", [1, 3])
def test_fit_needs_one_batch_per_individual_model(batches):
    surgery = RepresentationSurgery(num_tasks=2, feature_dim=4, rank=2)
    with pytest.raises(ValueError, match=rf"one batch of inputs per task: 2 individual models, {batches} batches"):
        surgery.fit(lambda v: v, [lambda v: 2 * v, lambda v: 3 * v], [torch.randn(3, 4)] * batches, steps=1)
