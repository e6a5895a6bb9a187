"""MING-MOE: exactly k experts per token, the routed LoRA update by hand, base model at init."""

import copy

import pytest
import torch
from torch.nn import functional as F

from reference_impls.architectures.ming_moe import MINGMoE
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def randomise_experts(model, seed=0):
    """B_e start at 0; give them random values so the experts differ from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for up in layer.up:
                up.weight.copy_(torch.randn(up.weight.shape, generator=g).to(up.weight))


def test_exactly_k_experts_per_token_and_per_pixel(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("ming_moe", problem, width=6, num_experts=5, k=2).to(device)
        x = torch.randn(7, *problem.input_shape, device=device) * 3
        probs, gates = model.layers[0].route(x)
        assert gates.shape == probs.shape and gates.shape[:2] == (7, 5)
        assert ((gates > 0).sum(1) == 2).all()  # sparse: k of E per token / pixel
        torch.testing.assert_close(gates.sum(1), torch.ones_like(gates.sum(1)))
        top2 = probs.topk(2, dim=1).indices
        assert ((gates > 0).long().sum(1) == (gates.gather(1, top2) > 0).long().sum(1)).all()


def test_routed_output_by_hand(device):
    torch.manual_seed(0)
    model = build("ming_moe", VEC, width=6, rank=2, num_experts=4, k=2, alpha=3.0).to(device)
    randomise_experts(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    logits = x @ layer.switch.weight.T + layer.switch.bias
    probs = torch.softmax(logits, -1)
    expected = x @ layer.base.weight.T + layer.base.bias
    for i in range(5):
        top = probs[i].topk(2).indices
        weights = probs[i, top] / probs[i, top].sum()
        for w, e in zip(weights, top.tolist()):
            update = layer.up[e].weight @ layer.down[e].weight  # B_e A_e
            expected[i] += (3.0 / 2) * w * (update @ x[i])
    torch.testing.assert_close(layer(x), expected)


def test_k_equal_to_e_is_dense_softmax_mixture(device):
    torch.manual_seed(0)
    model = build("ming_moe", VEC, width=6, num_experts=3, k=3).to(device)
    x = torch.randn(4, 6, device=device)
    probs, gates = model.layers[0].route(x)
    torch.testing.assert_close(gates, probs)


def test_untrained_model_is_the_backbone(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("ming_moe", problem, width=6, num_experts=3).to(device)
        layers = [torch.nn.Sequential(layer.base, torch.nn.ReLU()) for layer in model.layers]
        plain = SharedBottom(problem.tasks, copy.deepcopy(torch.nn.Sequential(*layers)), copy.deepcopy(model.heads))
        x = torch.randn(3, *problem.input_shape, device=device)
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], plain(x)[t], rtol=0, atol=0)


def test_unselected_experts_get_no_gradient(device, params_with_grad):
    torch.manual_seed(0)
    x = torch.randn(1, 6, device=device)  # one token
    for k in (2, 1):
        model = build("ming_moe", VEC, width=8, depth=1, num_experts=4, k=k).to(device)
        randomise_experts(model)
        assert not any(p.requires_grad for p in model.layers[0].base.parameters())  # frozen base
        chosen = {str(e) for e in model.layers[0].route(x)[1][0].nonzero().flatten().tolist()}
        touched = params_with_grad(model, model(x)["a"].square().sum())
        experts = {n.split(".")[3] for n in touched if n.startswith(("layers.0.down.", "layers.0.up."))}
        assert len(chosen) == k and experts == chosen
        assert not any(n.startswith("heads.b") for n in touched)
        # renormalised top-k: with k = 1 the one gate is always 1, so the router learns nothing
        router_grad = model.layers[0].switch.weight.grad.abs().max().item()
        assert router_grad > 1e-4 if k > 1 else router_grad < 1e-6


def test_balance_loss_by_hand(device):
    torch.manual_seed(0)
    model = build("ming_moe", VEC, width=6, num_experts=4, k=2, balance_weight=0.5).to(device)
    model(torch.randn(9, 6, device=device))
    terms = []
    for layer in model.layers:
        probs, gates = layer.last_probs, layer.last_gates
        f = (gates > 0).float().sum(0) / (9 * 2)
        terms.append(4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * torch.stack(terms).mean())
    copy.deepcopy(model)  # the cached routing does not block copies


def test_parameter_count(n_params):
    d, w, r, e = 6, 8, 2, 3
    model = build("ming_moe", VEC, width=w, depth=2, rank=r, num_experts=e)
    per_layer = lambda d_in, d_out: e * r * (d_in + d_out) + (d_in * e + e)  # experts, router
    backbone = (d * w + w) + (w * w + w)
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == backbone + per_layer(d, w) + per_layer(w, w) + heads
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == 2 * w + 2  # only the head


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="k <= num_experts"):
        build("ming_moe", VEC, num_experts=2, k=3)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("ming_moe", device)
    first, last = short_training("ming_moe", dense, device, steps=40)
    assert last < 0.8 * first
    assert type(build("ming_moe", VEC)) is MINGMoE


def test_pixels_are_routed_by_a_convolution_with_the_layer_s_kernel_and_a_softmax_over_experts(device):
    """Per output pixel, p = softmax over the E experts of a router convolution shaped like W0."""
    torch.manual_seed(1)
    model = build("ming_moe", IMG, width=6, num_experts=4, k=2).to(device)
    layer, x = model.layers[0], torch.randn(3, 2, 5, 5, device=device)
    switch, base = layer.switch, layer.base
    assert switch.weight.shape == (4, *base.weight.shape[1:])  # E x C_in x the layer's kernel
    logits = F.conv2d(x, switch.weight, switch.bias, base.stride, base.padding)
    probs, gates = layer.route(x)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 5, 5, device=device))


def test_defaults_k_two_and_no_balance_term():
    """k = 2 by default (k = 1 would leave the router untrained); the balance term is opt-in."""
    model = build("ming_moe", VEC)
    assert all(layer.k == 2 for layer in model.layers)
    model(torch.randn(4, 6))
    assert model.balance_weight == 0.0 and model.auxiliary_loss().item() == 0.0


def test_balance_loss_by_hand_counts_every_pixel_as_a_token_and_needs_a_forward_first():
    """On images the tokens are the pixels: f_e and P_e average over batch and positions."""
    torch.manual_seed(0)
    model = build("ming_moe", IMG, width=4, num_experts=3, k=2, balance_weight=1.0)
    with pytest.raises(RuntimeError, match="forward"):
        model.layers[0].balance_loss()
    model(torch.randn(2, 2, 5, 5))
    for layer in model.layers:
        probs, gates = layer.last_probs, layer.last_gates  # (B, E, H, W)
        tokens = probs.shape[0] * probs.shape[2] * probs.shape[3]
        f = (gates > 0).float().sum(dim=(0, 2, 3)) / (tokens * 2)
        expected = 3 * (f * probs.mean(dim=(0, 2, 3))).sum()
        torch.testing.assert_close(layer.balance_loss(), expected)
