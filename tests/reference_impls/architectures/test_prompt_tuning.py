"""Prompt tuning: [P_e; X_e] through the frozen transformer, P d per task, only prompts/heads learn."""

import pytest
import torch

from reference_impls.architectures.prompt_tuning import PromptTuning
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def test_prompt_is_prepended_to_the_input_embeddings_only(device):
    torch.manual_seed(0)
    model = build("prompt_tuning", VEC, width=8, num_heads=2, prompt_length=3).to(device)
    x = torch.randn(4, 12, device=device)
    h = torch.cat([model.prompts["a"].expand(4, -1, -1), model.tokenizer(x)], dim=1)
    for layer in model.layers:  # plain frozen layers: nothing is added inside the network
        h = layer(h)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](h[:, 3:]))


def test_first_layer_input_is_prompt_then_input_tokens():
    """[P_e; X_e]: the prompt occupies the first P positions. The frozen layers are permutation
    equivariant, so the outputs cannot tell front from back; the first layer's input can."""
    torch.manual_seed(0)
    model = build("prompt_tuning", VEC, width=8, num_heads=2, prompt_length=3)
    x, seen = torch.randn(4, 12), []
    handle = model.layers[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model.features(x, "b")
    handle.remove()
    torch.testing.assert_close(seen[0][:, :3], model.prompts["b"].expand(4, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(seen[0][:, 3:], model.tokenizer(x), rtol=0, atol=0)


def test_prompt_initialisation_is_gaussian_with_std_one_half():
    torch.manual_seed(0)
    values = build("prompt_tuning", VEC, width=8, num_heads=2, prompt_length=2000).prompts["a"].detach().flatten()
    assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 0.5) < 0.02
    beyond_two_sigma = (values.abs() > 1.0).double().mean().item()  # 4.55% for a Gaussian
    assert abs(beyond_two_sigma - 0.0455) < 0.01


def test_first_layer_sees_the_prompt_as_a_prefix_of_projected_prompt_tokens(device):
    """At layer 1 the input positions see exactly prefix keys W_k P_e, values W_v P_e."""
    torch.manual_seed(0)
    model = build("prompt_tuning", VEC, width=8, num_heads=2, prompt_length=3).to(device)
    x, layer, p = torch.randn(4, 12, device=device), model.layers[0], model.prompts["b"]
    tokens = model.tokenizer(x)
    joint = layer(torch.cat([p.expand(4, -1, -1), tokens], dim=1))[:, 3:]
    as_prefix = layer(tokens, layer.attention.key(p), layer.attention.value(p))
    torch.testing.assert_close(joint, as_prefix)
    # deeper layers differ: there the prompt positions are no longer free parameters
    second = model.layers[1]
    h = layer(torch.cat([p.expand(4, -1, -1), tokens], dim=1))
    assert not torch.allclose(second(h)[:, 3:], second(h[:, 3:], second.attention.key(p), second.attention.value(p)))


def test_different_prompts_give_different_tasks_the_same_backbone(device):
    torch.manual_seed(0)
    model = build("prompt_tuning", VEC, width=8, num_heads=2).to(device)
    x = torch.randn(4, 12, device=device)
    with torch.no_grad():
        model.heads["b"].linear.weight[:1].copy_(model.heads["a"].linear.weight)
        model.heads["b"].linear.bias[:1].copy_(model.heads["a"].linear.bias)
        out = model(x)
        assert not torch.allclose(out["a"], out["b"][:, :1])  # only the prompts differ
        model.prompts["b"].copy_(model.prompts["a"])
        out = model(x)
    torch.testing.assert_close(out["a"], out["b"][:, :1])


def test_parameter_count_and_frozen_backbone(device, n_params, params_with_grad):
    w, length = 8, 5
    model = build("prompt_tuning", VEC, width=w, num_heads=2, prompt_length=length).to(device)
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == length * w + heads[t]
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].square().sum())
    assert touched == {"prompts.a", "heads.a.linear.weight", "heads.a.linear.bias"}
    assert type(model) is PromptTuning


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("prompt_tuning", device)
    first, last = short_training("prompt_tuning", dense, device, steps=30)
    assert last < 0.8 * first
