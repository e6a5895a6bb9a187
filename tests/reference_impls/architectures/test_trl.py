"""Task Routing: fixed, seeded masks; exact sparsity; masked units are exactly zero."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.trl import TaskRouting, TaskRoutingLayer

TASKS = ("a", "b", "c")
OUT = {"a": 2, "b": 1, "c": 3}


def make(seed=0, sigma=0.5, channels=(8, 12)):
    return TaskRouting(TASKS, 3, OUT, channels=channels, sigma=sigma, seed=seed)


def all_masks(model):
    return [r.masks.clone() for r in model.routers]


def test_masks_fixed_across_calls_and_training(device):
    torch.manual_seed(0)
    model = make().to(device)
    before = all_masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(2, 3, 5, 5, device=device)
        loss = sum(o.square().mean() for o in model(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for b, a in zip(before, all_masks(model)):
        assert torch.equal(b, a)
    assert not any(r.masks.requires_grad for r in model.routers)
    assert all("masks" not in n for n, _ in model.named_parameters())


def test_same_seed_same_masks_other_seed_different():
    for m1, m2 in zip(all_masks(make(seed=3)), all_masks(make(seed=3))):
        assert torch.equal(m1, m2)
    differs = [not torch.equal(m1, m2) for m1, m2 in zip(all_masks(make(seed=3)), all_masks(make(seed=4)))]
    assert all(differs)
    # Layers inside one model do not reuse one pattern.
    layer = make(channels=(10, 10))
    assert not torch.equal(layer.routers[0].masks, layer.routers[1].masks)


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_fraction_active_units_is_sigma(sigma):
    layer = TaskRoutingLayer(units=40, num_tasks=5, sigma=sigma, seed=1)
    assert set(layer.masks.unique().tolist()) <= {0.0, 1.0}
    per_task = layer.masks.mean(dim=1)
    assert torch.allclose(per_task, torch.full((5,), round(sigma * 40) / 40))
    assert abs(per_task.mean().item() - sigma) <= 1 / 40


def test_sigma_out_of_range_rejected():
    with pytest.raises(ValueError):
        TaskRoutingLayer(units=4, num_tasks=2, sigma=1.5, seed=0)


def test_masked_units_are_exactly_zero_and_active_units_are_not(device):
    torch.manual_seed(0)
    model = make(sigma=0.5).to(device)
    x = torch.randn(4, 3, 6, 6, device=device)
    for i, task in enumerate(TASKS):
        feats = model.features(x, task)
        mask = model.routers[-1].masks[i].bool()
        assert torch.all(feats[:, ~mask] == 0)
        assert torch.all(feats[:, mask].abs().sum(dim=(0, 2, 3)) > 0)
    # Different tasks see different features from the same input.
    assert not torch.equal(model.features(x, "a"), model.features(x, "b"))


def test_task_a_loss_reaches_only_its_head_and_its_units(device):
    torch.manual_seed(0)
    model = make().to(device)
    x = torch.randn(3, 3, 5, 5, device=device)
    model.forward_task(x, "a").square().sum().backward()
    for task in ("b", "c"):
        assert all(p.grad is None for p in model.heads[task].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads["a"].parameters())
    # Routing also blocks updates of every conv's filters for units task a does not use:
    # a TRL follows each block, not only the last.
    for conv, router in zip(model.convs, model.routers):
        mask = router.masks[0].bool()
        assert torch.all(conv.weight.grad[~mask] == 0) and torch.all(conv.bias.grad[~mask] == 0)
        assert torch.all(conv.weight.grad[mask].abs().sum(dim=(1, 2, 3)) > 0)


def test_parameter_count_and_split():
    channels = (8, 12)
    model = make(channels=channels)
    widths = [3, *channels]
    trunk = sum(a * b * 9 + b for a, b in zip(widths[:-1], widths[1:]))
    heads = sum(12 * o + o for o in OUT.values())
    assert sum(p.numel() for p in model.parameters()) == trunk + heads
    assert sum(p.numel() for p in model.shared_parameters()) == trunk
    assert sum(p.numel() for p in model.task_specific_parameters("c")) == 12 * 3 + 3


def test_output_shapes_and_image_level_heads(device):
    model = make().to(device)
    out = model(torch.randn(2, 3, 5, 5, device=device))
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: (2, d, 5, 5) for t, d in OUT.items()}
    pooled = TaskRouting(TASKS, 3, OUT, dense=False).to(device)
    assert pooled(torch.randn(2, 3, 5, 5, device=device))["c"].shape == (2, 3)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("trl", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("trl", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_routed_trunk_is_relu_conv_times_the_binary_mask_by_hand(device):
    """Each block is relu(conv(h)) * m_t: active units pass unscaled (no dropout-style 1/sigma)."""
    torch.manual_seed(0)
    model = make(sigma=0.25).to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    for i, task in enumerate(TASKS):
        h = x
        for conv, router in zip(model.convs, model.routers):
            h = torch.relu(conv(h)) * router.masks[i].view(1, -1, 1, 1)
        torch.testing.assert_close(model.features(x, task), h)


def test_default_sharing_ratio_keeps_half_the_units():
    model = TaskRouting(TASKS, 3, OUT, channels=(8, 12))
    assert model.sigma == 0.5
    assert [r.masks.sum(dim=1).tolist() for r in model.routers] == [[4.0] * 3, [6.0] * 3]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float64))
def test_routing_keeps_the_input_dtype(dtype):
    """A 0/1 mask is exact in every dtype: routing must not promote a bfloat16 feature map to float32."""
    layer = TaskRoutingLayer(units=4, num_tasks=2, sigma=0.5, seed=0)
    x = torch.randn(2, 4, 3, 3).to(dtype)
    out = layer(x, 1)
    assert out.dtype == dtype
    assert torch.equal(out, x * layer.masks[1].to(dtype).view(1, 4, 1, 1))
