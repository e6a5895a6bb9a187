"""InvPT++: the finer stage's attention is shaped by the coarser stage's scores (fusion or selective)."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.invpt import InvPT, JointTaskBlock
from reference_impls.architectures.invpt_plus_plus import CrossScaleJointBlock, InvPTPlusPlus, resample_scores

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, **kw):
    torch.manual_seed(0)
    return InvPTPlusPlus(TASKS, 3, OUT, channels=8, **kw).to(device)


def stages(model, x):
    feats, preds, encoder = model.preliminary_decoding(x)
    return model.decode_stages_with_attention(feats, preds, encoder), (feats, preds, encoder)


def stage2_input_and_stage1_scores(model, x):
    """Recomputed from the modules: stage 1's pre-softmax scores and stage 2's input maps."""
    feats, preds, (half, quarter) = model.preliminary_decoding(x)
    torch.testing.assert_close(quarter, model.down_quarter(half))  # the encoder's 1/4-scale map
    maps = torch.stack([model.to_tokens[t](torch.cat([feats[t], preds[t]], 1)) for t in TASKS], 1)
    maps = maps + model.encoder_skip_quarter(quarter).unsqueeze(1)
    s1_out, _, s1_scores = model.stage1.attend_across_scales(maps, None)
    b, t, c, h, w = s1_out.shape
    up = F.interpolate(s1_out.reshape(b * t, c, h, w), size=half.shape[-2:], mode="bilinear")
    up = torch.relu(model.upsample_refine(up)).reshape(b, t, c, *half.shape[-2:])
    return up + model.encoder_skip(half).unsqueeze(1), s1_scores, (h, w)


def upsample_queries_by_hand(scores, tasks, grid, new_grid):
    """Each task's block of query rows is a map over its query grid: resize it, key by key."""
    b, heads, _, keys = scores.shape
    rows = []
    for i in range(tasks):
        block = scores[:, :, i * grid[0] * grid[1]:(i + 1) * grid[0] * grid[1]]  # (B, H, qh*qw, K)
        block = block.permute(0, 1, 3, 2).reshape(b * heads, keys, *grid)
        block = F.interpolate(block, size=new_grid, mode="bilinear")
        rows.append(block.reshape(b, heads, keys, -1).permute(0, 1, 3, 2))
    return torch.cat(rows, dim=2)


def test_fusion_mixes_own_and_upsampled_coarse_scores_over_heads_before_the_softmax(device):
    """A_2 = softmax(W_fuse [S_2 ; up(S_1)]): a 1x1 map over the 2H stacked heads, current first."""
    model = make(device, cross_scale="fusion")
    x = torch.randn(2, 3, 16, 16, device=device)  # stage 1: 4x4 maps; stage 2: 8x8 queries, 4x4 pooled keys
    with torch.no_grad():
        s2_in, s1_scores, grid = stage2_input_and_stage1_scores(model, x)
        own, _, _ = model.stage2.scores(s2_in)
        passed_up = upsample_queries_by_hand(s1_scores, 2, grid, (8, 8))
        weight = model.stage2.fuse.weight[:, :, 0, 0]  # (H, 2H)
        fused = (torch.einsum("gh,bhqk->bgqk", weight[:, :2], own)
                 + torch.einsum("gh,bhqk->bgqk", weight[:, 2:], passed_up))
        (_, _), (_, weights2) = stages(model, x)[0]
    assert weights2.shape == (2, 2, 2 * 64, 2 * 16)
    torch.testing.assert_close(weights2, torch.softmax(fused, dim=-1))


def test_selective_attends_only_to_the_keys_the_coarse_scores_rank_highest(device):
    """Per query and head: weight on exactly the top ⌈ρK⌉ keys of up(S_1), softmax of S_2 over them."""
    model = make(device, cross_scale="selective", keep_ratio=0.25)
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        s2_in, s1_scores, grid = stage2_input_and_stage1_scores(model, x)
        own, _, _ = model.stage2.scores(s2_in)
        ranked = upsample_queries_by_hand(s1_scores, 2, grid, (8, 8))
        (_, _), (_, weights2) = stages(model, x)[0]
    keep = math.ceil(0.25 * 32)  # 2 tasks x 4x4 pooled keys
    chosen = torch.zeros_like(own, dtype=torch.bool).scatter(-1, ranked.topk(keep, dim=-1).indices, True)
    assert ((weights2 > 0) == chosen).all()
    assert (chosen.sum(-1) == keep).all()
    expected = torch.softmax(own.masked_fill(~chosen, float("-inf")), dim=-1)
    torch.testing.assert_close(weights2, expected)


