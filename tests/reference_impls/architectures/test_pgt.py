"""PGT: shared weights, task prompts inside self-attention decide each task's features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.pgt import PGT, MultiScaleFusion, PatchMerging, PromptConditionedBlock
from reference_impls.architectures.registry import Problem

TASKS = ("seg", "depth", "sal")
OUT = {"seg": 3, "depth": 1, "sal": 1}


def build(device, tasks=TASKS, num_prompts=3, **kw):
    torch.manual_seed(0)
    out_dims = {t: OUT[t] for t in tasks}
    return PGT(tasks, (3, 8, 8), out_dims, dim=8, num_heads=2, num_prompts=num_prompts, **kw).to(device)


def test_block_attention_reads_prompts_as_keys_and_values(device):
    torch.manual_seed(0)
    block = PromptConditionedBlock(dim=4, num_heads=1).to(device)
    x, prompts = torch.randn(2, 5, 4, device=device), torch.randn(3, 4, device=device)
    normed = block.norm1(x)
    w_q, w_k, w_v = block.qkv.weight.split(4)
    b_q, b_k, b_v = block.qkv.bias.split(4)
    context = torch.cat([prompts.expand(2, -1, -1), normed], 1)  # [P; LN(X)], prompts unnormalised
    mixed = F.scaled_dot_product_attention(normed @ w_q.T + b_q, context @ w_k.T + b_k, context @ w_v.T + b_v)
    after_attention = x + block.proj(mixed)
    expected = after_attention + block.mlp(block.norm2(after_attention))
    torch.testing.assert_close(block(x, prompts), expected)
    # Without prompts it is an ordinary pre-LN self-attention block.
    plain = F.scaled_dot_product_attention(normed @ w_q.T + b_q, normed @ w_k.T + b_k, normed @ w_v.T + b_v)
    torch.testing.assert_close(block.attend(x, None), block.proj(plain))


def test_two_heads_each_scaled_by_their_own_width(device):
    """Multi-head: heads split the width, each softmax scaled by sqrt(C / heads), then one projection."""
    torch.manual_seed(0)
    block = PromptConditionedBlock(dim=8, num_heads=2).to(device)
    x, prompts = torch.randn(2, 5, 8, device=device), torch.randn(3, 8, device=device)
    context = torch.cat([prompts.expand(2, -1, -1), block.norm1(x)], 1)
    q, k, v = block.qkv(context).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        scores = q[:, 3:, cols] @ k[:, :, cols].transpose(1, 2) / 2.0  # sqrt(4)
        heads.append(scores.softmax(dim=-1) @ v[:, :, cols])
    torch.testing.assert_close(block.attend(x, prompts), block.proj(torch.cat(heads, dim=-1)))


def test_patch_merging_reads_exactly_its_2x2_neighbourhood():
    """Merged token (i, j) depends on the tokens of grid cells 2i..2i+1 x 2j..2j+1 and no others."""
    torch.manual_seed(0)
    merge, grid = PatchMerging(3), (4, 6)
    tokens = torch.randn(1, 24, 3)
    jac = torch.autograd.functional.jacobian(lambda z: merge(z, grid), tokens)  # (1, 6, 6, 1, 24, 3)
    reads = jac[0].abs().sum(dim=(1, 2, -1)).reshape(6, 4, 6) > 0  # merged token -> input cells
    for m in range(6):
        i, j = divmod(m, 3)
        expected = torch.zeros(4, 6, dtype=torch.bool)
        expected[2 * i:2 * i + 2, 2 * j:2 * j + 2] = True
        assert torch.equal(reads[m], expected), m


def test_fusion_resizes_every_stage_bilinearly_to_the_finest_grid(device):
    torch.manual_seed(0)
    fusion = MultiScaleFusion([4, 8], 4).to(device)
    grids = [(4, 4), (2, 2)]
    stages = [torch.randn(2, 16, 4, device=device), torch.randn(2, 4, 8, device=device)]
    maps = [p(s).transpose(1, 2).reshape(2, 4, *g) for p, s, g in zip(fusion.project, stages, grids)]
    maps[1] = F.interpolate(maps[1], size=(4, 4), mode="bilinear", align_corners=False)
    fused = F.conv2d(torch.cat(maps, dim=1), fusion.fuse[0].weight)  # 1x1, no bias
    normed = F.batch_norm(fused, None, None, training=True)  # batch statistics; unit scale, zero shift at init
    expected = F.leaky_relu(normed, 0.01).flatten(2).transpose(1, 2)
    torch.testing.assert_close(fusion(stages, grids), expected)


def test_block_mlp_ratio_is_two():
    """LN 2 x 2C, qkv 3C^2 + 3C, projection C^2 + C, MLP C -> 2C -> C: 600 weights at C = 8."""
    block = PromptConditionedBlock(dim=8, num_heads=2)
    assert sum(p.numel() for p in block.parameters()) == 32 + 216 + 72 + (8 * 16 + 16 + 16 * 8 + 8)


def test_second_stage_doubles_width_and_heads(device):
    """Swin layout: stage s has width C 2^s and heads 2^s times the first stage's (head width kept)."""
    model = build(device, num_prompts=3)
    block, prompts = model.stages[1][0], model.encoder_prompts["seg"][1][0]
    x = torch.randn(2, 4, 16, device=device)
    outputs = {}
    for heads in (2, 4):
        reference = PromptConditionedBlock(dim=16, num_heads=heads).to(device)
        reference.load_state_dict(block.state_dict())
        outputs[heads] = reference(x, prompts)
    torch.testing.assert_close(block(x, prompts), outputs[4])
    assert (outputs[4] - outputs[2]).abs().max() > 1e-4


