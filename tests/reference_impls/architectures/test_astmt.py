"""ASTMT: neutral SE + zero adapters = shared path; modules are task-private."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.astmt import AttentiveSingleTasking, SqueezeExcitation, TaskAdaptedBlock

from .conftest import names_the_refusal

TASKS = ("a", "b")
OUT = {"a": 2, "b": 3}


def make(channels=8, depth=2):
    torch.manual_seed(0)
    return AttentiveSingleTasking(TASKS, 3, OUT, channels=channels, depth=depth, reduction=4)


def neutralise_se(model, task):
    with torch.no_grad():
        for block in model.blocks:
            block.se[task].fc2.weight.zero_()
            block.se[task].fc2.bias.fill_(100.0)  # sigmoid(100) == 1.0 exactly in float32


def test_zero_adapters_and_neutral_se_equal_shared_path(device):
    model = make().to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    neutralise_se(model, "a")
    assert torch.equal(model.features(x, "a"), model.shared_features(x))
    # Task b keeps its (random) SE gates, so it is a different function of the input.
    assert not torch.allclose(model.features(x, "b"), model.shared_features(x))


def test_se_gate_lies_in_unit_interval_and_scales_channels(device):
    model = make().to(device)
    se = model.blocks[0].se["a"]
    u = torch.randn(3, 8, 5, 5, device=device)
    g = se.gate(u)
    assert g.shape == (3, 8) and torch.all((g > 0) & (g < 1))
    torch.testing.assert_close(se(u), u * g[:, :, None, None])


def test_nonzero_adapter_changes_only_its_task(device):
    model = make().to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    before_b = model.features(x, "b")
    before_a = model.features(x, "a")
    with torch.no_grad():
        model.blocks[0].adapters1["a"].weight.normal_()
    assert torch.equal(model.features(x, "b"), before_b)
    assert not torch.allclose(model.features(x, "a"), before_a)


def test_task_a_loss_gives_zero_grad_to_task_b_modules(device):
    model = make().to(device)
    model.forward_task(torch.randn(2, 3, 6, 6, device=device), "a").square().sum().backward()
    assert all(p.grad is None for p in model.task_specific_parameters("b"))
    # Zero-initialised adapters still receive a gradient, so they can learn.
    for block in model.blocks:
        assert block.adapters1["a"].weight.grad.abs().sum() > 0
        assert block.adapters2["a"].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.shared_parameters())


def test_parameter_count():
    c, depth, r = 8, 2, 2  # hidden SE width c // 4 = 2
    model = make(channels=c, depth=depth)
    shared = (3 * c * 9 + c) + depth * 2 * (c * c * 9 + c)
    per_block_task = 2 * c * c + (c * r + r) + (r * c + c)
    per_task = {t: depth * per_block_task + c * o + o for t, o in OUT.items()}
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    assert sum(p.numel() for p in model.parameters()) == shared + sum(per_task.values())


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("astmt", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("astmt", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_block_adds_parallel_adapters_and_gates_the_residual_branch(device):
    """relu(x + SE_t(conv2(h) + A2_t(h))) with h = relu(conv1(x) + A1_t(x)), Fig. 2."""
    model = make().to(device)
    block = model.blocks[0]
    with torch.no_grad():
        block.adapters1["a"].weight.normal_()
        block.adapters2["a"].weight.normal_()
    x = torch.randn(2, 8, 5, 5, device=device)
    h = torch.relu(block.conv1(x) + block.adapters1["a"](x))
    u = block.conv2(h) + block.adapters2["a"](h)
    torch.testing.assert_close(block(x, "a"), torch.relu(x + block.se["a"](u)))


def test_se_gate_is_sigmoid_of_a_relu_mlp_on_average_pooled_channels_by_hand(device):
    """gate(u) = sigmoid(W2 relu(W1 mean_hw(u) + b1) + b2), the SE unit of the docstring."""
    se = make().to(device).blocks[0].se["a"]
    u = torch.randn(3, 8, 5, 5).to(device)  # CPU draw: the same values on every device
    pooled = u.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ se.fc1.weight.T + se.fc1.bias)
    assert (hidden == 0).any() and (hidden > 0).any()  # the ReLU is exercised
    expected = torch.sigmoid(hidden @ se.fc2.weight.T + se.fc2.bias)
    torch.testing.assert_close(se.gate(u), expected)


def test_shared_path_uses_no_task_module_by_hand(device):
    """shared_features is stem + plain residual blocks relu(x + conv2(relu(conv1(x)))), no SE, no adapter."""
    model = make().to(device)
    with torch.no_grad():  # non-trivial adapters, so leaving them in would show
        for block in model.blocks:
            for adapter in [*block.adapters1.values(), *block.adapters2.values()]:
                adapter.weight.normal_()
    x = torch.randn(2, 3, 6, 6, device=device)
    h = torch.relu(model.stem(x))
    for block in model.blocks:
        h = torch.relu(h + block.conv2(torch.relu(block.conv1(h))))
    torch.testing.assert_close(model.shared_features(x), h)


def test_default_se_reduction_is_4():
    model = AttentiveSingleTasking(TASKS, 3, OUT, channels=16)
    se = model.blocks[0].se["a"]
    assert se.fc1.out_features == 16 // 4
    assert SqueezeExcitation(16).fc1.out_features == 4
    assert TaskAdaptedBlock(16, TASKS).se["a"].fc1.out_features == 4


def test_se_bottleneck_width_is_channels_over_the_given_reduction():
    """The SE unit squeezes C channels to C // r (at least one), with the reduction r the caller gives:
    the model passes it to every block and the block to every task's SE unit."""
    for c, r in ((16, 2), (8, 8), (4, 4), (6, 4), (12, 3)):
        expected = max(1, c // r)
        assert SqueezeExcitation(c, r).fc1.out_features == expected
        assert TaskAdaptedBlock(c, TASKS, r).se["b"].fc1.out_features == expected
        model = AttentiveSingleTasking(TASKS, 3, OUT, channels=c, depth=2, reduction=r)
        assert {block.se[t].fc1.out_features for block in model.blocks for t in TASKS} == {expected}
        assert {block.se[t].fc2.in_features for block in model.blocks for t in TASKS} == {expected}


def test_registry_width_is_the_channel_count_of_every_layer():
    """build(..., width=w) gives a stem, blocks, adapters and heads of w channels."""
    problem = registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)
    model = registry.build("astmt", problem, width=8)
    assert model.stem.out_channels == 8
    for block in model.blocks:
        assert block.conv1.out_channels == block.conv2.out_channels == 8
        assert block.adapters1["a"].out_channels == block.adapters2["b"].in_channels == 8
    assert model(torch.randn(2, 2, 4, 4))["a"].shape == (2, 2, 4, 4)


@pytest.mark.parametrize("argument", ("channels", "reduction"))
def test_refuses_a_zero_size_and_names_it(argument):
    """checks.require_positive: a width of 0 is refused when the model is built, naming the argument."""
    kwargs = {"channels": 8, "reduction": 4, argument: 0}
    with pytest.raises(ValueError) as error:
        AttentiveSingleTasking(TASKS, 3, OUT, **kwargs)
    assert names_the_refusal(error.value, argument, 0)
