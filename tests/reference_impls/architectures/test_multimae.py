"""MultiMAE: Dirichlet split of a fixed visible budget, encoder on visible tokens only,
per-modality cross-attention decoders, squared error on masked positions only."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.four_m import symmetric_dirichlet
from reference_impls.architectures.multimae import MultiMAE, dirichlet_visible
from reference_impls.architectures.registry import Problem

DENSE = Problem(("seg", "depth"), (2, 16, 16), {"seg": 3, "depth": 1}, dense=True)  # 16 tokens per modality


def build(device, problem=DENSE, **kw):
    torch.manual_seed(0)
    return MultiMAE.from_problem(problem, width=16, **kw).to(device)


def labels_for(problem, batch, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(batch, problem.out_dims[t], *problem.input_shape[1:], generator=g).to(device)
            for t in problem.tasks}


def per_modality_counts(visible, lengths):
    bounds = torch.tensor(lengths).cumsum(0)
    modality = torch.bucketize(visible, bounds, right=True)
    return torch.stack([(modality == m).sum(1) for m in range(len(lengths))], dim=1)


def test_the_visible_budget_is_exact_and_split_as_the_dirichlet_draw_asks():
    lengths, n, batch = [16, 16, 16], 12, 2000
    visible = dirichlet_visible(lengths, n, 1.0, batch, torch.Generator().manual_seed(0))
    assert visible.shape == (batch, n)
    assert (visible.diff(dim=1) > 0).all()  # n distinct tokens
    wanted = (symmetric_dirichlet(batch, 3, (1.0,), torch.Generator().manual_seed(0)) * n).round().long()
    counts = per_modality_counts(visible, lengths)
    exact = wanted.sum(1) == n
    assert exact.sum() > batch // 2 and (exact.sum() < batch)
    assert torch.equal(counts[exact], wanted[exact])  # rounding that adds up: each modality gets its request
    over, under = wanted.sum(1) > n, wanted.sum(1) < n
    assert (counts[over] <= wanted[over]).all() and (counts[under] >= wanted[under]).all()


def test_each_modality_offers_random_positions():
    """The tokens a modality offers are a random subset: every position is visible about equally often."""
    lengths = [16, 16, 16]
    visible = dirichlet_visible(lengths, 12, 1.0, 3000, torch.Generator().manual_seed(7))
    frequency = torch.bincount(visible.flatten(), minlength=48).float().view(3, 16)
    assert (frequency.max(1).values < 1.2 * frequency.min(1).values).all()


def test_the_concentration_sets_how_unevenly_modalities_share_the_budget():
    lengths, n = [16, 16, 16], 12
    peaked = per_modality_counts(dirichlet_visible(lengths, n, 1e-2, 500, torch.Generator().manual_seed(1)), lengths)
    assert (peaked.max(1).values >= n - 1).float().mean() > 0.8  # mostly all from one modality
    even = per_modality_counts(dirichlet_visible(lengths, n, 1e3, 500, torch.Generator().manual_seed(1)), lengths)
    assert ((even - n // 3).abs() <= 1).all()
    few = per_modality_counts(dirichlet_visible([2, 30], 20, 1e-3, 200, torch.Generator().manual_seed(2)), [2, 30])
    assert (few[:, 0] <= 2).all() and (few.sum(1) == 20).all()  # a short modality gives what it has


def test_predictions_depend_on_the_visible_tokens_only(device):
    model = build(device)
    x = torch.randn(3, *DENSE.input_shape, device=device)
    labels = labels_for(DENSE, 3, device)
    visible = dirichlet_visible(model.lengths, model.num_visible, 1.0, 3, torch.Generator().manual_seed(4)).to(device)
    is_visible = torch.zeros(3, 48, dtype=torch.bool, device=device).scatter(1, visible, True)
    modalities = [x] + [labels[t] for t in DENSE.tasks]

    def predictions(data):
        encoded = model.encode_visible(data, visible)
        return [model.predict(encoded, visible, m) for m in range(3)]

    before = predictions(modalities)
    hidden = [data + 5 * model.token_mask_to_values(m, ~is_visible[:, 16 * m:16 * (m + 1)])
              for m, data in enumerate(modalities)]
    for a, b in zip(predictions(hidden), before):
        torch.testing.assert_close(a, b)
    b, pos = torch.nonzero(is_visible[:, 16:32])[0].tolist()  # one visible 'seg' token
    shown = torch.zeros(3, 16, dtype=torch.bool, device=device)
    shown[b, pos] = True
    moved = list(modalities)
    moved[1] = modalities[1] + model.token_mask_to_values(1, shown)
    assert not torch.allclose(predictions(moved)[2], before[2])  # depth reads the seg token


def test_decoder_queries_carry_the_visible_tokens_of_their_own_modality(device):
    """SpatialOutputAdapter with task queries: a visible position's query is its projected encoder
    token plus the decoder's position and modality embeddings; a masked one is the mask token plus them."""
    model = build(device)
    x = torch.randn(2, *DENSE.input_shape, device=device)
    labels = labels_for(DENSE, 2, device)
    visible = dirichlet_visible(model.lengths, model.num_visible, 1.0, 2, torch.Generator().manual_seed(5)).to(device)
    encoded = model.encode_visible([x] + [labels[t] for t in DENSE.tasks], visible)
    decoder = model.decoders[1]
    seen = []
    hook = decoder.cross_attention.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = decoder(encoded, visible)
    hook.remove()
    embeddings = decoder.embeddings()
    context = decoder.project_context(encoded)
    expected = (decoder.mask_token + embeddings[16:32]).repeat(2, 1, 1)
    for b in range(2):
        for i, p in enumerate(visible[b].tolist()):
            if 16 <= p < 32:
                expected[b, p - 16] = context[b, i] + embeddings[p]
    assert ((visible >= 16) & (visible < 32)).any()
    torch.testing.assert_close(seen[0], decoder.query_norm(expected))

    # one cross-attention with no residual around it, to the visible tokens (with their embeddings)
    # and the global token (without), then an MLP with a residual, the blocks and the output layer
    memory = torch.cat([context[:, :-1] + embeddings[visible], context[:, -1:]], dim=1)
    h = decoder.cross_attention(decoder.query_norm(expected), decoder.context_norm(memory))
    h = h + decoder.mlp(decoder.out_norm(h))
    for block in decoder.blocks:
        h = block(h)
    torch.testing.assert_close(out, decoder.to_values(h))


