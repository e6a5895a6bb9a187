"""MTL-LoRA: the output formula by hand, backbone at init, n=1 & Λ=I is shared LoRA, merging, reach, symmetry."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.mtl_lora import MTLLoRA
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def randomise(model, seed=0):
    """Random B^i, Λ_t and w_t (they start at 0, I and 1), so every part of the update matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for p in [*layer.up.parameters(), *layer.transform.parameters(), *layer.mixing.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g).to(p))


def test_output_matches_the_formula_by_hand(device):
    torch.manual_seed(0)
    tau, r = 0.7, 2
    model = build("mtl_lora", VEC, width=6, rank=r, num_up=3, alpha=3.0, temperature=tau).to(device)
    randomise(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    for t in VEC.tasks:
        w = layer.mixing[t]
        soft = torch.exp(w / tau) / torch.exp(w / tau).sum()
        lam, a = layer.transform[t].weight, layer.down.weight
        update = sum(soft[i] * x @ (layer.up[i].weight @ lam @ a).T for i in range(3))
        expected = x @ layer.base.weight.T + layer.base.bias + (3.0 / r) * update
        torch.testing.assert_close(layer(x, t), expected)
    assert not torch.allclose(layer(x, "a"), layer(x, "b"))  # Λ_t and w_t make the tasks differ


def test_initialisation_is_identity_transform_random_mixture_and_the_backbone(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("mtl_lora", problem, width=6, rank=3, num_up=4).to(device)
        for layer in model.layers:
            for t in problem.tasks:
                torch.testing.assert_close(layer.transform[t].weight.flatten(1), torch.eye(3, device=device))
                assert layer.mixing[t].abs().max() <= 4**-0.5 and layer.mixing[t].std() > 0  # U(-1/√n, 1/√n)
                torch.testing.assert_close(layer.mixture(t).sum(), torch.tensor(1.0, device=device))
        layers = [torch.nn.Sequential(layer.base, torch.nn.ReLU()) for layer in model.layers]
        plain = SharedBottom(problem.tasks, copy.deepcopy(torch.nn.Sequential(*layers)), copy.deepcopy(model.heads))
        x = torch.randn(3, *problem.input_shape, device=device)
        for t in problem.tasks:
            torch.testing.assert_close(model(x)[t], plain(x)[t], rtol=0, atol=0)


def test_mixing_weights_fill_the_whole_symmetric_interval():
    """w_t ~ U(-1/sqrt(n), 1/sqrt(n)): with n = 100 draws per task and layer both ends are reached."""
    torch.manual_seed(0)
    n = 100
    model = build("mtl_lora", VEC, width=4, rank=1, num_up=n)
    bound = n**-0.5
    for layer in model.layers:
        for t in VEC.tasks:
            w = layer.mixing[t].detach()
            assert w.abs().max() <= bound
            assert w.min() < -0.9 * bound and w.max() > 0.9 * bound  # P(miss) = 0.9^100 per end


def test_one_up_projection_and_identity_transform_is_one_shared_lora(device):
    torch.manual_seed(0)
    model = build("mtl_lora", VEC, width=6, rank=2, num_up=1, alpha=2.0).to(device)
    with torch.no_grad():
        for layer in model.layers:
            layer.up[0].weight.normal_()
            layer.mixing["a"].fill_(-4.0)  # any w_t: a softmax over one entry is 1
    layer, x = model.layers[1], torch.randn(4, 6, device=device)
    h = torch.relu(model.layers[0](x, "a"))
    lora = h @ layer.base.weight.T + layer.base.bias + h @ (layer.up[0].weight @ layer.down.weight).T
    torch.testing.assert_close(layer(h, "a"), lora)
    torch.testing.assert_close(layer(h, "a"), layer(h, "b"))  # the same adapter for both tasks


def test_each_task_update_merges_into_one_weight(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("mtl_lora", problem, width=6, rank=2, alpha=3.0).to(device)  # α / r = 1.5 must merge too
        randomise(model)
        x = torch.randn(3, *problem.input_shape, device=device)
        for t in problem.tasks:
            h = x
            for layer in model.layers:
                w = layer.base.weight + layer.delta_weight(t)
                h = F.linear(h, w, layer.base.bias) if w.ndim == 2 else F.conv2d(h, w, layer.base.bias, padding=1)
                h = torch.relu(h)
            torch.testing.assert_close(model(x)[t], model.heads[t](h), rtol=1e-4, atol=1e-4)


def test_parameter_count(n_params):
    d, w, r, n = 6, 8, 2, 3
    model = build("mtl_lora", VEC, width=w, depth=2, rank=r, num_up=n)
    shared = lambda d_in, d_out: r * d_in + n * r * d_out  # A and B^1..B^n
    per_task_layer = r * r + n  # Λ_t and w_t
    heads = {"a": w + 1, "b": 2 * w + 2}
    backbone = (d * w + w) + (w * w + w)
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == 2 * per_task_layer + heads[t]
    assert n_params(model) == backbone + shared(d, w) + shared(w, w) + 2 * 2 * per_task_layer + sum(heads.values())


def test_gradient_reach(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mtl_lora", VEC, width=8).to(device)
    x = torch.randn(5, 6, device=device)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    # B^i = 0 at init: only the up-projections and the head move first.
    assert {n for n in touched if not n.startswith("heads")} == {f"layers.{k}.up.{i}.weight" for k in range(2) for i in range(3)}
    randomise(model)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert {"layers.0.down.weight", "layers.1.up.2.weight", "layers.0.transform.a.weight", "layers.1.mixing.a"} <= touched
    assert not any(".b." in n or n.endswith("mixing.b") or n.startswith("heads.b") or ".base." in n for n in touched)
    assert type(model) is MTLLoRA and model.name == "mtl_lora"


def test_training_breaks_the_symmetry_between_the_up_projections():
    """Every B^i starts at 0: with equal mixtures they would get equal gradients and stay equal forever."""
    torch.manual_seed(0)
    model = build("mtl_lora", VEC, width=6, rank=2, num_up=3)
    x = torch.randn(8, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam's first steps are sign-like: they would hide it
    for _ in range(3):
        opt.zero_grad()
        sum(o.square().mean() for o in model(x).values()).backward()
        opt.step()
    for layer in model.layers:
        ups = [b.weight for b in layer.up]
        assert all((ups[0] - u).abs().max() > 1e-3 * ups[0].abs().max() for u in ups[1:])  # n distinct ones
        assert all(layer.mixing[t].grad.abs().max() > 1e-8 for t in VEC.tasks)  # w_t learns too
    assert not torch.allclose(model.layers[0].mixture("a"), model.layers[0].mixture("b"))


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("mtl_lora", device)
    first, last = short_training("mtl_lora", dense, device, steps=40)
    assert last < 0.8 * first


def test_the_mixing_softmax_has_temperature_one_half_by_default():
    """tau = 0.5 is the documented default: w_t = softmax(mixing_t / 0.5)."""
    model = MTLLoRA.from_problem(VEC, width=8)
    randomise(model)
    for layer in model.layers:
        for t in VEC.tasks:
            torch.testing.assert_close(layer.mixture(t), torch.softmax(layer.mixing[t] / 0.5, dim=0))
