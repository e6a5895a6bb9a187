"""LORPMAN: main network + Σ α_k B_k A_k, the orthogonality penalty, gradients, trade-offs, training."""

import pytest
import torch

from reference_impls.architectures.lorpman import LORPMAN, orthogonality_penalty
from reference_impls.architectures.palora import PaLoRA
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_preferences_reach_opposite_trade_offs
from .harness_probe import moved_by_auxiliary_step

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def with_random_ups(model: LORPMAN) -> LORPMAN:
    """Give every B_k non-zero entries (they start at zero) so that the low-rank terms show."""
    with torch.no_grad():
        for layer in model.layers:
            for up in layer.up:
                up.weight.normal_()
    return model


def _penalty_by_hand(downs) -> torch.Tensor:
    a = [d.weight for d in downs]
    return sum((a[i] @ a[j].T).square().sum() for i, j in ((0, 1), (0, 2), (1, 2)))


def test_one_hot_preference_is_main_network_plus_that_low_rank_term(device):
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2).to(device)
    with_random_ups(model)
    x = torch.randn(4, 6, device=device)
    layer = model.layers[0]
    for k in range(3):
        w = layer.base.weight + layer.up[k].weight @ layer.down[k].weight
        torch.testing.assert_close(layer(x, torch.eye(3, device=device)[k]), x @ w.T + layer.base.bias)
    mixed = torch.tensor([0.2, 0.3, 0.5], device=device)
    parts = [layer.delta_weight(e) for e in torch.eye(3, device=device)]
    torch.testing.assert_close(layer.delta_weight(mixed), sum(a * p for a, p in zip(mixed, parts)))


def test_orthogonality_penalty_matches_hand_computation_and_vanishes_on_orthogonal_rows():
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2)
    torch.testing.assert_close(orthogonality_penalty(model.layers[0].down), _penalty_by_hand(model.layers[0].down))
    with torch.no_grad():
        basis = torch.eye(6)
        for k, down in enumerate(model.layers[0].down):
            down.weight.copy_(basis[2 * k : 2 * k + 2])  # disjoint rows of the identity
    assert orthogonality_penalty(model.layers[0].down).item() == 0.0
    assert model.orthogonal_regularizer() > 0  # the other layer is still random


def test_the_penalty_is_a_sufficient_condition_only():
    """Orthogonal A_k rows make the updates orthogonal, not the converse: a fresh model's updates
    are all zero (every B_k starts at zero), trivially orthogonal, while the penalty is positive."""
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2)
    for layer in model.layers:
        for k in range(3):
            assert torch.count_nonzero(layer.delta_weight(torch.eye(3)[k])) == 0
    assert model.orthogonal_regularizer() > 0


def test_regulariser_trains_only_the_low_rank_matrices(params_with_grad):
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2)
    touched = params_with_grad(model, model.orthogonal_regularizer())
    assert touched and all(".down." in n for n in touched)
    losses = {t: o.square().mean() for t, o in model(torch.randn(3, 6)).items()}
    total = model.regularised_loss(losses, torch.tensor([0.5, 0.5, 0.0]))
    expected = 0.5 * losses["a"] + 0.5 * losses["b"] + model.orthogonal_weight * model.orthogonal_regularizer()
    torch.testing.assert_close(total, expected)
    assert build("lorpman", VEC, width=6, rank=2).orthogonal_weight > 0  # the penalty is on by default


def test_each_tasks_loss_reaches_only_shared_parameters_and_its_own(params_with_grad):
    """W(α) mixes every task's B_k A_k, so every loss reaches every adapter: they are shared."""
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2)
    with_random_ups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    own = {t: {names[id(p)] for p in model.task_specific_parameters(t)} for t in VEC.tasks}
    x = torch.randn(4, 6)
    for t in VEC.tasks:
        touched = params_with_grad(model, model(x)[t].square().sum())
        assert own[t] <= touched and not any(touched & own[s] for s in VEC.tasks if s != t), t
    assert {"layers.0.down.1.weight", "layers.1.up.2.weight"} <= {names[id(p)] for p in model.shared_parameters()}


def test_parameter_count(n_params):
    d, w, r = 6, 8, 2
    model = build("lorpman", VEC, width=w, rank=r)
    per_task = r * (d + w) + r * (w + w)
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == (d * w + w) + (w * w + w) + 3 * per_task + heads
    assert isinstance(model, PaLoRA) and type(model) is LORPMAN


def test_preferences_reach_different_non_dominated_trade_offs():
    """Two conflicting regression targets: α = e_a and α = e_b end at opposite, non-dominated points."""
    torch.manual_seed(0)
    model = LORPMAN.from_problem(Problem(("a", "b"), (4,), {"a": 1, "b": 1}), width=8, rank=2)
    assert_preferences_reach_opposite_trade_offs(model, "regularised_loss", steps=300, lr=1e-2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("lorpman", device)
    first, last = short_training("lorpman", dense, device, steps=40)
    assert last < 0.8 * first


def test_auxiliary_loss_is_the_weighted_penalty_and_a_harness_step_follows_it():
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2, orthogonal_weight=0.3)
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * model.orthogonal_regularizer())
    assert build("lorpman", VEC, width=6, rank=2, orthogonal_weight=0.0).auxiliary_loss().item() == 0.0
    with pytest.raises(ValueError, match="orthogonal_weight"):
        build("lorpman", VEC, orthogonal_weight=-1.0)
    moved, auxiliary = moved_by_auxiliary_step(model, torch.randn(8, 6))
    assert auxiliary > 0 and moved and all(".down." in n for n in moved)  # only the A_k, which R reads


def test_the_regulariser_sums_the_penalties_of_every_layer_and_its_default_weight_is_1e_2():
    torch.manual_seed(0)
    model = build("lorpman", VEC, width=6, rank=2, depth=3)
    expected = sum(_penalty_by_hand(layer.down) for layer in model.layers)
    torch.testing.assert_close(model.orthogonal_regularizer(), expected)
    assert model.orthogonal_weight == 1e-2


def test_the_low_rank_terms_are_scaled_by_s():
    torch.manual_seed(0)
    model = with_random_ups(build("lorpman", VEC, width=6, rank=2, scale=0.5))
    layer, x = model.layers[0], torch.randn(4, 6)
    for k in range(3):
        w = layer.base.weight + 0.5 * layer.up[k].weight @ layer.down[k].weight
        torch.testing.assert_close(layer(x, torch.eye(3)[k]), x @ w.T + layer.base.bias)


def test_one_task_has_no_pairs_and_so_no_orthogonality_penalty():
    """Σ_{i<j} over a single low-rank term is empty: the penalty is exactly 0, not an error."""
    torch.manual_seed(0)
    model = build("lorpman", Problem(("a",), (6,), {"a": 1}), width=6, rank=2)
    assert orthogonality_penalty(model.layers[0].down).item() == 0.0
    assert model.orthogonal_regularizer().item() == 0.0
