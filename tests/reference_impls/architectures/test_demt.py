"""DeMT: deformable sampling (zero offsets = regular grid), query/key roles, task interaction."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.demt import CrossAttention, DeformableDepthwiseConv, DeformableMixer, DeMT

from .conftest import assert_each_task_owns_exactly, names_under

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, dense=True):
    torch.manual_seed(0)
    return DeMT(TASKS, 3, OUT, channels=8, dense=dense).to(device)


def test_zero_offsets_sample_the_regular_grid_exactly(device):
    torch.manual_seed(0)
    conv = DeformableDepthwiseConv(4).to(device)
    x = torch.randn(2, 4, 5, 7, device=device)
    expected = F.conv2d(x, conv.weight.view(4, 1, 3, 3), conv.bias, padding=1, groups=4)
    torch.testing.assert_close(conv(x), expected)  # offset predictor starts at zero
    zeros = torch.zeros(2, 18, 5, 7, device=device)
    torch.testing.assert_close(conv.sample(x, zeros), expected)


def test_integer_offsets_shift_the_taps_and_fractional_ones_interpolate(device):
    torch.manual_seed(0)
    conv = DeformableDepthwiseConv(1).to(device)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 4] = 1.0  # keep only the centre tap: output = x(p + Δp)
    x = torch.randn(1, 1, 4, 6, device=device)
    offsets = torch.zeros(1, 18, 4, 6, device=device)
    offsets[:, 8] = 1.0  # centre tap, dx = +1
    shifted = conv.sample(x, offsets)
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:])
    torch.testing.assert_close(shifted[..., -1], torch.zeros_like(x[..., -1]))  # outside: zero
    offsets[:, 8] = 0.25
    torch.testing.assert_close(conv.sample(x, offsets)[..., :-1], 0.75 * x[..., :-1] + 0.25 * x[..., 1:])


def test_offsets_are_learned_from_the_features(device, params_with_grad):
    model = make(device)
    out = model(torch.randn(2, 3, 8, 8, device=device))
    names = params_with_grad(model, out["seg"].square().mean())
    for t in TASKS:  # both tasks' mixers (and their offset nets) feed seg via interaction
        assert f"mixers.{t}.spatial.offset.weight" in names, t
    assert not any(n.startswith(("task_query.depth.", "heads.depth.")) for n in names)


def test_queries_set_the_output_tokens_keys_are_an_unordered_set(device):
    torch.manual_seed(0)
    block = CrossAttention(8).to(device)
    q, ctx = torch.randn(2, 5, 8, device=device), torch.randn(2, 11, 8, device=device)
    out = block(q, ctx)
    assert out.shape == (2, 5, 8)  # one output per query token, however many keys
    perm_k, perm_q = torch.randperm(11), torch.randperm(5)
    torch.testing.assert_close(block(q, ctx[:, perm_k]), out)  # keys/values: permutation invariant
    torch.testing.assert_close(block(q[:, perm_q], ctx), out[:, perm_q])  # queries: equivariant


def test_task_query_reads_the_interacted_features_of_all_tasks(device):
    model = make(device)
    with torch.no_grad():
        deformed = model.deformed_features(torch.randn(1, 3, 8, 8, device=device))
        before = model.decode_tasks(deformed, (8, 8))["seg"]
        deformed["depth"] = deformed["depth"] + torch.randn_like(deformed["depth"])
        after = model.decode_tasks(deformed, (8, 8))["seg"]
    assert not torch.allclose(before, after)  # seg changed through depth's tokens
    shapes = {t: tuple(f.shape) for t, f in deformed.items()}
    assert shapes == {"seg": (1, 8, 4, 4), "depth": (1, 8, 4, 4)}  # 1/2 scale


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("demt", device)
    for dense in (True, False):
        first, last = short_training("demt", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("demt", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_mixer_is_residual_deformable_sampling_then_channel_mixing(device):
    """As the official DefMixer: x' = x + GELU(deform(x)), then GELU(1x1(x')) (BatchNorms left out)."""
    torch.manual_seed(0)
    mixer = DeformableMixer(4).to(device)
    with torch.no_grad():
        mixer.spatial.offset.weight.normal_(std=0.3)  # non-zero offsets: a truly deformed sampling
    x = torch.randn(2, 4, 5, 6, device=device)
    spatial = x + F.gelu(mixer.spatial.sample(x, mixer.spatial.offset(x)))
    expected = F.gelu(F.conv2d(spatial, mixer.channel_mix.weight, mixer.channel_mix.bias))
    torch.testing.assert_close(mixer(x), expected)


def test_cross_attention_by_hand(device):
    """queries + proj(softmax(q k^T / sqrt(d)) v) with q from LN(queries), k, v from LN(context); then + MLP."""
    torch.manual_seed(0)
    block = CrossAttention(8, num_heads=2).to(device)
    queries, context = torch.randn(2, 5, 8, device=device), torch.randn(2, 7, 8, device=device)
    q = block.q(block.norm_q(queries))
    k, v = block.kv(block.norm_kv(context)).chunk(2, dim=-1)
    heads = [torch.softmax(q[..., h:h + 4] @ k[..., h:h + 4].transpose(1, 2) / 2.0, -1) @ v[..., h:h + 4]
             for h in (0, 4)]
    x = queries + block.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(block(queries, context), x + block.mlp(block.norm_mlp(x)))


@pytest.mark.parametrize("dense", [True, False])
def test_decoding_by_hand_every_task_queries_the_interacted_tokens_with_its_own_block(device, dense):
    """Dense heads are upsampled bilinearly to the input; pooled ones average the head's map."""
    model = make(device, dense)
    with torch.no_grad():
        deformed = model.deformed_features(torch.randn(2, 3, 8, 8, device=device))
        out = model.decode_tasks(deformed, (8, 8))
        tokens = {t: f.flatten(2).transpose(1, 2) for t, f in deformed.items()}
        joint = torch.cat([tokens[t] for t in TASKS], dim=1)
        interacted = model.interaction(joint, joint)
        for t in TASKS:
            mine = model.task_query[t](tokens[t], interacted).transpose(1, 2).reshape(2, 8, 4, 4)
            head = model.heads[t](mine)
            expected = (F.interpolate(head, size=(8, 8), mode="bilinear", align_corners=False) if dense
                        else head.sum(dim=(2, 3)) / 16)
            torch.testing.assert_close(out[t], expected)


