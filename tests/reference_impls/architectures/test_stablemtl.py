"""StableMTL: zero-init task attention = single-stream model, 1-to-N per-token task attention,
frozen codec and auxiliary streams, unified latent loss, deterministic one step, training."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.stablemtl import StableMTL, TaskAttention

TASKS = ("seg", "depth", "normals")
OUT = {"seg": 3, "depth": 1, "normals": 3}


def make(device, **kw):
    torch.manual_seed(0)
    return StableMTL(TASKS, 3, OUT, dim=8, **kw).to(device)


def test_at_initialisation_it_is_the_single_stream_model(device):
    model = make(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    z = model.codec.encode(x)
    alone = model.main(z, "seg")[0]  # no auxiliary streams
    with_streams = model.main(z, "seg", model.auxiliary_features(z, "seg"))[0]
    torch.testing.assert_close(with_streams, alone)
    torch.nn.init.normal_(model.main.blocks[0].task_attention.out.weight)
    assert (model.main(z, "seg", model.auxiliary_features(z, "seg"))[0] - alone).abs().max() > 1e-4


def test_task_attention_is_one_query_per_token_over_the_other_tasks(device):
    torch.manual_seed(0)
    att = TaskAttention(TASKS, 8).to(device)
    torch.nn.init.normal_(att.out.weight)
    main = torch.randn(2, 6, 8, device=device)
    aux = {t: torch.randn(2, 6, 8, device=device) for t in ("depth", "normals")}
    w, _ = att.weights(main, aux)
    assert w.shape == (2, 6, 2)  # per token, one weight per auxiliary task
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 6, device=device))
    moved = dict(aux, depth=aux["depth"].clone())
    moved["depth"][:, 4] += torch.randn(2, 8, device=device)  # one location's auxiliary token
    changed = (att(main, moved) - att(main, aux)).abs().amax(dim=(0, 2))
    assert changed[4] > 1e-5 and torch.all(changed[[0, 1, 2, 3, 5]] == 0)


def test_the_task_attention_query_reads_the_main_streams_self_attention_output(device):
    # official SparseCausalAttention (github.com/astra-vision/StableMTL): the task query is
    # computed from the self-attention output (after its output projection), not its input
    model = make(device)
    block = model.main.blocks[0]
    torch.nn.init.normal_(block.task_attention.out.weight)
    h = torch.randn(2, 6, 8, device=device)
    encoding = torch.randn(2, 4, 8, device=device)
    aux = {t: torch.randn(2, 6, 8, device=device) for t in ("depth", "normals")}
    normed = block.norm(h)
    residual = block.self_attention(normed, normed, normed, need_weights=False)[0]
    expected = block.prompt(h + residual + block.task_attention(residual, aux), encoding)
    out, returned = block(h, encoding, aux)
    torch.testing.assert_close(returned, residual)
    torch.testing.assert_close(out, expected)


def test_the_main_stream_attends_to_the_other_tasks_streams_only(device, params_with_grad):
    model = make(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    features = model.auxiliary_features(model.codec.encode(x), "seg")
    assert all(set(block) == {"depth", "normals"} for block in features)  # never its own stream
    for block in model.main.blocks:
        torch.nn.init.normal_(block.task_attention.out.weight)
    names = params_with_grad(model, model(x)["seg"].square().mean())
    for t in ("depth", "normals"):
        assert any(n.startswith(f"main.blocks.0.task_attention.to_v.{t}") for n in names)
    assert not any(".task_attention." in n and n.endswith((".seg.weight", ".seg.bias")) for n in names)


def test_codec_round_trip_and_unified_latent_loss_equals_pixel_loss(device):
    model = make(device)
    y = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(model.codec.decode(model.codec.encode(y), 3), y)
    x = torch.randn(2, 3, 4, 4, device=device)
    targets = {"seg": y, "depth": torch.randn(2, 1, 4, 4, device=device)}
    latents = model.predict_latents(x)
    by_hand = sum((latents[t] - model.codec.encode(targets[t])).square().mean() for t in targets) / 2
    torch.testing.assert_close(model.latent_loss(x, targets), by_hand)
    # Orthogonal codec: the latent MSE of a task equals the MSE of its zero-padded maps.
    lat = model.predict_latents(x)["depth"]
    full = model.codec.decode(lat, 4)
    target_padded = torch.nn.functional.pad(targets["depth"], (0, 0, 0, 0, 0, 3))
    torch.testing.assert_close((lat - model.codec.encode(targets["depth"])).square().mean(),
                               (full - target_padded).square().mean())


def test_one_deterministic_step_and_frozen_parts_get_no_gradient(device, params_with_grad):
    model = make(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    assert torch.equal(model(x)["depth"], model(x)["depth"])
    torch.nn.init.normal_(model.main.blocks[0].task_attention.out.weight)
    names = params_with_grad(model, model(x)["seg"].square().mean())
    assert not any(n.startswith(("auxiliary.", "codec.")) for n in names)
    assert "main.task_tokens.seg" in names and "main.task_tokens.depth" not in names
    assert any(n.startswith("main.blocks.0.task_attention.to_k.depth") for n in names)
    assert all(not p.requires_grad for p in model.auxiliary.parameters())


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("stablemtl", device)
    for dense in (True, False):
        first, last = short_training("stablemtl", dense, device, steps=30)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("stablemtl", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_the_task_encoding_is_several_tokens_so_the_cross_attention_reads_its_queries(device, params_with_grad):
    """Over one key every attention weight is 1, whatever the query: the task encoding was a
    single token, so the query projection and its norm never got a gradient."""
    model = make(device)
    assert all(tuple(p.shape) == (1, 4, 8) for p in model.main.task_tokens.values())
    x = torch.randn(2, 3, 5, 5, device=device)
    names = params_with_grad(model, model(x)["seg"].square().mean())
    for i in range(len(model.main.blocks)):
        assert {f"main.blocks.{i}.prompt.q.weight", f"main.blocks.{i}.prompt.norm_q.weight"} <= set(names)
    single = make(device, num_task_tokens=1)
    names = params_with_grad(single, single(x)["seg"].square().mean())
    assert "main.blocks.0.prompt.q.weight" not in names  # the degenerate case, kept as a check of the claim
    with pytest.raises(ValueError, match="num_task_tokens"):
        make(device, num_task_tokens=0)


def _randomise(module):
    """Non-trivial values for every parameter (layer-norm affines included), so each map matters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def test_task_attention_by_hand_for_one_token(device):
    """w_k = softmax_k(q . k_k / sqrt(d)), q = W_q LN_q(main), k_k = W_k^t LN_t(a_t), same LN_t for v."""
    torch.manual_seed(0)
    att = TaskAttention(TASKS, 8).to(device)
    _randomise(att)
    with torch.no_grad():  # logits of order one, so that the softmax is not saturated
        att.to_q.weight.mul_(0.1)
    main = torch.randn(2, 6, 8, device=device)
    aux = {t: torch.randn(2, 6, 8, device=device) for t in ("depth", "normals")}

    def ln(norm, v):
        return (v - v.mean()) / (v.var(unbiased=False) + norm.eps).sqrt() * norm.weight + norm.bias

    q = att.to_q.weight @ ln(att.norm_q, main[1, 3])
    keys = [att.to_k[t].weight @ ln(att.norm_kv[t], aux[t][1, 3]) for t in aux]
    values = [att.to_v[t].weight @ ln(att.norm_kv[t], aux[t][1, 3]) for t in aux]
    w = torch.softmax(torch.stack([q @ k for k in keys]) / 8 ** 0.5, dim=0)
    assert 0.1 < w[0] < 0.9
    weights, _ = att.weights(main, aux)
    torch.testing.assert_close(weights[1, 3], w)
    expected = att.out.weight @ (w[0] * values[0] + w[1] * values[1]) + att.out.bias
    torch.testing.assert_close(att(main, aux)[1, 3], expected)


