import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.soft_modularization import SoftModularization

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_routing_weights_are_distributions(device):
    torch.manual_seed(0)
    model = build("soft_modularization", VEC, num_layers=3, num_modules=4).to(device)
    weights, last = model.routing_weights(torch.randn(7, 6, device=device) * 3, "a")
    assert len(weights) == 2
    for p in weights:
        assert p.shape == (7, 4, 4) and (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(7, 4, device=device))
    assert last.shape == (7, 4)
    torch.testing.assert_close(last.sum(-1), torch.ones(7, device=device))


def test_output_is_the_hand_computed_weighted_mix(device):
    torch.manual_seed(1)
    model = build("soft_modularization", VEC, num_layers=2, num_modules=2).to(device)
    x = torch.randn(3, 6, device=device)
    state = model.encoder(x)
    r = model.router
    g = state * model.task_embeddings["b"]  # D(s) * F(z_t)
    p = torch.softmax(r.down[0](torch.relu(g)).view(3, 2, 2), -1)
    last = torch.softmax(r.last(torch.relu(r.up[0](p.flatten(1)) * g)), -1)
    f0 = [m(torch.relu(state)) for m in model.layers[0]]
    f1 = [m(torch.relu(p[:, j, 0:1] * f0[0] + p[:, j, 1:2] * f0[1])) for j, m in enumerate(model.layers[1])]
    h = torch.relu(last[:, 0:1] * f1[0] + last[:, 1:2] * f1[1])
    expected = model.heads["b"](h)
    got = model(x)["b"]
    torch.testing.assert_close(got, expected)
    # the router is trained end to end: D(s) and F(z_t) also learn through the routing weights
    wrt = [model.encoder.weight, model.task_embeddings["b"], *r.parameters()]
    for g_got, g_hand in zip(torch.autograd.grad(got.sum(), wrt), torch.autograd.grad(expected.sum(), wrt)):
        torch.testing.assert_close(g_got, g_hand)


def test_images_route_on_the_pixel_mean_of_the_encoding(device):
    torch.manual_seed(5)
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)
    model = build("soft_modularization", problem, width=8).to(device)
    x = torch.randn(3, 2, 4, 4, device=device) * 2
    g = model.encoder(x).mean(dim=(2, 3)) * model.task_embeddings["a"]
    (p,), last = model.router(g)
    (p_model,), last_model = model.routing_weights(x, "a")
    torch.testing.assert_close(p_model, p)
    torch.testing.assert_close(last_model, last)


def test_each_routing_layer_is_conditioned_on_the_previous_one(device):
    torch.manual_seed(6)
    model = build("soft_modularization", VEC, num_layers=3, num_modules=2).to(device).double()
    x = torch.randn(3, 6, device=device, dtype=torch.float64)
    r = model.router
    g = model.encoder(x) * model.task_embeddings["a"]
    p1 = torch.softmax(r.down[0](torch.relu(g)).view(3, 2, 2), -1)
    p2 = torch.softmax(r.down[1](torch.relu(r.up[0](p1.flatten(1)) * g)).view(3, 2, 2), -1)  # reads p^1
    last = torch.softmax(r.last(torch.relu(r.up[1](p2.flatten(1)) * g)), -1)  # reads p^2, not p^1
    (got1, got2), got_last = model.routing_weights(x, "a")
    for got, hand in ((got1, p1), (got2, p2), (got_last, last)):
        torch.testing.assert_close(got, hand)


@pytest.mark.parametrize("sources", ([[1, 0], [1, 0]], [[1, 0], [0, 1]]), ids=("swap-swap", "swap-keep"))
def test_one_hot_routing_is_a_plain_chain_of_modules(device, sources):
    """With one-hot routes, module j of layer l+1 reads only module sources[l][j] of layer l, so
    the output is one chain of modules; swap-then-keep also pins which p^l wires which layers."""
    torch.manual_seed(7)
    model = build("soft_modularization", VEC, num_layers=3, num_modules=2).to(device)
    state = model.encoder(torch.randn(4, 6, device=device))
    routes = [torch.eye(2, device=device)[src].expand(4, 2, 2) for src in sources]
    last = torch.tensor([1.0, 0.0], device=device).expand(4, 2)  # the output reads module 0
    chain = [0]
    for src in reversed(sources):
        chain.insert(0, src[chain[0]])
    by_hand = state
    for layer, module in enumerate(chain):
        by_hand = model.layers[layer][module](torch.relu(by_hand))
    torch.testing.assert_close(model.base_network(state, routes, last), torch.relu(by_hand))


def test_tasks_route_differently_and_equal_embeddings_route_alike(device):
    torch.manual_seed(3)
    model = build("soft_modularization", VEC, num_layers=3, num_modules=3).to(device)
    x = torch.randn(5, 6, device=device)
    (pa, _), la = model.routing_weights(x, "a")
    (pb, _), lb = model.routing_weights(x, "b")
    assert (pa - pb).abs().max() > 1e-2 and (la - lb).abs().max() > 1e-2
    assert (pa[0] - pa[1]).abs().max() > 1e-3  # routes also depend on the input
    with torch.no_grad():
        model.task_embeddings["b"].copy_(model.task_embeddings["a"])
    torch.testing.assert_close(model.routing_weights(x, "b")[0][0], pa)


def test_gradient_split_between_tasks(device, params_with_grad):
    torch.manual_seed(4)
    model = build("soft_modularization", VEC).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 6, device=device))["a"].square().sum())
    assert "task_embeddings.a" in touched and any(n.startswith("router.") for n in touched)
    assert all(any(n.startswith(f"layers.{l}.{j}.") for n in touched) for l in range(2) for j in range(2))
    assert not any(n.startswith(("task_embeddings.b", "heads.b")) for n in touched)


def test_parameter_count(n_params):
    d, D, L, n = 6, 16, 3, 2
    model = build("soft_modularization", VEC, width=D, num_layers=L, num_modules=n)
    router = (L - 1) * ((D * n * n + n * n) + (n * n * D + D)) + (D * n + n)
    modules = L * n * (D * D + D)
    expected = (d * D + D) + 2 * D + modules + router + (D + 1) + (2 * D + 2)
    assert n_params(model) == expected


def test_needs_two_layers():
    with pytest.raises(ValueError, match="num_layers"):
        build("soft_modularization", VEC, num_layers=1)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("soft_modularization", device)
    first, last = short_training("soft_modularization", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("soft_modularization", VEC)
    assert type(model) is SoftModularization and model.name == "soft_modularization"
