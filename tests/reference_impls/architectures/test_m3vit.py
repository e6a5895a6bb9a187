"""M³ViT: exactly k experts per token, task-specific routers, unchosen experts get no gradient."""

import pytest
import torch

from reference_impls.architectures.m3vit import M3ViT, TaskMoE, top_k_gate
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (8,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 4, 4), {"a": 3, "b": 1}, dense=True)


def test_top_k_sparsity_per_token(device):
    torch.manual_seed(0)
    moe = TaskMoE(8, ("a", "b"), num_experts=5, k=2).to(device)
    x = torch.randn(3, 7, 8, device=device)
    g = moe.gates(x, "a")
    assert g.shape == (3, 7, 5)
    assert ((g > 0).sum(-1) == 2).all()  # exactly k experts per token
    assert (g.sum(-1) < 1).all()  # the kept probabilities are not renormalised
    logits = moe.routers["a"](x)
    chosen = g > 0
    assert (logits.masked_fill(~chosen, float("inf")).amin(-1) >= logits.masked_fill(chosen, -float("inf")).amax(-1)).all()
    # the kept weights are the softmax over all five experts at the chosen ones (Eq. 3)
    torch.testing.assert_close(g, torch.softmax(logits, -1) * chosen)


def test_moe_output_is_gate_weighted_sum_of_chosen_experts(device):
    torch.manual_seed(0)
    moe = TaskMoE(8, ("a", "b"), num_experts=4, k=2).to(device)
    x = torch.randn(2, 5, 8, device=device)
    g = moe.gates(x, "b")
    expected = sum(g[..., i : i + 1] * moe.experts[i](x) for i in range(4))
    torch.testing.assert_close(moe(x, "b"), expected, rtol=1e-5, atol=1e-6)


def test_routers_are_task_specific(device, params_with_grad):
    torch.manual_seed(0)
    model = build("m3vit", VEC, width=8, num_experts=4, k=2).to(device)
    x = torch.randn(16, 8, device=device)
    moe = model.blocks[1].moe
    tokens = model.blocks[1].norm2(torch.randn(16, 8, device=device))
    assert not torch.equal(moe.gates(tokens, "a") > 0, moe.gates(tokens, "b") > 0)  # tasks route differently
    before = model(x)["a"]
    with torch.no_grad():
        moe.routers["b"].weight.normal_()
    torch.testing.assert_close(model(x)["a"], before)  # b's router does not touch a's path
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert "blocks.1.moe.routers.a.weight" in touched
    assert not any("routers.b" in n or n.startswith("heads.b") for n in touched)


def attend(block, h):
    """The first half of a pre-LN block: h + attention(LN1(h))."""
    a = block.norm1(h)
    return h + block.attention(a, a, a, need_weights=False)[0]


def test_each_task_path_is_routed_by_its_own_router(device):
    """model(x)[t] by hand: dense block, then the MoE block with t's router, then t's head."""
    torch.manual_seed(1)
    model = build("m3vit", VEC, width=8, num_experts=4, k=2).to(device)
    x = torch.randn(6, 8, device=device)
    h = model.blocks[0](model.tokenizer(x), "a")  # no MoE: the task plays no part
    mid = model.blocks[1]
    h = attend(mid, h)
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.heads[t](h + mid.moe(mid.norm2(h), t)))


def test_unchosen_experts_get_no_gradient(device, params_with_grad):
    torch.manual_seed(3)
    model = build("m3vit", VEC, width=8, num_experts=6, k=1, num_tokens=2).to(device)
    x = torch.randn(1, 8, device=device)  # 2 tokens, k = 1: at most 2 of 6 experts are chosen
    tokens = model.tokenizer(x)
    h = model.blocks[0](tokens, "a")
    mid = model.blocks[1]
    chosen_gate = mid.moe.gates(mid.norm2(attend(mid, h)), "a")
    chosen = set(chosen_gate.reshape(-1, 6).nonzero()[:, 1].tolist())
    touched = params_with_grad(model, model(x)["a"].square().sum())
    with_grad = {i for i in range(6) if any(n.startswith(f"blocks.1.moe.experts.{i}.") for n in touched)}
    assert with_grad == chosen and len(chosen) <= 2


def test_moe_in_every_other_block_and_one_expert_is_the_dense_mlp(device):
    model = build("m3vit", VEC, width=8, depth=4)
    assert [b.moe is not None for b in model.blocks] == [False, True, False, True]
    torch.manual_seed(0)
    moe = TaskMoE(8, ("a",), num_experts=1, k=1).to(device)
    x = torch.randn(2, 3, 8, device=device)
    torch.testing.assert_close(moe(x, "a"), moe.experts[0](x))


def test_dense_blocks_are_pre_ln_with_residuals_and_k_defaults_to_at_least_2(device):
    """Even blocks: h' = h + attn(LN1 h), out = h' + MLP(LN2 h'); the task plays no part."""
    torch.manual_seed(5)
    model = build("m3vit", VEC, width=8, depth=2).to(device)
    dense = model.blocks[0]
    h = torch.randn(3, 4, 8, device=device) * 2 + 1
    with torch.no_grad():
        mid = attend(dense, h)
        torch.testing.assert_close(dense(h, "a"), mid + dense.mlp(dense.norm2(mid)))
        torch.testing.assert_close(dense(h, "b"), dense(h, "a"))
    assert model.blocks[1].moe.k == 2


def test_parameter_count(n_params):
    w, n, tokens = 8, 4, 4
    model = build("m3vit", VEC, width=w, depth=2, num_experts=n, num_tokens=tokens)
    mlp = (w * 2 * w + 2 * w) + (2 * w * w + w)
    attention = 4 * w * w + 4 * w
    norms = 2 * 2 * w
    blocks = 2 * (attention + norms) + mlp + n * mlp + 2 * n * w  # dense block, MoE block with 2 routers
    tokenizer = (2 * w + w) + tokens * w  # chunks of 8 / 4 = 2 features, position embeddings
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == tokenizer + blocks + heads
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == n * w + w + 1
    assert type(model) is M3ViT and model.name == "m3vit"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("m3vit", device)
    first, last = short_training("m3vit", dense, device, steps=40)
    assert last < 0.8 * first


def test_the_gate_is_eq_3_top_k_of_the_softmax_without_renormalising(device, params_with_grad):
    """TopK(softmax(logits), k): for logits [2, 1, 0, -1] and k = 2 the gates are the first two
    softmax probabilities (0.644, 0.237), summing below 1; the official noisy_vmoe gate does
    the same. Even with k = 1 the task loss trains the router."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=device)
    probabilities = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(top_k_gate(logits, 2), torch.cat([probabilities[:, :2], torch.zeros(1, 2, device=device)], 1))
    assert float(top_k_gate(logits, 2).sum()) < 0.9
    torch.manual_seed(0)
    model = build("m3vit", VEC, width=8, num_experts=4, k=1).to(device)
    touched = params_with_grad(model, model(torch.randn(6, 8, device=device))["a"].square().sum())
    assert "blocks.1.moe.routers.a.weight" in touched