def masked_loss_by_hand(model, x, labels, seed):
    """Per modality: each example's mean squared error over its masked 4 x 4 patches, averaged over the
    examples with any masked patch (16 tokens per modality)."""
    batch = x.shape[0]
    visible = dirichlet_visible(model.lengths, model.num_visible, model.alpha, batch,
                                torch.Generator().manual_seed(seed)).to(x.device)
    modalities = [x] + [labels[t] for t in DENSE.tasks]
    encoded = model.encode_visible(modalities, visible)
    expected = 0.0
    for m, data in enumerate(modalities):
        pred = model.predict(encoded, visible, m)
        per_example = []
        for b in range(batch):
            shown = {p - 16 * m for p in visible[b].tolist() if 16 * m <= p < 16 * (m + 1)}
            hidden = [q for q in range(16) if q not in shown]
            if not hidden:
                continue
            patch = lambda t: t[b].unfold(1, 4, 4).unfold(2, 4, 4).reshape(t.shape[1], 16, 16)  # noqa: E731
            per_example.append((patch(pred) - patch(data))[:, hidden].square().mean())
        if per_example:
            expected = expected + torch.stack(per_example).mean()
    return expected


def test_loss_is_the_masked_squared_error_summed_over_modalities(device):
    model = build(device)
    x = torch.randn(3, *DENSE.input_shape, device=device)
    labels = labels_for(DENSE, 3, device)
    loss = model.masked_autoencoding_loss(x, labels, torch.Generator().manual_seed(6))
    torch.testing.assert_close(loss, masked_loss_by_hand(model, x, labels, 6))


def test_an_example_with_a_modality_fully_visible_is_left_out_of_that_modalitys_mean(device):
    """The code's nanmean over examples: the mean runs over the examples with a masked patch, not the batch."""
    model = build(device, num_visible=16, alpha=1e-2)
    x = torch.randn(2, *DENSE.input_shape, device=device)
    labels = labels_for(DENSE, 2, device)
    seed = next(s for s in range(400) if ((per_modality_counts(dirichlet_visible(
        model.lengths, 16, 1e-2, 2, torch.Generator().manual_seed(s)), model.lengths) == 16).sum(0) == 1).any())
    loss = model.masked_autoencoding_loss(x, labels, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss, masked_loss_by_hand(model, x, labels, seed))


def test_a_fully_visible_modality_adds_nothing(device):
    model = build(device, num_visible=16, alpha=1e-2)
    x = torch.randn(1, *DENSE.input_shape, device=device)
    labels = labels_for(DENSE, 1, device)
    seed = next(s for s in range(200) if (per_modality_counts(
        dirichlet_visible(model.lengths, 16, 1e-2, 1, torch.Generator().manual_seed(s)), model.lengths) == 16).any())
    visible = dirichlet_visible(model.lengths, 16, 1e-2, 1, torch.Generator().manual_seed(seed)).to(device)
    full = int(per_modality_counts(visible.cpu(), model.lengths)[0].argmax())
    with torch.no_grad():
        model.decoders[full].to_values.bias.add_(100.0)  # its predictions no longer matter
    loss = model.masked_autoencoding_loss(x, labels, torch.Generator().manual_seed(seed))
    assert loss < 50