def test_prompts_are_an_unordered_set_and_change_every_patch(device):
    torch.manual_seed(0)
    block = PromptConditionedBlock(dim=8, num_heads=2).to(device)
    x, prompts = torch.randn(1, 6, 8, device=device), torch.randn(4, 8, device=device)
    with_prompts = block(x, prompts)
    assert with_prompts.shape == x.shape  # prompt outputs are discarded, not carried on
    torch.testing.assert_close(block(x, prompts[[2, 0, 3, 1]]), with_prompts)  # no positions
    change = (with_prompts - block(x)).norm(dim=-1)
    assert (change > 1e-3).all()  # every patch token reads the prompts


def test_tasks_differ_only_through_their_prompts(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    own = {t: model.task_features(x, t) for t in TASKS}
    # With its own prompts each task gets different features from the same weights...
    for a, b in (("seg", "depth"), ("seg", "sal"), ("depth", "sal")):
        assert (own[a] - own[b]).abs().max() > 1e-2
    # ...and once every task holds seg's prompts, the features coincide.
    with torch.no_grad():
        for t in ("depth", "sal"):
            for s in range(len(model.stages)):
                model.encoder_prompts[t][s].copy_(model.encoder_prompts["seg"][s])
            model.decoder_prompts[t].copy_(model.decoder_prompts["seg"])
    for t in ("depth", "sal"):
        torch.testing.assert_close(model.task_features(x, t), own["seg"])


def test_with_no_prompts_it_is_one_plain_transformer_for_all_tasks(device):
    model = build(device, num_prompts=0)
    x = torch.randn(2, 3, 8, 8, device=device)
    plain = model.task_features(x, None)  # blocks called without any prompts
    for t in TASKS:
        torch.testing.assert_close(model.task_features(x, t), plain)
    assert sum(p.numel() for p in model.task_specific_parameters("seg")) == sum(
        p.numel() for p in model.heads["seg"].parameters()
    )


def test_swapping_two_tasks_prompts_swaps_their_features(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    before = {t: model.task_features(x, t) for t in TASKS}
    with torch.no_grad():
        for s in range(len(model.stages)):
            a, b = model.encoder_prompts["seg"][s], model.encoder_prompts["sal"][s]
            a_copy = a.clone()
            a.copy_(b)
            b.copy_(a_copy)
        a_copy = model.decoder_prompts["seg"].clone()
        model.decoder_prompts["seg"].copy_(model.decoder_prompts["sal"])
        model.decoder_prompts["sal"].copy_(a_copy)
    torch.testing.assert_close(model.task_features(x, "seg"), before["sal"])
    torch.testing.assert_close(model.task_features(x, "sal"), before["seg"])
    torch.testing.assert_close(model.task_features(x, "depth"), before["depth"])


def test_task_specific_parameters_are_prompts_and_head_only(device, n_params):
    model = build(device, depths=(2, 1), decoder_depth=2)
    dim, prompts, patch = 8, 3, model.tokenizer.patch
    # P (sum_s depth_s C_s + depth_dec C): prompts for every block, widths 8 then 16.
    prompt_count = prompts * (2 * dim + 1 * 2 * dim + 2 * dim)
    for t in TASKS:
        head = dim * OUT[t] * patch**2 + OUT[t] * patch**2  # one token -> p x p pixels
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == prompt_count + head
    # Task-conditional: the shared weights do not grow with the number of tasks.
    two_tasks = build(device, tasks=("seg", "depth"), depths=(2, 1), decoder_depth=2)
    assert sum(p.numel() for p in two_tasks.shared_parameters()) == sum(p.numel() for p in model.shared_parameters())
    assert n_params(model) - n_params(two_tasks) == prompt_count + (dim + 1) * patch**2  # sal's prompts and head


def test_each_task_loss_reaches_shared_weights_and_only_its_own_prompts(device, params_with_grad):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    reached = params_with_grad(model, model(x)["depth"].square().mean())
    names = dict(model.named_parameters())
    shared = {n for n, p in names.items() if any(p is q for q in model.shared_parameters())}
    assert shared <= reached
    own = {n for n, p in names.items() if any(p is q for q in model.task_specific_parameters("depth"))}
    assert own <= reached
    for other in ("seg", "sal"):
        theirs = {n for n, p in names.items() if any(p is q for q in model.task_specific_parameters(other))}
        assert not theirs & reached
    assert {"encoder_prompts.depth.0", "encoder_prompts.depth.1", "decoder_prompts.depth"} <= reached


def test_every_block_reads_its_own_prompts(device):
    """Deep prompting: each encoder and decoder block has its own prompts, and each is used."""
    model = build(device, depths=(2, 1), decoder_depth=2)
    model(torch.randn(2, 3, 8, 8, device=device))["seg"].square().mean().backward()
    per_block = [*model.encoder_prompts["seg"], model.decoder_prompts["seg"]]
    for stacked in per_block:  # (blocks, prompts, width): every block's slice gets a gradient
        assert (stacked.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_rejects_vectors_and_grids_that_cannot_be_merged():
    with pytest.raises(ValueError, match="image"):
        PGT.from_problem(Problem(("a", "b"), (100,), {"a": 1, "b": 1}))
    with pytest.raises(ValueError, match="halved"):
        PGT(("a",), (1, 3, 3), {"a": 1})  # 3x3 grid of 1x1 patches


def test_prompt_init_bound_follows_patch_and_width():
    model = PGT(("a",), (3, 8, 8), {"a": 1}, dim=8)
    bound = math.sqrt(6.0 / (3 * model.tokenizer.patch**2 + 8))
    values = torch.cat([p.flatten() for p in model.task_specific_parameters("a") if p.ndim == 3])
    assert values.abs().max() <= bound and values.abs().max() > 0.8 * bound


@pytest.mark.parametrize("dense", [True, False])
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("pgt", device)
    first, last = short_training("pgt", dense, device, steps=30)
    assert last < 0.5 * first


def test_defaults_build_two_stages_and_one_prompted_decoder_block():
    # the docstring's layout: two encoder stages, then one more prompt-conditioned block in the decoder
    torch.manual_seed(0)
    model = PGT(("a",), (3, 8, 8), {"a": 2})
    assert len(model.stages) == 2 and len(model.merges) == 1 and len(model.decoder_blocks) == 1
    assert model(torch.randn(2, 3, 8, 8))["a"].shape == (2, 2, 8, 8)


def test_a_third_stage_halves_the_grid_again_and_doubles_the_width_again():
    torch.manual_seed(0)
    model = PGT(("a",), (3, 16, 16), {"a": 1}, dim=8, depths=(1, 1, 1))  # a 4x4 grid of 4x4 patches
    stages = model.encoder_features(torch.randn(2, 3, 16, 16), "a")
    assert [s.shape[1:] for s in stages] == [(16, 8), (4, 16), (1, 32)]
    assert model(torch.randn(2, 3, 16, 16))["a"].shape == (2, 1, 16, 16)


@pytest.mark.parametrize("input_shape, depths", [((1, 3, 4), (1, 1)),  # a 3x4 grid: 3 rows cannot halve
                                                 ((1, 24, 16), (1, 1, 1)),  # 6x4: 6 rows cannot halve twice
                                                 ((1, 16, 24), (1, 1, 1))])  # 4x6: 6 columns cannot either
def test_rejects_each_grid_side_that_cannot_be_halved_once_per_merge(input_shape, depths):
    with pytest.raises(ValueError, match="halved"):
        PGT(("a",), input_shape, {"a": 1}, dim=8, depths=depths)


def test_the_constructor_itself_rejects_vector_inputs_and_the_registry_passes_keywords_on():
    with pytest.raises(ValueError, match="image"):
        PGT(("a",), (12,), {"a": 1})
    model = PGT.from_problem(Problem(("a",), (3, 8, 8), {"a": 1}, dense=True), width=8, num_prompts=5)
    assert model.decoder_prompts["a"].shape == (1, 5, 8)
