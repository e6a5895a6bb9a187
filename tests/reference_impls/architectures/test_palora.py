"""PaLoRA: one-hot α is base + that adapter, W(α) affine in α, gradients through α_k, sampling, training."""

import pytest
import torch

from reference_impls.architectures.encoders import heads_for, trunk_for
from reference_impls.architectures.palora import PaLoRA, sample_preference
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_preferences_reach_opposite_trade_offs

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def randomise_up(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for up in layer.up:
                up.weight.copy_(torch.randn(up.weight.shape, generator=g).to(up.weight))


def test_one_hot_preference_is_base_plus_that_adapter(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("palora", problem, width=6, rank=2).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        base = {t: o.clone() for t, o in model(x, torch.tensor([1.0, 0.0])).items()}
        torch.testing.assert_close(base, model(x, torch.tensor([0.0, 1.0])))  # B = 0: every α is the base
        randomise_up(model)
        for k in range(2):
            alpha = torch.eye(2)[k]
            for layer in model.layers:
                expected = model.layers[0].scale * (layer.up[k].weight.flatten(1) @ layer.down[k].weight.flatten(1))
                torch.testing.assert_close(layer.delta_weight(alpha).flatten(1), expected)
        assert not torch.allclose(model(x, torch.eye(2)[0])["a"], model(x, torch.eye(2)[1])["a"])


def test_combined_weight_is_affine_in_alpha():
    torch.manual_seed(0)
    model = build("palora", VEC, width=8, rank=2)
    randomise_up(model)
    layer, a, b = model.layers[1], torch.tensor([0.2, 0.8]), torch.tensor([0.9, 0.1])
    torch.testing.assert_close(layer.delta_weight(0.3 * a + 0.7 * b), 0.3 * layer.delta_weight(a) + 0.7 * layer.delta_weight(b))
    x = torch.randn(4, 8)
    alpha = torch.tensor([0.35, 0.65])
    merged = x @ (layer.base.weight + layer.delta_weight(alpha)).T + layer.base.bias
    torch.testing.assert_close(layer(x, alpha), merged)


def test_adapter_gradients_follow_alpha(device, params_with_grad):
    torch.manual_seed(0)
    model = build("palora", VEC, width=8, rank=2).to(device)
    with torch.no_grad():  # equal adapters, so their gradients differ only by the factor α_k
        for layer in model.layers:
            layer.down[1].weight.copy_(layer.down[0].weight)
            layer.up[0].weight.fill_(0.1)
            layer.up[1].weight.fill_(0.1)
    x = torch.randn(5, 6, device=device)
    alpha = torch.tensor([0.25, 0.75], device=device)
    model.zero_grad()
    model(x, alpha)["a"].square().sum().backward()
    for layer in model.layers:
        torch.testing.assert_close(layer.up[1].weight.grad, 3 * layer.up[0].weight.grad)
    touched = params_with_grad(model, model(x, torch.tensor([1.0, 0.0], device=device))["a"].square().sum())
    assert not any(".up.1." in n or ".down.1." in n for n in touched)  # α_b = 0: task b's adapter gets nothing
    assert {"layers.0.base.weight", "layers.0.up.0.weight"} <= touched


def test_sampled_preferences_lie_on_the_simplex():
    g = torch.Generator().manual_seed(0)
    samples = torch.stack([sample_preference(3, g) for _ in range(2000)])
    assert (samples >= 0).all() and torch.allclose(samples.sum(1), torch.ones(2000))
    torch.testing.assert_close(samples.mean(0), torch.full((3,), 1 / 3), atol=0.02, rtol=0)  # uniform: mean 1/K
    # uniform on Δ_3 (Dirichlet(1, 1, 1)): each α_k ~ Beta(1, 2), variance 1/18; normalised
    # uniform draws would also have mean 1/3 but variance ~0.031
    torch.testing.assert_close(samples.var(0), torch.full((3,), 1 / 18), atol=0.006, rtol=0)
    model = build("palora", VEC, width=4)
    alpha = model.sample_preference(torch.Generator().manual_seed(1))
    assert torch.equal(model.preference, alpha)
    with pytest.raises(ValueError):
        model.set_preference(torch.tensor([0.7, 0.7]))


def test_only_the_heads_are_task_specific_because_every_task_reads_every_adapter(params_with_grad):
    """Under the default (uniform) preference task a's loss reaches task b's adapter too."""
    torch.manual_seed(0)
    model = build("palora", VEC, width=8, rank=2)
    with torch.no_grad():
        for layer in model.layers:
            for up in layer.up:
                up.weight.normal_()  # B_k = 0 at init would hide the adapters from the gradient
    x = torch.randn(4, 6)
    for t in VEC.tasks:
        assert [id(p) for p in model.task_specific_parameters(t)] == [id(p) for p in model.heads[t].parameters()]
        reached = params_with_grad(model, model(x)[t].square().sum())
        assert {f"layers.{i}.up.{k}.weight" for i in range(len(model.layers)) for k in range(2)} <= reached


def test_parameter_count(n_params):
    d, w, r = 6, 8, 2
    model = build("palora", VEC, width=w, rank=r)
    per_task = r * (d + w) + r * (w + w)
    heads = {"a": w + 1, "b": 2 * w + 2}
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == heads["a"]
    assert n_params(model) == (d * w + w) + (w * w + w) + 2 * per_task + sum(heads.values())


def test_preferences_reach_different_non_dominated_trade_offs():
    """Two conflicting regression targets: α = e_a and α = e_b end at opposite, non-dominated points."""
    torch.manual_seed(0)
    model = PaLoRA.from_problem(Problem(("a", "b"), (4,), {"a": 1, "b": 1}), width=8, rank=2)
    assert_preferences_reach_opposite_trade_offs(model, "weighted_loss", steps=300, lr=1e-2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("palora", device)
    first, last = short_training("palora", dense, device, steps=40)
    assert last < 0.8 * first
    assert type(build("palora", VEC)) is PaLoRA


def test_the_procedure_line_gives_the_paper_its_own_preference_schedule():
    """The paper draws α from a deterministic schedule (left out here, as the docstring says);
    the line used to say the paper draws them with sample_preference(), the uniform draw that
    stands in for that schedule."""
    line = PaLoRA.training_procedure
    assert "deterministic schedule" in line and "draws one uniformly instead" in line
    assert "sample_preference()" in line and "weighted_loss()" in line


def test_the_untrained_model_is_the_base_network_for_every_preference():
    """B_k = 0 at the start: whatever α, the trunk's layers (each followed by its ReLU) alone."""
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        trunk = trunk_for(problem.input_shape, 6, 2)
        model = PaLoRA(problem.tasks, trunk, heads_for(problem, 6), rank=2)
        x = torch.randn(3, *problem.input_shape)
        for alpha in (torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.7])):
            torch.testing.assert_close(model.encode(x, alpha), trunk(x))


def test_the_scale_multiplies_every_adapter_by_hand():
    """W(α) x = W x + b + s Σ_k α_k B_k A_k x with s = 0.5, for the layer and its delta_weight."""
    torch.manual_seed(0)
    model = build("palora", VEC, width=8, rank=2, scale=0.5)
    randomise_up(model, seed=1)
    layer, alpha, x = model.layers[0], torch.tensor([0.2, 0.8]), torch.randn(4, 6)
    low_rank = [layer.up[k].weight @ layer.down[k].weight for k in range(2)]
    torch.testing.assert_close(layer.delta_weight(alpha), 0.5 * (0.2 * low_rank[0] + 0.8 * low_rank[1]))
    by_hand = x @ layer.base.weight.T + layer.base.bias + 0.5 * sum(
        a * (x @ layer.down[k].weight.T @ layer.up[k].weight.T) for k, a in enumerate(alpha))
    torch.testing.assert_close(layer(x, alpha), by_hand)


def test_preferences_off_the_simplex_are_refused():
    model = build("palora", VEC, width=4)
    for bad in (torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.6])):  # a negative entry; a sum of 1.1
        with pytest.raises(ValueError, match="non-negative and sum to 1"):
            model.set_preference(bad)
        with pytest.raises(ValueError, match="non-negative and sum to 1"):
            model(torch.randn(2, 6), bad)


