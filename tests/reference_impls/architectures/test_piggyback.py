"""Piggyback: W ⊙ m with binary m, frozen backbone, straight-through gradient, no interference."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.piggyback import MaskedLayer, Piggyback
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
TAU = 5e-3


def scramble_scores(model, seed=0):
    """Scores spread around the threshold, so roughly half the weights are masked out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for s in layer.scores.values():
                s.copy_((torch.rand(s.shape, generator=g) - 0.5).to(s) * 4 * TAU + TAU)


def test_effective_weights_are_backbone_times_binary_mask(device):
    for problem in (VEC, Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)):
        torch.manual_seed(0)
        model = build("piggyback", problem, width=6).to(device)
        scramble_scores(model)
        x = torch.randn(3, *problem.input_shape, device=device)
        h = x
        for layer in model.layers:
            m = layer.mask("b")
            assert set(m.unique().tolist()) == {0.0, 1.0}
            assert torch.equal(m, (layer.scores["b"] > TAU).float())
            assert torch.equal(layer.masked_weight("b"), layer.weight * m)
            w = layer.weight * (layer.scores["b"] > TAU).float()
            h = F.linear(h, w, layer.bias) if w.ndim == 2 else F.conv2d(h, w, layer.bias, padding=1)
            h = torch.relu(h)
        torch.testing.assert_close(model(x)["b"], model.heads["b"](h))


def test_untrained_masks_are_all_ones_so_the_model_is_the_backbone(device):
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU())
    heads = {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 2)}
    model = Piggyback(VEC.tasks, backbone, heads).to(device)
    backbone, heads = backbone.to(device), {t: h.to(device) for t, h in heads.items()}
    x = torch.randn(4, 6, device=device)
    for t in VEC.tasks:
        assert torch.equal(model(x)[t], heads[t](backbone(x)))


def test_backbone_gets_no_gradient_and_is_not_a_parameter(device, params_with_grad):
    torch.manual_seed(0)
    model = build("piggyback", VEC, width=8).to(device)
    assert model.shared_parameters() == []
    assert all(".scores." in n or n.startswith("heads.") for n, _ in model.named_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 6, device=device))["a"].square().sum())
    assert touched == {"layers.0.scores.a", "layers.1.scores.a", "heads.a.0.weight", "heads.a.0.bias"}
    assert all(layer.weight.grad is None and not layer.weight.requires_grad for layer in model.layers)


def test_straight_through_gradient_formula(device):
    """dL/dm^r = dL/dm = (dL/dy x^T) ⊙ W, also where the mask is 0 (so weights can return)."""
    torch.manual_seed(0)
    layer = MaskedLayer(torch.nn.Linear(5, 3), ["a"], threshold=TAU, init_score=1e-2).to(device)
    with torch.no_grad():
        layer.scores["a"][0, :2] = -1.0  # two weights masked out
        layer.scores["a"][1, 0] = TAU  # a score at the threshold masks too: m = 1[m^r > tau], strictly
    assert layer.mask("a")[1, 0] == 0 and layer.mask("a")[1, 1] == 1
    x = torch.randn(7, 5, device=device)
    target = torch.randn(7, 3, device=device)
    y = layer(x, "a")
    (y - target).square().sum().backward()
    dy = 2 * (y.detach() - target)
    expected = (dy.T @ x) * layer.weight  # sum over the batch of dy_j w_ji x_i
    torch.testing.assert_close(layer.scores["a"].grad, expected)
    assert (layer.scores["a"].grad[0, :2] != 0).all()


def test_bias_is_not_masked_even_where_a_whole_row_is(device):
    """y = (W ⊙ m) x + b: the mask covers weights only, so a unit with every weight off outputs its bias."""
    torch.manual_seed(0)
    layer = MaskedLayer(torch.nn.Linear(4, 3), ["a"], threshold=TAU, init_score=1e-2).to(device)
    with torch.no_grad():
        layer.scores["a"][0] = -1.0  # unit 0: every weight masked out
        layer.scores["a"][1, ::2] = -1.0
    x = torch.randn(5, 4, device=device)
    keep = torch.tensor([[0.0] * 4, [0, 1, 0, 1], [1.0] * 4], device=device)
    torch.testing.assert_close(layer(x, "a"), x @ (layer.weight * keep).T + layer.bias)
    assert torch.equal(layer(x, "a")[:, 0], layer.bias[0].expand(5))


def test_backbone_weights_are_a_copy():
    """Changing the network the model was built from afterwards changes nothing in the model."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())
    model = Piggyback(VEC.tasks, backbone, {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 2)})
    x = torch.randn(4, 6)
    before = model(x)["a"]
    with torch.no_grad():
        backbone[0].weight.add_(1.0)
        backbone[0].bias.add_(1.0)
    assert torch.equal(model(x)["a"], before)


def test_training_one_task_leaves_the_other_task_unchanged(device):
    torch.manual_seed(0)
    model = build("piggyback", VEC, width=8).to(device)
    x = torch.randn(16, 6, device=device)
    before = {t: o.detach().clone() for t, o in model(x).items()}
    weights = [layer.weight.clone() for layer in model.layers]
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(20):
        opt.zero_grad()
        (model(x)["b"] - 1.0).square().mean().backward()
        opt.step()
    after = model(x)
    assert torch.equal(after["a"], before["a"])
    assert not torch.equal(after["b"], before["b"])
    assert any((layer.mask("b") == 0).any() for layer in model.layers)  # masks did change
    assert all(torch.equal(layer.weight, w) for layer, w in zip(model.layers, weights))


def test_parameter_count(n_params):
    d, w = 6, 8
    model = build("piggyback", VEC, width=w, depth=2)
    backbone_weights = d * w + w * w  # one real score per weight, per task (biases are not masked)
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == 2 * backbone_weights + heads
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == backbone_weights + w + 1


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("piggyback", device)
    first, last = short_training("piggyback", dense, device, steps=40)
    assert last < 0.8 * first


def test_a_backbone_layer_without_bias_is_masked_without_one():
    # a bias-free layer stays bias-free: the masked model computes ReLU((W * mask) x) with no bias term
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.ReLU())
    model = Piggyback(VEC.tasks, backbone, {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 2)})
    assert model.layers[0].bias is None
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](torch.relu(x @ backbone[0].weight.T)))
