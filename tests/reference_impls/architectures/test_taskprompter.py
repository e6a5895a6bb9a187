"""TaskPrompter: prompts are processed jointly with patches; features are read through them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.taskprompter import PromptedBlock, TaskPrompter

TASKS = ("seg", "depth", "sal")
OUT = {"seg": 3, "depth": 1, "sal": 1}


def build(device, **kw):
    torch.manual_seed(0)
    return TaskPrompter(TASKS, 3, OUT, image_size=(8, 8), patch_size=2, dim=8, num_heads=2, **kw).to(device)


def test_block_spatial_scores_are_prompt_to_patch_attention(device):
    torch.manual_seed(0)
    block = PromptedBlock(dim=4, num_heads=1, num_patches=5).to(device)
    patches, prompts = torch.randn(1, 5, 4, device=device), torch.randn(1, 2, 4, device=device)
    _, _, spatial, channel = block(patches, prompts)
    normed = block.norm1(torch.cat([prompts, patches], 1))[0]
    q, k, _ = block.qkv(normed).split(4, -1)
    torch.testing.assert_close(spatial[0, 0], q[:2] @ k[2:].T / 2.0)
    cp = block.to_channel_prompt(normed[:2])  # (T, N)
    torch.testing.assert_close(channel[0], cp @ normed[2:] / math.sqrt(5))
    assert spatial.shape == (1, 1, 2, 5) and channel.shape == (1, 2, 4)


@pytest.mark.parametrize("num_heads", (1, 2))
def test_block_output_by_hand_channel_read_writes_back_into_prompts_only(device, num_heads):
    """tokens + attn; prompts += W(softmax(cp C^T / sqrt N) C); then + MLP(LN(tokens)). Head h attends
    with channels h*d_h..(h+1)*d_h of q, k, v and the heads are joined per token before the projection
    (with one head, joining them wrongly goes unnoticed)."""
    torch.manual_seed(0)
    block = PromptedBlock(dim=4, num_heads=num_heads, num_patches=5).to(device)
    patches, prompts = torch.randn(1, 5, 4, device=device), torch.randn(1, 2, 4, device=device)
    new_patches, new_prompts, spatial, _ = block(patches, prompts)
    tokens = torch.cat([prompts, patches], 1)[0]
    normed = block.norm1(tokens)
    q, k, v = block.qkv(normed).split(4, -1)
    d_h = 4 // num_heads
    heads = []
    for h in range(num_heads):
        cols = slice(h * d_h, (h + 1) * d_h)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(d_h)
        torch.testing.assert_close(spatial[0, h], scores[:2, 2:])
        heads.append(torch.softmax(scores, -1) @ v[:, cols])
    tokens = tokens + block.proj(torch.cat(heads, -1))
    channels = normed[2:].T  # (C, N): each channel is an N-vector
    read = torch.softmax(block.to_channel_prompt(normed[:2]) @ channels.T / math.sqrt(5), -1) @ channels
    tokens = torch.cat([tokens[:2] + block.from_channel_prompt(read), tokens[2:]])
    tokens = tokens + block.mlp(block.norm2(tokens))
    torch.testing.assert_close(new_prompts[0], tokens[:2])
    torch.testing.assert_close(new_patches[0], tokens[2:])


def test_forward_reads_each_task_through_its_own_prompt_maps_by_hand(device):
    """Maps of the last block, normalised; F_t = fuse_t([proj_spa(F_spa); proj_chan(F_chan)]); pooled."""
    model = build(device, dense=False)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    patches = model.patch_embed(x).flatten(2).transpose(1, 2) + model.positions
    prompts = model.prompts.expand(2, -1, -1)
    for block in model.blocks:
        patches, prompts, spatial_scores, channel_scores = block(patches, prompts)
    feats = patches.transpose(1, 2).reshape(2, 8, 4, 4)
    for i, t in enumerate(TASKS):
        spa = feats.clone()
        for h in range(2):
            weight = (torch.softmax(spatial_scores[:, h, i], -1) * 16).view(2, 1, 4, 4)
            spa[:, 4 * h : 4 * h + 4] = weight * feats[:, 4 * h : 4 * h + 4] + feats[:, 4 * h : 4 * h + 4]
        chan = (torch.softmax(channel_scores[:, i], -1) * 8)[:, :, None, None] * feats + feats
        both = torch.cat([pointwise(model.spatial_proj[t], spa), pointwise(model.channel_proj[t], chan)], 1)
        fused = F.gelu(pointwise(model.fuse[t][0], both))  # one 1x1 conv + GELU
        torch.testing.assert_close(out[t], pointwise(model.heads[t], fused).mean(dim=(2, 3)))


def pointwise(conv, x):
    """A 1x1 convolution written as a per-pixel matrix product (fails for a wider kernel)."""
    weight = conv.weight.view(conv.out_channels, conv.in_channels)
    return torch.einsum("oc,bchw->bohw", weight, x) + conv.bias[:, None, None]


def test_task_features_follow_the_prompt_maps(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    feats, spatial, channel = model.encode_with_prompts(x)
    assert feats.shape == (2, 8, 4, 4) and spatial.shape == (2, 3, 2, 4, 4) and channel.shape == (2, 3, 8)
    torch.testing.assert_close(spatial.sum((-1, -2)), torch.full((2, 3, 2), 16.0, device=device))
    torch.testing.assert_close(channel.sum(-1), torch.full((2, 3), 8.0, device=device))
    spa, chan = model.task_features(feats, spatial, channel, 1)
    # Head h re-weights channels 4h..4h+3 by its attention map of prompt "depth".
    for h in range(2):
        block = feats[:, 4 * h : 4 * h + 4]
        torch.testing.assert_close(spa[:, 4 * h : 4 * h + 4], spatial[:, 1, h, None] * block + block)
    torch.testing.assert_close(chan, channel[:, 1, :, None, None] * feats + feats)


def test_prompts_are_jointly_processed(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    assert out["seg"].shape == (2, 3, 8, 8)
    out["depth"].sum().backward()
    # Every prompt shapes the shared tokens, so the depth loss reaches all of them...
    assert (model.prompts.grad.abs().sum(-1) > 0).all()
    # ...while other tasks' read-out modules stay untouched.
    for t in ("seg", "sal"):
        assert all(p.grad is None for p in model.task_specific_parameters(t))
    assert all(p.grad is not None for p in model.shared_parameters())


def test_changing_one_prompt_changes_that_tasks_maps(device):
    model = build(device)
    x = torch.randn(1, 3, 8, 8, device=device)
    _, s1, c1 = model.encode_with_prompts(x)
    with torch.no_grad():
        model.prompts[2].add_(torch.randn(8, device=device))  # not a constant: LayerNorm removes those
    _, s2, c2 = model.encode_with_prompts(x)
    assert not torch.allclose(s1[:, 2], s2[:, 2]) and not torch.allclose(c1[:, 2], c2[:, 2])


def test_trains(device, fit):
    model = build(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    target = {t: torch.randn(4, OUT[t], 8, 8, device=device) for t in TASKS}
    losses = fit(model, x, lambda out: sum(F.mse_loss(out[t], target[t]) for t in TASKS), steps=30, lr=0.01)
    assert losses[-1] < 0.9 * losses[0]


def test_taskprompter_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("taskprompter", device)


def test_registry_problem_with_odd_size_and_a_task_without_width():
    """Dense outputs have the input's size even when the patch size does not divide it, and a
    task the problem leaves without a width gets 1 (was a 4x4 map and a KeyError)."""
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 5, 5), {"a": 2}, dense=True)
    out = registry.build("taskprompter", problem)(torch.randn(1, 2, 5, 5))
    assert out["a"].shape == (1, 2, 5, 5) and out["b"].shape == (1, 1, 5, 5)


def test_only_blocks_whose_prompts_are_read_again_write_channel_content_back(device, params_with_grad):
    """The prompts leaving the last block are read by no one, so its write-back would never
    train (it did not: it got no gradient from any task); every other parameter learns."""
    model = build(device)
    assert [b.from_channel_prompt is not None for b in model.blocks] == [True] * (len(model.blocks) - 1) + [False]
    x = torch.randn(2, 3, 8, 8, device=device)
    names = params_with_grad(model, sum(o.square().sum() for o in model(x).values()))
    assert names == {n for n, p in model.named_parameters()}


def test_the_block_mlp_has_a_gelu_between_its_two_maps():
    from .conftest import assert_mlps_have_a_gelu

    torch.manual_seed(0)
    assert_mlps_have_a_gelu([PromptedBlock(8, 2, 4).mlp])


def test_the_default_configuration_builds_and_runs():
    """The defaults fit together: the heads divide the width, the patches tile the 8x8 image."""
    torch.manual_seed(0)
    model = TaskPrompter(TASKS, 3, OUT)
    out = model(torch.randn(2, 3, 8, 8))
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: (2, d, 8, 8) for t, d in OUT.items()}


def test_a_width_of_zero_is_refused_when_the_model_is_built():
    """dim = 0 would build empty layers that fail only inside the first forward pass."""
    with pytest.raises(ValueError):
        TaskPrompter(TASKS, 3, OUT, dim=0)


def test_parameter_count():
    """Patch embedding, one position per patch, one prompt per task, the blocks (the last without
    write-back), and per task two 1x1 projections, the fusion and the head."""
    c_in, d, n, depth, t_count = 3, 8, 16, 2, len(TASKS)
    model = build("cpu", depth=depth)
    linear = lambda i, o: i * o + o  # noqa: E731
    block = (2 * d + linear(d, 3 * d) + linear(d, d) + linear(d, n) + 2 * d
             + linear(d, 2 * d) + linear(2 * d, d))
    write_back = linear(n, d)
    shared = c_in * d * 2 * 2 + d + n * d + t_count * d + depth * block + (depth - 1) * write_back
    per_task = {t: 2 * linear(d, d) + linear(2 * d, d) + linear(d, o) for t, o in OUT.items()}
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    assert sum(p.numel() for p in model.parameters()) == shared + sum(per_task.values())


def test_from_problem_takes_width_and_accepts_the_smallest_image_of_one_patch():
    """``width`` sets the token width; a 2x2 image is one 2x2 patch, the smallest input it can read."""
    from reference_impls.architectures import registry

    torch.manual_seed(0)
    problem = registry.Problem(("a", "b"), (3, 2, 2), {"a": 2}, dense=True)
    model = registry.build("taskprompter", problem, width=8)
    assert model.prompts.shape == (2, 8) and model.patch_embed.out_channels == 8
    out = model(torch.randn(2, 3, 2, 2))
    assert out["a"].shape == (2, 2, 2, 2) and out["b"].shape == (2, 1, 2, 2)


def test_dense_outputs_are_the_heads_patch_maps_resized_bilinearly_without_aligned_corners(device):
    """Dense predictions are the head's map on the patch grid, resized to the input like the harness
    does it (bilinear, align_corners=False)."""
    model = build(device)
    captured = {}
    for t in TASKS:
        model.heads[t].register_forward_hook(lambda m, args, out, t=t: captured.__setitem__(t, out))
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    for t in TASKS:
        assert captured[t].shape[-2:] == (4, 4)
        expected = F.interpolate(captured[t], size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[t], expected)
