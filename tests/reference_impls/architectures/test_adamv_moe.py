"""AdaMV-MoE: k_t unrenormalised top-k gates per task, V-MoE balancing losses, and the
adaptive expert selection that grows a task's k while its validation loss rewards it."""

import io
import math

import pytest
import torch

from reference_impls.architectures.adamv_moe import AdaMVMoE, NoisyTopKTaskMoE
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (8,), {"a": 1, "b": 2})


def moe(device, num_experts=5, noise_std=1.0):
    torch.manual_seed(0)
    return NoisyTopKTaskMoE(8, ("a", "b"), num_experts, noise_std).to(device)


def test_gates_are_the_k_largest_softmax_probabilities_not_renormalised(device):
    layer = moe(device).eval()
    x = torch.randn(20, 8, device=device)
    combine, _ = layer.route(x, "a", 2)
    probs = torch.softmax(layer.routers["a"](x), -1)
    assert ((combine > 0).sum(-1) == 2).all()  # exactly k experts per token
    kept = probs.topk(2, -1)
    torch.testing.assert_close(combine.gather(-1, kept.indices), kept.values)  # the probabilities themselves
    assert (combine.sum(-1) < 1 - 1e-3).all()  # ... so a token's weights sum below 1 when k < N


def test_the_router_learns_from_the_task_loss_even_with_one_expert(device):
    layer = moe(device).eval()
    x = torch.randn(6, 8, device=device)
    out, _ = layer(x, "a", 1)
    out.square().sum().backward()
    assert layer.routers["a"].weight.grad.abs().sum() > 0  # a renormalised top-1 gate would be constant 1
    assert layer.routers["b"].weight.grad is None


def test_output_mixes_the_chosen_experts_and_only_they_get_gradient(device):
    layer = moe(device, num_experts=6).eval()
    x = torch.randn(1, 8, device=device)  # one token: k = 2 of 6 experts are chosen
    combine, _ = layer.route(x, "b", 2)
    out, _ = layer(x, "b", 2)
    torch.testing.assert_close(out, sum(combine[:, i:i + 1] * layer.experts[i](x) for i in range(6)))
    out.sum().backward()
    chosen = combine[0] > 0
    for i, expert in enumerate(layer.experts):
        touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())
        assert touched == bool(chosen[i]), i


def test_training_noise_has_std_sigma_over_n_and_the_losses_match_v_moe(device):
    """By hand: softmax(logits + σ/N ε) top-k, importance CV² of clean gates, load CV² of
    P(logit_i + fresh noise beats the k-th noisy logit)."""
    layer = moe(device, num_experts=4, noise_std=2.0).train()
    x = torch.randn(10, 8, device=device)
    combine, aux = layer.route(x, "a", 2, torch.Generator(device=device).manual_seed(3))
    logits = layer.routers["a"](x)
    eps = torch.randn(logits.shape, generator=torch.Generator(device=device).manual_seed(3), device=device)
    noisy = logits + 0.5 * eps  # σ / N = 2 / 4
    kept = torch.softmax(noisy, -1).topk(2, -1)
    torch.testing.assert_close(combine.gather(-1, kept.indices), kept.values)
    importance = torch.softmax(logits, -1).sum(0)
    importance_loss = (importance.std(unbiased=False) / importance.mean()) ** 2
    threshold = noisy.topk(2, -1).values[:, 1:]
    p = (1 - torch.special.ndtr((threshold - logits) / 0.5)).mean(0)
    load_loss = (p.std(unbiased=False) / p.mean()) ** 2
    torch.testing.assert_close(aux, importance_loss + load_loss)
    assert load_loss > 1e-4 and importance_loss > 1e-4


