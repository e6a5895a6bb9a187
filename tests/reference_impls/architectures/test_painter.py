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