@pytest.mark.parametrize("mode", ["fusion", "selective", "none"])
def test_gradient_reaches_the_coarse_scores_only_through_fusion(mode, device):
    """Fusion reads S_1's values; the selective mask only reads its ranking; "none" ignores it."""
    torch.manual_seed(0)
    block = CrossScaleJointBlock(8, num_heads=2, kv_pool=2, cross_scale=mode).to(device)
    maps = torch.randn(1, 2, 8, 4, 4, device=device)
    previous = torch.randn(1, 2, 2 * 4, 2 * 4, device=device, requires_grad=True)  # 2x2 queries, 2x2 keys
    out, _, _ = block.attend_across_scales(maps, (previous, (2, 2), (2, 2)))
    (grad,) = torch.autograd.grad(out.square().sum(), previous, allow_unused=True)
    if mode == "fusion":
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0


def test_fusion_and_selective_change_the_output_that_plain_attention_gives():
    torch.manual_seed(0)
    maps = torch.randn(1, 2, 8, 4, 4)
    previous = torch.randn(1, 2, 2 * 4, 2 * 4)
    outs = {}
    for mode in ("none", "fusion", "selective"):
        torch.manual_seed(1)
        block = CrossScaleJointBlock(8, num_heads=2, kv_pool=2, cross_scale=mode, keep_ratio=0.5)
        outs[mode] = block.attend_across_scales(maps, (previous, (2, 2), (2, 2)))[0]
    torch.manual_seed(1)
    plain = CrossScaleJointBlock(8, num_heads=2, kv_pool=2)
    torch.testing.assert_close(outs["none"], plain.attend_across_scales(maps, None)[0])
    torch.manual_seed(1)
    torch.testing.assert_close(outs["none"], JointTaskBlock(8, num_heads=2, kv_pool=2)(maps))  # InvPT's block
    assert not torch.allclose(outs["fusion"], outs["none"])
    assert not torch.allclose(outs["selective"], outs["none"])


def test_resample_scores_resizes_each_task_query_grid_and_key_grid_bilinearly():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 2 * 2 * 3, 2 * 3 * 3)  # 2 tasks, 2x3 query grids, 3x3 key grids
    same = resample_scores(scores, 2, (2, 3), (3, 3), (2, 3), (3, 3))
    torch.testing.assert_close(same, scores)
    grown = resample_scores(scores, 2, (2, 3), (3, 3), (4, 6), (3, 3))
    torch.testing.assert_close(grown, upsample_queries_by_hand(scores, 2, (2, 3), (4, 6)))
    keyed = resample_scores(scores, 2, (2, 3), (3, 3), (2, 3), (2, 2))
    row = scores[1, 2, 5].reshape(2, 3, 3)  # one query's scores over each task's 3x3 key grid
    by_hand = F.interpolate(row[None], size=(2, 2), mode="bilinear").reshape(-1)
    torch.testing.assert_close(keyed[1, 2, 5], by_hand)


def test_odd_images_resample_the_key_grid_and_still_decode():
    """10x10: stage 1 sees 2x2 maps, stage 2 5x5 queries with 3x3 pooled keys: keys are resampled."""
    model = make("cpu", cross_scale="selective")
    x = torch.randn(1, 3, 10, 10)
    ((s1, w1), (s2, w2)), _ = stages(model, x)
    assert w1.shape[-1] == 2 * 4 and w2.shape[-2:] == (2 * 25, 2 * 9)
    assert {t: tuple(o.shape) for t, o in model(x).items()} == {"seg": (1, 3, 10, 10), "depth": (1, 1, 10, 10)}


def test_encoder_features_are_aggregated_into_both_stages(device):
    """Unlike InvPT, the encoder reaches stage 1 through its own skip, not only through the tokens."""
    model = make(device)
    with torch.no_grad():
        feats, preds, encoder = model.preliminary_decoding(torch.randn(1, 3, 16, 16, device=device))
        before = model.decode_stages(feats, preds, encoder)  # tokens (feats, preds) held fixed below
        quarter_moved = model.decode_stages(feats, preds, encoder._replace(quarter=encoder.quarter + 0.5))
        assert not torch.allclose(quarter_moved[0], before[0]) and not torch.allclose(quarter_moved[1], before[1])
        half_moved = model.decode_stages(feats, preds, encoder._replace(half=encoder.half + 0.5))
        torch.testing.assert_close(half_moved[0], before[0])  # the 1/2-scale map enters stage 2 only
        assert not torch.allclose(half_moved[1], before[1])
        model.encoder_skip_quarter.weight.zero_()
        model.encoder_skip_quarter.bias.zero_()
        torch.testing.assert_close(model.decode_stages(feats, preds, encoder._replace(quarter=encoder.quarter + 0.5)),
                                   model.decode_stages(feats, preds, encoder))


def test_parameters_beyond_invpt_and_the_task_specific_split():
    c, heads = 8, 2
    torch.manual_seed(0)
    invpt = sum(p.numel() for p in InvPT(TASKS, 3, OUT, channels=c).parameters())
    skip = c * c + c
    fuse = 2 * heads * heads  # no bias: it would cancel in the softmax
    assert sum(p.numel() for p in make("cpu", cross_scale="fusion").parameters()) == invpt + skip + fuse
    assert sum(p.numel() for p in make("cpu", cross_scale="selective").parameters()) == invpt + skip
    model = make("cpu")
    for t, o in OUT.items():
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == c * o + o


