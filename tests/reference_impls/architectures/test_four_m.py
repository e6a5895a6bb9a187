"""4M: Dirichlet token budgets, disjoint input/target subsets, targets predicted from inputs only."""

from __future__ import annotations

import torch

from reference_impls.architectures.four_m import FourM, gather_selected, symmetric_dirichlet
from reference_impls.architectures.registry import Problem

DENSE = Problem(("seg", "depth"), (2, 16, 16), {"seg": 3, "depth": 1}, dense=True)  # 16 tokens per modality
VECTOR = Problem(("a", "b"), (12,), {"a": 2, "b": 1})


def build(device, problem=DENSE, **kw):
    torch.manual_seed(0)
    return FourM.from_problem(problem, width=16, **kw).to(device)


def labels_for(model, problem, batch, device):
    g = torch.Generator().manual_seed(3)
    return {t: torch.randn(batch, problem.out_dims[t], *problem.input_shape[1:], generator=g).to(device)
            for t in problem.tasks}


def test_subsets_are_disjoint_and_match_the_budgets(device):
    model = build(device, input_tokens=6, target_tokens=6)  # no modality can run out of tokens
    s = model.sample_tokens(300, torch.Generator().manual_seed(0))
    assert not (s.inputs & s.targets).any()
    for m in range(3):
        in_m = (s.inputs & (model.modality_of == m)).sum(1).cpu()
        tgt_m = (s.targets & (model.modality_of == m)).sum(1).cpu()
        assert torch.equal(in_m, s.input_budget[:, m]) and torch.equal(tgt_m, s.target_budget[:, m])
    assert (s.input_budget.sum(1) == 6).all() and (s.target_budget.sum(1) == 6).all()
    assert (s.target_budget[:, 0] == 0).all()  # the input x is never a target
    assert (s.input_budget + s.target_budget <= model.lengths.cpu()).all()


def test_budgets_are_capped_by_what_a_modality_has(device):
    model = build(device, input_tokens=40, target_tokens=30)  # 48 tokens in all, 16 per modality
    s = model.sample_tokens(300, torch.Generator().manual_seed(1))
    assert (s.input_budget <= 16).all() and (s.input_budget + s.target_budget <= 16).all()
    assert not (s.inputs & s.targets).any()


