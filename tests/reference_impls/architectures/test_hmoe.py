"""HMoE (Li et al. 2020): label-space stacking by hand, task-constrained gradients, MMoE limit."""

import copy

import pytest
import torch

from reference_impls.architectures.hmoe import HMoE
from reference_impls.architectures.mmoe import MMoE
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (6,), {"a": 2, "b": 2, "c": 2})


def model_on(device, **kwargs):
    torch.manual_seed(0)
    return build("hmoe", VEC, width=8, num_experts=3, **kwargs).to(device)


def test_each_scenario_mixes_all_scenario_predictions_with_its_own_softmax(device):
    model = model_on(device)
    x = torch.randn(5, 6, device=device)
    preds = model.scenario_predictions(x)
    stacked = torch.stack([preds[t] for t in VEC.tasks], 1)  # (B, K, 2)
    out = model(x)
    for t in VEC.tasks:
        w = torch.softmax(x @ model.label_gates[t][1].weight.T, -1)  # w_k = softmax(V_k x)
        torch.testing.assert_close(out[t], (w.unsqueeze(-1) * stacked).sum(1))
    with torch.no_grad():
        model.label_gates["b"][1].weight.zero_()  # uniform weights: the mean prediction
    torch.testing.assert_close(model(x)["b"], stacked.mean(1))


def test_each_scenarios_loss_reaches_only_its_own_tower_and_gates(device, params_with_grad):
    """Task-constrained back-propagation for every scenario, not only the first."""
    model = model_on(device)
    x = torch.randn(8, 6, device=device)
    for t in VEC.tasks:
        touched = params_with_grad(model, model(x)[t].square().sum())
        assert {n.split(".")[0] for n in touched if n.split(".")[1] == t} == {"towers", "gates", "label_gates"}
        assert any(n.startswith("experts.") for n in touched)
        others = [f"{part}.{u}." for u in VEC.tasks if u != t for part in ("towers", "gates", "label_gates")]
        assert not any(n.startswith(tuple(others)) for n in touched)


def test_other_scenarios_still_shape_the_output_forward(device):
    model = model_on(device)
    x = torch.randn(4, 6, device=device)
    before = model(x)["a"]
    with torch.no_grad():
        model.towers["b"][0].bias.add_(1.0)  # scenario b predicts 1 higher...
    after = model(x)["a"]
    w_ab = torch.softmax(x @ model.label_gates["a"][1].weight.T, -1)[:, 1:2]
    torch.testing.assert_close(after - before, w_ab.expand(4, 2))  # ...a moves by w_ab


def test_identity_label_space_weights_is_mmoe(device):
    model = model_on(device)
    mmoe = MMoE(VEC.tasks, lambda: torch.nn.Identity(), 3, 6, copy.deepcopy(model.towers)).to(device)
    mmoe.experts, mmoe.gates = copy.deepcopy(model.experts), copy.deepcopy(model.gates)
    eye = torch.eye(3, device=device)
    model.label_space_weights = lambda x: {t: eye[i].expand(len(x), 3) for i, t in enumerate(VEC.tasks)}
    x = torch.randn(4, 6, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], mmoe(x)[t])


def test_parameter_count_and_label_space_check(n_params):
    d, w, n, k, c = 6, 8, 3, 3, 2
    model = build("hmoe", VEC, width=w, depth=1, num_experts=n)
    mmoe_part = n * (d * w + w) + k * d * n + k * (w * c + c)
    assert n_params(model) == mmoe_part + k * d * k  # bias-free label-space gates
    with pytest.raises(ValueError, match="label space"):
        build("hmoe", Problem(("seg", "depth"), (3, 32, 32), {"seg": 5, "depth": 1}, dense=True))


def test_training_on_related_scenarios_lowers_the_loss(device, fit):
    model = model_on(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 6, generator=g).to(device)
    base = x @ torch.randn(6, 2, generator=g).to(device)
    targets = {t: base * s for t, s in zip(VEC.tasks, (1.0, 0.8, -0.5))}
    losses = fit(model, x, lambda out: sum((out[t] - targets[t]).square().mean() for t in VEC.tasks), 60, 2e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_registry_name_builds_the_catalogued_class():
    model = build("hmoe", Problem(("a", "b"), (100,), {"a": 1, "b": 1}))
    assert type(model) is HMoE and model.name == "hmoe"
    assert model(torch.randn(3, 100))["b"].shape == (3, 1)


def test_task_specific_parameters_are_the_scenario_s_mmoe_gate_tower_and_label_gate():
    model = model_on("cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    for t in VEC.tasks:
        mine = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert mine == {n for n in names.values() if n.startswith((f"gates.{t}.", f"towers.{t}.", f"label_gates.{t}."))}
        assert any(n.startswith(f"label_gates.{t}.") for n in mine)


def test_depth_reaches_the_experts():
    deep, shallow = HMoE.from_problem(VEC, width=8, depth=3), HMoE.from_problem(VEC, width=8, depth=1)
    count = lambda m: sum(isinstance(x, torch.nn.Linear) for x in m.experts[0].modules())  # noqa: E731
    assert count(deep) == count(shallow) + 2
