"""(IA)^3: identity at init, l_k/l_v/l_ff as in Sec. 3.3 by hand, L (2d + d_ff) per task, foldable."""

import copy
import math

import pytest
import torch

from reference_impls.architectures.ia3 import IA3
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def plain(model, x, task):
    h = model.tokenizer(x)
    for layer in model.layers:
        h = layer(h)
    return model.heads[task](h)


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.scales.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 2)


def test_vectors_start_at_ones_so_the_model_is_the_backbone(device):
    for problem in (VEC, Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1}, dense=True)):
        torch.manual_seed(0)
        model = build("ia3", problem, width=8, num_heads=2).to(device)
        assert all((p == 1).all() for p in model.scales.parameters())
        x = torch.randn(3, *problem.input_shape, device=device)
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], plain(model, x, t), rtol=0, atol=0)


def test_untrained_vectors_give_the_backbone_even_when_its_norms_are_not_the_identity(device):
    """With all-one vectors the model is the frozen backbone for any (pretrained) LayerNorm affine maps."""
    torch.manual_seed(0)
    model = build("ia3", VEC, width=8, num_heads=2).to(device).double()
    with torch.no_grad():  # a pretrained backbone's norms: distinct affine maps, so their order shows
        for layer in model.layers:
            for norm in (layer.norm1, layer.norm2):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.normal_()
    x = torch.randn(3, 12, device=device, dtype=torch.float64)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], plain(model, x, t), rtol=1e-12, atol=1e-12)


def test_rescaling_matches_a_hand_computation(device):
    torch.manual_seed(0)
    model = build("ia3", VEC, width=4, depth=1, num_heads=1).to(device)
    randomise(model)
    layer, s = model.layers[0], model.scales["b"][0]
    x = torch.randn(2, 12, device=device)
    h = model.tokenizer(x)
    att = layer.attention
    q, k, v = att.query(h), s.keys * att.key(h), s.values * att.value(h)  # l_k ⊙ K, l_v ⊙ V
    a = layer.norm1(h + att.out(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), -1) @ v))
    w1, act, w2 = layer.feed_forward
    out = layer.norm2(a + w2(s.inner * act(w1(a))))  # (l_ff ⊙ γ(W_1 a)) W_2
    torch.testing.assert_close(model(x)["b"], model.heads["b"](out))


def test_l_ff_acts_after_the_nonlinearity_so_it_does_not_fold_into_w1(device):
    torch.manual_seed(0)
    model = build("ia3", VEC, width=8, num_heads=2).to(device)
    randomise(model)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for layer, s in zip(folded.layers, folded.scales["a"]):
            for linear, vec in ((layer.attention.key, s.keys), (layer.attention.value, s.values),
                                (layer.feed_forward[0], s.inner)):
                linear.weight.mul_(vec[:, None])  # diag(l) W
                linear.bias.mul_(vec)  # diag(l) b
        for p in folded.scales["a"].parameters():
            p.fill_(1.0)
    x = torch.randn(3, 12, device=device)  # GELU(l ⊙ z) != l ⊙ GELU(z): fold l_ff only works before γ
    assert not torch.allclose(folded(x)["a"], model(x)["a"], atol=1e-3)


def test_key_and_value_vectors_fold_exactly(device):
    torch.manual_seed(0)
    model = build("ia3", VEC, width=8, num_heads=2).to(device)
    randomise(model)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for layer, s in zip(folded.layers, folded.scales["a"]):
            for linear, vec in ((layer.attention.key, s.keys), (layer.attention.value, s.values)):
                linear.weight.mul_(vec[:, None])
                linear.bias.mul_(vec)
                vec.fill_(1.0)
            layer.feed_forward[2].weight.mul_(s.inner[None, :])  # l_ff folds into W_2's columns
            s.inner.fill_(1.0)
    x = torch.randn(3, 12, device=device)
    torch.testing.assert_close(folded(x)["a"], model(x)["a"], rtol=1e-4, atol=1e-5)


def test_parameter_count_and_frozen_backbone(device, params_with_grad):
    w, depth = 8, 3
    model = build("ia3", VEC, width=w, depth=depth, num_heads=2).to(device)
    d_ff = 2 * w
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == depth * (2 * w + d_ff) + heads[t]
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["b"].square().sum())
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("b"))}
    assert touched == specific
    assert type(model) is IA3


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("ia3", device)
    first, last = short_training("ia3", dense, device, steps=30)
    assert last < 0.8 * first