def test_eval_mode_is_deterministic_and_uses_the_importance_loss_only(device):
    layer = moe(device).eval()
    x = torch.randn(10, 8, device=device)
    first, aux = layer.route(x, "a", 3)
    torch.testing.assert_close(layer.route(x, "a", 3)[0], first)
    importance = torch.softmax(layer.routers["a"](x), -1).sum(0)
    torch.testing.assert_close(aux, (importance.std(unbiased=False) / importance.mean()) ** 2)
    with torch.no_grad():
        layer.routers["a"].weight.zero_()  # a uniform router is perfectly balanced
    assert layer.route(x, "a", 3)[1].abs() < 1e-12


def test_adaptive_expert_selection_grows_k_while_it_pays_and_undoes_the_first_that_does_not():
    model = build("adamv_moe", VEC, width=8, num_experts=4, initial_k=2, patience=2)
    script = [  # step, validation losses, expected k after it
        (1, {"a": 1.0, "b": 1.0}, {"a": 2, "b": 2}),  # first measurement: both best so far
        (2, {"a": 0.9, "b": 1.0}, {"a": 2, "b": 2}),  # b stalled only 1 step
        (4, {"a": 0.9, "b": 1.0}, {"a": 2, "b": 3}),  # b stalled 3 > 2 steps: one more expert
        (5, {"a": 0.9, "b": 0.8}, {"a": 3, "b": 3}),  # b's increase paid off and stays; a stalled
        (6, {"a": 0.95, "b": 0.8}, {"a": 2, "b": 3}),  # a's did not: undone, and a's search ends
        (9, {"a": 0.5, "b": 0.8}, {"a": 2, "b": 4}),  # a frozen even though it improves; b stalled again
        (10, {"a": 0.4, "b": 0.8}, {"a": 2, "b": 3}),  # b's second increase did not pay: undone
        (30, {"a": 0.4, "b": 0.9}, {"a": 2, "b": 3}),  # both frozen now
    ]
    for step, losses, expected in script:
        assert model.adapt_expert_counts(step, losses) == expected, step
    assert model.experts_per_task == {"a": 2, "b": 3}


def test_k_stops_growing_at_max_k():
    model = build("adamv_moe", VEC, width=8, num_experts=4, initial_k=2, max_k=3, patience=0)
    ks = [model.adapt_expert_counts(step, {"a": loss, "b": 1.0})["a"]
          for step, loss in enumerate([1.0, 1.0, 0.5, 0.5, 0.5, 0.5])]
    assert ks == [2, 3, 3, 3, 3, 3]  # grows once, improves, then stalls at the cap without reverting


def test_each_task_activates_its_own_number_of_experts(device, monkeypatch):
    model = build("adamv_moe", VEC, width=8, num_experts=4).to(device).eval()
    model.schedule.k.update(a=1, b=3)
    seen = {}
    route = NoisyTopKTaskMoE.route

    def spy(self, x, task, k, generator=None):
        combine, aux = route(self, x, task, k, generator)
        seen[task] = (combine > 0).sum(-1)
        return combine, aux

    monkeypatch.setattr(NoisyTopKTaskMoE, "route", spy)
    model(torch.randn(5, 8, device=device))
    assert (seen["a"] == 1).all() and (seen["b"] == 3).all()


def test_routers_and_heads_are_task_specific(device, params_with_grad):
    torch.manual_seed(0)
    model = build("adamv_moe", VEC, width=8).to(device).eval()
    x = torch.randn(16, 8, device=device)
    before = model(x)["a"]
    with torch.no_grad():
        model.blocks[1].moe.routers["b"].weight.normal_()
    torch.testing.assert_close(model(x)["a"], before)  # b's router does not touch a's path
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert "blocks.1.moe.routers.a.weight" in touched
    assert not any("routers.b" in n or n.startswith("heads.b") for n in touched)
    assert "blocks.1.moe.routers.b.weight" in params_with_grad(model, model(x)["b"].square().sum())


