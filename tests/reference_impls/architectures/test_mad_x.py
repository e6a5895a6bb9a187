"""MAD-X: exact invertible adapter, TA stacked on LA, domain swap, identity at init, frozen parts."""

import pytest
import torch

from reference_impls.architectures.mad_x import MADX, InvertibleAdapter
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def randomise(module, seed=0):
    """Random weights; down-projection biases of +1 so that no ReLU unit is dead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p))
            if name.endswith("down.bias"):
                p.fill_(1.0)


def test_invertible_adapter_is_exactly_invertible(device):
    torch.manual_seed(0)
    adapter = InvertibleAdapter(8, 3).to(device).double()
    randomise(adapter)
    e = torch.randn(4, 5, 8, device=device, dtype=torch.float64)
    o = adapter(e)
    assert (o - e).abs().max() > 0.1  # far from the identity, yet
    torch.testing.assert_close(adapter.inverse(o), e, rtol=0, atol=1e-12)
    torch.testing.assert_close(adapter(adapter.inverse(e)), e, rtol=0, atol=1e-12)
    e1, e2 = e.chunk(2, dim=-1)  # the coupling by hand
    o1 = adapter.f.up(torch.relu(adapter.f.down(e2))) + e1
    o2 = adapter.g.up(torch.relu(adapter.g.down(o1))) + e2
    torch.testing.assert_close(o, torch.cat([o1, o2], dim=-1))


def test_untrained_model_is_the_backbone(device):
    for problem in (VEC, Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1}, dense=True)):
        torch.manual_seed(0)
        model = build("mad_x", problem, width=8, num_heads=2).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        h = model.tokenizer(x)
        for layer in model.layers:
            h = layer(h)
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], model.heads[t](h), rtol=0, atol=1e-6)


def test_task_adapter_is_stacked_on_the_language_adapter_and_domains_swap(device):
    torch.manual_seed(0)
    model = build("mad_x", VEC, width=8, depth=1, num_heads=2).to(device)
    randomise(model.language), randomise(model.task_adapters, 1), randomise(model.invertible, 2)
    x = torch.randn(3, 12, device=device)
    layer, ta = model.layers[0], model.task_adapters["a"][0]
    outs = {}
    for domain in ("source", "target"):
        model.set_domain(domain)
        la_mod = model.language[domain][0]
        h = model.invertible[domain](model.tokenizer(x))
        a = layer.norm1(h + layer.attention(h))
        f = layer.feed_forward(a)
        la = la_mod.up(torch.relu(la_mod.down(f))) + f  # LA(h, r)
        t = ta.up(torch.relu(ta.down(la))) + la  # TA(h, r) on top of LA
        outs[domain] = model(x)["a"]
        torch.testing.assert_close(outs[domain], model.heads["a"](layer.norm2(a + t)))
    assert not torch.allclose(outs["source"], outs["target"])  # same task adapter, another domain
    with pytest.raises(ValueError):
        model.set_domain("klingon")


def test_every_layer_reads_its_own_language_and_task_adapter(device):
    """The whole depth-3 model by hand: layer l uses LA_l and TA_l, not the first layer's adapters."""
    torch.manual_seed(0)
    model = build("mad_x", VEC, width=8, depth=3, num_heads=2).to(device)
    randomise(model.language), randomise(model.task_adapters, 1)
    model.set_domain("target")
    bottleneck = lambda m, z: m.up(torch.relu(m.down(z)))
    x = torch.randn(3, 12, device=device)
    h = model.invertible["target"](model.tokenizer(x))
    for layer, la_mod, ta_mod in zip(model.layers, model.language["target"], model.task_adapters["b"]):
        a = layer.norm1(h + layer.attention(h))
        f = layer.feed_forward(a)
        la = bottleneck(la_mod, f) + f
        h = layer.norm2(a + bottleneck(ta_mod, la) + la)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](h))


def test_only_task_adapters_and_heads_train_by_default(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mad_x", VEC, width=8, num_heads=2).to(device)
    randomise(model.task_adapters)
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["b"].square().sum())
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("b"))}
    assert touched == specific and all(n.startswith(("task_adapters.b.", "heads.b.")) for n in touched)
    model = build("mad_x", VEC, width=8, num_heads=2, train_domains=True).to(device)
    randomise(model.task_adapters), randomise(model.language, 1)
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["b"].square().sum())
    assert "language.source.0.up.weight" in touched and "invertible.source.f.up.weight" in touched
    assert not any(".target." in n for n in touched)
    assert type(model) is MADX


def test_parameter_counts():
    d, m, depth = 8, 3, 2
    model = build("mad_x", VEC, width=d, depth=depth, num_heads=2, bottleneck=m)
    bottleneck = 2 * m * d + d + m
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == depth * bottleneck + d + 1
    half = d // 2
    assert sum(p.numel() for p in model.invertible["source"].parameters()) == 2 * (2 * m * half + half + m)
    assert sum(p.numel() for p in model.language["target"].parameters()) == depth * bottleneck


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("mad_x", device)
    first, last = short_training("mad_x", dense, device, steps=30)
    assert last < 0.8 * first


def test_default_bottleneck_is_a_quarter_of_the_width():
    """r = width / 4 (module docstring; at least one unit) for every adapter."""
    for width, r in ((16, 4), (4, 1)):
        model = MADX.from_problem(Problem(("a", "b"), (6,), {"a": 1}), width=width, depth=1, num_heads=2)
        downs = [m.down for m in model.modules() if hasattr(m, "down")]
        assert downs and all(d.out_features == r for d in downs)
