import copy

import pytest
import torch
from torch import nn

from reference_impls.architectures.policy_sketches import PolicySketches
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

CRAFT = Problem(("planks", "sticks", "rope"), (6,), {"planks": 1, "sticks": 2, "rope": 1})
SKETCHES = {"planks": ("wood", "bench"), "sticks": ("wood", "toolshed"), "rope": ("grass", "toolshed")}


def crafting(device: torch.device) -> PolicySketches:
    torch.manual_seed(0)
    return build("policy_sketches", CRAFT, width=8, sketches=SKETCHES).to(device)


def test_a_task_composes_its_sketch_modules_in_order(device):
    model = crafting(device)
    x = torch.randn(5, 6, device=device)
    m = model.subpolicies
    expected = model.heads["sticks"](m["toolshed"](m["wood"](model.stem(x))))
    torch.testing.assert_close(model(x)["sticks"], expected, rtol=0, atol=0)
    swapped = model.heads["sticks"](model.run_sketch(x, ("toolshed", "wood")))
    assert not torch.allclose(swapped, expected)  # a sketch is a sequence, not a set
    assert list(m) == ["wood", "bench", "toolshed", "grass"]  # one module per distinct symbol


def test_tasks_sharing_a_symbol_share_exactly_that_module(device, params_with_grad):
    model = crafting(device)
    x = torch.randn(8, 6, device=device)

    def modules_touched(task: str) -> set[str]:
        touched = params_with_grad(model, model(x)[task].square().sum())
        return {n.split(".")[1] for n in touched if n.startswith("subpolicies.")}

    planks, sticks, rope = (modules_touched(t) for t in CRAFT.tasks)
    assert planks == {"wood", "bench"} and sticks == {"wood", "toolshed"} and rope == {"grass", "toolshed"}
    assert planks & sticks == {"wood"} and sticks & rope == {"toolshed"} and not planks & rope
    own = {id(p) for p in model.task_specific_parameters("planks")}
    expected = {id(p) for p in [*model.subpolicies["bench"].parameters(), *model.heads["planks"].parameters()]}
    assert own == expected  # "wood" is shared with sticks, so it is not planks' own


def test_a_repeated_symbol_runs_its_module_once_per_mention(device):
    torch.manual_seed(0)
    model = build("policy_sketches", CRAFT, width=8,
                  sketches={"planks": ("wood", "wood"), "sticks": ("wood",), "rope": ("wood", "grass", "wood")}).to(device)
    x, m = torch.randn(5, 6, device=device), model.subpolicies
    out, h = model(x), model.stem(x)
    torch.testing.assert_close(out["planks"], model.heads["planks"](m["wood"](m["wood"](h))), rtol=0, atol=0)
    torch.testing.assert_close(out["rope"], model.heads["rope"](m["wood"](m["grass"](m["wood"](h)))), rtol=0, atol=0)


def test_every_task_trains_the_shared_stem_and_owns_its_unshared_modules(split_by_task):
    model = crafting(torch.device("cpu"))
    split = split_by_task(model, torch.randn(8, 6))
    stem = names_under(model, "stem.")
    assert stem and all(stem <= reached for _, reached in split.values())
    own = {"planks": ("subpolicies.bench.", "heads.planks."), "sticks": ("heads.sticks.",),
           "rope": ("subpolicies.grass.", "heads.rope.")}
    assert_each_task_owns_exactly(split, lambda t: names_under(model, *own[t]))


def test_one_symbol_for_every_task_is_shared_bottom(device):
    torch.manual_seed(1)
    model = build("policy_sketches", CRAFT, width=8, sketches={t: ("go",) for t in CRAFT.tasks}).to(device)
    trunk = nn.Sequential(copy.deepcopy(model.stem), copy.deepcopy(model.subpolicies["go"]))
    hard = SharedBottom(CRAFT.tasks, trunk, copy.deepcopy(model.heads)).to(device)
    x = torch.randn(4, 6, device=device)
    for t in CRAFT.tasks:
        torch.testing.assert_close(model(x)[t], hard(x)[t])


def test_a_new_sketch_reuses_learned_modules_without_new_parameters(fit):
    torch.manual_seed(2)
    model = build("policy_sketches", CRAFT, width=8, sketches=SKETCHES)
    x = torch.randn(32, 6)
    targets = {t: torch.randn(32, d) for t, d in CRAFT.out_dims.items()}
    losses = fit(model, x, lambda out: sum((out[t] - targets[t]).square().mean() for t in out), 60, 3e-2)
    assert losses[-1] < 0.5 * losses[0]
    before = sum(p.numel() for p in model.parameters())
    h = model.run_sketch(x, ("grass", "bench"))  # never trained as a pair
    assert h.shape == (32, 8) and sum(p.numel() for p in model.parameters()) == before


def test_parameter_count(n_params):
    d, w = 6, 8
    model = build("policy_sketches", CRAFT, width=w, sketches=SKETCHES)
    symbols = 4 * (w * w + w)
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == (d * w + w) + symbols + heads


@pytest.mark.parametrize("empty", CRAFT.tasks)
def test_empty_sketch_is_rejected(empty):
    sketches = {t: () if t == empty else ("a",) for t in CRAFT.tasks}
    with pytest.raises(ValueError, match="at least one symbol"):
        build("policy_sketches", CRAFT, sketches=sketches)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("policy_sketches", device)
    first, last = short_training("policy_sketches", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("policy_sketches", Problem(("a", "b"), (6,), {"a": 1, "b": 1}))
    assert type(model) is PolicySketches and model.name == "policy_sketches"
    assert model.sketches == {"a": ("shared", "a"), "b": ("shared", "b")}
