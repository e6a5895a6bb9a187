"""Painter: the prompt pair names the task, masked output patches are painted, the loss reads only them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.painter import Painter, masked_loss
from reference_impls.architectures.registry import Problem

DENSE = Problem(("seg", "depth"), (2, 8, 8), {"seg": 3, "depth": 1}, dense=True)  # patch 4, stitched grid 4 x 2


def build(device, problem=DENSE, **kw):
    torch.manual_seed(0)
    return Painter.from_problem(problem, **kw).to(device)


def test_the_prompt_pair_alone_names_the_task(device):
    model = build(device)
    assert all(list(model.task_specific_parameters(t)) == [] for t in DENSE.tasks)
    x = torch.randn(3, 2, 8, 8, device=device)
    out = model(x)
    assert not torch.allclose(out["seg"][:, :1], out["depth"])  # different prompts
    image, canvas = model.prompt("seg")
    model.set_prompt("depth", image[0], canvas[0])  # same prompt pair: same answer, same weights
    torch.testing.assert_close(model(x)["depth"], model(x)["seg"][:, :1])
    before = model(x)["seg"]
    model.set_prompt("seg", image[0], -canvas[0])  # only the example output changes
    assert not torch.allclose(model(x)["seg"], before)
    model.set_prompt("seg", torch.randn_like(image[0]), canvas[0])  # only the example image changes
    assert not torch.allclose(model(x)["seg"], before)


def test_loss_reads_only_masked_patches():
    g = torch.Generator().manual_seed(1)
    target, prediction = torch.randn(2, 3, 16, 8, generator=g), torch.randn(2, 3, 16, 8, generator=g)
    mask = torch.zeros(2, 4, 2, dtype=torch.bool)
    mask[0, 1, 0] = mask[1, 3, 1] = True
    pixels = mask[:, None].repeat_interleave(4, 2).repeat_interleave(4, 3).expand_as(target)
    loss = masked_loss(prediction, target, mask, patch=4)
    by_hand = F.smooth_l1_loss(prediction[pixels], target[pixels], beta=0.01) * pixels.sum() / (pixels.sum() + 1e-2)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(masked_loss(prediction, torch.where(pixels, target, target + 9), mask, 4), loss)
    assert not torch.allclose(masked_loss(prediction, torch.where(pixels, target + 1, target), mask, 4), loss)
    assert masked_loss(torch.where(pixels, target, prediction), target, mask, 4) == 0


def test_hidden_output_patches_do_not_leak_into_the_painting(device):
    model = build(device)
    prompt_image, prompt_canvas = model.prompt("seg")
    x, query_canvas = torch.randn(2, 2, 8, 8, device=device), torch.randn(2, 3, 8, 8, device=device)
    mask = model.random_mask(2, torch.Generator().manual_seed(2)).to(device)
    assert mask.sum() == 2 * 4  # half of the 8 patches of each output canvas
    painted = model.paint(prompt_image, prompt_canvas, x, query_canvas, mask)
    query_pixels = mask[:, 2:].repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    assert query_pixels.any() and not query_pixels.all()
    hidden_changed = torch.where(query_pixels, query_canvas + 5, query_canvas)
    torch.testing.assert_close(model.paint(prompt_image, prompt_canvas, x, hidden_changed, mask), painted)
    visible_changed = torch.where(query_pixels, query_canvas, query_canvas + 5)
    assert not torch.allclose(model.paint(prompt_image, prompt_canvas, x, visible_changed, mask), painted)


def test_inference_masks_exactly_the_query_output(device):
    model = build(device)
    mask = model.query_mask(2, device)
    assert mask.shape == (2, 4, 2) and not mask[:, :2].any() and mask[:, 2:].all()
    prompt_image, prompt_canvas = model.prompt("depth")
    x = torch.randn(2, 2, 8, 8, device=device)
    painted = model.paint(prompt_image, prompt_canvas, x)
    torch.testing.assert_close(model(x)["depth"], painted[:, :1, 8:])  # forward reads the query's half


def test_masked_image_modelling_lowers_the_loss(device):
    model = build(device)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(5, 2, 8, 8, generator=g).to(device)
    outputs = torch.cat([images, -images[:, :1]], 1)  # a fixed pixel-wise task
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        mask = model.random_mask(4, g).to(device)
        loss = model.training_loss(images[:1], outputs[:1], images[1:], outputs[1:], mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_vector_inputs_are_refused():
    with pytest.raises(ValueError, match="image inputs"):
        Painter.from_problem(Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_registry_builds_and_forward_trains(device, short_training, registry_output_shapes):
    registry_output_shapes("painter", device)
    for dense in (True, False):
        first, last = short_training("painter", dense, device, 15)
        assert last < first


def test_vit_blocks_are_pre_ln_with_a_gelu_mlp():
    """Painter's ViT blocks (baaivision/Painter, models_painter.py: act_layer=nn.GELU) by hand."""
    model = build("cpu")
    block = model.blocks[0]
    h = torch.randn(2, 8, 16)
    normed = block.norm1(h)
    h1 = h + block.self_attn(normed, normed, normed, need_weights=False)[0]
    expected = h1 + block.linear2(F.gelu(block.linear1(block.norm2(h1))))
    torch.testing.assert_close(block(h), expected)


