"""TSP-Transformer: shared early layers, per-layer task prompts later; S = L is shared-bottom."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.tsp_transformer import TSPTransformer

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def small(**kw):
    torch.manual_seed(0)
    return build("tsp_transformer", VEC, width=8, num_heads=2, **kw)


def test_prompted_layers_by_hand(device):
    model = small(depth=3, shared_depth=1, prompt_length=2).to(device)
    with torch.no_grad():
        for p in model.prompts.values():
            p.normal_()
    x = torch.randn(4, 12, device=device)
    shared = model.layers[0](model.tokenizer(x))  # the vanilla stage, the same for all tasks
    torch.testing.assert_close(model.encode(x), shared)
    for t in VEC.tasks:
        h = shared
        for layer, prompt in zip(model.layers[1:], model.prompts[t]):
            n = h.shape[1]
            h = layer(torch.cat([h, prompt.expand(4, -1, -1)], dim=1))[:, :n]  # [h; P_t^l], prompts dropped
        torch.testing.assert_close(model(x)[t], model.heads[t](h))
    assert not torch.allclose(model.task_features(shared, "a"), model.task_features(shared, "b"))


def test_no_prompted_stage_is_a_shared_bottom_transformer(device):
    model = small(depth=2, shared_depth=2).to(device)
    x = torch.randn(4, 12, device=device)
    h = model.tokenizer(x)
    for layer in model.layers:
        h = layer(h)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], model.heads[t](h))
        assert model.prompts[t].numel() == 0


def test_parameter_count(n_params):
    w, depth, shared, length = 8, 3, 1, 2
    model = small(depth=depth, shared_depth=shared, prompt_length=length)
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == (depth - shared) * length * w + heads[t]
    backbone = sum(p.numel() for p in [*model.tokenizer.parameters(), *model.layers.parameters()])
    assert sum(p.numel() for p in model.shared_parameters()) == backbone
    assert n_params(model) == backbone + 2 * (depth - shared) * length * w + sum(heads.values())


def test_a_task_loss_reaches_its_prompts_and_the_shared_layers_only(device, params_with_grad):
    model = small(depth=2, shared_depth=1).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].square().sum())
    assert "prompts.a" in touched and "prompts.b" not in touched
    assert not any(name.startswith("heads.b") for name in touched)
    assert {"layers.0.attention.query.weight", "layers.1.feed_forward.0.weight", "tokenizer.positions"} <= touched
    assert type(model) is TSPTransformer
    with pytest.raises(ValueError):
        small(depth=2, shared_depth=3)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("tsp_transformer", device)
    first, last = short_training("tsp_transformer", dense, device, steps=30)
    assert last < 0.8 * first


def test_prompts_start_at_zero_and_tasks_start_apart_only_through_their_heads(device):
    """Official init: P_t^l = 0, so before training every task's prompted features coincide."""
    model = small(depth=3, shared_depth=1, prompt_length=2).to(device)
    assert all((p == 0).all() for p in model.prompts.values())
    h = model.encode(torch.randn(4, 12, device=device))
    torch.testing.assert_close(model.task_features(h, "a"), model.task_features(h, "b"))


def test_the_default_model_has_both_stages():
    """The docstring's layout: a shared vanilla stage (S >= 1) then a prompted one (L - S >= 1)."""
    model = build("tsp_transformer", VEC)
    assert 1 <= model.shared_depth < len(model.layers)
    assert all(p.shape[0] == len(model.layers) - model.shared_depth and p.shape[1] >= 1 for p in model.prompts.values())


def test_every_layer_may_be_prompted_and_the_token_count_is_honoured():
    """S = 0 is allowed (prompts in all L layers); num_tokens sets how many features make one token."""
    model = small(shared_depth=0)
    assert model.shared_depth == 0 and all(p.shape[0] == len(model.layers) for p in model.prompts.values())
    assert model(torch.randn(3, 12))["b"].shape == (3, 2)
    assert small(num_tokens=3).tokenizer.chunk == 4  # 12 features in 3 tokens of 4
