"""CIAT: parallel adapters by hand, the on/off switch, zeroed adapters = shared model, gradients, counts."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.ciat import CIAT, EmbeddingAdapter
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("en_de", "en_fr"), (12,), {"en_de": 1, "en_fr": 2})
IMG = Problem(("en_de", "en_fr"), (2, 8, 8), {"en_de": 3, "en_fr": 1}, dense=True)


def shared_model(model, x, task):
    """The frozen pre-LN transformer alone: h + F(LN(h)) per sublayer, final LN, then the head."""
    h = model.tokenizer(x)
    for layer in model.layers:
        h = h + layer.attention(layer.norm1(h))
        h = h + layer.feed_forward(layer.norm2(h))
    return model.heads[task](model.output_norm(h))


def mlp(seq, z):
    return F.relu(z @ seq[0].weight.T + seq[0].bias) @ seq[2].weight.T + seq[2].bias


def test_adapters_recalibrate_embeddings_and_run_beside_each_sublayer(device):
    torch.manual_seed(0)
    model = build("ciat", VEC, width=8, depth=2, num_heads=2).to(device)
    x = torch.randn(4, 12, device=device)
    emb = model.embedding_adapters["en_fr"]
    e = model.tokenizer(x)
    h = e + mlp(emb.mlp, F.layer_norm(e, (8,), emb.norm.weight, emb.norm.bias))  # e' = e + E_t(e)
    for layer, (a_att, a_ffn) in zip(model.layers, model.layer_adapters["en_fr"]):
        z = layer.norm1(h)
        h = h + layer.attention(z) + mlp(a_att, z)  # parallel: same normalised input z
        z = layer.norm2(h)
        h = h + layer.feed_forward(z) + mlp(a_ffn, z)
    torch.testing.assert_close(model(x)["en_fr"], model.heads["en_fr"](model.output_norm(h)))


def test_switch_off_or_zeroed_adapters_give_the_shared_model(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("ciat", problem, width=8, num_heads=2).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        with torch.no_grad():
            adapted = model(x)
            for t in problem.tasks:  # the default initialisation is not the identity
                assert (adapted[t] - shared_model(model, x, t)).abs().max() > 1e-3
            model.use_adapters = False  # pre-training stage
            off = model(x)
            model.use_adapters = True
            for t in problem.tasks:
                for seq in [model.embedding_adapters[t].mlp, *[a for pair in model.layer_adapters[t] for a in pair]]:
                    seq[2].weight.zero_(), seq[2].bias.zero_()
            zeroed = model(x)
        for t in problem.tasks:
            torch.testing.assert_close(off[t], shared_model(model, x, t), rtol=0, atol=0)
            torch.testing.assert_close(zeroed[t], shared_model(model, x, t), rtol=0, atol=1e-6)


def test_only_the_tasks_adapters_and_head_learn(device, params_with_grad):
    torch.manual_seed(0)
    model = build("ciat", VEC, width=8, num_heads=2).to(device)
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["en_de"].square().sum())
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("en_de"))}
    assert touched == specific
    assert all(".en_de." in n or n.startswith("heads.en_de.") for n in touched)
    model = build("ciat", VEC, width=8, num_heads=2, freeze_backbone=False).to(device)
    model.use_adapters = False  # pre-training: the shared model learns, no adapter is used
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["en_de"].sum())
    assert "layers.0.attention.query.weight" in touched and not any("adapters" in n for n in touched)
    assert type(model) is CIAT


def test_parameter_counts(n_params):
    d, m, depth = 8, 3, 2
    assert n_params(EmbeddingAdapter(d, m)) == 2 * d + 2 * m * d + m + d
    model = build("ciat", VEC, width=d, depth=depth, num_heads=2, inner=m)
    per_adapter = 2 * m * d + m + d
    heads = {"en_de": d + 1, "en_fr": 2 * d + 2}
    for t in VEC.tasks:  # embedding adapter + two parallel adapters per layer + head
        expected = (2 * d + per_adapter) + depth * 2 * per_adapter + heads[t]
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == expected


def test_bottlenecks_default_to_half_the_width():
    """As in the official code: every adapter's inner width is width // 2 unless given."""
    model = build("ciat", VEC, width=12, num_heads=2)
    for t in VEC.tasks:
        seqs = [model.embedding_adapters[t].mlp, *[a for pair in model.layer_adapters[t] for a in pair]]
        assert [(seq[0].in_features, seq[0].out_features, seq[2].out_features) for seq in seqs] == [(12, 6, 12)] * 5


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("ciat", device)
    first, last = short_training("ciat", dense, device, steps=30)
    assert last < 0.8 * first


def test_shared_feed_forward_uses_relu_as_the_official_transformer():
    """The official CIAT encoder's FFN activation is ReLU (NeurST's default), not GELU."""
    torch.manual_seed(0)
    model = build("ciat", VEC, width=8, num_heads=2)
    ffn = model.layers[0].feed_forward
    z = torch.randn(3, 5, 8)
    expected = F.relu(z @ ffn[0].weight.T + ffn[0].bias) @ ffn[2].weight.T + ffn[2].bias
    torch.testing.assert_close(ffn(z), expected)


def test_adapters_start_as_the_official_keras_dense_layers():
    """Glorot-uniform weights (bound sqrt(6 / (fan_in + fan_out))) and zero biases."""
    torch.manual_seed(0)
    model = build("ciat", VEC, width=16, num_heads=2)
    linears = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "adapter" in name]
    assert linears
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert torch.count_nonzero(layer.bias) == 0
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.8 * bound


def test_from_problem_honours_depth_and_num_tokens_and_tiny_widths_keep_one_inner_unit():
    """depth sets the shared layers (and adapter pairs), num_tokens the tokenisation; half of a width of 2
    is 1, still a valid bottleneck."""
    model = build("ciat", VEC, width=12, num_heads=2, depth=3, num_tokens=4)
    assert len(model.layers) == 3 and len(model.layer_adapters["en_de"]) == 3 and model.tokenizer.length == 4
    tiny = build("ciat", VEC, width=2, num_heads=2)
    assert tiny.embedding_adapters["en_de"].mlp[0].out_features == 1
