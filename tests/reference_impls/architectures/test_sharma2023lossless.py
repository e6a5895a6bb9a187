"""Lossless adaptation: pretrained features exact at init and after training, placement, gradients, counts."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.sharma2023lossless import LosslessAdapters, ResidualBottleneck

VEC = Problem(("reach", "push"), (12,), {"reach": 1, "push": 2})
IMG = Problem(("reach", "push"), (2, 6, 6), {"reach": 3, "push": 1}, dense=True)


def test_lossless_at_initialisation(device):
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("sharma2023lossless", problem, width=8).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        for t in problem.tasks:
            torch.testing.assert_close(model.features(x, t), model.pretrained_features(x), rtol=0, atol=0)
        with torch.no_grad():  # a non-zero up projection does change the task's features
            model.adapters["push"]["0"].up.weight.normal_()
        assert (model.features(x, "push") - model.pretrained_features(x)).abs().max() > 1e-3


def test_training_the_tasks_leaves_the_pretrained_model_unchanged(device, fit):
    torch.manual_seed(0)
    model = build("sharma2023lossless", IMG, width=8).to(device)
    x = torch.randn(4, 2, 6, 6, device=device)
    before = model.pretrained_features(x).detach().clone()
    losses = fit(model, x, lambda out: sum(o.square().mean() for o in out.values()), 15, 5e-2)
    assert losses[-1] < 0.8 * losses[0]  # the tasks did learn ...
    torch.testing.assert_close(model.pretrained_features(x), before, rtol=0, atol=0)  # ... losslessly
    assert (model.features(x, "reach") - before).abs().max() > 1e-3


def test_adapters_sit_after_every_block_and_on_top_by_hand(device):
    torch.manual_seed(0)
    model = build("sharma2023lossless", VEC, width=8, depth=3).to(device)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_()
    x = torch.randn(5, 12, device=device)
    ad = model.adapters["reach"]
    step = lambda a, h: h + torch.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
    h = step(ad["0"], model.blocks[0](x))  # bottom
    h = step(ad["1"], model.blocks[1](h))  # middle
    h = step(ad["2"], model.blocks[2](h))  # middle
    torch.testing.assert_close(model(x)["reach"], model.heads["reach"](step(ad["top"], h)))  # top


def test_placement_and_top_only_baseline(device):
    torch.manual_seed(0)
    model = build("sharma2023lossless", VEC, width=8, depth=3, placement=("top",)).to(device)
    assert set(model.adapters["reach"]) == {"top"}
    x = torch.randn(5, 12, device=device)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_()
    expected = model.heads["push"](model.adapters["push"]["top"](model.pretrained_features(x)))
    torch.testing.assert_close(model(x)["push"], expected)  # adapter on frozen features only
    assert set(build("sharma2023lossless", VEC, width=8, depth=3, placement=("bottom",)).adapters["push"]) == {"0"}
    with pytest.raises(ValueError):
        build("sharma2023lossless", VEC, placement=("side",))


def test_only_the_tasks_adapters_and_head_learn_and_counts(device, params_with_grad, n_params):
    torch.manual_seed(0)
    d, m, depth = 8, 2, 3
    model = build("sharma2023lossless", VEC, width=d, depth=depth, bottleneck=m).to(device)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.normal_()
    assert all(not p.requires_grad for p in model.shared_parameters())
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["push"].square().sum())
    specific = {n for n, p in model.named_parameters() if any(p is q for q in model.task_specific_parameters("push"))}
    assert touched == specific and all(n.startswith(("adapters.push.", "heads.push.")) for n in touched)
    assert n_params(ResidualBottleneck(d, m)) == 2 * m * d + m + d
    per_task = (depth + 1) * (2 * m * d + m + d)  # one after every block, one on top
    assert sum(p.numel() for p in model.task_specific_parameters("reach")) == per_task + d + 1
    assert type(model) is LosslessAdapters


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("sharma2023lossless", device)
    first, last = short_training("sharma2023lossless", dense, device, steps=30)
    assert last < 0.8 * first


def test_a_model_without_a_top_adapter_runs_and_is_lossless_at_init():
    torch.manual_seed(0)
    model = build("sharma2023lossless", VEC, width=8, depth=3, placement=("bottom", "middle"))
    x = torch.randn(3, 12)
    assert "top" not in model.adapters["push"]
    torch.testing.assert_close(model(x)["push"], model.heads["push"](model.pretrained_features(x)))