def test_the_adapted_counts_are_saved_with_the_model():
    model = build("adamv_moe", VEC, width=8, patience=0).eval()
    for step, loss in enumerate([1.0, 1.0, 1.0]):  # a: 2 -> 3 -> back to 2, frozen
        model.adapt_expert_counts(step, {"a": loss, "b": 1.0 - step / 10})
    model.schedule.k["b"] = 4
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build("adamv_moe", VEC, width=8, patience=0).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert fresh.experts_per_task == {"a": 2, "b": 4}
    assert fresh.schedule.frozen == {"a": True, "b": False}
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x)["b"], model(x)["b"])
    assert fresh.adapt_expert_counts(3, {"a": 5.0, "b": 0.1}) == {"a": 2, "b": 4}  # a stays frozen


def test_forward_with_aux_sums_the_moe_layers_losses_per_task_as_the_official_code(device):
    torch.manual_seed(0)
    model = build("adamv_moe", VEC, width=8, depth=4).to(device).eval()
    x = torch.randn(6, 8, device=device)
    h, layer_losses = model.tokenizer(x), []
    for block in model.blocks:  # blocks 1 and 3 are MoE layers
        h, layer_aux = block(h, "b", 2)
        layer_losses += [] if layer_aux is None else [layer_aux]
    assert len(layer_losses) == 2
    torch.testing.assert_close(model.forward_with_aux(x)[1]["b"], layer_losses[0] + layer_losses[1])
    outputs, aux = model.train().forward_with_aux(x)
    assert set(aux) == {"a", "b"} and all(a.ndim == 0 and a > 0 for a in aux.values())
    (outputs["a"].sum() + aux["a"]).backward()  # the balancing loss trains the routers as well
    assert model.blocks[3].moe.routers["a"].weight.grad.abs().sum() > 0
    model.balance_weight = 0.25  # what the training harness adds: weight x sum over tasks
    torch.testing.assert_close(model.auxiliary_loss(), 0.25 * (aux["a"] + aux["b"]).detach(), check_dtype=False)


@pytest.mark.parametrize("kw, named", [({"initial_k": 5}, "initial_k"), ({"max_k": 5}, "max_k"),
                                       ({"initial_k": 3, "max_k": 2}, "max_k"),
                                       ({"noise_std": -0.5}, "noise_std"),
                                       ({"noise_std": math.nan}, "noise_std"), ({"patience": -1}, "patience"),
                                       ({"balance_weight": -1.0}, "balance_weight")])
def test_bad_arguments_are_refused_when_built(kw, named):
    with pytest.raises(ValueError, match=named):
        build("adamv_moe", VEC, width=8, num_experts=4, **kw)


def test_registry_shapes_and_training(device, registry_output_shapes, short_training):
    registry_output_shapes("adamv_moe", device)
    for dense in (True, False):
        first, last = short_training("adamv_moe", dense, device, steps=25)
        assert last < 0.7 * first, dense
    assert isinstance(build("adamv_moe", VEC), AdaMVMoE)


def test_task_parameters_are_its_routers_and_head_and_the_rest_is_trained_by_every_task(device, params_with_grad):
    torch.manual_seed(0)
    model = build("adamv_moe", VEC, width=8, depth=4).to(device).eval()
    names = {id(p): n for n, p in model.named_parameters()}
    for t in model.tasks:
        mine = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert mine == {f"blocks.{i}.moe.routers.{t}.weight" for i in (1, 3)} | {
            n for n in names.values() if n.startswith(f"heads.{t}.")}
    touched = params_with_grad(model, model(torch.randn(16, 8, device=device))["a"].square().sum())
    for i in range(4):  # shared attention and norms in every block, shared experts in the MoE ones
        assert {f"blocks.{i}.attention.in_proj_weight", f"blocks.{i}.norm1.weight"} <= touched, i
    assert any(n.startswith("blocks.1.moe.experts.") for n in touched)


def test_a_stall_must_last_longer_than_patience():
    """``step - best_step > patience``: a stall of exactly ``patience`` steps changes nothing."""
    model = build("adamv_moe", VEC, width=8, num_experts=4, initial_k=2, patience=3)
    assert model.adapt_expert_counts(10, {"a": 1.0, "b": 1.0}) == {"a": 2, "b": 2}
    assert model.adapt_expert_counts(13, {"a": 1.0, "b": 1.0}) == {"a": 2, "b": 2}  # 3 steps: not yet
    assert model.adapt_expert_counts(14, {"a": 1.0, "b": 0.5}) == {"a": 3, "b": 2}  # 4 > 3