def test_the_weighted_loss_uses_the_preference_it_is_given():
    model = build("palora", VEC, width=4)  # current preference: uniform
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(10.0)}
    torch.testing.assert_close(model.weighted_loss(losses), torch.tensor(6.0))
    torch.testing.assert_close(model.weighted_loss(losses, torch.tensor([0.25, 0.75])), torch.tensor(8.0))


def test_defaults_are_rank_4_and_scale_1():
    """Docstring: ``scale`` = 1 at rank 4 by default, so W(α) = W + Σ_k α_k B_k A_k."""
    torch.manual_seed(0)
    model = build("palora", VEC, width=8)
    randomise_up(model, seed=2)
    layer, alpha = model.layers[0], torch.tensor([0.3, 0.7])
    assert all(down.weight.shape[0] == 4 for down in layer.down)
    expected = sum(a * layer.up[k].weight @ layer.down[k].weight for k, a in enumerate(alpha))
    torch.testing.assert_close(layer.delta_weight(alpha), expected)


def test_preference_draws_come_from_the_given_generator_alone():
    model = build("palora", VEC, width=4)
    draws = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        g = torch.Generator().manual_seed(3)
        draws.append((sample_preference(3, g), model.sample_preference(g)))
    torch.testing.assert_close(draws[0][0], draws[1][0], rtol=0, atol=0)
    torch.testing.assert_close(draws[0][1], draws[1][1], rtol=0, atol=0)
