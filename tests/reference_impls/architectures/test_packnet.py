"""PackNet: disjoint masks, magnitude pruning, task t frozen once later tasks train."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.packnet import PackNet
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def train(model, x, task, steps=15, lr=1e-2):
    """A fresh Adam per task, as the method requires; only ``task``'s loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (model.forward_task(x, task) - 1.0).square().mean().backward()
        opt.step()


def packed(device, fraction=0.5):
    torch.manual_seed(0)
    model = build("packnet", VEC, width=8).to(device)
    x = torch.randn(16, 6, device=device)
    train(model, x, "a")
    model.prune("a", fraction)
    model.start_task("b")
    train(model, x, "b")
    model.prune("b", fraction)
    model.start_task("c")
    return model, x


def test_masks_are_disjoint_and_cover_the_weights(device):
    model, _ = packed(device)
    for layer, (a, b, c) in zip(model.layers, zip(*(model.masks(t) for t in VEC.tasks))):
        assert not (a & b).any() and not (a & c).any() and not (b & c).any()
        assert torch.equal(a | b | c, torch.ones_like(a))  # c took every freed weight
        n = a.numel()
        assert a.sum() == n - round(0.5 * n)
        assert b.sum() == round(0.5 * n) - round(0.5 * round(0.5 * n))
        assert torch.equal(layer.visible(2), a | b)


def test_prune_keeps_the_largest_magnitudes(device):
    torch.manual_seed(0)
    model = build("packnet", VEC, width=8).to(device)
    before = [layer.weight.detach().abs().clone() for layer in model.layers]
    model.prune("a", 0.75)
    for layer, mag in zip(model.layers, before):
        kept = layer.owner == 1
        assert kept.sum() == mag.numel() - round(0.75 * mag.numel())
        assert mag[kept].min() >= mag[~kept].max()
        assert (layer.weight[~kept] == 0).all() and (layer.owner[~kept] == 0).all()


def test_earlier_tasks_are_unchanged_by_training_later_tasks(device):
    model, x = packed(device)
    before = {t: o.detach().clone() for t, o in model(x).items()}
    train(model, x, "c", steps=20)
    after = model(x)
    assert torch.equal(after["a"], before["a"]) and torch.equal(after["b"], before["b"])
    assert not torch.equal(after["c"], before["c"])


def test_task_t_uses_exactly_the_weights_of_tasks_up_to_t(device):
    model, x = packed(device)
    for k, task in enumerate(VEC.tasks, start=1):
        h = x
        for layer in model.layers:
            w = layer.weight * ((layer.owner >= 1) & (layer.owner <= k))
            h = torch.relu(F.linear(h, w, layer.bias))
        torch.testing.assert_close(model(x)[task], model.heads[task](h))


def test_gradient_reaches_only_the_current_tasks_weights(device):
    model, x = packed(device)
    model.zero_grad(set_to_none=True)
    model.forward_task(x, "c").square().sum().backward()
    for layer in model.layers:
        assert (layer.weight.grad[layer.owner != 3] == 0).all()
        assert layer.bias.grad is None  # biases are fixed after the first task
    assert sum(layer.weight.grad[layer.owner == 3].abs().sum() for layer in model.layers) > 0
    assert all(p.grad is None for t in ("a", "b") for p in model.heads[t].parameters())


def test_task_t_reads_zero_where_no_task_owns_a_weight(device):
    """Free weights are outside every task's view, even if something (stale momentum) moved them off 0."""
    torch.manual_seed(0)
    model = build("packnet", VEC, width=8).to(device)
    x = torch.randn(4, 6, device=device)
    model.prune("a", 0.5)
    before = model(x)["a"].detach().clone()
    with torch.no_grad():
        for layer in model.layers:
            layer.weight[layer.owner == 0] = 5.0
    torch.testing.assert_close(model(x)["a"], before, rtol=0, atol=0)


def bias_gradients(model, x, task):
    model.zero_grad(set_to_none=True)
    model.forward_task(x, task).square().sum().backward()
    return [layer.bias.grad for layer in model.layers]


def test_biases_train_with_the_first_task_only(device):
    torch.manual_seed(0)
    model = build("packnet", VEC, width=8).to(device)
    x = torch.randn(4, 6, device=device)
    assert all(g is not None and g.abs().sum() > 0 for g in bias_gradients(model, x, "a"))
    model.prune("a", 0.5)
    for task in ("b", "c"):
        model.start_task(task)
        assert all(g is None for g in bias_gradients(model, x, task))


def test_prune_fraction_must_be_in_zero_one():
    torch.manual_seed(0)
    model = build("packnet", VEC, width=4)
    for fraction in (1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            model.prune("a", fraction)
    model.prune("a", 0.0)
    assert all((layer.owner == 1).all() for layer in model.layers)


def test_tasks_are_packed_in_order():
    torch.manual_seed(0)
    model = build("packnet", VEC, width=4)
    with pytest.raises(ValueError):
        model.start_task("c")  # b comes first
    with pytest.raises(ValueError):
        model.prune("b", 0.5)  # b is not being trained yet
    model.start_task("b")
    with pytest.raises(ValueError):
        model.prune("a", 0.5)  # a is frozen now


def test_parameter_count_does_not_grow_with_tasks(n_params):
    d, w = 6, 8
    model = build("packnet", VEC, width=w, depth=2)
    trunk = (d * w + w) + (w * w + w)
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == trunk + heads
    assert isinstance(model, PackNet)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("packnet", device)
    first, last = short_training("packnet", dense, device, steps=15)
    assert last < 0.7 * first


def test_a_backbone_without_biases_packs_and_runs_like_the_plain_network():
    """Bias-free layers are allowed: before any pruning, task 1 sees every weight, so it is the plain stack."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.ReLU(),
                                   torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU())
    heads = {t: torch.nn.Linear(4, 1) for t in ("a", "b")}
    model = PackNet(("a", "b"), backbone, heads)
    assert all(layer.bias is None for layer in model.layers)
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x)["a"], heads["a"](backbone(x)))