def test_budget_shares_follow_a_symmetric_dirichlet():
    shares = symmetric_dirichlet(20000, 3, (0.5,), torch.Generator().manual_seed(2))
    torch.testing.assert_close(shares.sum(1), torch.ones(20000))
    torch.testing.assert_close(shares.mean(0), torch.full((3,), 1 / 3), atol=0.01, rtol=0)
    expected_var = (1 / 3) * (2 / 3) / (3 * 0.5 + 1)  # Var of one share of Dir(0.5, 0.5, 0.5)
    torch.testing.assert_close(shares.var(0), torch.full((3,), expected_var), atol=0.006, rtol=0)
    model = build("cpu", input_tokens=9, target_tokens=8)
    s = model.sample_tokens(4000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(s.input_budget.float().mean(0), torch.full((3,), 3.0), atol=0.2, rtol=0)
    torch.testing.assert_close(s.target_budget[:, 1:].float().mean(0), torch.full((2,), 4.0), atol=0.2, rtol=0)


def test_tiny_alphas_give_one_modality_the_whole_budget():
    # Dir(1e-3) puts almost all mass on one coordinate; Gamma(1e-3) draws underflow to 0, so
    # sampling by normalising raw gamma draws gave some rows 0/0 (and torch then 1/3 each).
    shares = symmetric_dirichlet(5000, 3, (1e-3,), torch.Generator().manual_seed(4))
    torch.testing.assert_close(shares.sum(1), torch.ones(5000))
    assert (shares.max(1).values > 0.99).float().mean() > 0.98
    assert ((shares - 1 / 3).abs() < 1e-3).all(1).sum() == 0
    counts = torch.bincount(shares.argmax(1), minlength=3).float()
    torch.testing.assert_close(counts / 5000, torch.full((3,), 1 / 3), atol=0.03, rtol=0)


def test_target_predictions_depend_only_on_input_tokens(device):
    model = build(device)
    x = torch.randn(3, *DENSE.input_shape, device=device)
    ids = {t: model.tokenize(t, y) for t, y in labels_for(model, DENSE, 3, device).items()}
    sample = model.sample_tokens(3, torch.Generator().manual_seed(4))
    logits = model.target_logits(x, ids, sample)
    assert sum(v.shape[0] for v in logits.values()) == int(sample.targets.sum())

    # Rewrite every task token and every pixel patch that is not an input: nothing changes.
    shifted = {}
    for m, t in enumerate(DENSE.tasks, start=1):
        hidden = ~sample.inputs[:, model.modality_of == m]
        shifted[t] = torch.where(hidden, (ids[t] + 7) % len(model.table(t)), ids[t])
    hidden_pixels = ~sample.inputs[:, model.modality_of == 0].view(3, 1, 4, 4)
    noisy_x = torch.where(hidden_pixels.repeat_interleave(4, 2).repeat_interleave(4, 3), x + 5, x)
    for t, v in model.target_logits(noisy_x, shifted, sample).items():
        torch.testing.assert_close(v, logits[t])

    # Change one *input* token: the predictions move.
    m, t = 1, "seg"
    b, pos = torch.nonzero(sample.inputs[:, model.modality_of == m])[0].tolist()
    changed = dict(ids)
    changed[t] = ids[t].clone()
    changed[t][b, pos] = (ids[t][b, pos] + 1) % len(model.table(t))
    assert not torch.allclose(model.target_logits(x, changed, sample)["depth"], logits["depth"])


def test_loss_averages_token_cross_entropy_within_then_across_modalities(device):
    model = build(device)
    x = torch.randn(3, *DENSE.input_shape, device=device)
    labels = labels_for(model, DENSE, 3, device)
    loss = model.masked_modeling_loss(x, labels, torch.Generator().manual_seed(6))
    sample = model.sample_tokens(3, torch.Generator().manual_seed(6))  # the same draw
    ids = {t: model.tokenize(t, y) for t, y in labels.items()}
    logits = model.target_logits(x, ids, sample)
    per_modality = []
    for m, t in enumerate(DENSE.tasks, start=1):
        chosen = sample.targets[:, model.modality_of == m]  # (B, 16): this task's target tokens
        log_p = torch.log_softmax(logits[t], -1)
        nll = -log_p[torch.arange(len(log_p), device=device), ids[t][chosen]]
        per_modality.append(nll.mean())
    counts = [int((sample.targets & (model.modality_of == m)).sum()) for m in (1, 2)]
    assert counts[0] != counts[1]  # so a plain per-token mean would differ
    torch.testing.assert_close(loss, torch.stack(per_modality).mean())


def test_forward_reads_expected_token_values(device):
    model = build(device, problem=VECTOR)
    x = torch.randn(4, 12, device=device)
    out = model(x)
    logits = model.target_logits(x, None, model.all_tasks_sample(4))
    centres = torch.linspace(-4, 4, 32, device=device)
    expected = torch.softmax(logits["a"], -1).view(4, 2, 32) @ centres
    torch.testing.assert_close(out["a"], expected)
    assert out["a"].shape == (4, 2) and out["b"].shape == (4, 1)


def test_tokenizer_round_trip_on_codebook_patches(device):
    model = build(device)
    ids = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(5)).to(device)
    y = model.detokenize("seg", model.table("seg")[ids])
    assert y.shape == (2, 3, 16, 16)
    assert torch.equal(model.tokenize("seg", y), ids)


def test_task_heads_and_queries_are_task_specific(device, params_with_grad):
    model = build(device)
    touched = params_with_grad(model, model(torch.randn(2, *DENSE.input_shape, device=device))["seg"].sum())
    assert any(n.startswith("encoder.") for n in touched) and any(n.startswith("pixels.") for n in touched)
    assert not any(n.startswith(("to_logits.depth", "query_modality.depth")) for n in touched)
    assert not any(n.startswith("token_embedding.") for n in touched)  # labels are not inputs here
    specific = {id(p) for p in model.task_specific_parameters("depth")}
    assert specific == {id(p) for p in [model.query_modality["depth"], *model.to_logits["depth"].parameters()]}


