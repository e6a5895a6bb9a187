"""Modulation module: ones = shared net; a zeroed channel blocks that task's gradient."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.modulation import ModulatedConvNet

TASKS = ("a", "b")
OUT = {"a": 2, "b": 3}


def make(channels=(6, 8)):
    torch.manual_seed(0)
    return ModulatedConvNet(TASKS, 3, OUT, channels=channels)


def plain_shared(model, x):
    for conv in model.convs:
        x = torch.relu(conv(x))
    return x


def test_all_ones_equals_shared_network(device):
    model = make().to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    for t in TASKS:
        assert torch.equal(model.features(x, t), plain_shared(model, x))


def test_modulation_scales_channels_per_task(device):
    model = make().to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    with torch.no_grad():
        model.modulation["a"][1].copy_(torch.arange(8.0, device=device) / 4)
    # One layer deep, ReLU(s*z) = s*ReLU(z) for s >= 0: the last layer's output is scaled.
    z = model.convs[1](torch.relu(model.convs[0](x)))
    expected = torch.relu(z) * (torch.arange(8.0, device=device) / 4).view(1, -1, 1, 1)
    torch.testing.assert_close(model.features(x, "a"), expected)
    assert torch.equal(model.features(x, "b"), plain_shared(model, x))


def test_forward_uses_each_tasks_own_scales_before_the_relu_by_hand(device):
    """out_t = head_t(ReLU(w_t^2 * conv2(ReLU(w_t^1 * conv1(x))))), signed scales, every task."""
    model = make().to(device)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in TASKS:
            for w in model.modulation[t]:
                w.copy_(torch.randn(w.shape, generator=g).to(device))
    x = torch.randn(2, 3, 5, 5, device=device)
    out = model(x)
    for t in TASKS:
        h = x
        for conv, w in zip(model.convs, model.modulation[t]):
            h = torch.relu(conv(h) * w.view(1, -1, 1, 1))
        torch.testing.assert_close(out[t], model.heads[t](h))


def test_zero_scale_blocks_task_gradient_to_that_shared_filter(device):
    model = make().to(device)
    with torch.no_grad():
        model.modulation["a"][1][[0, 3]] = 0.0
    x = torch.randn(3, 3, 5, 5, device=device)
    model.forward_task(x, "a").square().sum().backward()
    grad = model.convs[1].weight.grad
    assert torch.all(grad[[0, 3]] == 0)
    assert grad[[1, 2, 4]].abs().sum() > 0


@pytest.mark.parametrize("task", TASKS)
def test_task_loss_reaches_only_shared_and_its_own_parameters(device, task, params_with_grad):
    model = make().to(device)
    x = torch.randn(3, 3, 5, 5, device=device)
    reached = params_with_grad(model, model(x)[task].square().sum())
    names = {id(p): n for n, p in model.named_parameters()}
    own = {names[id(p)] for p in model.task_specific_parameters(task)}
    shared = {names[id(p)] for p in model.shared_parameters()}
    assert reached == own | shared


def test_parameter_count():
    channels = (6, 8)
    model = make(channels)
    widths = [3, *channels]
    trunk = sum(a * b * 9 + b for a, b in zip(widths[:-1], widths[1:]))
    per_task = {t: sum(channels) + 8 * o + o for t, o in OUT.items()}
    assert sum(p.numel() for p in model.shared_parameters()) == trunk
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    assert sum(p.numel() for p in model.parameters()) == trunk + sum(per_task.values())


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    problem = registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=dense)
    torch.manual_seed(0)
    model = registry.build("modulation", problem, width=8).to(device)
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)
    out = model(x)
    targets = {t: torch.randn_like(o) for t, o in out.items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)

    def loss_fn():
        return sum((o - targets[t]).square().mean() for t, o in model(x).items())

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("modulation", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_scale_multiplies_the_tasks_gradient_on_each_shared_filter(device):
    """Backward goes through the same w_t: for w > 0 and a loss linear in the features,
    the last conv's gradient under scales w is w[c] times its gradient under ones, channel by channel.

    ReLU(w z) = w ReLU(z) for w > 0, and the head is a 1x1 conv, so d(sum out)/dz_c is w[c] times
    its value at w = 1 with the same ReLU mask. A zero scale alone cannot show this: ReLU(0) has
    zero slope whether or not the product passes the scale on.
    """
    model = make().to(device)
    x = torch.randn(3, 3, 5, 5, device=device)

    def last_conv_grad():
        model.zero_grad(set_to_none=True)
        model.forward_task(x, "a").sum().backward()
        return model.convs[1].weight.grad.clone(), model.convs[1].bias.grad.clone()

    ones_w, ones_b = last_conv_grad()
    scales = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.25, 1.5, 0.75, 4.0], device=device)
    with torch.no_grad():
        model.modulation["a"][1].copy_(scales)
    scaled_w, scaled_b = last_conv_grad()
    assert ones_b.abs().min() > 0
    torch.testing.assert_close(scaled_w, ones_w * scales.view(-1, 1, 1, 1))
    torch.testing.assert_close(scaled_b, ones_b * scales)


def test_registry_builds_dense_or_pooled_heads_as_the_problem_says(device, registry_output_shapes):
    """A dense problem gets per-pixel outputs, a pooled one a vector per image."""
    registry_output_shapes("modulation", device)


def test_registry_refuses_options_it_cannot_honour():
    """channels comes from width, so giving it is refused (not silently dropped); so is a misspelt option."""
    problem = registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)
    with pytest.raises(ValueError, match="channels"):
        registry.build("modulation", problem, channels=(4, 4))
    with pytest.raises(TypeError):
        registry.build("modulation", problem, chanels=(4, 4))