def test_task_specific_split_is_exactly_query_block_and_head(device, split_by_task):
    """Every task's mixer feeds all tasks through the interaction block; only its query block and head are its own."""
    model = make(device)
    split = split_by_task(model, torch.randn(2, 3, 8, 8, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"task_query.{t}.", f"heads.{t}."))


def test_every_cross_attention_mlp_has_a_gelu_and_deformed_features_are_the_mixers_of_the_backbone():
    from reference_impls.architectures.demt import CrossAttention
    from reference_impls.architectures.registry import Problem, build

    from .conftest import assert_mlps_have_a_gelu

    torch.manual_seed(0)
    model = build("demt", Problem(("a", "b"), (3, 16, 16), {"a": 1, "b": 2}, dense=True))
    assert_mlps_have_a_gelu(m.mlp for m in model.modules() if isinstance(m, CrossAttention))
    x = torch.randn(2, 3, 16, 16)
    deformed = model.deformed_features(x)
    for t in model.tasks:
        torch.testing.assert_close(deformed[t], model.mixers[t](model.backbone(x)))


def test_vertical_offsets_shift_rows_and_the_bias_is_added(device):
    """Offset channel 2k + 1 is tap k's dy (down is positive); the per-channel bias is added after the sum.
    The offset predictor has two channels, (dx, dy), per tap."""
    torch.manual_seed(0)
    conv = DeformableDepthwiseConv(1).to(device)
    assert conv.offset.out_channels == 18
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 4] = 1.0  # centre tap only: output = x(p + Δp) + bias
        conv.bias.fill_(0.5)
    x = torch.randn(1, 1, 4, 6, device=device)
    offsets = torch.zeros(1, 18, 4, 6, device=device)
    offsets[:, 9] = 1.0  # centre tap, dy = +1
    shifted = conv.sample(x, offsets)
    torch.testing.assert_close(shifted[:, :, :-1], x[:, :, 1:] + 0.5)
    torch.testing.assert_close(shifted[:, :, -1], torch.full_like(x[:, :, -1], 0.5))  # outside: zero, plus bias


def test_zero_offsets_with_a_5x5_kernel_are_the_ordinary_depthwise_convolution(device):
    """The tap grid is centred for any odd kernel size: k x k taps at -(k // 2) .. k // 2."""
    torch.manual_seed(0)
    conv = DeformableDepthwiseConv(2, kernel_size=5).to(device)
    x = torch.randn(1, 2, 6, 7, device=device)
    expected = F.conv2d(x, conv.weight.view(2, 1, 5, 5), conv.bias, padding=2, groups=2)
    torch.testing.assert_close(conv(x), expected)


def test_num_heads_reaches_every_attention_block_and_defaults_are_one_head_dense():
    """DeMT's own defaults: one head, dense per-pixel outputs; num_heads (also through the registry) sets
    the heads of the interaction block and of every task query block."""
    torch.manual_seed(0)
    default = DeMT(TASKS, 3, OUT, channels=8)
    assert default.interaction.num_heads == 1 and default.task_query["seg"].num_heads == 1
    assert default(torch.randn(1, 3, 4, 4))["seg"].shape == (1, 3, 4, 4)
    problem = registry.Problem(TASKS, (3, 2, 2), OUT, dense=True)  # the smallest image: 2 x 2, halved to 1 x 1
    model = registry.build("demt", problem, width=8, num_heads=4)
    blocks = [model.interaction, *model.task_query.values()]
    assert [b.num_heads for b in blocks] == [4, 4, 4]
    assert model(torch.randn(2, 3, 2, 2))["depth"].shape == (2, 1, 2, 2)