def test_masked_modeling_training_lowers_the_loss(device):
    model = build(device)
    x = torch.randn(8, *DENSE.input_shape, device=device)
    labels = {"seg": x[:, :1].repeat(1, 3, 1, 1), "depth": -x[:, 1:]}  # predictable from x and each other
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        loss = model.masked_modeling_loss(x, labels, torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_registry_builds_and_forward_trains(device, short_training, registry_output_shapes):
    registry_output_shapes("four_m", device)
    first, last = short_training("four_m", True, device, 20)
    assert last < first


def test_decoder_reads_projected_encoder_states_with_their_embeddings_added_back(device):
    """4M's decoder context (apple/ml-4m, fourm/models/fm.py): a linear projection of the normalised
    encoder output plus each input token's position and modality embedding, added again; each
    decoder block layer-normalises it before its cross-attention (fm_utils.py)."""
    model = build(device)
    x = torch.randn(3, *DENSE.input_shape, device=device)
    ids = {t: model.tokenize(t, y) for t, y in labels_for(model, DENSE, 3, device).items()}
    sample = model.sample_tokens(3, torch.Generator().manual_seed(4))
    seen = []
    hook = model.decoder[0].cross_attention.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    model.target_logits(x, ids, sample)
    hook.remove()
    h, valid, index = gather_selected(model.embed_pool(x, ids), sample.inputs)
    mask = valid[:, None, None, :] | torch.eye(h.shape[1], dtype=torch.bool, device=device)
    for block in model.encoder:
        h = block(h, mask)
    no_content = torch.cat([model.pixels.positions + model.pixel_modality]
                           + [model.positions[t] + model.input_modality[t] for t in DENSE.tasks])
    context = model.context_projection(model.encoder_norm(h)) + no_content[index]
    torch.testing.assert_close(seen[0], model.decoder[0].norm_context(context))


def test_a_modality_without_targets_counts_as_zero_in_the_mean_across_modalities(device):
    """fm.py's per-modality loss gives a target modality with no target tokens in the batch a loss
    of 0 and still divides by the number of target modalities."""
    model = build(device, alphas=(1e-3,), target_tokens=4)  # nearly one-hot shares: one modality gets all
    x = torch.randn(1, *DENSE.input_shape, device=device)
    labels = labels_for(model, DENSE, 1, device)
    ids = {t: model.tokenize(t, y) for t, y in labels.items()}
    seed = next(s for s in range(100)
                if (model.sample_tokens(1, torch.Generator().manual_seed(s)).target_budget[0, 1:] > 0).sum() == 1)
    sample = model.sample_tokens(1, torch.Generator().manual_seed(seed))
    m = 1 + int(sample.target_budget[0, 1:].argmax())  # the one modality with targets
    task = DENSE.tasks[m - 1]
    logits = model.target_logits(x, ids, sample)[task]
    only = torch.nn.functional.cross_entropy(logits, ids[task][sample.targets[:, model.modality_of == m]])
    loss = model.masked_modeling_loss(x, labels, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss, only / 2)


def test_a_sample_uses_one_alpha_of_the_mixture_for_both_budgets():
    """Mixing Dir(1e-3) (nearly all on one modality) with Dir(1e3) (an even split): a sample's input
    and target budgets are both split evenly or (nearly always) neither is, and each alpha is drawn half the time."""
    model = build("cpu", alphas=(1e-3, 1e3), input_tokens=6, target_tokens=6)
    s = model.sample_tokens(2000, torch.Generator().manual_seed(7))
    even_in, even_target = (s.input_budget == 2).all(1), (s.target_budget[:, 1:] == 3).all(1)
    assert abs(even_in.float().mean().item() - 0.5) < 0.05
    assert (even_target == even_in).float().mean() > 0.99  # Dir(1e-3) splits a budget in two now and then
    shares = symmetric_dirichlet(2000, 3, (1e-3, 1e3), torch.Generator().manual_seed(8))
    assert abs((shares.max(1).values < 0.4).float().mean().item() - 0.5) < 0.05


def test_subsets_are_random_positions_of_each_modality():
    """Every position of a modality is equally likely to be chosen, as input and as target."""
    model = build("cpu", alphas=(1e3,), input_tokens=6, target_tokens=6)  # 2 inputs, 3 targets per task
    s = model.sample_tokens(800, torch.Generator().manual_seed(8))
    for m in (1, 2):
        in_m, tgt_m = s.inputs[:, model.modality_of == m], s.targets[:, model.modality_of == m]
        torch.testing.assert_close(in_m.float().mean(0), torch.full((16,), 2 / 16), atol=0.06, rtol=0)
        torch.testing.assert_close(tgt_m.float().mean(0), torch.full((16,), 3 / 16), atol=0.06, rtol=0)


def test_encoder_tokens_and_decoder_queries_sum_their_embeddings(device):
    """Input token = embedding of its id + position + modality (pixels: projection + pixel modality);
    query = shared mask token + position + query modality, no content."""
    model = build(device)
    x = torch.randn(2, *DENSE.input_shape, device=device)
    ids = {t: model.tokenize(t, y) for t, y in labels_for(model, DENSE, 2, device).items()}
    pool, queries = model.embed_pool(x, ids), model.query_pool(2)
    parts = pool.split(model.lengths.tolist(), dim=1)
    torch.testing.assert_close(parts[0], model.pixels(x) + model.pixel_modality)
    for m, t in enumerate(DENSE.tasks, start=1):
        torch.testing.assert_close(parts[m], model.token_embedding[t](ids[t]) + model.positions[t] + model.input_modality[t])
        torch.testing.assert_close(queries.split(model.lengths.tolist(), dim=1)[m],
                                   (model.mask_token + model.positions[t] + model.query_modality[t]).expand(2, -1, -1))


def test_each_modality_is_read_out_by_its_own_logit_layer(device, split_by_task):
    model = build(device)
    for t, (_, reached) in split_by_task(model, torch.randn(2, *DENSE.input_shape, device=device)).items():
        assert {n.split(".")[1] for n in reached if n.startswith("to_logits.")} == {t}
        assert {n for n in reached if n.startswith("query_modality.")} == {f"query_modality.{t}"}


def test_default_concentration_is_4ms_alpha_one_half():
    """4M's all-to-all masking draws the budgets from Dir(0.5) alone (4M-21 mixes several alphas)."""
    assert build("cpu").alphas == (0.5,)


def test_every_block_mlp_is_w2_gelu_w1_by_hand(device):
    """Each encoder and decoder block's MLP is W2 GELU(W1 t + b1) + b2 (exact erf GELU),
    written out from its weights in float64."""
    model = build(device).double()
    blocks = [*model.encoder, *model.decoder]
    assert len(blocks) == 4
    for block in blocks:
        first, last = block.mlp[0], block.mlp[-1]
        t = torch.randn(3, 5, first.in_features, device=device, dtype=torch.float64)
        u = t @ first.weight.T + first.bias
        gelu = 0.5 * u * (1 + torch.erf(u / 2**0.5))
        torch.testing.assert_close(block.mlp(t), gelu @ last.weight.T + last.bias, rtol=1e-12, atol=1e-12)


def test_masking_draws_are_reproducible_from_the_generator_alone():
    """The Dirichlet budgets (alpha component included) and the subsets come from the given generator,
    not from the global RNG: the same seed gives the same draw whatever the global state is."""
    model = build("cpu", alphas=(0.2, 5.0), input_tokens=6, target_tokens=6)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        shares = symmetric_dirichlet(50, 3, (0.2, 5.0), torch.Generator().manual_seed(9))
        draws.append((shares, model.sample_tokens(50, torch.Generator().manual_seed(9))))
    (shares_a, a), (shares_b, b) = draws
    torch.testing.assert_close(shares_a, shares_b, rtol=0, atol=0)
    for field in ("inputs", "targets", "input_budget", "target_budget"):
        assert torch.equal(getattr(a, field), getattr(b, field))


def test_a_single_sample_draws_random_positions_too():
    """With a batch of one, each modality's chosen positions still vary from draw to draw and cover
    every position about equally often (the random order is taken within the sample, not across the batch)."""
    model = build("cpu", alphas=(1e3,), input_tokens=6, target_tokens=6)  # 2 inputs, 3 targets per task
    hits = torch.zeros(16)
    for seed in range(240):
        s = model.sample_tokens(1, torch.Generator().manual_seed(seed))
        hits += s.inputs[0, model.modality_of == 1].float()
    torch.testing.assert_close(hits / 240, torch.full((16,), 2 / 16), atol=0.08, rtol=0)


def test_samples_are_independent_of_the_rest_of_the_batch(device):
    """A batch larger than its number of input tokens works, and each sample's target logits equal
    those of the sample run alone with the same input/target subsets."""
    model = build(device, input_tokens=2, target_tokens=3)
    x = torch.randn(5, *DENSE.input_shape, device=device)
    ids = {t: model.tokenize(t, y) for t, y in labels_for(model, DENSE, 5, device).items()}
    sample = model.sample_tokens(5, torch.Generator().manual_seed(2))
    batched = model.target_logits(x, ids, sample)
    alone = {t: [] for t in DENSE.tasks}
    for b in range(5):
        one = type(sample)(sample.inputs[b:b + 1], sample.targets[b:b + 1],
                           sample.input_budget[b:b + 1], sample.target_budget[b:b + 1])
        for t, v in model.target_logits(x[b:b + 1], {t: i[b:b + 1] for t, i in ids.items()}, one).items():
            alone[t].append(v)
    for t in DENSE.tasks:
        torch.testing.assert_close(batched[t], torch.cat(alone[t]), atol=1e-5, rtol=1e-5)


def test_all_tasks_query_budgets_count_its_inputs_and_targets():
    """forward()'s query takes every pixel token as input and every task token as target; its
    budgets say so, as every TokenSample's budgets count its subsets per modality."""
    model = build("cpu")
    s = model.all_tasks_sample(3)
    for m in range(3):
        assert torch.equal((s.inputs & (model.modality_of == m)).sum(1), s.input_budget[:, m])
        assert torch.equal((s.targets & (model.modality_of == m)).sum(1), s.target_budget[:, m])


def test_blocks_are_pre_norm_residual_sums(device):
    """Each block adds its sublayers to the residual stream: h + SA(LN1 h), then + CA(LN h, LN memory),
    then + MLP(LN2 h)."""
    model = build(device)
    enc, dec = model.encoder[0], model.decoder[0]
    g = torch.Generator().manual_seed(11)
    h, memory = torch.randn(2, 5, 16, generator=g).to(device), torch.randn(2, 4, 16, generator=g).to(device)
    self_mask = torch.ones(2, 1, 5, 5, dtype=torch.bool, device=device)
    cross_mask = torch.ones(2, 1, 1, 4, dtype=torch.bool, device=device)
    a = h + enc.self_attention(enc.norm1(h), enc.norm1(h), self_mask)
    torch.testing.assert_close(enc(h, self_mask), a + enc.mlp(enc.norm2(a)))
    a = h + dec.self_attention(dec.norm1(h), dec.norm1(h), self_mask)
    a = a + dec.cross_attention(dec.norm_cross(a), dec.norm_context(memory), cross_mask)
    torch.testing.assert_close(dec(h, self_mask, memory, cross_mask), a + dec.mlp(dec.norm2(a)))


def test_direct_construction_defaults_to_vector_outputs_of_size_one_for_unlisted_tasks():
    """Without ``dense=True`` an image input still gives per-sample vector outputs, and a task missing
    from ``out_dims`` gets one output, as the repository's other models do."""
    torch.manual_seed(0)
    model = FourM(("a", "b"), (2, 16, 16), {"a": 2}, dim=16)
    out = model(torch.randn(3, 2, 16, 16))
    assert out["a"].shape == (3, 2) and out["b"].shape == (3, 1)


def test_default_token_budgets_are_whole_numbers_of_tokens():
    """Without explicit budgets the input and target token counts are still token counts (integers),
    also when a pool has an odd number of tokens (here 9 in all, 3 of them task tokens), and the
    sampled budgets never exceed them."""
    model = build("cpu", problem=VECTOR)
    assert int(model.lengths.sum()) == 9 and int(model.lengths[1:].sum()) == 3
    assert isinstance(model.input_tokens, int) and isinstance(model.target_tokens, int)
    s = model.sample_tokens(200, torch.Generator().manual_seed(0))
    assert (s.input_budget.sum(1) <= model.input_tokens).all()
    assert (s.target_budget.sum(1) <= model.target_tokens).all()
