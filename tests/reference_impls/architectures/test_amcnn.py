"""AM-CNN: zero bottleneck = independent columns; attention in (0,1); sharing via modules."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.amcnn import AMCNNModule, AttentionAwareMTCNN

TASKS = ("a", "b")
OUT = {"a": 2, "b": 1}


def make():
    torch.manual_seed(0)
    return AttentionAwareMTCNN(TASKS, 3, OUT, channels=(4, 4, 4), reduction=2)


def grad_norm(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_zero_bottlenecks_give_independent_single_task_columns(device):
    model = make().to(device)
    with torch.no_grad():
        for m in model.modules_between:
            for b in m.bottleneck.values():
                b.weight.zero_()
                b.bias.zero_()
    x = torch.randn(2, 3, 5, 5, device=device)
    out = model(x)
    for t in TASKS:
        h = x
        for block in model.columns[t]:
            h = block(h)
        assert torch.equal(out[t], model.heads[t](h))


def test_module_is_shortcut_plus_attended_bottleneck(device):
    torch.manual_seed(0)
    module = AMCNNModule(TASKS, 3, reduction=2).to(device)
    feats = {t: torch.randn(2, 3, 4, 4, device=device) for t in TASKS}
    z = torch.cat([feats["a"], feats["b"]], dim=1)
    a = module.attention["b"](z)
    assert a.shape == (2, 6, 1, 1) and torch.all((a > 0) & (a < 1))
    torch.testing.assert_close(module(feats)["b"], feats["b"] + module.bottleneck["b"](a * z))


def test_attention_is_squeeze_excitation_of_the_pooled_concatenation_by_hand(device):
    """a_k = sigmoid(W2 ReLU(W1 mean_hw(Z) + b1) + b2), per sample."""
    torch.manual_seed(0)
    se = AMCNNModule(TASKS, 3, reduction=2).attention["a"].to(device)
    z = torch.randn(2, 6, 4, 4, device=device)
    pooled = z.mean(dim=(2, 3))
    hidden = torch.relu(pooled @ se.fc1.weight.T + se.fc1.bias)
    expected = torch.sigmoid(hidden @ se.fc2.weight.T + se.fc2.bias)
    torch.testing.assert_close(se(z), expected[:, :, None, None])


def test_a_module_sits_between_every_pair_of_blocks(device):
    """block_1 -> module_1 -> block_2 -> module_2 -> block_3 -> head, composed by hand."""
    model = make().to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    feats = {t: x for t in TASKS}
    for depth, module in enumerate(model.modules_between):
        feats = module({t: model.columns[t][depth](f) for t, f in feats.items()})
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t](model.columns[t][-1](feats[t])))


def test_task_a_loss_reaches_both_columns_but_not_task_b_specific_parameters(device):
    model = make().to(device)
    model(torch.randn(2, 3, 5, 5, device=device))["a"].square().sum().backward()
    assert grad_norm(model.columns["b"][0]) > 0  # sharing: task a reads column b
    assert grad_norm(model.columns["a"][0]) > 0
    assert all(p.grad is None for p in model.task_specific_parameters("b"))
    assert grad_norm(model.modules_between[0].attention["a"]) > 0


def test_parameter_count():
    c, K, r = 4, 2, 2
    kc, hidden = K * c, (K * c) // r
    conv3 = lambda i, o: i * o * 9 + o  # noqa: E731
    column = conv3(3, c) + 2 * conv3(c, c)
    module_per_task = (kc * hidden + hidden) + (hidden * kc + kc) + (kc * c + c)
    model = make()
    total = K * column + 2 * K * module_per_task + sum(c * o + o for o in OUT.values())
    assert sum(p.numel() for p in model.parameters()) == total
    for t, o in OUT.items():
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == module_per_task + conv3(c, c) + c * o + o


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("amcnn", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("amcnn", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_se_bottleneck_has_channels_over_reduction_units_and_at_least_one():
    """SE rule: hidden = C // r (8 // 2 = 4, 6 // 4 = 1), kept at one unit when r exceeds C (3 // 4 = 0)."""
    from reference_impls.architectures.amcnn import ChannelAttention

    for channels, reduction, hidden in ((8, 2, 4), (6, 4, 1), (3, 4, 1)):
        se = ChannelAttention(channels, reduction)
        assert se.fc1.weight.shape == (hidden, channels) and se.fc2.weight.shape == (channels, hidden)


def test_two_blocks_are_enough_and_one_is_refused():
    """A module sits between two blocks, so two blocks make the smallest AM-CNN."""
    torch.manual_seed(0)
    model = AttentionAwareMTCNN(TASKS, 3, OUT, channels=(4, 4), reduction=2)
    assert len(model.modules_between) == 1
    assert model(torch.randn(2, 3, 5, 5))["a"].shape == (2, 2, 5, 5)
    with pytest.raises(ValueError, match="two blocks"):
        AttentionAwareMTCNN(TASKS, 3, OUT, channels=(4,))


def test_with_four_blocks_only_the_last_module_part_is_task_specific(split_by_task):
    """Every module but the last feeds a later module that all tasks read: its parts are shared. A task's
    own parameters are all reached by its loss and by no other task's loss."""
    torch.manual_seed(0)
    model = AttentionAwareMTCNN(TASKS, 3, OUT, channels=(4, 4, 4, 4), reduction=2)
    split = split_by_task(model, torch.randn(2, 3, 5, 5))
    for t, (claimed, reached) in split.items():
        assert claimed and claimed <= reached
        for other, (_, reached_other) in split.items():
            if other != t:
                assert not claimed & reached_other, (t, other)