def test_decoder_embeddings_are_position_plus_source_modality():
    model = build("cpu")
    decoder = model.decoders[2]
    for m, (start, stop) in enumerate(((0, 16), (16, 32), (32, 48))):
        torch.testing.assert_close(decoder.embeddings()[start:stop],
                                   decoder.positions[m] + decoder.modality_embedding[m][None])


def test_defaults_half_of_x_visible_and_no_self_attention_for_a_one_token_modality():
    assert build("cpu").num_visible == 8  # half of x's 16 tokens
    vector = Problem(("one", "many"), (12,), {"one": 1, "many": 12})
    model = build("cpu", vector, num_tokens=4)
    assert [len(d.blocks) for d in model.decoders] == [2, 0, 2]  # x, the one-value task, the 12-value task


def test_forward_is_the_x_to_all_tasks_query(device, split_by_task):
    model = build(device)
    x = torch.randn(2, *DENSE.input_shape, device=device)
    out = model(x)
    assert out["seg"].shape == (2, 3, 16, 16) and out["depth"].shape == (2, 1, 16, 16)
    visible = torch.arange(16, device=device).expand(2, -1)
    encoded = model.encode_visible([x], visible)
    torch.testing.assert_close(out["depth"], model.predict(encoded, visible, 2))
    split = split_by_task(model, x)
    for task, (claimed, reached) in split.items():
        other = next(t for t in split if t != task)
        assert "encoder.0.mlp.0.weight" in reached and not reached & split[other][0]
        assert {f"decoders.{1 + DENSE.tasks.index(task)}.{n}" for n in ("to_values.weight", "mask_token")} <= claimed & reached
        assert not any(n.startswith(("patches.1.", "patches.2.", "decoders.0.")) for n in reached)  # labels: no input


def test_masked_pre_training_lowers_the_loss(device):
    model = build(device)
    x = torch.randn(4, *DENSE.input_shape, device=device)
    labels = {"seg": x[:, :1].repeat(1, 3, 1, 1), "depth": -x[:, 1:]}  # predictable from x and each other
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(15):
        loss = model.masked_autoencoding_loss(x, labels, torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])


def test_registry_builds_and_forward_trains(device, short_training, registry_output_shapes):
    registry_output_shapes("multimae", device)
    first, last = short_training("multimae", True, device, 20)
    assert last < first


def test_every_decoder_mlp_is_w2_gelu_w1_by_hand(device):
    """Each modality decoder's MLP after its cross-attention is W2 GELU(W1 t + b1) + b2 (exact
    erf GELU), written out from its weights in float64."""
    model = build(device).double()
    assert len(model.decoders) == 3
    for decoder in model.decoders:
        first, last = decoder.mlp[0], decoder.mlp[-1]
        t = torch.randn(2, 4, first.in_features, device=device, dtype=torch.float64)
        u = t @ first.weight.T + first.bias
        gelu = 0.5 * u * (1 + torch.erf(u / 2**0.5))
        torch.testing.assert_close(decoder.mlp(t), gelu @ last.weight.T + last.bias, rtol=1e-12, atol=1e-12)


def test_decoder_normalises_queries_with_query_norm_and_context_with_context_norm(device):
    """With distinct affine parameters on the two LayerNorms, the cross-attention's query input
    undone by query_norm's affine map, and its context input undone by context_norm's, each have
    zero mean and unit variance per token (plain torch ops, float64, eps made negligible)."""
    model = build(device).double()
    decoder = model.decoders[1]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for norm in (decoder.query_norm, decoder.context_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g, dtype=torch.float64) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=torch.float64))
            norm.eps = 1e-15  # so that a normalised token has variance 1 to rounding
    seen = {}
    hook = decoder.cross_attention.register_forward_pre_hook(lambda _, args: seen.update(q=args[0], c=args[1]))
    model(torch.randn(2, *DENSE.input_shape, device=device, dtype=torch.float64))
    hook.remove()
    for arg, norm in ((seen["q"], decoder.query_norm), (seen["c"], decoder.context_norm)):
        undone = (arg - norm.bias) / norm.weight
        mean, var = undone.mean(-1), undone.var(-1, unbiased=False)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-9)
        torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-9)


VECTOR = Problem(("one", "many"), (12,), {"one": 1, "many": 12})  # with num_tokens=4: x 4 tokens, 'one' 1, 'many' 4


