"""OmniNet: spatial/temporal caches, spatial attention gated by the temporal weights, task tokens."""

from __future__ import annotations

import math

import pytest
import torch

from reference_impls.architectures.omninet import OmniNet, sinusoid_positions, spatial_gate
from reference_impls.architectures.registry import Problem

from .conftest import layer_norm_by_hand

IMAGE = Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1})
VECTOR = Problem(("a", "b"), (12,), {"a": 3, "b": 1})


def make(problem=IMAGE, device="cpu"):
    torch.manual_seed(0)
    return OmniNet.from_problem(problem, width=8, num_tokens=4).to(device)


def test_gate_gives_every_spatial_feature_its_frames_temporal_weight():
    weights = torch.arange(5.0).view(1, 1, 1, 5)  # temporal steps: 2 frames of a video, then 3 words
    gate = spatial_gate(weights, [(2, 3), (3, 1)])  # the words have no spatial features
    assert gate.flatten().tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_spatial_attention_is_softmax_of_gated_scores(device):
    model = make(device=device)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 4, 8, generator=g).to(device)  # 3 frames of 4 regions
    question = torch.randn(2, 5, 1, 8, generator=g).to(device)  # 5 words
    caches = model.fill_caches([video, question])
    assert caches.temporal.shape == (2, 8, 8) and caches.spatial.shape == (2, 12, 8)
    inputs = torch.randn(2, 2, 8, generator=g).to(device)
    layer = model.decoder[0]
    causal = torch.ones(2, 2, dtype=torch.bool, device=device).tril()
    _, temporal, spatial = layer(inputs, caches, causal)
    assert temporal.shape == (2, 2, 2, 8)  # (batch, heads, queries, time steps)
    # recompute the spatial attention by hand: scores times the frame's temporal weight
    h, _ = layer.self_attention(inputs, inputs, causal)
    h, _ = layer.temporal_attention(layer.to_temporal(h), caches.temporal)
    attention = layer.spatial_attention
    q = attention.query(layer.to_spatial(h)).view(2, 2, 2, 4).transpose(1, 2)
    k = attention.key(caches.spatial).view(2, 12, 2, 4).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)
    frame_weight = temporal[..., :3].repeat_interleave(4, dim=-1)  # video frames only, not the words
    torch.testing.assert_close(spatial, torch.softmax(scores * frame_weight, dim=-1))
    assert not torch.allclose(spatial, torch.softmax(scores, dim=-1))


def test_caches_hold_spatial_features_and_encoded_patch_means(device):
    model = make(device=device)
    x = torch.randn(3, 2, 8, 8, device=device)
    frames = model.frames(x)
    assert frames.shape == (3, 1, 4, 8)  # one frame of 2 x 2 patches
    caches = model.fill_caches([frames])
    control = model.control.weight[0].expand(3, 1, 4, -1)
    h = model.input_proj(torch.cat([frames, control], -1))
    torch.testing.assert_close(caches.spatial, model.spatial_proj(h[:, 0]))
    steps = model.temporal_proj(h.mean(2))  # the mean over patches, one time step
    rate = 1 / 10000 ** (torch.tensor([0, 0, 2, 2, 4, 4, 6, 6], device=device) / 8)
    position_1 = torch.stack([rate[::2].sin(), rate[1::2].cos()], -1).flatten()  # sin, cos, sin, ...
    torch.testing.assert_close(sinusoid_positions(1, 8, steps)[0], position_1)
    steps = steps + position_1
    for layer in model.temporal_encoder:
        steps = layer(steps)
    torch.testing.assert_close(caches.temporal, steps)
    text = make(VECTOR, device)  # a vector is a sequence of chunks: no spatial cache, no spatial attention
    assert text.frames(torch.randn(3, 12, device=device)).shape == (3, 4, 1, 8)
    assert text.fill_caches([text.frames(torch.randn(3, 12, device=device))]).spatial is None
    assert all(layer.spatial_attention is None for layer in text.decoder)