def hand_tokens(conv, image, patch):
    """A patch-embedding convolution by hand: W · (the p x p pixels of each patch, row-major) + b."""
    pixels = F.unfold(image, patch, stride=patch)  # (B, C p p, N), patches row by row
    return (conv.weight.flatten(1) @ pixels).transpose(1, 2) + conv.bias


def hand_channel_norm(x, norm):
    mean = x.mean(1, keepdim=True)
    var = (x - mean).square().mean(1, keepdim=True)
    return (x - mean) / (var + norm.eps).sqrt() * norm.weight[:, None, None] + norm.bias[:, None, None]


def hand_paint(model, images, canvas, mask):
    """Segment embeddings (input / output), the mask token on the masked output patches, one
    shared position table; blocks 1..separate_blocks on each canvas, then on their patch-wise
    mean; the normalised features of the last feature_blocks blocks, concatenated, projected to
    p x p pixels per patch, and the conv head (3x3 conv, LayerNorm over channels, GELU, 1x1)."""
    p, (gh, gw), b = model.patch, model.grid, images.shape[0]
    x = hand_tokens(model.image_embed, images, p) + model.segment_image + model.positions
    y = hand_tokens(model.canvas_embed, canvas, p)
    y = torch.where(mask.flatten(1)[..., None], model.mask_token, y) + model.segment_canvas + model.positions
    streams = [x, y]
    for block in model.blocks[:model.separate_blocks]:
        streams = [block(s) for s in streams]
    h, features = (streams[0] + streams[1]) / 2, []
    for i, block in enumerate(model.blocks[model.separate_blocks:], model.separate_blocks):
        h = block(h)
        if i >= len(model.blocks) - model.feature_blocks:
            features.append(F.layer_norm(h, h.shape[-1:], model.norm.weight, model.norm.bias, model.norm.eps))
    z = torch.cat(features, -1) @ model.decoder_embed.weight.T + model.decoder_embed.bias
    d = z.shape[-1] // p**2
    z = z.view(b, gh, gw, d, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, d, gh * p, gw * p)
    conv3, norm, conv1 = model.decoder_pred[0], model.decoder_pred[1].norm, model.decoder_pred[3]
    z = F.gelu(hand_channel_norm(F.conv2d(z, conv3.weight, conv3.bias, padding=1), norm))
    return torch.einsum("oc,bchw->bohw", conv1.weight[:, :, 0, 0], z) + conv1.bias[:, None, None]


@pytest.mark.parametrize("kw", [{}, {"depth": 4, "separate_blocks": 2, "feature_blocks": 2}])
def test_painting_recomputed_by_hand(kw):
    model = build("cpu", **kw).double()
    with torch.no_grad():  # embeddings large enough that dropping one shows
        for p in (model.mask_token, model.segment_image, model.segment_canvas, model.positions):
            p.normal_()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 2, 16, 8, generator=g, dtype=torch.float64)
    canvas = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64)
    mask = model.random_mask(2, g)
    expected = hand_paint(model, images, canvas, mask)
    torch.testing.assert_close(model.decode_canvas(model.encode_canvases(images, canvas, mask)), expected)


def test_outputs_become_canvases_padded_with_zeros_and_image_level_outputs_are_constant():
    model = build("cpu")  # canvas channels: 3 (seg)
    dense = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model.as_canvas(dense), torch.cat([dense, torch.zeros(2, 2, 8, 8)], 1))
    vector = torch.tensor([[0.5, -2.0]])
    expected = torch.tensor([0.5, -2.0, 0.0])[None, :, None, None].expand(1, 3, 8, 8)
    torch.testing.assert_close(model.as_canvas(vector), expected)


def test_an_image_level_task_reads_the_mean_of_its_painted_query_half():
    problem = Problem(("cls", "score"), (2, 8, 8), {"cls": 3, "score": 1}, dense=False)
    model = build("cpu", problem)
    x = torch.randn(2, 2, 8, 8)
    out = model(x)
    for t, c in problem.task_out_dims.items():
        painted = model.paint(*model.prompt(t), x)
        torch.testing.assert_close(out[t], painted[:, :c, 8:].mean(dim=(2, 3)))