def test_defaults_follow_the_official_code():
    """k_t starts at 2, patience 5000 steps, both balancing losses weighted 1.0, max_k = N."""
    model = build("adamv_moe", VEC, width=8, num_experts=4)
    assert model.experts_per_task == {"a": 2, "b": 2}
    assert model.schedule.patience == 5000 and model.schedule.max_k == 4
    assert model.balance_weight == 1.0


def test_moe_block_adds_the_gated_expert_mix_of_the_normed_tokens_to_its_input(device):
    """With attention silenced, a MoE block returns h + sum_i G_i E_i(LN2(h)) (its second norm), written out by hand."""
    from .conftest import layer_norm_by_hand

    torch.manual_seed(0)
    model = build("adamv_moe", VEC, width=8, depth=2, num_experts=4).to(device).double().eval()
    block = model.blocks[1]
    with torch.no_grad():
        block.attention.out_proj.weight.zero_()
        block.attention.out_proj.bias.zero_()
        for norm in (block.norm1, block.norm2):  # distinct affine maps, so that the wrong norm shows
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
    h = torch.randn(3, 5, 8, device=device, dtype=torch.float64)
    out, _ = block(h, "b", 2)
    m = layer_norm_by_hand(h, block.norm2).reshape(-1, 8)
    probs = torch.softmax(m @ block.moe.routers["b"].weight.T, -1)
    kept = probs.topk(2, -1)
    gates = torch.zeros_like(probs).scatter(-1, kept.indices, kept.values)
    mix = sum(gates[:, i:i + 1] * torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(m, e[0].weight, e[0].bias)), e[2].weight, e[2].bias)
        for i, e in enumerate(block.moe.experts))
    torch.testing.assert_close(out, h + mix.view_as(h), rtol=1e-10, atol=1e-10)


def test_dense_block_is_pre_norm_residual_attention_then_residual_mlp(device):
    """h1 = h + Attn(LN1 h); out = h1 + MLP(LN2 h1), composed here from the block's own parts."""
    torch.manual_seed(0)
    model = build("adamv_moe", VEC, width=8, depth=2).to(device).eval()
    dense, routed = model.blocks
    h = torch.randn(2, 5, 8, device=device)
    a = dense.norm1(h)
    h1 = h + dense.attention(a, a, a)[0]
    out, aux = dense(h, "a", 2)
    assert aux is None
    torch.testing.assert_close(out, h1 + dense.mlp(dense.norm2(h1)))
    a = routed.norm1(h)
    h1 = h + routed.attention(a, a, a)[0]
    torch.testing.assert_close(routed(h, "a", 2)[0], h1 + routed.moe(routed.norm2(h1), "a", 2)[0])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_loss_uses_the_kth_largest_noisy_logit_for_every_k(device, k):
    """P_i = 1 - Φ((k-th largest noisy logit - clean logit_i) / (σ/N)), for k other than 2 as well."""
    layer = moe(device, num_experts=4, noise_std=2.0).train()
    x = torch.randn(10, 8, device=device)
    _, aux = layer.route(x, "a", k, torch.Generator(device=device).manual_seed(3))
    logits = layer.routers["a"](x)
    eps = torch.randn(logits.shape, generator=torch.Generator(device=device).manual_seed(3), device=device)
    noisy = logits + 0.5 * eps
    threshold = noisy.sort(-1, descending=True).values[:, k - 1:k]
    p = (1 - torch.special.ndtr((threshold - logits) / 0.5)).mean(0)
    importance = torch.softmax(logits, -1).sum(0)
    expected = (importance.std(unbiased=False) / importance.mean()) ** 2 + (p.std(unbiased=False) / p.mean()) ** 2
    torch.testing.assert_close(aux, expected)