def test_one_step_from_a_zero_input_latent_at_the_last_timestep(device):
    """The denoiser's input is [image latent, zeros] plus the embedding of t = 999; the stream's
    features are each block's self-attention residual."""
    model = make(device)
    den = model.main
    z = model.codec.encode(torch.randn(2, 3, 5, 5, device=device))
    x = torch.cat([z, torch.zeros_like(z)], 1)
    t = torch.full((2,), 999, device=device)
    tokens = (den.inp(x) + den.time(t)[:, :, None, None]).flatten(2).transpose(1, 2)
    encoding = den.task_tokens["depth"].expand(2, -1, -1)
    residuals = []
    for block in den.blocks:
        tokens, residual = block(tokens, encoding)
        residuals.append(residual)
    latent, features = den(z, "depth")
    torch.testing.assert_close(latent, den.out(tokens.transpose(1, 2).reshape(2, -1, 5, 5)))
    for got, want in zip(features, residuals, strict=True):
        torch.testing.assert_close(got, want)


def test_each_auxiliary_stream_is_prompted_with_its_own_task(device):
    model = make(device)
    z = model.codec.encode(torch.randn(2, 3, 5, 5, device=device))
    per_block = model.auxiliary_features(z, "seg")
    for t in ("depth", "normals"):
        for i, f in enumerate(model.auxiliary(z, t)[1]):
            torch.testing.assert_close(per_block[i][t], f, rtol=0, atol=0)