def test_block_counts_are_validated_and_passed_through_from_problem():
    """1 <= separate_blocks < depth and 1 <= feature_blocks <= depth - separate_blocks, as the error states;
    keyword arguments of from_problem reach the constructor; the MLP is twice the width (docstring)."""
    model = build("cpu", depth=4, separate_blocks=2, feature_blocks=1)
    assert len(model.blocks) == 4 and model.feature_blocks == 1 and model.separate_blocks == 2
    assert model.decoder_embed.in_features == 16  # one block's features
    assert all(block.linear1.out_features == 2 * 16 for block in model.blocks)
    for bad in ({"depth": 3, "separate_blocks": 1, "feature_blocks": 3}, {"depth": 3, "separate_blocks": 3},
                {"depth": 3, "separate_blocks": 1, "feature_blocks": 0}):
        with pytest.raises(ValueError, match="separate_blocks"):
            Painter(("a", "b"), 2, {"a": 1, "b": 1}, **bad)


def test_a_task_missing_from_out_dims_paints_one_channel():
    """As in Problem: a task that out_dims does not name has one output channel."""
    torch.manual_seed(0)
    model = Painter(("a", "b"), 2, {"a": 3})
    assert model.out_dims == {"a": 3, "b": 1} and model.canvas_channels == 3


def test_every_patch_of_the_stitched_grid_has_its_own_position():
    """One learned position per patch of the stitched 4 x 2 grid (not a single vector for all)."""
    model = build("cpu")
    assert model.positions.shape == (4 * 2, 16)
    assert not torch.allclose(model.positions[0], model.positions[1])


def test_placeholder_prompts_follow_the_seed_and_the_output_kind():
    """The placeholder prompt pairs come from ``seed`` alone (not the global RNG); a dense task's
    placeholder output is an image, an image-level one is painted as a constant image."""
    torch.manual_seed(1)
    a = Painter.from_problem(DENSE, seed=3)
    torch.manual_seed(2)
    b = Painter.from_problem(DENSE, seed=3)
    for t in DENSE.tasks:
        for pa, pb in zip(a.prompt(t), b.prompt(t)):
            torch.testing.assert_close(pa, pb)
    canvas = a.prompt("seg")[1]
    assert canvas[0, :3].std(dim=(1, 2)).min() > 0  # varies over pixels
    vector = Painter.from_problem(Problem(("cls", "score"), (2, 8, 8), {"cls": 3, "score": 1}, dense=False))
    canvas = vector.prompt("cls")[1]
    torch.testing.assert_close(canvas, canvas[..., :1, :1].expand_as(canvas))


def test_image_level_outputs_of_a_batch_become_constant_canvases():
    model = build("cpu")
    vector = torch.tensor([[0.5, -2.0], [1.0, 3.0]])
    expected = torch.cat([vector, torch.zeros(2, 1)], 1)[:, :, None, None].expand(2, 3, 8, 8)
    torch.testing.assert_close(model.as_canvas(vector), expected)


def test_random_mask_follows_its_generator_and_hides_every_patch_sometimes():
    """The mask depends only on the generator passed in; each row hides round(ratio * n) patches,
    and over draws every patch is hidden at least once (not always the same half)."""
    model = build("cpu")
    torch.manual_seed(0)
    first = model.random_mask(1, torch.Generator().manual_seed(4))
    torch.manual_seed(1)
    torch.testing.assert_close(model.random_mask(1, torch.Generator().manual_seed(4)), first)
    g = torch.Generator().manual_seed(5)
    masks = torch.cat([model.random_mask(1, g) for _ in range(30)])
    assert (masks.flatten(1).sum(1) == 4).all() and masks.any(0).all() and not masks.all(0).any()


def test_training_loss_paints_the_given_canvas_under_the_given_mask():
    """training_loss = masked smooth-L1 of paint(prompt pair, query, its true canvas, the mask) against
    the stitched true canvases; visible query patches are shown to the model, the mask is not the query mask."""
    model = build("cpu")
    g = torch.Generator().manual_seed(6)
    prompt_image, prompt_output = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    image, output = torch.randn(2, 2, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = model.random_mask(2, g)
    painted = model.paint(prompt_image, prompt_output.expand(2, -1, -1, -1), image, output, mask)
    expected = masked_loss(painted, torch.cat([prompt_output.expand(2, -1, -1, -1), output], 2), mask, 4)
    torch.testing.assert_close(model.training_loss(prompt_image, prompt_output, image, output, mask), expected)