@pytest.mark.parametrize("problem", [IMAGE, VECTOR])
def test_the_task_is_named_only_by_its_control_token(problem, device):
    model = make(problem, device)
    x = torch.randn(3, *problem.input_shape, device=device)
    out = model(x)
    assert out["a"].shape == (3, 3) and out["b"].shape == (3, 1)
    with torch.no_grad():  # give b the control embedding and the classifier of a's first class
        model.control.weight[model.controls["b"]] = model.control.weight[model.controls["a"]]
        model.classifiers["b"].weight.copy_(model.classifiers["a"].weight[:1])
        model.classifiers["b"].bias.copy_(model.classifiers["a"].bias[:1])
    torch.testing.assert_close(model(x)["b"], out["a"][:, :1])


def test_first_step_is_the_teacher_forced_first_position_and_decoding_is_causal(device):
    model = make(device=device)
    x = torch.randn(2, 2, 8, 8, device=device)
    caches = model.fill_caches([model.frames(x)])
    targets = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1]], device=device)
    scores = model.decode_task(caches, "a", targets)
    assert scores.shape == (2, 4, 3)
    torch.testing.assert_close(scores[:, 0], model(x)["a"])
    changed = targets.clone()
    changed[:, 1] = (changed[:, 1] + 1) % 3  # token 1 is the input of position 2 only
    new = model.decode_task(caches, "a", changed)
    torch.testing.assert_close(new[:, :2], scores[:, :2])
    assert not torch.allclose(new[:, 2:], scores[:, 2:])


def test_each_task_reaches_only_shared_parameters_and_its_own(device, params_with_grad):
    model = make(device=device)
    out = model(torch.randn(2, 2, 8, 8, device=device))
    names = {id(p): n for n, p in model.named_parameters()}
    for t in model.tasks:
        reached = params_with_grad(model, out[t].square().sum()) if t == "a" else params_with_grad(
            model, model(torch.randn(2, 2, 8, 8, device=device))[t].square().sum())
        own = {names[id(p)] for p in model.classifiers[t].parameters()}
        other = {names[id(p)] for u in model.tasks if u != t for p in model.task_specific_parameters(u)}
        assert own <= reached and not reached & other


def test_trains_and_refuses_dense_problems(device, fit):
    model = make(VECTOR, device)
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)).to(device)  # the CPU's data on every device
    target = {"a": x[:, :3], "b": x[:, 3:4] - x[:, 4:5]}
    # 100 steps: after 30, 6 of 8 data seeds had not yet halved the loss; after 100 all had (at most 0.42)
    losses = fit(model, x, lambda out: sum((out[t] - target[t]).square().mean() for t in target), 100, 1e-2)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="dense"):
        OmniNet.from_problem(Problem(("a",), (2, 8, 8), {"a": 1}, dense=True))


def hand_attention(att, x, memory, mask=None, gate=None):
    """LN(x + W_o softmax_k(gate * q.k / sqrt(d_k)) V), head by head, from the layer's weights."""
    heads, d_k = att.num_heads, att.head_dim
    q = x @ att.query.weight.T + att.query.bias
    k = memory @ att.key.weight.T
    v = memory @ att.value.weight.T + att.value.bias
    mixed, weights = [], []
    for i in range(heads):
        cols = slice(i * d_k, (i + 1) * d_k)
        scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(d_k)
        if gate is not None:
            scores = scores * gate[:, i]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        w = scores.exp() / scores.exp().sum(-1, keepdim=True)
        weights.append(w)
        mixed.append(w @ v[..., cols])
    out = torch.cat(mixed, -1) @ att.out.weight.T + att.out.bias
    return layer_norm_by_hand(x + out, att.norm), torch.stack(weights, 1)




def hand_feed_forward(ff, x):
    """LN(x + W_2 ReLU(W_1 x))."""
    first, second = ff.net[0], ff.net[2]
    hidden = (x @ first.weight.T + first.bias).clamp(min=0)
    return layer_norm_by_hand(x + hidden @ second.weight.T + second.bias, ff.norm)