def test_registry_shapes_training_defaults_and_bad_arguments(device, registry_output_shapes, short_training):
    registry_output_shapes("invpt_plus_plus", device)
    for dense in (True, False):
        first, last = short_training("invpt_plus_plus", dense, device, steps=25)
        assert last < 0.7 * first, dense
    model = InvPTPlusPlus.from_problem(registry.Problem(TASKS, (3, 8, 8), OUT, dense=True), width=8,
                                       cross_scale="selective", keep_ratio=0.75, num_heads=4)
    assert model.stage2.cross_scale == "selective" and model.stage2.keep_ratio == 0.75
    assert model.stage1.num_heads == model.stage2.num_heads == 4
    assert make("cpu").stage2.cross_scale == "fusion"  # the default
    with pytest.raises(ValueError, match="cross_scale"):
        make("cpu", cross_scale="both")
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            make("cpu", keep_ratio=bad)
    with pytest.raises(ValueError, match="image"):
        registry.build("invpt_plus_plus", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_a_cross_scale_block_built_with_defaults_is_invpts_block():
    """Two heads, no pooling, no cross-scale attention: the same output as InvPT's JointTaskBlock(8)."""
    maps = torch.randn(1, 2, 8, 4, 4)
    torch.manual_seed(1)
    block = CrossScaleJointBlock(8)
    torch.manual_seed(1)
    torch.testing.assert_close(block.attend_across_scales(maps, None)[0], JointTaskBlock(8)(maps))
    assert block.num_heads == 2


@pytest.mark.parametrize("mode", ["fusion", "selective"])
def test_with_nothing_passed_up_a_cross_scale_block_attends_as_invpts(mode):
    """``previous=None`` (a first stage): the fusion and selective blocks fall back to plain attention."""
    maps = torch.randn(1, 2, 8, 4, 4)
    torch.manual_seed(1)
    block = CrossScaleJointBlock(8, num_heads=2, kv_pool=2, cross_scale=mode)
    torch.manual_seed(1)
    torch.testing.assert_close(block.attend_across_scales(maps, None)[0], JointTaskBlock(8, 2, kv_pool=2)(maps))


def test_selective_with_keep_ratio_one_keeps_every_key():
    """ρ = 1 is allowed (the share kept is at most 1) and masks nothing: plain attention."""
    maps, previous = torch.randn(1, 2, 8, 4, 4), torch.randn(1, 2, 2 * 4, 2 * 4)
    torch.manual_seed(1)
    block = CrossScaleJointBlock(8, num_heads=2, kv_pool=2, cross_scale="selective", keep_ratio=1.0)
    torch.manual_seed(1)
    plain = CrossScaleJointBlock(8, num_heads=2, kv_pool=2)
    torch.testing.assert_close(block.attend_across_scales(maps, (previous, (2, 2), (2, 2)))[0],
                               plain.attend_across_scales(maps, None)[0])


def test_a_tiny_keep_ratio_keeps_one_key_the_coarse_argmax():
    """⌈0.1 · 8⌉ = 1 of the 8 pooled keys: each query attends only to its top key under up(S_1)."""
    torch.manual_seed(0)
    block = CrossScaleJointBlock(8, num_heads=2, kv_pool=2, cross_scale="selective", keep_ratio=0.1)
    maps, previous = torch.randn(1, 2, 8, 4, 4), torch.randn(1, 2, 2 * 4, 2 * 4)
    _, weights, _ = block.attend_across_scales(maps, (previous, (2, 2), (2, 2)))
    passed_up = resample_scores(previous, 2, (2, 2), (2, 2), (4, 4), (2, 2))
    assert weights.shape[-1] == 8
    torch.testing.assert_close(weights, F.one_hot(passed_up.argmax(-1), 8).to(weights))


def test_constructor_defaults_are_invpts_sixteen_channels_and_two_heads():
    """Built with defaults: InvPT's parameters at 16 channels plus the 16-channel skip and the 2-head W_fuse."""
    torch.manual_seed(0)
    invpt = sum(p.numel() for p in InvPT(TASKS, 3, OUT).parameters())
    model = InvPTPlusPlus(TASKS, 3, OUT)
    assert sum(p.numel() for p in model.parameters()) == invpt + (16 * 16 + 16) + 2 * 2 * 2
    assert {t: tuple(o.shape) for t, o in model(torch.randn(1, 3, 8, 8)).items()} == {"seg": (1, 3, 8, 8),
                                                                                      "depth": (1, 1, 8, 8)}


def test_any_head_count_that_splits_the_channels_is_accepted():
    """9 channels in 3 heads of 3: valid for every stage, though 9 does not split into InvPT's default 2 heads."""
    model = InvPTPlusPlus(TASKS, 3, OUT, channels=9, num_heads=3)
    assert model.stage1.num_heads == model.stage2.num_heads == 3
    assert model(torch.randn(1, 3, 8, 8))["seg"].shape == (1, 3, 8, 8)