def test_freeze_auxiliary_copies_the_trained_main_stream(device):
    model = make(device)
    _randomise(model.main)  # as if stage one had trained it
    model.freeze_auxiliary()
    main = model.main.state_dict()
    for name, value in model.auxiliary.state_dict().items():
        torch.testing.assert_close(value, main[name], rtol=0, atol=0)
    assert all(not p.requires_grad for p in model.auxiliary.parameters())


def test_pooled_outputs_are_the_spatial_mean_of_the_dense_maps(device):
    x = torch.randn(2, 3, 5, 5, device=device)
    dense, pooled = make(device)(x), make(device, dense=False)(x)
    for t in TASKS:
        torch.testing.assert_close(pooled[t], dense[t].mean(dim=(2, 3)))


def test_the_latent_is_wide_enough_for_the_image_and_every_task_map():
    """The codec's latent holds every input channel and every task's channels (maps are
    zero-padded, never cut): each input channel reaches the outputs and each task gets its width."""
    torch.manual_seed(0)
    direct = StableMTL(("a", "b"), 6, {"a": 7, "b": 1}, dim=8)
    built = StableMTL.from_problem(registry.Problem(("a", "b"), (6, 4, 4), {"a": 2}, dense=True), width=8)
    for model, widths in ((direct, {"a": 7, "b": 1}), (built, {"a": 2, "b": 1})):
        x = torch.randn(1, 6, 4, 4, requires_grad=True)
        out = model(x)
        assert {t: o.shape[1] for t, o in out.items()} == widths
        sum(o.sum() for o in out.values()).backward()
        assert (x.grad.abs().sum(dim=(0, 2, 3)) > 0).all()


def test_options_reach_every_block_and_the_codec_is_fixed_whatever_the_global_seed():
    """``num_heads`` sets the self- and prompt cross-attention heads, keywords pass through
    ``from_problem``; the frozen VAE stand-in is one fixed map, not drawn from the global RNG."""
    model = StableMTL.from_problem(registry.Problem(TASKS, (3, 4, 4), OUT, dense=True), width=8,
                                   num_heads=4, num_task_tokens=3)
    for block in model.main.blocks:
        assert block.self_attention.num_heads == block.prompt.num_heads == 4
    assert model.main.task_tokens["seg"].shape == (1, 3, 8)
    torch.manual_seed(1)
    first = StableMTL(TASKS, 3, OUT, dim=8).codec.matrix
    torch.manual_seed(2)
    torch.testing.assert_close(StableMTL(TASKS, 3, OUT, dim=8).codec.matrix, first, rtol=0, atol=0)