def hand_decoder_layer(layer, h, caches, causal):
    """Causal self-attention, temporal attention, spatial attention gated by every key's frame's
    temporal weight (the gate is not detached), then the feed-forward block."""
    h, _ = hand_attention(layer.self_attention, h, h, causal)
    h, temporal = hand_attention(layer.temporal_attention, layer.to_temporal(h), caches.temporal)
    h = layer.to_spatial(h)
    if caches.spatial is not None:
        gate = temporal[..., :3].repeat_interleave(4, -1)  # 3 frames of 4 regions, then 5 words
        h, _ = hand_attention(layer.spatial_attention, h, caches.spatial, gate=gate)
    return hand_feed_forward(layer.feed_forward, layer.to_decoder(h))


def video_and_question(model, device):
    g = torch.Generator().manual_seed(4)
    video = torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64).to(device)  # 3 frames of 4 regions
    question = torch.randn(2, 5, 1, 8, generator=g, dtype=torch.float64).to(device)  # 5 words
    return model.fill_caches([video, question]), video


def test_a_decoder_layer_by_hand_values_and_gradients(device):
    model = make(device=device).double()
    caches, _ = video_and_question(model, device)
    h = torch.randn(2, 3, 8, dtype=torch.float64, device=device)
    causal = torch.ones(3, 3, dtype=torch.bool, device=device).tril()
    layer = model.decoder[0]
    out, expected = layer(h, caches, causal)[0], hand_decoder_layer(layer, h, caches, causal)
    torch.testing.assert_close(out, expected)
    # the spatial loss reaches the temporal attention's keys through the gate as well
    key, probe = layer.temporal_attention.key.weight, torch.randn_like(out)  # (a LayerNorm's square sum is flat)
    (got,) = torch.autograd.grad((out * probe).sum(), key)
    (want,) = torch.autograd.grad((expected * probe).sum(), key)
    torch.testing.assert_close(got, want)


def test_the_temporal_encoder_layer_is_self_attention_then_feed_forward_by_hand(device):
    model = make(VECTOR, device).double()
    steps = torch.randn(3, 4, 8, dtype=torch.float64, device=device)  # 4 time steps: attention mixes them
    for layer in model.temporal_encoder:
        torch.testing.assert_close(
            layer(steps), hand_feed_forward(layer.feed_forward, hand_attention(layer.attention, steps, steps)[0]))


def test_the_spatial_cache_is_ordered_frame_then_region(device):
    model = make(device=device).double()
    caches, video = video_and_question(model, device)
    control = model.control.weight[model.controls["IMAGE"]]
    for f in range(3):
        for r in range(4):
            token = model.input_proj(torch.cat([video[:, f, r], control.expand(2, -1)], -1))
            torch.testing.assert_close(caches.spatial[:, 4 * f + r], model.spatial_proj(token))


def test_teacher_forced_decoding_by_hand(device):
    """Inputs [task control token; the task's own output embedding of targets[:, :-1]] plus the
    sinusoid positions 1..L, through the causal decoder, then the task's classifier."""
    model = make(device=device).double()
    caches, _ = video_and_question(model, device)
    targets = torch.zeros(2, 3, dtype=torch.long, device=device)  # b has one class
    with torch.no_grad():  # distinct output embeddings per task, so reading the wrong one shows
        model.output_embeddings["b"].weight.mul_(-3.0)
    first = model.control_to_decoder(model.control.weight[model.controls["b"]]).expand(2, 1, -1)
    answers = model.embedding_to_decoder(model.output_embeddings["b"](targets[:, :-1]))
    h = torch.cat([first, answers], 1) + sinusoid_positions(3, 8, first)
    causal = torch.ones(3, 3, dtype=torch.bool, device=device).tril()
    for layer in model.decoder:
        h = hand_decoder_layer(layer, h, caches, causal)
    expected = model.classifiers["b"](model.decoder_out(h))
    torch.testing.assert_close(model.decode_task(caches, "b", targets), expected)


