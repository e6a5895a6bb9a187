"""Sequential Reptile (Lee et al. 2022): one inner step is SGD, the outer step is the exact interpolation."""

import copy

import pytest
import torch
from torch import nn

from reference_impls.sampling.seq_reptile import (
    SequentialReptile,
    sample_task_sequence,
    sequential_reptile_step,
)

from ..conftest import DEVICES
on_devices = pytest.mark.parametrize("device", DEVICES)


def make_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"trunk": nn.Linear(3, 4), "a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}).to(device)


def loss_fn(model, task, batch):
    x, y = batch
    return ((model[task](torch.tanh(model["trunk"](x))) - y) ** 2).mean()


def batches(device: str = "cpu", n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(8, 3, generator=g)
        y = x.sum(1, keepdim=True) if i % 2 == 0 else -x[:, :1]
        out.append(("a" if i % 2 == 0 else "b", (x.to(device), y.to(device))))
    return out


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@on_devices
def test_one_inner_step_with_full_interpolation_is_plain_sgd(device):
    model, ref = make_model(device), make_model(device)
    (task, batch), = batches(device, n=1)
    sequential_reptile_step(model, sgd(0.1), [(task, batch)], loss_fn, outer_lr=1.0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    loss_fn(ref, task, batch).backward()
    opt.step()
    torch.testing.assert_close(flat(model), flat(ref))


@on_devices
def test_outer_update_is_exactly_theta_plus_eps_times_phi_minus_theta(device):
    seq = batches(device)
    model = make_model(device)
    theta = flat(model)
    inner = copy.deepcopy(model)  # φ_K: the plain sequential SGD trajectory over the same batches
    opt = torch.optim.SGD(inner.parameters(), lr=0.05)
    for task, batch in seq:
        opt.zero_grad()
        loss_fn(inner, task, batch).backward()
        opt.step()
    phi = flat(inner)
    sequential_reptile_step(model, sgd(0.05), seq, loss_fn, outer_lr=0.3)
    torch.testing.assert_close(flat(model), theta + 0.3 * (phi - theta))
    assert not torch.allclose(flat(model), phi)  # interpolation, not the end point


@on_devices
def test_the_inner_trajectory_is_sequential_not_a_summed_gradient(device):
    seq = batches(device, n=2)
    sequential = make_model(device)
    sequential_reptile_step(sequential, sgd(0.5), seq, loss_fn, outer_lr=1.0)
    summed = make_model(device)  # both gradients at θ: what multi-task SGD would do
    total = sum(loss_fn(summed, t, b) for t, b in seq)
    total.backward()
    with torch.no_grad():
        for p in summed.parameters():
            p -= 0.5 * p.grad
    assert (flat(sequential) - flat(summed)).abs().max() > 1e-4  # differs by the alignment term


def test_task_sequence_is_seeded_and_follows_the_distribution():
    tasks = ["a", "b", "c"]
    probs = torch.tensor([0.7, 0.2, 0.1])
    one = sample_task_sequence(tasks, probs, 20, torch.Generator().manual_seed(3))
    two = sample_task_sequence(tasks, probs, 20, torch.Generator().manual_seed(3))
    assert one == two
    many = sample_task_sequence(tasks, probs, 3000, torch.Generator().manual_seed(4))
    assert abs(many.count("a") / 3000 - 0.7) < 0.04 and "c" in many


@on_devices
def test_short_training_lowers_both_task_losses(device):
    model = make_model(device)
    sr = SequentialReptile(sgd(0.05), outer_lr=0.5)
    eval_set = batches(device, n=2, seed=9)

    def total():
        with torch.no_grad():
            return sum(loss_fn(model, t, b).item() for t, b in eval_set)

    before = total()
    for step in range(40):
        sr.step(model, batches(device, n=4, seed=step), loss_fn)
    assert total() < 0.5 * before
    with pytest.raises(ValueError):
        SequentialReptile(sgd(0.1), outer_lr=0.0)


def test_inner_optimizer_state_lasts_one_whole_trajectory_and_no_longer():
    """With momentum, one inner optimizer per outer step (not per batch, not kept across steps)."""
    model = make_model()
    reference = copy.deepcopy(model)
    momentum = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)  # noqa: E731
    reptile = SequentialReptile(momentum, outer_lr=1.0)  # ε = 1: θ becomes φ_K
    for seed in (1, 2):
        reptile.step(model, batches(seed=seed), loss_fn)
        inner = momentum(reference.parameters())  # fresh for this outer step only
        for task, batch in batches(seed=seed):
            inner.zero_grad()
            loss_fn(reference, task, batch).backward()
            inner.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("outer_lr", [0.0, -0.5, 1.5, float("nan")])
def test_outer_lr_outside_zero_one_is_refused_by_the_class_and_the_step(outer_lr):
    message = rf"outer_lr must be in \(0, 1\], got {outer_lr}"
    with pytest.raises(ValueError, match=message):
        SequentialReptile(sgd(0.1), outer_lr=outer_lr)
    with pytest.raises(ValueError, match=message):  # before: NaN weights, or a silent over- or backward step
        sequential_reptile_step(make_model(), sgd(0.1), [], loss_fn, outer_lr)


@pytest.mark.parametrize("steps", [0, -1])
def test_a_task_sequence_needs_at_least_one_step(steps):
    with pytest.raises(ValueError, match=f"steps must be at least 1, got {steps}"):
        sample_task_sequence(["a", "b"], torch.tensor([0.5, 0.5]), steps)


def test_the_class_steps_with_its_own_outer_lr():
    seq = batches()
    by_function, by_class = make_model(), make_model()
    sequential_reptile_step(by_function, sgd(0.05), seq, loss_fn, outer_lr=0.3)
    SequentialReptile(sgd(0.05), outer_lr=0.3).step(by_class, seq, loss_fn)
    torch.testing.assert_close(flat(by_class), flat(by_function))


def test_default_arguments_are_valid_and_the_step_returns_each_inner_loss_in_order():
    """The function's default ε = 1 lands on φ_K; the class's default ε passes its own check. The returned
    losses are L_{t_k}(φ_{k-1}), replayed here with a plain SGD loop."""
    seq = batches()
    model, ref = make_model(), make_model()
    losses = sequential_reptile_step(model, sgd(0.05), seq, loss_fn)  # default outer_lr
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    expected = []
    for task, batch in seq:
        opt.zero_grad()
        loss = loss_fn(ref, task, batch)
        expected.append(loss.item())
        loss.backward()
        opt.step()
    assert losses == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(flat(model), flat(ref))  # ε = 1: θ becomes φ_K
    reptile = SequentialReptile(sgd(0.05))
    assert 0 < reptile.outer_lr <= 1
