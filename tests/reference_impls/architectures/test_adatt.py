import pytest
import torch
from torch.nn import functional as F

from reference_impls.architectures.adatt import AdaTT
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 3})


def test_gates_mix_every_expert_of_the_level(device):
    torch.manual_seed(0)
    model = build("adatt", VEC, num_levels=3, task_experts=2, shared_experts=1).to(device)
    levels = model.gate_probabilities(torch.randn(5, 6, device=device) * 3)
    for j, gates in enumerate(levels):
        assert set(gates) == ({"a", "b", "shared"} if j < 2 else {"a", "b"})  # Sec. 3.2
        for g in gates.values():
            assert g.shape == (5, 2 + 2 + 1) and (g >= 0).all()  # all units' experts, Eq. (6)
            torch.testing.assert_close(g.sum(-1), torch.ones(5, device=device))


def test_fusion_unit_is_eq11_and_tower_is_eq1(device):
    """f_t = (pad(v_t) + G_t)^T E^l (Eq. (11), the fused form of Eqs. (7)-(10))."""
    torch.manual_seed(1)
    model = build("adatt", VEC, num_levels=1, task_experts=2, shared_experts=1).to(device)
    with torch.no_grad():
        model.levels[0].native["a"].copy_(torch.tensor([0.7, -1.3]))
    x = torch.randn(4, 6, device=device)
    level = model.levels[0]
    every = torch.stack([e(x) for u in ("a", "b", "shared") for e in level.experts[u]], 1)  # (B, 5, w)
    gate = torch.softmax(x @ level.gates["a"][1].weight.T, -1)  # Eq. (10), bias-free
    padded = F.pad(level.native["a"], (0, 3)).expand(4, -1)  # v_a for a's experts, zeros elsewhere
    fused = torch.einsum("be,bed->bd", padded + gate, every)
    torch.testing.assert_close(model(x)["a"], model.towers["a"](fused))  # Eq. (1)


def test_upper_level_units_read_their_own_previous_output(device):
    """Eqs. (4), (10) at level 2: unit u's experts and gate read f_u^1, not another unit's."""
    torch.manual_seed(4)
    model = build("adatt", VEC, num_levels=2, task_experts=2, shared_experts=1).to(device)
    x = torch.randn(4, 6, device=device)
    first, _ = model.levels[0]({u: x for u in ("a", "b", "shared")})
    top = model.levels[1]
    gates = model.gate_probabilities(x)[1]
    every = [e(first[u]) for u in ("a", "b", "shared") for e in top.experts[u]]
    for t in ("a", "b"):
        gate = torch.softmax(first[t] @ top.gates[t][1].weight.T, -1)  # Eq. (10) on f_t^1
        torch.testing.assert_close(gates[t], gate)
        own = torch.stack(every[:2] if t == "a" else every[2:4])
        fused = sum(gate[:, i : i + 1] * every[i] for i in range(5)) + torch.einsum("n,nbd->bd", top.native[t], own)
        torch.testing.assert_close(model(x)[t], model.towers[t](fused))


def test_native_weights_start_at_the_mean_of_the_native_experts():
    model = build("adatt", VEC, num_levels=2, task_experts=4, shared_experts=2)
    for level in model.levels:
        for v in level.native.values():
            torch.testing.assert_close(v, torch.full_like(v, 1 / len(v)))


def test_only_fusing_units_have_gates_and_native_weights():
    """Sec. 3.2: the shared unit fuses below the top level; at the top it only supplies experts."""
    model = build("adatt", VEC, num_levels=3, task_experts=2, shared_experts=2)
    for j, level in enumerate(model.levels):
        fusing = {"a", "b", "shared"} if j < 2 else {"a", "b"}
        assert set(level.gates) == set(level.native) == fusing, j
        assert set(level.experts) == {"a", "b", "shared"}, j


def test_one_native_expert_gets_unit_weight(device):
    torch.manual_seed(2)
    model = build("adatt", VEC, num_levels=1, task_experts=1, shared_experts=0).to(device)  # AdaTT-sp
    level = model.levels[0]
    assert len(level.native) == 0  # nothing to learn: NativeExpertLF(E_t) = E_t
    x = torch.randn(4, 6, device=device)
    own = level.experts["b"][0](x)
    every = [level.experts[u][0](x) for u in ("a", "b")]
    gate = level.gates["b"](x)
    expected = gate[:, :1] * every[0] + gate[:, 1:] * every[1] + own
    torch.testing.assert_close(model(x)["b"], model.towers["b"](expected))


def test_other_tasks_experts_reach_a_task_directly(device, params_with_grad):
    torch.manual_seed(3)
    model = build("adatt", VEC, num_levels=2, task_experts=2, shared_experts=0).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 6, device=device))["a"].sum())
    assert any(n.startswith("levels.1.experts.b.") for n in touched)  # task-to-task fusion
    assert not any(n.startswith(("levels.1.gates.b", "levels.1.native.b", "towers.b")) for n in touched)
    named = dict(model.named_parameters())
    touched_b = params_with_grad(model, model(torch.randn(8, 6, device=device))["b"].sum())
    private_b = {id(named[n]) for n in touched_b - touched}
    assert private_b == {id(p) for p in model.task_specific_parameters("b")}  # the split is tight


def test_parameter_count(n_params):
    T, d, w, m, ms = 2, 6, 16, 2, 1
    model = build("adatt", VEC, width=w, depth=1, num_levels=2, task_experts=m, shared_experts=ms)
    experts = (T * m + ms) * ((d * w + w) + (w * w + w))
    gates = (T + 1) * d * (T * m + ms) + T * w * (T * m + ms)  # shared unit fuses below the top
    native = 2 * T * m  # v_t at both levels; the one shared expert has unit weight, no v
    towers = (w + 1) + (3 * w + 3)
    assert n_params(model) == experts + gates + native + towers


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("adatt", device)
    first, last = short_training("adatt", dense, device, steps=15)
    assert last < 0.7 * first


def test_rejects_tasks_without_experts():
    with pytest.raises(ValueError, match="expert"):
        build("adatt", VEC, task_experts=0)


def test_registry_name_builds_the_catalogued_class():
    model = build("adatt", VEC)
    assert type(model) is AdaTT and model.name == "adatt"


def test_with_three_levels_the_private_part_is_the_top_levels_gate_native_weights_and_tower():
    """Only what sits after the last fusion belongs to a task alone, however many levels there are."""
    model = build("adatt", VEC, num_levels=3, task_experts=2, shared_experts=1)
    top = model.levels[-1]
    expected = {id(p) for p in [*top.gates["a"].parameters(), top.native["a"], *model.towers["a"].parameters()]}
    assert {id(p) for p in model.task_specific_parameters("a")} == expected