def test_sinusoid_table_is_the_transformers_closed_form():
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)) for positions p = 1..L."""
    table = sinusoid_positions(50, 16, torch.zeros(1, dtype=torch.float64))
    for p in (1, 7, 50):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert table[p - 1, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-9)
            assert table[p - 1, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-9)


def test_gate_walks_the_temporal_steps_of_several_inputs():
    """Inputs with s = 2 have spatial features too; each input's steps start where the previous ones end."""
    weights = torch.randn(2, 2, 3, 6, generator=torch.Generator().manual_seed(0))
    links = [(1, 1), (2, 2), (3, 3)]  # steps 0 | 1, 2 | 3, 4, 5
    expected = torch.stack([weights[..., j] for j in [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]], -1)
    torch.testing.assert_close(spatial_gate(weights, links), expected)


def test_several_spatial_inputs_share_the_caches_in_order(device):
    """Two inputs with regions (s = 2 and s = 3) are appended along the cache's sequence axis; a model
    without spatial attention refuses any input with s > 1."""
    model = make(device=device)
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(2, 3, 2, 8, generator=g).to(device), torch.randn(2, 1, 3, 8, generator=g).to(device)
    caches = model.fill_caches([first, second])
    assert caches.spatial.shape == (2, 3 * 2 + 1 * 3, 8) and caches.temporal.shape == (2, 4, 8)
    assert caches.links == [(3, 2), (1, 3)]
    torch.testing.assert_close(caches.spatial[:, :6], model.fill_caches([first]).spatial)
    torch.testing.assert_close(caches.spatial[:, 6:], model.fill_caches([second]).spatial)
    text = make(VECTOR, device)
    with pytest.raises(ValueError):
        text.fill_caches([torch.randn(2, 3, 2, 8, device=device)])


def test_sizes_are_validated_and_encoder_depth_is_honoured():
    """Zero widths or depths are refused; encoder_depth temporal layers are built; a task missing from
    out_dims has one class (as in Problem)."""
    for bad in ("dim", "encoder_depth", "decoder_depth"):
        with pytest.raises(ValueError, match=bad):
            OmniNet(("a", "b"), (12,), {}, **{bad: 0})
    model = OmniNet(("a", "b"), (12,), {"a": 3}, dim=8, encoder_depth=3)
    assert len(model.temporal_encoder) == 3 and model.out_dims == {"a": 3, "b": 1}


def test_decoder_states_report_each_layers_attention_weights(device):
    """decoder_states returns, per decoder layer, the (temporal, spatial) weights that layer computed."""
    model = make(device=device).double()
    caches, _ = video_and_question(model, device)
    inputs = torch.randn(2, 3, 8, dtype=torch.float64, device=device)
    _, weights = model.decoder_states(inputs, caches)
    assert len(weights) == len(model.decoder)
    h = inputs + sinusoid_positions(3, 8, inputs)
    causal = torch.ones(3, 3, dtype=torch.bool, device=device).tril()
    for layer, (temporal, spatial) in zip(model.decoder, weights):
        h, expected_temporal, expected_spatial = layer(h, caches, causal)
        torch.testing.assert_close(temporal, expected_temporal)
        torch.testing.assert_close(spatial, expected_spatial)


def test_two_targets_are_teacher_forced_over_two_positions(device):
    """With targets of length 2, position 1 reads the embedding of targets[:, 0]."""
    model = make(device=device).double()
    caches, _ = video_and_question(model, device)
    targets = torch.tensor([[0, 1], [2, 0]], device=device)
    scores = model.decode_task(caches, "a", targets)
    assert scores.shape == (2, 2, 3)
    torch.testing.assert_close(scores[:, :1], model.decode_task(caches, "a"))
    changed = model.decode_task(caches, "a", torch.tensor([[1, 1], [0, 0]], device=device))
    assert not torch.allclose(changed[:, 1], scores[:, 1])
