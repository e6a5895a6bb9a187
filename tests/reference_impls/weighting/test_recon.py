import pytest
import torch
from torch import nn

from reference_impls.architectures.registry import Problem, build
from reference_impls.weighting.gradients import per_task_gradients
from reference_impls.weighting.recon import (
    ReconModel, ReconScores, TaskCopies, conflict_counts, layer_slices, make_task_specific, pair_cosines,
)

D = torch.float64


def test_layer_slices_group_weight_and_bias_of_each_module():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    assert layer_slices(net.named_parameters()) == {"0": slice(0, 16), "2": slice(16, 24)}
    with pytest.raises(ValueError, match="adjacent"):
        layer_slices([("a.weight", torch.zeros(2)), ("b.weight", torch.zeros(1)), ("a.bias", torch.zeros(1))])


def test_scores_on_hand_cases():
    # Three tasks, two layers of two columns. Layer "x": rows e1, −e1, e2 -> cosines (−1, 0, 0).
    # Layer "y": rows (1, 1), (1, 0.9), (−1, −0.2) -> one aligned pair, two opposed pairs.
    layers = {"x": slice(0, 2), "y": slice(2, 4)}
    grads = torch.tensor([[1.0, 0.0, 1.0, 1.0], [-1.0, 0.0, 1.0, 0.9], [0.0, 1.0, -1.0, -0.2]], dtype=D)
    assert torch.allclose(pair_cosines(grads[:, :2]), torch.tensor([-1.0, 0.0, 0.0], dtype=D))
    assert conflict_counts(grads, layers, threshold=0.0).tolist() == [1, 2]
    assert conflict_counts(grads, layers, threshold=-0.85).tolist() == [1, 1]  # y's cosines: 0.999, −0.832, −0.860
    assert conflict_counts(grads, layers, threshold=0.5).tolist() == [3, 2]  # orthogonal pairs count below S = 0.5
    assert conflict_counts(grads, layers, threshold=-1.0).tolist() == [0, 0]  # strictly below S
    # The default S = 0 is Definition 1's conflict (cosine below 0), for the function and the accumulator
    assert conflict_counts(grads, layers).tolist() == [1, 2]
    assert ReconScores(layers).record(grads).tolist() == [1, 2]
    assert ReconScores(layers, threshold=-0.85).record(grads).tolist() == [1, 1]  # the accumulator's own S


def test_zero_gradients_count_as_cosine_zero_and_scale_does_not_matter():
    layers = {"only": slice(0, 3)}
    grads = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=D)
    assert conflict_counts(grads, layers, threshold=0.0).tolist() == [0]
    assert conflict_counts(grads, layers, threshold=0.01).tolist() == [1]
    pair = torch.tensor([[1.0, 2.0, -1.0], [-2.0, 1.0, 0.5]], dtype=D)
    for scale in (1e-200, 1e-150, 1.0, 1e150, 1e200):  # 1e±200: squares under/overflow float64
        assert conflict_counts(scale * pair, layers).tolist() == [1]
    for scale in (1e-20, 1e20):  # float32: squared entries would under/overflow without normalising
        assert conflict_counts((scale * pair).float(), layers).tolist() == [1]


def test_scores_accumulate_over_steps_and_rank_in_descending_order():
    scores = ReconScores({"a": slice(0, 1), "b": slice(1, 2), "c": slice(2, 3)}, threshold=0.0)
    steps = [
        torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]]),  # conflicts on a and c
        torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -1.0]]),  # conflict on c
        torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]]),  # conflict on b
    ]
    assert scores.record(steps[0]).tolist() == [1, 0, 1]
    for grads in steps[1:]:
        scores.record(grads)
    assert scores.scores() == {"a": 1, "b": 1, "c": 2}
    assert scores.ranking() == ["c", "a", "b"]  # ties keep the model order
    assert scores.select(2) == ["c", "a"]
    with pytest.raises(ValueError, match="columns"):
        scores.record(torch.zeros(2, 4))


def model_and_batch(device, seed: int = 0):
    torch.manual_seed(seed)
    model = build("shared_bottom", Problem(("a", "b"), (6,), {"a": 1, "b": 1}), width=8, depth=3).to(device)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 6, generator=generator).to(device)
    y = torch.tanh(x @ torch.randn(6, 2, generator=generator).to(device))  # learnable targets
    return model, x, y


def task_losses(model, x, y):
    out = model(x)
    return torch.stack([(out[t].squeeze(1) - y[:, k]).pow(2).mean() for k, t in enumerate(("a", "b"))])


def test_scores_for_a_model_match_its_shared_layers(device):
    model, x, y = model_and_batch(device)
    scores = ReconScores.for_model(model)
    assert list(scores.layers) == ["encoder.blocks.0.0", "encoder.blocks.1.0", "encoder.blocks.2.0"]
    grads = per_task_gradients(task_losses(model, x, y), model.shared_parameters())
    step = scores.record(grads)
    expected = [int(torch.nn.functional.cosine_similarity(grads[0, s], grads[1, s], dim=0) < 0)
                for s in scores.layers.values()]
    assert step.tolist() == expected


