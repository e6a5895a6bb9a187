"""Masking (Zhao et al.): W ⊙ 1[M > τ] on attention/FFN weights, initial sparsity, STE, frozen W."""

import copy

import pytest
import torch

from reference_impls.architectures.piggyback import ThresholdSTE
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.weight_masking import WeightMasking

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def test_masked_layer_by_hand(device):
    """One layer recomputed with explicitly masked copies of its six weight matrices."""
    torch.manual_seed(0)
    model = build("weight_masking", VEC, width=8, depth=1, num_heads=2, initial_sparsity=0.3).to(device)
    layer, x = model.layers[0], torch.randn(3, 12, device=device)
    scores = model.scores[0]["b"]
    assert set(scores) == {"attention_query_weight", "attention_key_weight", "attention_value_weight",
                           "attention_out_weight", "feed_forward_0_weight", "feed_forward_2_weight"}
    masked = copy.deepcopy(layer)
    with torch.no_grad():
        for name, m in masked.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_((scores[f"{name}_weight".replace(".", "_")] > 0.3).float())
    expected = model.heads["b"](masked(model.tokenizer(x)))
    torch.testing.assert_close(model(x)["b"], expected)
    share = torch.cat([(s <= 0.3).float().flatten() for s in scores.values()]).mean().item()
    assert 0.2 < share < 0.4  # U(0, 1) scores: the initial sparsity is τ


def test_zero_initial_sparsity_is_the_backbone(device):
    torch.manual_seed(0)
    model = build("weight_masking", VEC, width=8, num_heads=2, initial_sparsity=0.0).to(device)
    x = torch.randn(3, 12, device=device)
    h = model.tokenizer(x)
    for layer in model.layers:
        h = layer(h)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], model.heads[t](h), rtol=0, atol=1e-6)


def test_straight_through_gradient_equals_the_mask_gradient(device):
    """dL/dM = dL/dm, and it is (dL/dy x^T) ⊙ W for the masked output projection."""
    torch.manual_seed(0)
    model = build("weight_masking", VEC, width=8, depth=1, num_heads=2, initial_sparsity=0.5).to(device)
    x = torch.randn(3, 12, device=device)
    model(x)["a"].sum().backward()
    grad = model.scores[0]["a"]["attention_out_weight"].grad
    assert grad is not None and (grad[model.scores[0]["a"]["attention_out_weight"] <= 0.5] != 0).any()
    score = torch.rand(4, 3, device=device, requires_grad=True)
    w, inp = torch.randn(4, 3, device=device), torch.randn(5, 3, device=device)
    y = inp @ (w * ThresholdSTE.apply(score, 0.5)).T
    y.square().sum().backward()
    torch.testing.assert_close(score.grad, (2 * y.detach()).T @ inp * w)


def test_backbone_frozen_and_masks_per_task(device, params_with_grad):
    torch.manual_seed(0)
    model = build("weight_masking", VEC, width=8, num_heads=2).to(device)
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].square().sum())
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("a"))}
    assert touched == specific and all(".a." in n or n.startswith("heads.a.") for n in touched)
    assert type(model) is WeightMasking


def test_parameter_count():
    w, depth = 8, 2
    model = build("weight_masking", VEC, width=w, depth=depth, num_heads=2)
    per_layer = 4 * w * w + 2 * (w * 2 * w)  # W_q, W_k, W_v, W_o and W_1, W_2 (d_ff = 2d); no biases
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == depth * per_layer + 2 * w + 2
    with pytest.raises(ValueError):
        build("weight_masking", VEC, initial_sparsity=1.0)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("weight_masking", device)
    first, last = short_training("weight_masking", dense, device, steps=30)
    assert last < 0.8 * first


def test_default_initial_sparsity_is_five_percent():
    """τ defaults to 5%: about one weight in twenty starts masked out, the rest of the backbone kept."""
    model = build("weight_masking", VEC, width=16, depth=2, num_heads=2)
    assert model.threshold == 0.05
    share = torch.cat([(s <= 0.05).float().flatten() for d in model.scores for s in d["a"].values()]).mean().item()
    assert 0.04 < share < 0.06
