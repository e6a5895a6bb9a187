"""MulT: every task's decoder uses the reference task's attention map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.mult import MulT

TASKS = ("normal", "depth", "seg")
OUT = {"normal": 3, "depth": 1, "seg": 4}


def build(device, **kw):
    torch.manual_seed(0)
    return MulT(TASKS, 3, OUT, image_size=(8, 8), patch_size=2, dim=8, num_heads=2,
                reference_task="depth", **kw).to(device)


def test_every_decoder_uses_the_reference_attention(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    states, used = model.decode_with_attention(x)
    assert len(used) == 2
    for layer, maps in enumerate(used):
        ref = maps["depth"]
        assert ref.shape == (2, 2, 16, 16)
        torch.testing.assert_close(ref.sum(-1), torch.ones(2, 2, 16, device=device))
        for t in TASKS:
            assert torch.equal(maps[t], ref)
    # Recompute layer 0's map by hand from the reference decoder's query/key projection.
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.positions
    shared = model.encoder(tokens)
    dec = model.decoders["depth"][0]
    q, k = dec.query_key(dec.norm1(shared)).chunk(2, -1)
    q = q.view(2, 16, 2, 4).transpose(1, 2)
    k = k.view(2, 16, 2, 4).transpose(1, 2)
    torch.testing.assert_close(used[0]["seg"], torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), -1))
    # A task's layer output is A V_t with its own values.
    seg = model.decoders["seg"][0]
    v = seg.value(seg.norm1(shared)).view(2, 16, 2, 4).transpose(1, 2)
    h = shared + seg.proj((used[0]["seg"] @ v).transpose(1, 2).reshape(2, 16, 8))
    torch.testing.assert_close(seg(shared, used[0]["seg"]), h + seg.mlp(seg.norm2(h)))


def test_only_reference_decoder_has_query_key(device):
    model = build(device)
    for t in TASKS:
        has = [layer.query_key is not None for layer in model.decoders[t]]
        assert all(has) if t == "depth" else not any(has)


def test_gradients_flow_into_reference_attention(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    assert out["seg"].shape == (2, 4, 8, 8)
    out["seg"].square().mean().backward()
    ref = model.decoders["depth"]
    # The seg loss trains the reference task's query/key and its earlier value path...
    assert all(l.query_key.weight.grad.abs().sum() > 0 for l in ref)
    assert ref[0].value.weight.grad.abs().sum() > 0
    # ...but not the reference task's last value path nor its head.
    assert ref[-1].value.weight.grad is None and ref[-1].mlp[0].weight.grad is None
    assert all(p.grad is None for p in model.heads["depth"].parameters())
    assert all(p.grad is None for p in model.task_specific_parameters("normal"))
    assert all(p.grad is not None for p in model.task_specific_parameters("seg"))
    assert all(p.grad is not None for p in model.shared_parameters())


def test_trains(device, fit):
    model = build(device, dense=False, encoder_depth=1)
    x = torch.randn(8, 3, 8, 8, device=device)
    target = {t: x.mean((1, 2, 3))[:, None].expand(-1, OUT[t]) * (i + 1) for i, t in enumerate(TASKS)}
    losses = fit(model, x, lambda out: sum(F.mse_loss(out[t], target[t]) for t in TASKS), steps=25, lr=0.01)
    assert losses[-1] < 0.5 * losses[0]


def test_mult_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("mult", device)


def test_pooled_output_is_the_token_mean_of_each_tasks_head(device):
    model = build(device, dense=False)
    x = torch.randn(2, 3, 8, 8, device=device)
    states, _ = model.decode_with_attention(x)
    out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads[t](states[t]).mean(dim=1))


def test_registry_problem_with_odd_size_and_a_task_without_width():
    """Dense outputs have the input's size even when the patch size does not divide it, and a
    task the problem leaves without a width gets 1 (was a 4x4 map and a KeyError)."""
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 5, 5), {"a": 2}, dense=True)
    out = registry.build("mult", problem)(torch.randn(1, 2, 5, 5))
    assert out["a"].shape == (1, 2, 5, 5) and out["b"].shape == (1, 1, 5, 5)


@pytest.mark.parametrize("depth", (2, 3))
@pytest.mark.parametrize("task", TASKS)
def test_task_loss_reaches_exactly_shared_and_its_own_parameters(device, task, depth, params_with_grad):
    """The reference decoder's last norm1 feeds everyone's attention: shared, not the reference's own.
    With three layers the middle one feeds the last attention map, so only the *last* value path is own."""
    model = build(device, decoder_depth=depth)
    reached = params_with_grad(model, model(torch.randn(2, 3, 8, 8, device=device))[task].square().sum())
    names = {id(p): n for n, p in model.named_parameters()}
    own = {names[id(p)] for p in model.task_specific_parameters(task)}
    assert reached == own | {names[id(p)] for p in model.shared_parameters()}


def test_reference_task_defaults_to_the_first(device):
    torch.manual_seed(0)
    model = MulT(("seg", "depth"), 3, {"seg": 2, "depth": 1}, image_size=(4, 4), dim=8, num_heads=2)
    assert model.reference == "seg"
    assert all(layer.query_key is not None for layer in model.decoders["seg"])
    assert all(layer.query_key is None for layer in model.decoders["depth"])


def test_every_layer_by_hand_map_from_the_reference_state_at_that_layer(device):
    """A^l = softmax(Q_r^l K_r^l^T / sqrt(d_h)) from task r's state entering layer l; Y_t^l = A^l V_t^l."""
    model = build(device, decoder_depth=3)
    x = torch.randn(2, 3, 8, 8, device=device)
    states, used = model.decode_with_attention(x)
    shared = model.encoder(model.patch_embed(x).flatten(2).transpose(1, 2) + model.positions)
    mine = {t: shared for t in TASKS}
    for layer in range(3):
        ref = model.decoders["depth"][layer]
        q, k = (t.view(2, 16, 2, 4).transpose(1, 2) for t in ref.query_key(ref.norm1(mine["depth"])).chunk(2, -1))
        attention = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
        torch.testing.assert_close(used[layer]["normal"], attention)
        mine = {t: model.decoders[t][layer](mine[t], attention) for t in TASKS}
    for t in TASKS:
        torch.testing.assert_close(states[t], mine[t])


