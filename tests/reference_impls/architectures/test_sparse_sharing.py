"""Sparse sharing: masked gradients, shared overlaps, global magnitude pruning, IMP, hard-sharing limit."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.encoders import heads_for, trunk_for
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom
from reference_impls.architectures.sparse_sharing import SparseSharing, iterative_magnitude_pruning

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def random_masks(model, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        layer.masks.copy_(torch.rand(layer.masks.shape, generator=g) < density)


def weight_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [layer.weight.grad.clone() for layer in model.layers]


def test_masked_weights_get_no_gradient_from_that_task(device, params_with_grad):
    torch.manual_seed(0)
    model = build("sparse_sharing", VEC, width=8).to(device)
    random_masks(model)
    x = torch.randn(16, 6, device=device)
    grads = weight_grads(model, model.forward_task(x, "a").square().sum())
    for g, m in zip(grads, model.masks("a")):
        assert (g[~m] == 0).all() and (g[m] != 0).any()
    touched = params_with_grad(model, model.forward_task(x, "a").square().sum())
    assert not any(n.startswith("heads.b") for n in touched)


def test_overlapping_weights_get_gradient_from_both_tasks(device):
    torch.manual_seed(1)
    model = build("sparse_sharing", VEC, width=8).to(device)
    random_masks(model, density=0.6, seed=1)
    x = torch.randn(16, 6, device=device)
    g_a = weight_grads(model, model.forward_task(x, "a").square().sum())
    g_b = weight_grads(model, model.forward_task(x, "b").square().sum())
    g = weight_grads(model, sum(o.square().sum() for o in model(x).values()))
    for ga, gb, gs, ma, mb in zip(g_a, g_b, g, model.masks("a"), model.masks("b")):
        both = ma & mb
        assert (both & (ga != 0) & (gb != 0)).any()  # shared entries learn from a and from b
        torch.testing.assert_close(gs, ga + gb)
        torch.testing.assert_close(gs[ma & ~mb], ga[ma & ~mb])  # private to a
        assert (gs[~(ma | mb)] == 0).all()  # used by nobody


def test_training_moves_only_the_weights_a_task_keeps(device):
    torch.manual_seed(2)
    model = build("sparse_sharing", VEC, width=8).to(device)
    random_masks(model, density=0.5, seed=2)
    before = [layer.weight.detach().clone() for layer in model.layers]
    x = torch.randn(32, 6, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        (model.forward_task(x, "a") - 1).square().mean().backward()
        opt.step()
    for layer, w0, m in zip(model.layers, before, model.masks("a")):
        assert torch.equal(layer.weight[~m], w0[~m]) and not torch.equal(layer.weight[m], w0[m])


def test_prune_keeps_the_largest_magnitudes_over_all_layers(device):
    torch.manual_seed(3)
    model = build("sparse_sharing", VEC, width=8).to(device)
    mags = [layer.weight.detach().abs() for layer in model.layers]
    total = sum(m.numel() for m in mags)
    model.prune("a", 0.75)
    kept = model.masks("a")
    assert sum(k.sum().item() for k in kept) == total - round(0.75 * total)
    min_kept = min(m[k].min() for m, k in zip(mags, kept))
    max_dropped = max(m[~k].max() for m, k in zip(mags, kept) if (~k).any())
    assert min_kept >= max_dropped
    first = [k.clone() for k in kept]
    model.prune("a", 0.5)  # the next round only removes from what is left
    assert all(not (k & ~f).any() for k, f in zip(model.masks("a"), first))
    assert all(m.all() for m in model.masks("b"))  # another task's mask is untouched


def test_a_task_computes_with_its_masked_weights_and_every_bias():
    torch.manual_seed(6)
    model = build("sparse_sharing", VEC, width=8).double()
    random_masks(model, density=0.5, seed=6)
    model.layers[0].masks[0, :2] = False  # a keeps no weight of units 0 and 1: their bias still counts
    x = torch.randn(5, 6, dtype=torch.float64)
    for k, t in enumerate(VEC.tasks):
        h = x
        for layer in model.layers:
            h = torch.relu(h @ (layer.weight * layer.masks[k]).T + layer.bias)
        torch.testing.assert_close(model.forward_task(x, t), model.heads[t](h))
    assert (model.layers[0].bias[:2] != 0).all()


def test_full_masks_are_hard_sharing(device):
    torch.manual_seed(4)
    backbone, heads = trunk_for(VEC.input_shape, 8, 2), heads_for(VEC, 8)
    hard = SharedBottom(VEC.tasks, copy.deepcopy(backbone), copy.deepcopy(heads)).to(device)
    sparse = SparseSharing(VEC.tasks, backbone, heads).to(device)
    x = torch.randn(5, 6, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(sparse(x)[t], hard(x)[t])
    sparse_grads = weight_grads(sparse, sum(o.sum() for o in sparse(x).values()))
    hard.zero_grad()
    sum(o.sum() for o in hard(x).values()).backward()
    hard_grads = [m.weight.grad for m in hard.encoder.modules() if isinstance(m, torch.nn.Linear)]
    for gs, gh in zip(sparse_grads, hard_grads):
        torch.testing.assert_close(gs, gh)


def test_iterative_magnitude_pruning_finds_different_subnetworks_and_rewinds():
    torch.manual_seed(5)
    model = build("sparse_sharing", VEC, width=8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 6, generator=g)
    targets = {"a": x[:, :1] * 2, "b": -x[:, 3:5]}

    def train(m, task):
        opt = torch.optim.Adam(m.parameters(), lr=2e-2)
        for _ in range(20):
            opt.zero_grad()
            F.mse_loss(m.forward_task(x, task), targets[task]).backward()
            opt.step()

    iterative_magnitude_pruning(model, "a", train, rounds=3, final_density=0.2)
    iterative_magnitude_pruning(model, "b", train, rounds=3, final_density=0.2)
    for t in VEC.tasks:
        assert model.density(t) == pytest.approx(0.2, abs=0.02)
    for p, initial in zip(model.parameters(), model.initial.buffers(), strict=True):
        assert torch.equal(p, initial)  # rewound to θ_0 for the multi-task phase
    a, b = torch.cat([m.flatten() for m in model.masks("a")]), torch.cat([m.flatten() for m in model.masks("b")])
    overlap = (a & b).sum().item()
    assert 0 < overlap < a.sum().item()  # partly shared, partly private


def test_every_imp_round_trains_the_pruned_subnetwork_from_theta_0():
    torch.manual_seed(7)
    model = build("sparse_sharing", VEC, width=8)
    theta_0 = [p.detach().clone() for p in model.parameters()]
    seen = []

    def train(m, task):  # records where each round starts, then "trains" every weight
        seen.append((m.density(task), all(torch.equal(p, p0) for p, p0 in zip(m.parameters(), theta_0))))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))

    iterative_magnitude_pruning(model, "a", train, rounds=3, final_density=0.125)
    # 1 - 0.125^(1/3) = 1/2 of what is left goes each round: 112 -> 56 -> 28 weights kept.
    assert seen == [(1.0, True), (0.5, True), (0.25, True)]
    assert model.density("a") == 0.125 and all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), theta_0))


def test_parameter_count_does_not_grow_with_tasks(n_params):
    d, w = 6, 8
    model = build("sparse_sharing", VEC, width=w, depth=2)
    trunk = (d * w + w) + (w * w + w)
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == trunk + heads  # masks are buffers
    assert isinstance(model, SparseSharing) and model.name == "sparse_sharing"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("sparse_sharing", device)
    first, last = short_training("sparse_sharing", dense, device, steps=15)
    assert last < 0.7 * first


def test_a_checkpoint_carries_the_initial_weights_that_rewind_restores():
    """θ_0 is model state: a model loaded from a checkpoint rewinds to the saved model's θ_0."""
    torch.manual_seed(0)
    saved = build("sparse_sharing", VEC, width=8)
    initial = [p.detach().clone() for p in saved.parameters()]
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(1.0)  # "training"
    saved.prune("a", 0.5)
    torch.manual_seed(1)
    restored = build("sparse_sharing", VEC, width=8)
    restored.load_state_dict(saved.state_dict())
    restored.double().rewind()
    for p, p0 in zip(restored.parameters(), initial, strict=True):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, p0.double())
    assert torch.equal(torch.cat([m.flatten() for m in restored.masks("a")]),
                       torch.cat([m.flatten() for m in saved.masks("a")]))


def test_imp_accepts_one_round_and_full_density_and_refuses_bad_schedules_before_training():
    """rounds >= 1 and final_density in (0, 1]; a bad schedule is refused before any training."""
    model = build("sparse_sharing", VEC, width=8, depth=3)
    assert len(model.layers) == 3  # depth reaches the base network
    calls = []
    train = lambda m, t: calls.append(t)  # noqa: E731
    iterative_magnitude_pruning(model, "a", train, rounds=1, final_density=1.0)  # no pruning at all
    assert calls == ["a"] and model.density("a") == 1.0
    iterative_magnitude_pruning(model, "a", train, rounds=1, final_density=0.5)
    assert model.density("a") == pytest.approx(0.5, abs=0.01)
    calls.clear()
    for rounds, density in ((0, 0.5), (2, 0.0), (2, 1.5), (2, -0.1)):
        with pytest.raises(ValueError):
            iterative_magnitude_pruning(model, "a", train, rounds=rounds, final_density=density)
    assert calls == []


def test_a_bias_free_base_layer_stays_bias_free():
    from reference_impls.architectures.sparse_sharing import SparseLayer
    layer = SparseLayer(torch.nn.Linear(3, 2, bias=False), num_tasks=2)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x, 1), x @ layer.weight.T)
