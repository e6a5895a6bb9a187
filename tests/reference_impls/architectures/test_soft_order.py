import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.soft_order import SoftOrder

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 4, 4), {"a": 3, "b": 1}, dense=True)


def one_hot_logits(order, device) -> torch.Tensor:
    """Logits whose softmax picks layer order[k] at depth k (exactly, after underflow)."""
    logits = torch.full((len(order), len(order)), -1e4, device=device)
    logits[torch.arange(len(order)), torch.tensor(order)] = 0.0
    return logits


def test_mixing_weights_are_a_distribution_per_depth(device):
    torch.manual_seed(0)
    model = build("soft_order", VEC, num_layers=4).to(device)
    with torch.no_grad():
        for p in model.logits.values():
            p.normal_(std=3.0)
    for s in model.mixing_weights().values():
        assert s.shape == (4, 4) and (s >= 0).all()
        torch.testing.assert_close(s.sum(-1), torch.ones(4, device=device))


def test_one_hot_logits_reproduce_parallel_and_permuted_orderings(device):
    torch.manual_seed(1)
    model = build("soft_order", VEC, num_layers=3).to(device)
    orders = {"a": [0, 1, 2], "b": [2, 0, 1]}  # Eq. (2) parallel, Eq. (3) permuted
    with torch.no_grad():
        for t, order in orders.items():
            model.logits[t].copy_(one_hot_logits(order, device))
    x = torch.randn(5, 6, device=device)
    out = model(x)
    for t, order in orders.items():
        y = model.encoders[t](x)
        for j in order:
            y = model.layers[j](y)
        torch.testing.assert_close(out[t], model.decoders[t](y), rtol=0, atol=0)


def test_soft_mixture_is_eq7(device):
    torch.manual_seed(2)
    model = build("soft_order", VEC, num_layers=2).to(device)
    with torch.no_grad():
        model.logits["b"].copy_(torch.tensor([[0.3, -1.0], [2.0, 0.5]]))
    x = torch.randn(3, 6, device=device)
    s = torch.softmax(model.logits["b"], -1)
    y = model.encoders["b"](x)
    for k in range(2):
        y = s[k, 0] * model.layers[0](y) + s[k, 1] * model.layers[1](y)
    expected, got = model.decoders["b"](y), model(x)["b"]
    torch.testing.assert_close(got, expected)
    # the ordering itself is learned: the logits get the gradient of Eq. (7)
    (g_got,), (g_hand,) = (torch.autograd.grad(o.sum(), [model.logits["b"]]) for o in (got, expected))
    torch.testing.assert_close(g_got, g_hand)
    assert g_got.abs().min() > 0


def test_logits_start_at_zero_so_every_depth_averages_all_layers(device):
    torch.manual_seed(4)
    model = build("soft_order", VEC, num_layers=3).to(device)
    x = torch.randn(4, 6, device=device)
    y = model.encoders["a"](x)
    for _ in range(3):
        y = sum(f(y) for f in model.layers) / 3
    torch.testing.assert_close(model(x)["a"], model.decoders["a"](y))


def test_a_task_trains_only_the_layers_its_ordering_uses(device, params_with_grad):
    torch.manual_seed(3)
    model = build("soft_order", VEC, num_layers=3).to(device)
    x = torch.randn(8, 6, device=device)
    touched = params_with_grad(model, model(x)["a"].sum())
    assert all(any(n.startswith(f"layers.{j}.") for n in touched) for j in range(3))  # soft: all
    assert not any(n.startswith(("encoders.b", "logits.b", "decoders.b")) for n in touched)
    with torch.no_grad():
        model.logits["a"].copy_(one_hot_logits([0, 2, 0], device))  # never uses layer 1
    touched = params_with_grad(model, model(x)["a"].sum())
    assert not any(n.startswith("layers.1.") for n in touched)


def test_parameter_count(n_params):
    T, d, w, D = 2, 6, 16, 3
    model = build("soft_order", VEC, width=w, num_layers=D)
    encoders = T * (d * w + w)
    layers = D * (w * w + w)
    logits = T * D * D  # the tensor S of Eq. (7)
    decoders = (w + 1) + (2 * w + 2)
    assert n_params(model) == encoders + layers + logits + decoders


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("soft_order", device)
    first, last = short_training("soft_order", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("soft_order", VEC)
    assert type(model) is SoftOrder and model.name == "soft_order"


def test_task_specific_split_is_exactly_encoder_logits_and_decoder(device, split_by_task):
    """E_t, s_(t,.,.) and D_t are task t's own; every F_j is shared."""
    torch.manual_seed(5)
    model = build("soft_order", VEC, num_layers=3).to(device)
    split = split_by_task(model, torch.randn(4, 6, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"encoders.{t}.", f"decoders.{t}.") | {f"logits.{t}"})


@pytest.mark.parametrize("problem", (VEC, IMG), ids=("vector", "image"))
def test_each_shared_layer_is_a_weight_layer_with_its_nonlinearity(device, problem):
    """F_j is not affine: F(z) + F(-z) != 2 F(0) (an affine map would make them equal)."""
    torch.manual_seed(6)
    model = build("soft_order", problem, width=4, num_layers=2).to(device)
    z = torch.randn(3, 4, *problem.input_shape[1:], device=device)
    for f in model.layers:
        assert not torch.allclose(f(z) + f(-z), 2 * f(torch.zeros_like(z)))