def test_dense_output_is_the_token_map_upsampled_bilinearly_to_the_input(device):
    """Dense tasks: each patch token's head output, laid out row-major on the patch grid, is resized to
    the input bilinearly with align_corners=False (4x4 patches -> 8x8, so nearest would differ)."""
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    states, _ = model.decode_with_attention(x)
    out = model(x)
    for t in TASKS:
        tokens = model.heads[t](states[t])  # (B, 16, out), token i = patch (i // 4, i % 4)
        grid = tokens.view(2, 4, 4, OUT[t]).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[t], expected)


def test_the_layer_mlp_has_a_gelu_between_its_two_maps():
    from reference_impls.architectures.mult import SharedAttentionLayer

    from .conftest import assert_mlps_have_a_gelu

    torch.manual_seed(0)
    assert_mlps_have_a_gelu([SharedAttentionLayer(8, 2, computes_attention=True).mlp])


def test_the_shared_encoder_mlps_have_a_gelu_as_swin_does():
    """The encoder stands in for Swin, whose MLPs use GELU (nn.TransformerEncoderLayer's default is ReLU)."""
    model = build("cpu")
    assert len(model.encoder.layers) == 2
    assert all(layer.activation is F.gelu for layer in model.encoder.layers)


def test_builds_and_runs_with_its_defaults():
    """Every constructor default together makes a working model (the width splits into the heads)."""
    torch.manual_seed(0)
    model = MulT(TASKS, 3, OUT)
    out = model(torch.randn(2, 3, 8, 8))
    assert {t: o.shape for t, o in out.items()} == {t: (2, OUT[t], 8, 8) for t in TASKS}


def test_a_width_of_zero_is_refused_naming_it():
    with pytest.raises(ValueError, match="dim must be at least 1, got 0"):
        MulT(TASKS, 3, OUT, dim=0)


def test_position_embedding_has_one_vector_per_patch_token(device):
    """A learned absolute position embedding: one row per patch of the grid, so patches are told apart
    (a single broadcast row would leave the encoder blind to where a patch is)."""
    model = MulT(TASKS, 3, OUT, image_size=(8, 6), patch_size=2, dim=8, num_heads=2).to(device)
    assert model.positions.shape == (4 * 3, 8)
    # A constant image gives twelve identical patches; the encoder's input must still tell them apart.
    states, _ = model.decode_with_attention(torch.ones(1, 3, 8, 6, device=device))
    rows = states["seg"][0]
    assert torch.cdist(rows, rows).add(torch.eye(12, device=device)).min() > 1e-4


def test_encoder_layers_are_pre_norm_with_a_gelu_mlp_twice_the_width_by_hand():
    """Swin-style block: h + MSA(LN1 h), then h + W2 GELU(W1 LN2 h), hidden width 2 * dim (docstring)."""
    model = build("cpu")
    h = torch.randn(2, 16, 8)
    for layer in model.encoder.layers:
        assert layer.linear1.weight.shape == (16, 8) and layer.linear2.weight.shape == (8, 16)
        n = layer.norm1(h)
        attended = h + layer.self_attn(n, n, n, need_weights=False)[0]
        expected = attended + layer.linear2(F.gelu(layer.linear1(layer.norm2(attended))))
        torch.testing.assert_close(layer(h), expected)
        h = expected


def test_registry_builds_a_2x2_image_with_the_given_width():
    """Patches are 2x2, so a 2x2 image (one patch) is the smallest accepted; ``width`` is the model width."""
    from reference_impls.architectures import registry

    torch.manual_seed(0)
    problem = registry.Problem(("a", "b"), (3, 2, 2), {"a": 2, "b": 1}, dense=True)
    model = registry.build("mult", problem, width=4)
    assert model.patch_embed.out_channels == 4 and model.positions.shape == (1, 4)
    out = model(torch.randn(2, 3, 2, 2))
    assert out["a"].shape == (2, 2, 2, 2) and out["b"].shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="1x1"):
        registry.build("mult", registry.Problem(("a", "b"), (3, 1, 1), {"a": 2}, dense=True))