def test_a_batch_of_one_still_offers_random_positions():
    """The random order of a modality's positions is drawn per example, so even one example at a time
    sees every position of every modality about equally often over many draws."""
    lengths = [16, 16, 16]
    draws = torch.cat([dirichlet_visible(lengths, 12, 1.0, 1, torch.Generator().manual_seed(s)) for s in range(400)])
    frequency = torch.bincount(draws.flatten(), minlength=48).float().view(3, 16)
    assert (frequency.min(1).values > 0.5 * frequency.mean(1)).all()


def test_the_visible_draw_depends_on_the_generator_only():
    """Same generator seed, same visible tokens, whatever the global random state (the rounding fill-up too)."""
    torch.manual_seed(0)
    first = dirichlet_visible([16, 16, 16], 12, 1.0, 200, torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    second = dirichlet_visible([16, 16, 16], 12, 1.0, 200, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_a_two_token_modality_keeps_its_decoder_self_attention():
    """Only a one-token modality loses the self-attention blocks; two tokens can attend to each other."""
    model = build("cpu", Problem(("two",), (12,), {"two": 2}), num_tokens=4)
    assert model.lengths == [4, 2] and [len(d.blocks) for d in model.decoders] == [2, 2]


def test_direct_construction_defaults_vector_outputs_and_uniform_dirichlet():
    """Built without options: a working model, not dense (vector outputs from an image), alpha = 1 as in MultiMAE."""
    torch.manual_seed(0)
    model = MultiMAE(("a",), (2, 16, 16), {"a": 3})
    assert model.alpha == 1.0
    assert model(torch.randn(2, 2, 16, 16))["a"].shape == (2, 3)


def test_token_lengths_and_visible_budget_follow_num_tokens_and_x():
    """num_tokens sets the vector modalities' token counts; the default budget is half of x's own tokens,
    at least one."""
    model = build("cpu", VECTOR, num_tokens=4)
    assert model.lengths == [4, 1, 4] and model.num_visible == 2
    tiny = build("cpu", Problem(("t",), (2,), {"t": 12}))  # x: 2 tokens of one value
    assert tiny.lengths[0] == 2 and tiny.num_visible == 1


def test_bad_hyperparameters_are_refused_and_a_full_budget_is_allowed():
    for bad in ({"decoder_depth": -1}, {"alpha": 0.0}, {"num_visible": 49}):
        with pytest.raises(ValueError):
            build("cpu", **bad)
    assert build("cpu", num_visible=48).num_visible == 48  # every token of the three modalities


def test_a_vector_token_mask_covers_exactly_its_chunk():
    """A vector modality is cut into chunks of ceil(d / num_tokens) values: masking token k masks values
    k * chunk to (k + 1) * chunk, nothing else."""
    model = build("cpu", VECTOR, num_tokens=4)
    for k in range(4):
        mask = torch.zeros(1, 4, dtype=torch.bool)
        mask[0, k] = True
        expected = torch.zeros(1, 12, dtype=torch.bool)
        expected[0, 3 * k:3 * k + 3] = True
        assert torch.equal(model.token_mask_to_values(2, mask), expected)


def test_vector_loss_is_the_masked_squared_error_by_hand():
    """Per modality the mean squared error over an example's masked values (value i belongs to token
    i // chunk), averaged over the examples with any masked value, summed; a one-value task counts fully."""
    model = build("cpu", VECTOR, num_tokens=4)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    labels = {"one": torch.randn(6, 1), "many": torch.randn(6, 12)}
    loss = model.masked_autoencoding_loss(x, labels, torch.Generator().manual_seed(2))
    visible = dirichlet_visible(model.lengths, model.num_visible, 1.0, 6, torch.Generator().manual_seed(2))
    modalities, chunks, starts = [x, labels["one"], labels["many"]], [3, 1, 3], [0, 4, 5]
    encoded = model.encode_visible(modalities, visible)
    expected = torch.zeros(())
    for m, data in enumerate(modalities):
        pred = model.predict(encoded, visible, m)
        means = []
        for b in range(6):
            hidden = [i for i in range(data.shape[1]) if starts[m] + i // chunks[m] not in visible[b].tolist()]
            if hidden:
                means.append((pred[b, hidden] - data[b, hidden]).square().mean())
        if means:
            expected = expected + torch.stack(means).mean()
    assert expected > 0
    torch.testing.assert_close(loss, expected)


def test_forward_on_vectors_sees_every_x_token():
    model = build("cpu", VECTOR, num_tokens=4)
    x = torch.randn(2, 12)
    out = model(x)
    visible = torch.arange(4).expand(2, -1)
    encoded = model.encode_visible([x], visible)
    for m, task in enumerate(VECTOR.tasks, start=1):
        torch.testing.assert_close(out[task], model.predict(encoded, visible, m))
