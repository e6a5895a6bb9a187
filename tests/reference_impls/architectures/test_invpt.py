"""InvPT: attention spans all tasks' tokens, resolution doubles per stage, only heads are task-specific."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.invpt import InvPT, JointTaskBlock

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, **kw):
    torch.manual_seed(0)
    return InvPT(TASKS, 3, OUT, channels=8, **kw).to(device)


def test_one_token_of_task_b_reaches_every_pixel_of_task_a(device):
    model = make(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        feats, preds, encoder = model.preliminary_decoding(x)
        before = model.heads_from_tokens(model.decode_stages(feats, preds, encoder)[-1], (16, 16))
        feats["depth"] = feats["depth"].clone()
        feats["depth"][:, :, 0, 0] += 1.0  # one corner token of the *other* task
        after = model.heads_from_tokens(model.decode_stages(feats, preds, encoder)[-1], (16, 16))
    changed = (after["seg"] - before["seg"]).abs().amax(dim=1)
    assert (changed > 1e-7).all()  # global + cross-task: even the opposite corner moves


def test_joint_attention_rows_cover_all_tasks_and_sum_to_one(device):
    torch.manual_seed(0)
    block = JointTaskBlock(8, num_heads=2, kv_pool=2).to(device)
    maps = torch.randn(1, 3, 8, 4, 6, device=device)  # 3 tasks, 4x6 maps
    w = block.attention(maps)
    assert w.shape == (1, 2, 3 * 4 * 6, 3 * 2 * 3)  # queries: all tokens, keys: pooled by 2
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 72, device=device))
    per_task_mass = w.reshape(1, 2, 72, 3, 6).sum(-1)
    assert (per_task_mass > 0).all()  # every query puts weight on every task's keys


def test_resolution_doubles_per_stage_and_outputs_at_input_size(device):
    model = make(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    feats, preds, encoder = model.preliminary_decoding(x)
    assert feats["seg"].shape == (2, 8, 8, 8) and preds["depth"].shape == (2, 1, 8, 8)
    assert encoder.half.shape == (2, 8, 16, 16) and encoder.quarter.shape == (2, 8, 8, 8)
    stages = model.decode_stages(feats, preds, encoder)
    assert [tuple(s.shape) for s in stages] == [(2, 2, 8, 8, 8), (2, 2, 8, 16, 16)]
    out = model(x)
    assert {t: tuple(o.shape) for t, o in out.items()} == {"seg": (2, 3, 32, 32), "depth": (2, 1, 32, 32)}


def test_task_loss_reaches_every_preliminary_decoder_but_only_its_own_head(device, params_with_grad):
    model = make(device)
    out = model(torch.randn(2, 3, 16, 16, device=device))
    names = params_with_grad(model, out["seg"].square().mean())
    for t in TASKS:
        assert any(n.startswith(f"preliminary.{t}.") for n in names), t
        assert any(n.startswith(f"to_tokens.{t}.") for n in names), t
    assert {n for n in names if n.startswith("heads.")} == {"heads.seg.weight", "heads.seg.bias"}


def test_parameter_counts():
    c, K = 8, len(TASKS)
    conv3 = lambda i, o: 9 * i * o + o  # noqa: E731
    block = 3 * 2 * c + (c * c + c) + (c * 2 * c + 2 * c) + (c * c + c) + (c * 2 * c + 2 * c) + (2 * c * c + c)
    shared = (conv3(3, c) + 2 * conv3(c, c) + K * conv3(c, c)
              + sum(c * o + o + (c + o) * c + c for o in OUT.values())  # predictors + token projections
              + 2 * block + conv3(c, c) + (c * c + c))
    model = make("cpu")
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t, o in OUT.items():
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == c * o + o


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("invpt", device)
    for dense in (True, False):
        first, last = short_training("invpt", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("invpt", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_keys_pool_odd_maps_in_non_overlapping_windows_as_the_release_does():
    """A 5x5 map pooled by 2: windows at columns (0, 1), (2, 3) and (4) alone, each averaging what
    it holds (the release's AvgPool2d with ceil_mode); an adaptive pool's bins would overlap."""
    block = JointTaskBlock(1, num_heads=1, kv_pool=2)
    maps = torch.arange(25.0).reshape(1, 1, 1, 5, 5)
    pooled = block._pooled_tokens(maps).reshape(3, 3)
    assert pooled[0].tolist() == [3.0, 5.0, 6.5]  # (0+1+5+6)/4, (2+3+7+8)/4, (4+9)/2
    assert pooled[2].tolist() == [20.5, 22.5, 24.0]  # the last row of windows holds one row of the map


def test_joint_block_by_hand_with_average_pooled_keys(device):
    """x + proj(softmax(q k^T / sqrt(d)) v), q from LN(x), k, v from LN(avg-pooled x); then + MLP(LN(.))."""
    torch.manual_seed(0)
    block = JointTaskBlock(8, num_heads=2, kv_pool=2).to(device)
    maps = torch.randn(2, 3, 8, 4, 6, device=device)
    tokens = maps.permute(0, 1, 3, 4, 2).reshape(2, 72, 8)
    pooled = torch.nn.functional.avg_pool2d(maps.reshape(6, 8, 4, 6), 2).reshape(2, 3, 8, 6)
    pooled = pooled.permute(0, 1, 3, 2).reshape(2, 18, 8)
    q = block.q(block.norm_q(tokens))
    k, v = block.kv(block.norm_kv(pooled)).chunk(2, dim=-1)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / 2.0, dim=-1)
        heads.append(weights @ v[..., part])
    mixed = tokens + block.proj(torch.cat(heads, dim=-1))
    expected = mixed + block.mlp(block.norm_mlp(mixed))
    torch.testing.assert_close(block(maps), expected.reshape(2, 3, 4, 6, 8).permute(0, 1, 4, 2, 3))


def test_tokens_read_the_preliminary_predictions_and_stage2_the_encoder_skip(device):
    model = make(device)
    with torch.no_grad():
        feats, preds, encoder = model.preliminary_decoding(torch.randn(1, 3, 16, 16, device=device))
        stage1, stage2 = model.decode_stages(feats, preds, encoder)
        moved = {**preds, "depth": preds["depth"] + 1.0}  # [F_t; P_t] is projected to tokens
        assert not torch.allclose(model.decode_stages(feats, moved, encoder)[0], stage1)
        skipped = model.decode_stages(feats, preds, encoder._replace(half=encoder.half + 1.0))
        torch.testing.assert_close(skipped[0], stage1)  # 1/2-scale features enter stage 2 only
        assert not torch.allclose(skipped[1], stage2)
        # the 1/4-scale map reaches the decoder only through the task features computed from it
        for stage, same in zip(model.decode_stages(feats, preds, encoder._replace(quarter=encoder.quarter + 1.0)),
                               (stage1, stage2)):
            torch.testing.assert_close(stage, same)


def _decoder_by_hand(model, x):
    """Stage-2 input and output maps, recomputed from the modules without decode_stages."""
    half = model.down_half(model.stem(x))
    quarter = model.down_quarter(half)
    feats = {t: model.preliminary[t](quarter) for t in TASKS}
    preds = {t: model.preliminary_predictors[t](feats[t]) for t in TASKS}  # P_t from the task's own F_t
    maps = torch.stack([model.to_tokens[t](torch.cat([feats[t], preds[t]], 1)) for t in TASKS], 1)
    s1 = model.stage1(maps)
    b, t, c, h, w = s1.shape
    up = torch.nn.functional.interpolate(s1.reshape(b * t, c, h, w), size=(2 * h, 2 * w), mode="bilinear")
    up = torch.relu(model.upsample_refine(up)).reshape(b, t, c, 2 * h, 2 * w)
    s2_in = up + model.encoder_skip(half).unsqueeze(1)
    return maps, preds, s2_in, model.stage2(s2_in)


def test_decoder_and_heads_by_hand_with_keys_pooled_only_in_the_finer_stage(device):
    model = make(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    maps, preds, s2_in, s2 = _decoder_by_hand(model, x)
    got, got_preds = model.forward_with_intermediate(x)
    for t in TASKS:
        torch.testing.assert_close(got_preds[t], preds[t])
    # Stage 1 (4x4 maps) attends to every token; stage 2 (8x8) to keys average-pooled by 2.
    assert model.stage1.attention(maps).shape[-2:] == (2 * 16, 2 * 16)
    assert model.stage2.attention(s2_in).shape[-2:] == (2 * 64, 2 * 16)
    for i, t in enumerate(TASKS):
        dense = torch.nn.functional.interpolate(model.heads[t](s2[:, i]), size=(16, 16), mode="bilinear")
        torch.testing.assert_close(got[t], dense)
    pooled = make(device, dense=False)
    s2 = _decoder_by_hand(pooled, x)[-1]
    for i, t in enumerate(TASKS):  # image-level tasks: the head's map averaged over space
        torch.testing.assert_close(pooled(x)[t], pooled.heads[t](s2[:, i]).mean(dim=(2, 3)))


def test_every_joint_task_block_mlp_has_a_gelu():
    from reference_impls.architectures.invpt import JointTaskBlock
    from reference_impls.architectures.registry import Problem, build

    from .conftest import assert_mlps_have_a_gelu

    torch.manual_seed(0)
    model = build("invpt", Problem(("a", "b"), (3, 16, 16), {"a": 1, "b": 2}, dense=True))
    assert_mlps_have_a_gelu(m.mlp for m in model.modules() if isinstance(m, JointTaskBlock))


def test_defaults_build_and_num_heads_reaches_both_joint_stages_also_through_the_registry():
    torch.manual_seed(0)
    assert InvPT(TASKS, 3, OUT)(torch.randn(1, 3, 8, 8))["seg"].shape == (1, 3, 8, 8)
    model = make("cpu", num_heads=4)
    assert model.stage1.num_heads == model.stage2.num_heads == 4
    problem = registry.Problem(TASKS, (3, 8, 8), OUT, dense=True)
    model = InvPT.from_problem(problem, width=8, num_heads=4)
    assert model.stage1.num_heads == model.stage2.num_heads == 4
    _, weights = model.stage1._attend(torch.randn(1, 2, 8, 2, 2))
    assert weights.shape[1] == 4  # four attention maps per query