def test_zero_noise_while_training_gives_clean_gates_and_the_importance_loss_only(device):
    """With noise_std = 0 the load term is left out (docstring), rather than dividing by σ = 0."""
    layer = moe(device, num_experts=4, noise_std=0.0).train()
    x = torch.randn(10, 8, device=device)
    combine, aux = layer.route(x, "a", 2)
    torch.testing.assert_close(combine, layer.eval().route(x, "a", 2)[0])
    importance = torch.softmax(layer.routers["a"](x), -1).sum(0)
    torch.testing.assert_close(aux, (importance.std(unbiased=False) / importance.mean()) ** 2)
    model = build("adamv_moe", VEC, width=8, noise_std=0.0, balance_weight=0.0).train()  # 0 is allowed
    assert model.blocks[1].moe.noise_std == 0.0
    _, losses = model.forward_with_aux(torch.randn(4, 8))
    assert all(torch.isfinite(v) for v in losses.values())


def test_training_noise_is_drawn_from_the_models_generator(device):
    """A model given a generator routes reproducibly, whatever the global RNG does in between."""
    import copy

    torch.manual_seed(0)
    first = build("adamv_moe", VEC, width=8, generator=torch.Generator().manual_seed(5)).to(device).train()
    second = copy.deepcopy(first)
    second.generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, device=device)
    torch.manual_seed(1)
    out1, aux1 = first.forward_with_aux(x)
    torch.manual_seed(2)
    out2, aux2 = second.forward_with_aux(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out1[t], out2[t])
        torch.testing.assert_close(aux1[t], aux2[t])
    layer = moe(device).train()
    y = torch.randn(12, 8, device=device)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(layer(y, "a", 2, torch.Generator(device=device).manual_seed(7)))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_the_whole_selection_state_is_restored_from_a_checkpoint():
    """Best losses, best steps and the last-change flags travel with k, so the search resumes where it was."""
    model = build("adamv_moe", VEC, width=8, patience=2)
    model.adapt_expert_counts(1, {"a": 1.0, "b": 0.7})
    model.adapt_expert_counts(4, {"a": 1.0, "b": 0.6})  # a stalled: 2 -> 3, just increased
    fresh = build("adamv_moe", VEC, width=8, patience=2)
    fresh.load_state_dict(model.state_dict())
    for key in ("k", "best_loss", "best_step", "just_increased", "frozen"):
        assert getattr(fresh.schedule, key) == getattr(model.schedule, key), key
    assert fresh.adapt_expert_counts(7, {"a": 1.0, "b": 0.5}) == {"a": 2, "b": 2}  # a's increase undone


def test_a_model_without_moe_layers_has_zero_balancing_loss_and_aux_needs_a_forward_first():
    model = build("adamv_moe", VEC, width=8, depth=1)
    with pytest.raises(RuntimeError):
        model.auxiliary_loss()
    _, losses = model.forward_with_aux(torch.randn(3, 8))
    assert all(v.ndim == 0 and v == 0 for v in losses.values())
    assert model.auxiliary_loss() == 0


@pytest.mark.parametrize("kw, named", [({"depth": 0}, "depth"), ({"num_heads": 0}, "num_heads"),
                                       ({"num_experts": 0, "initial_k": 1, "max_k": 1}, "num_experts")])
def test_non_positive_sizes_are_refused_when_built(kw, named):
    with pytest.raises(ValueError, match=named):
        build("adamv_moe", VEC, width=8, **kw)


def test_k_may_start_at_max_k_and_the_noise_default_is_v_moes():
    """initial_k = max_k = N is a valid (dense top-k) choice; σ = 1 (noise std σ/N) by default."""
    model = build("adamv_moe", VEC, width=8, num_experts=4, initial_k=4)
    assert model.experts_per_task == {"a": 4, "b": 4}
    assert model.blocks[1].moe.noise_std == 1.0
    assert NoisyTopKTaskMoE(8, ("a",), 4).noise_std == 1.0
