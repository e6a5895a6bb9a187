"""AdapterFusion: identity adapters at init, fusion attention by hand, V ≈ I mix, two-stage training."""

import pytest
import torch

from reference_impls.architectures.adapterfusion import AdapterFusion, BottleneckAdapter, Fusion
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (12,), {"a": 1, "b": 2, "c": 1})


def plain(model, x, task):
    h = model.tokenizer(x)
    for layer in model.layers:
        h = layer(h)
    return model.heads[task](h)


def test_untrained_adapters_are_the_identity_in_both_stages(device):
    torch.manual_seed(0)
    model = build("adapterfusion", VEC, width=8, num_heads=2).to(device)
    x = torch.randn(3, 12, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], plain(model, x, t), rtol=0, atol=0)
    model.start_fusion()  # all adapters equal (identity): fusion returns z V with V = I + 1e-6 noise
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], plain(model, x, t), rtol=1e-4, atol=1e-4)


def test_fusion_matches_a_hand_computation(device):
    torch.manual_seed(0)
    fusion = Fusion(6).to(device)
    with torch.no_grad():
        fusion.value.weight.normal_()
    h, z = torch.randn(2, 4, 6, device=device), torch.randn(2, 4, 3, 6, device=device)
    expected = torch.empty(2, 4, 6, device=device)
    for b in range(2):
        for t in range(4):
            query = fusion.query(h[b, t])  # h^T Q
            scores = torch.stack([query @ fusion.key(z[b, t, n]) for n in range(3)])  # · z_n^T K
            s = torch.softmax(scores, dim=0)
            expected[b, t] = sum(s[n] * fusion.value(z[b, t, n]) for n in range(3))  # Σ s_n z_n^T V
    torch.testing.assert_close(fusion(h, z), expected)


def test_identical_adapter_outputs_pass_through_whatever_the_attention(device):
    torch.manual_seed(0)
    fusion = Fusion(6, value_noise=0.0).to(device)
    h, one = torch.randn(2, 4, 6, device=device), torch.randn(2, 4, 1, 6, device=device)
    torch.testing.assert_close(fusion(h, one.expand(-1, -1, 3, -1)), one[:, :, 0])


def test_query_and_key_start_random_and_value_near_identity():
    torch.manual_seed(0)
    d = 16
    fusion = Fusion(d)
    for linear in (fusion.query, fusion.key):
        assert torch.linalg.matrix_rank(linear.weight).item() == d and linear.weight.std() > 0.05
    assert not torch.allclose(fusion.query.weight, fusion.key.weight)
    off = fusion.value.weight - torch.eye(d)
    assert 0 < off.abs().max() < 1e-5  # I plus tiny noise


def test_default_bottleneck_is_a_quarter_of_the_width():
    torch.manual_seed(0)
    model = build("adapterfusion", VEC, width=16, num_heads=2)
    assert all(ad.down.out_features == 4 for per_layer in model.adapters for ad in per_layer.values())


def test_the_value_map_has_no_bias(device):
    """z'_n = z_n^T V is linear, as in Sec. 3.2 and the official BertFusion: zero outputs fuse to zero."""
    torch.manual_seed(0)
    fusion = Fusion(6).to(device)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_()
    h, z = torch.randn(2, 4, 6, device=device), torch.zeros(2, 4, 3, 6, device=device)
    torch.testing.assert_close(fusion(h, z), torch.zeros(2, 4, 6, device=device), rtol=0, atol=0)


def test_a_layer_in_each_stage_by_hand(device):
    """Stage 1: LN2(a + Φ_t(f)); stage 2: LN2(a + Ψ_t(f; Φ_1(f) .. Φ_N(f))), f = FFN(a)."""
    torch.manual_seed(0)
    model = build("adapterfusion", VEC, width=8, depth=1, num_heads=2).to(device)
    with torch.no_grad():
        for p in [*model.adapters.parameters(), *model.fusions.parameters()]:
            p.normal_(std=0.5)
    layer, x = model.layers[0], torch.randn(3, 12, device=device)
    h = model.tokenizer(x)
    a = layer.norm1(h + layer.attention(h))
    f = layer.feed_forward(a)
    adapted = {n: f + torch.relu(f @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias
               for n, ad in model.adapters[0].items()}  # Φ_n(f) = f + U ReLU(D f)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], model.heads[t](layer.norm2(a + adapted[t])))
    model.start_fusion()
    z = torch.stack([adapted[n] for n in VEC.tasks], dim=2)  # every task's adapter, (B, T, N, d)
    for t in VEC.tasks:
        psi = model.fusions[0][t]
        s = torch.softmax(torch.einsum("btd,btnd->btn", psi.query(f), psi.key(z)), dim=-1)
        fused = (s[..., None] * psi.value(z)).sum(dim=2)
        torch.testing.assert_close(model(x)[t], model.heads[t](layer.norm2(a + fused)))


def test_two_stages_train_the_right_parameters(device, params_with_grad):
    torch.manual_seed(0)
    model = build("adapterfusion", VEC, width=8, num_heads=2).to(device)
    with torch.no_grad():  # trained-looking adapters so gradients flow everywhere
        for p in model.adapters.parameters():
            p.normal_(std=0.3)
    x = torch.randn(5, 12, device=device)
    touched = params_with_grad(model, model(x)["b"].square().sum())  # stage 1: own adapter + head
    assert touched and all(n.startswith("heads.b.") or ".b." in n and n.startswith("adapters.") for n in touched)
    assert all(not p.requires_grad for p in model.shared_parameters())
    model.start_fusion()
    touched = params_with_grad(model, model(x)["b"].square().sum())  # stage 2: b's fusion + head only
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("b"))}
    assert touched == specific and all(n.startswith(("fusions.", "heads.b.")) for n in touched)
    assert all(".b." in n for n in touched if n.startswith("fusions."))
    assert all(not p.requires_grad for p in model.adapters.parameters())


def test_parameter_counts(n_params):
    d, m = 8, 3
    assert n_params(BottleneckAdapter(d, m)) == 2 * m * d + d + m
    assert n_params(Fusion(d)) == 3 * d * d + 2 * d
    depth = 2
    model = build("adapterfusion", VEC, width=d, depth=depth, num_heads=2, bottleneck=m)
    head_b = 2 * d + 2
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == depth * (2 * m * d + d + m) + head_b
    model.start_fusion()
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == depth * (3 * d * d + 2 * d) + head_b
    assert type(model) is AdapterFusion


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("adapterfusion", device)
    first, last = short_training("adapterfusion", dense, device, steps=30)
    assert last < 0.8 * first


def test_default_bottleneck_is_a_quarter_of_a_small_width_too():
    # d / 4 also when it is 1 (width 4)
    torch.manual_seed(0)
    model = build("adapterfusion", VEC, width=4, num_heads=2)
    assert all(ad.down.out_features == 1 for per_layer in model.adapters for ad in per_layer.values())