def test_scores_for_a_model_use_the_given_threshold(device):
    """``for_model`` keeps S: default 0 (Definition 1), or the one passed."""
    model, x, y = model_and_batch(device, seed=1)  # layer cosines of mixed signs on this seed
    grads = per_task_gradients(task_losses(model, x, y), model.shared_parameters())
    for threshold in (None, -0.31):
        scores = ReconScores.for_model(model) if threshold is None else ReconScores.for_model(model, threshold)
        limit = 0.0 if threshold is None else threshold
        expected = [int(torch.nn.functional.cosine_similarity(grads[0, s], grads[1, s], dim=0) < limit)
                    for s in scores.layers.values()]
        assert scores.record(grads).tolist() == expected, threshold
        assert 0 < sum(expected) < len(expected)  # the threshold decides some layers either way


def test_task_copies_pass_keyword_arguments_to_the_layer():
    class Scale(nn.Module):
        def forward(self, x, factor=1.0):
            return factor * x

    copies = TaskCopies(Scale(), ["a", "b"])
    assert torch.equal(copies(torch.ones(2), factor=3.0), torch.full((2,), 3.0))


def test_conversion_keeps_outputs_and_copies_get_gradient_from_one_task_only(device):
    model, x, y = model_and_batch(device)
    converted = make_task_specific(model, ["encoder.blocks.1.0"])
    before, after = model(x), converted(x)
    for t in model.tasks:
        assert torch.allclose(before[t], after[t])  # copies start from the shared layer
    copies = converted.switches()[0].copies
    shared = converted.shared_parameters()
    losses = task_losses(converted, x, y)
    for k, task in enumerate(converted.tasks):
        other = converted.tasks[1 - k]
        own = torch.autograd.grad(losses[k], list(copies[task].parameters()), retain_graph=True, allow_unused=True)
        foreign = torch.autograd.grad(losses[k], list(copies[other].parameters()), retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in own)
        assert all(g is None or not g.any() for g in foreign)  # exactly zero: no path from task k
        shared_grads = torch.autograd.grad(losses[k], shared, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in shared_grads)  # the other layers stay shared
    assert {id(p) for p in copies["a"].parameters()} <= {id(p) for p in converted.task_specific_parameters("a")}
    assert not {id(p) for p in copies["a"].parameters()} & {id(p) for p in shared}


def test_parameter_count_grows_by_the_copies_and_empty_selection_is_the_original(device):
    model, x, _ = model_and_batch(device)
    count = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.get_submodule("encoder.blocks.2.0").parameters())
    assert sum(p.numel() for p in make_task_specific(model, ["encoder.blocks.2.0"]).parameters()) == count + layer
    plain = make_task_specific(model, [])
    assert sum(p.numel() for p in plain.parameters()) == count
    assert all(torch.equal(plain(x)[t], model(x)[t]) for t in model.tasks)
    with pytest.raises(ValueError, match="submodule"):
        ReconModel(model, ["encoder.blocks.9"])


def test_scores_then_conversion_then_training_lowers_the_loss(device):
    model, x, y = model_and_batch(device, seed=1)
    scores = ReconScores.for_model(model, threshold=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(10):  # step 1: measure while training the shared model
        optimizer.zero_grad()
        losses = task_losses(model, x, y)
        scores.record(per_task_gradients(losses, model.shared_parameters()))
        losses.sum().backward()
        optimizer.step()
    assert int(scores.counts.sum()) <= 10 * 3
    converted = make_task_specific(model, scores.select(1))  # step 3
    assert converted.layer_names == (scores.ranking()[0],)
    optimizer = torch.optim.Adam(converted.parameters(), lr=0.02)
    initial = float(task_losses(converted, x, y).sum().detach())
    for _ in range(60):
        optimizer.zero_grad()
        task_losses(converted, x, y).sum().backward()
        optimizer.step()
    assert float(task_losses(converted, x, y).sum().detach()) < 0.5 * initial
    first, second = converted.switches()[0].copies.values()
    assert not torch.equal(first.weight, second.weight)  # each copy followed its own task


def test_ranking_keeps_the_model_order_among_many_tied_layers():
    """Many layers with equal scores: descending score, ties in the model's order."""
    names = [f"layer{i}" for i in range(40)]
    scores = ReconScores({name: slice(i, i + 1) for i, name in enumerate(names)})
    scores.counts = torch.tensor([i % 3 for i in range(40)], dtype=torch.long)
    expected = [n for s in (2, 1, 0) for n in names if int(n[5:]) % 3 == s]
    assert scores.ranking() == expected
    assert scores.select(5) == expected[:5]
