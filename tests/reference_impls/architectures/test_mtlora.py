"""MTLoRA: TA-LoRA shared, TS-LoRA per task at stage ends, the task feature by hand, reach, counts."""

import pytest
import torch

from reference_impls.architectures.encoders import trunk_for
from reference_impls.architectures.mtlora import MTLoRA
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def randomise_ups(model, seed=0):
    """Every B starts at 0; give them random values so each LoRA path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".1.weight") and (".agnostic." in name or ".specific." in name):  # the B of a pair
                p.copy_(torch.randn(p.shape, generator=g).to(p))


def test_structure_splits_agnostic_and_specific_modules():
    model = build("mtlora", VEC, width=6, stages=2, layers_per_stage=2)
    shape = [[(layer.agnostic is not None, tuple(layer.specific)) for layer in stage] for stage in model.stages]
    assert shape == [[(True, ()), (True, ("a", "b"))], [(True, ()), (False, ("a", "b"))]]
    shared = {id(p) for p in model.shared_parameters()}
    for stage in model.stages:
        for layer in stage:
            if layer.agnostic is not None:
                assert all(id(p) in shared for p in layer.agnostic.parameters())  # TA-LoRA is shared
            for t, pair in layer.specific.items():
                mine = {id(p) for p in model.task_specific_parameters(t)}
                assert all(id(p) in mine and id(p) not in shared for p in pair.parameters())


@pytest.mark.parametrize("layers_per_stage", [2, 3])
def test_untrained_task_features_equal_the_frozen_backbone(device, layers_per_stage):
    # 3 layers per stage: with 2, a stage that reused its first layer for every shared layer
    # computed the same thing (found by a mutation audit)
    for problem in (VEC, IMG):
        torch.manual_seed(0)
        model = build("mtlora", problem, width=6, layers_per_stage=layers_per_stage).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        h, plain = x, []
        for stage in model.stages:
            assert len(stage) == layers_per_stage
            for layer in stage:
                h = torch.relu(layer.base(h))
            plain.append(h)
        for t, feats in model.stage_features(x).items():
            assert len(feats) == len(plain)
            for got, want in zip(feats, plain):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_stage_end_feature_is_w0_plus_the_tasks_own_pair(device):
    torch.manual_seed(0)
    model = build("mtlora", VEC, width=6, rank=2, alpha=3.0).to(device)
    randomise_ups(model)
    x = torch.randn(4, 6, device=device)
    first = model.stages[0][0]
    h = torch.relu(x @ (first.base.weight + 1.5 * first.agnostic[1].weight @ first.agnostic[0].weight).T + first.base.bias)
    end = model.stages[0][1]
    for t in VEC.tasks:
        a, b = end.specific[t][0].weight, end.specific[t][1].weight
        expected = torch.relu(h @ (end.base.weight + 1.5 * b @ a).T + end.base.bias)  # no TA-LoRA term
        torch.testing.assert_close(model.stage_features(x)[t][0], expected)
    feats = model.stage_features(x)
    assert not torch.allclose(feats["a"][0], feats["b"][0])


def test_forward_by_hand_with_the_default_scale_one(device):
    """Two stages of one layer each, alpha left at its default r: s = 1 on every LoRA pair."""
    torch.manual_seed(0)
    model = build("mtlora", VEC, width=6, rank=2, stages=2, layers_per_stage=1).to(device).double()
    randomise_ups(model)
    x = torch.randn(4, 6, device=device, dtype=torch.float64)

    def lora(layer, pair, h):  # relu(W0 h + b + B A h)
        return torch.relu(h @ (layer.base.weight + pair[1].weight @ pair[0].weight).T + layer.base.bias)

    first, second = model.stages[0][0], model.stages[1][0]
    h = lora(first, first.agnostic, x)  # the shared path leaves stage 1 through its end layer's TA-LoRA
    out = model(x)
    for t in VEC.tasks:
        fused = torch.cat([lora(first, first.specific[t], x), lora(second, second.specific[t], h)], dim=1)
        expected = model.heads[t](fused @ model.fusion[t].weight.T + model.fusion[t].bias)  # stages in order
        torch.testing.assert_close(out[t], expected)


def test_gradient_reach(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mtlora", IMG, width=6).to(device)
    randomise_ups(model)
    assert all(not p.requires_grad for stage in model.stages for layer in stage for p in layer.base.parameters())
    touched = params_with_grad(model, model(torch.randn(2, 2, 5, 5, device=device))["a"].square().sum())
    agnostic = {f"stages.{s}.{i}.agnostic.{j}.weight" for s, i in ((0, 0), (0, 1), (1, 0)) for j in (0, 1)}
    specific_a = {f"stages.{s}.1.specific.a.{j}.weight" for s in (0, 1) for j in (0, 1)}
    assert agnostic | specific_a <= touched
    assert {"fusion.a.weight", "fusion.a.bias"} <= touched
    assert not any(".b." in n or n.startswith(("fusion.b", "heads.b")) for n in touched)


def test_parameter_count(n_params):
    d, w, r, stages, per_stage = 6, 8, 2, 2, 2
    model = build("mtlora", VEC, width=w, rank=r, stages=stages, layers_per_stage=per_stage)
    pair = lambda d_in: r * (d_in + w)
    agnostic = pair(d) + pair(w) + pair(w)  # every layer except the last stage's last
    specific = stages * pair(w)  # per task: one TS-LoRA pair per stage end
    fusion = stages * w * w + w
    heads = {"a": w + 1, "b": 2 * w + 2}
    backbone = (d * w + w) + 3 * (w * w + w)
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == specific + fusion + heads[t]
    assert n_params(model) == backbone + agnostic + 2 * (specific + fusion) + sum(heads.values())
    assert type(model) is MTLoRA and model.name == "mtlora"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("mtlora", device)
    first, last = short_training("mtlora", dense, device, steps=40)
    assert last < 0.8 * first


def test_stage_counts_are_honoured_and_bad_splits_refused():
    """from_problem's stages reach the model (one or three); a backbone that does not split into equal
    stages, or zero stages, is refused."""
    assert len(build("mtlora", VEC, width=6, stages=1, layers_per_stage=2).stages) == 1
    assert [len(s) for s in build("mtlora", VEC, width=6, stages=3, layers_per_stage=1).stages] == [1, 1, 1]
    heads = {"a": torch.nn.Linear(6, 1), "b": torch.nn.Linear(6, 2)}
    for stages in (0, 3):  # 4 layers
        with pytest.raises(ValueError):
            MTLoRA(VEC.tasks, trunk_for((6,), 6, 4), heads, 6, stages=stages)


def test_task_specific_parameters_are_the_stage_end_pairs_with_three_layers_per_stage():
    """With three layers per stage the TS-LoRA pairs sit on each stage's last layer."""
    model = build("mtlora", VEC, width=6, stages=2, layers_per_stage=3)
    mine = {id(p) for p in model.task_specific_parameters("a")}
    for stage in model.stages:
        assert all(id(p) in mine for p in stage[2].specific["a"].parameters())
        assert not stage[0].specific and not stage[1].specific
