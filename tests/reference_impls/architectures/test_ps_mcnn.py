import pytest
import torch

from reference_impls.architectures.ps_mcnn import PartiallySharedMCNN, local_constraint
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def test_paths_feeding_each_task(device, params_with_grad):
    torch.manual_seed(0)
    model = build("ps_mcnn", VEC, width=8, depth=3).to(device)
    touched = params_with_grad(model, model(torch.randn(4, 6, device=device))["a"].sum())
    stages = lambda net: {int(n.split(".")[2]) for n in touched if n.startswith(f"tsnets.{net}.")}
    assert stages("a") == {0, 1, 2}  # its own network, all stages
    assert stages("b") == {0, 1}  # other tasks reach a only via SNet, one stage late
    assert {int(n.split(".")[1]) for n in touched if n.startswith("snet.")} == {0, 1, 2}
    assert not any(n.startswith(("heads.b", "heads.c")) for n in touched)


def test_snet_reads_all_tasks_and_tsnets_read_only_snet_and_themselves(device):
    torch.manual_seed(0)
    model = build("ps_mcnn", VEC, width=8, depth=2).to(device)
    w_s, w_t = 8, 4
    assert model.snet[1][0].in_features == w_s + 3 * w_t
    assert model.tsnets["a"][1][0].in_features == w_t + w_s
    shared, own = model.representations(torch.randn(2, 6, device=device))
    assert shared.shape == (2, w_s) and own["c"].shape == (2, w_t)


def test_forward_by_hand_each_stage_reads_the_previous_stage(device):
    """Stage l + 1 of SNet and of every TSNet reads stage-l outputs only (not SNet's new stage)."""
    torch.manual_seed(0)
    model = build("ps_mcnn", VEC, width=8, depth=3).to(device)
    x = torch.randn(4, 6, device=device)
    s, own = model.snet[0](x), {t: model.tsnets[t][0](x) for t in VEC.tasks}
    for l in (1, 2):
        s, own = (model.snet[l](torch.cat([s, own["a"], own["b"], own["c"]], dim=1)),
                  {t: model.tsnets[t][l](torch.cat([own[t], s], dim=1)) for t in VEC.tasks})
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.heads[t](torch.cat([own[t], s], dim=1)))


def test_task_specific_parameters_are_last_stage_and_head():
    model = build("ps_mcnn", VEC, width=8, depth=2)
    ids = {id(p) for p in model.task_specific_parameters("b")}
    assert ids == {id(p) for p in [*model.tsnets["b"][1].parameters(), *model.heads["b"].parameters()]}
    assert not ids & {id(p) for p in model.tsnets["b"][0].parameters()}


def test_local_constraint_by_hand():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    ids = torch.tensor([0, 0, 0, 1])
    # k = 1 nearest same-identity: 0 -> 1 (1), 1 -> 0 (1), 2 -> 0 (9); sample 3 has none
    torch.testing.assert_close(local_constraint(f, ids, k=1), torch.tensor(11.0 / 3))
    torch.testing.assert_close(local_constraint(f, torch.arange(4)), torch.tensor(0.0))


def test_short_training_lowers_the_loss(short_training, device):
    first, last = short_training("ps_mcnn", True, device, 15)
    assert last < first


def test_registry_name_builds_the_catalogued_class(registry_output_shapes, device):
    assert type(build("ps_mcnn", VEC)) is PartiallySharedMCNN
    registry_output_shapes("ps_mcnn", device)


def test_local_constraint_averages_over_the_k_nearest_same_identity_neighbours():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    ids = torch.tensor([0, 0, 0, 1])
    # k = 2: 0 -> {1, 9}, 1 -> {1, 10}, 2 -> {9, 10}; sample 3 has none
    torch.testing.assert_close(local_constraint(f, ids, k=2), torch.tensor(40.0 / 6))


def test_local_constraint_pulls_same_identity_samples_together():
    """Its gradient moves each sample towards its neighbour: d/df_0 of (|f_0 - f_1|^2 twice) / 2 = 2 (f_0 - f_1)."""
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    local_constraint(f, torch.tensor([7, 7])).backward()
    torch.testing.assert_close(f.grad, torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64))


def test_depth_one_is_allowed_and_depth_zero_refused():
    # one stage: SNet and TSNets each read the input once, the heads read [TSNet; SNet]
    torch.manual_seed(0)
    model = build("ps_mcnn", VEC, width=8, depth=1)
    assert len(model.snet) == 1 and model(torch.randn(2, 6))["b"].shape == (2, 2)
    with pytest.raises(ValueError, match="depth"):
        build("ps_mcnn", VEC, width=8, depth=0)


def test_task_specific_parameters_are_the_last_of_three_stages():
    model = build("ps_mcnn", VEC, width=8, depth=3)
    ids = {id(p) for p in model.task_specific_parameters("a")}
    assert ids == {id(p) for p in [*model.tsnets["a"][2].parameters(), *model.heads["a"].parameters()]}


def test_local_constraint_with_k_above_the_batch_or_one_feature_per_sample():
    # k is capped at the other samples of the batch; one-dimensional features are still compared
    f = torch.tensor([[0.0], [2.0]])
    torch.testing.assert_close(local_constraint(f, torch.tensor([3, 3]), k=5), torch.tensor(4.0))


def test_local_constraint_of_a_single_sample_is_zero_with_zero_gradient():
    f = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = local_constraint(f, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(f.grad, torch.zeros(1, 2))
