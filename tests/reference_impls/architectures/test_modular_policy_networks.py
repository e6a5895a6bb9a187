import copy

import pytest
import torch

from reference_impls.architectures.modular_policy_networks import ModularPolicyNetwork
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

# three of the four pairs of a 2 robots x 2 tasks grid; (r4, reach) is held out
PAIRS = {"r3_push": ("r3", "push"), "r3_reach": ("r3", "reach"), "r4_push": ("r4", "push")}
GRID = Problem(tuple(PAIRS), (8,), {o: 2 for o in PAIRS})  # 6 task features + 2 robot-state features


def grid(device: torch.device, seed: int = 0) -> ModularPolicyNetwork:
    torch.manual_seed(seed)
    return build("modular_policy_networks", GRID, width=8, robot_obs_dim=2, pairs=PAIRS).to(device)


def test_a_pair_is_its_robot_module_on_its_task_module(device):
    model = grid(device)
    x = torch.randn(5, 8, device=device)
    z = model.task_modules["push"](x[:, :6])
    expected = model.robot_modules["r4"](torch.cat([z, x[:, 6:]], dim=1))
    torch.testing.assert_close(model(x)["r4_push"], expected, rtol=0, atol=0)
    unseen = model.robot_modules["r4"](torch.cat([model.task_modules["reach"](x[:, :6]), x[:, 6:]], dim=1))
    torch.testing.assert_close(model.compose(x, "r4", "reach"), unseen, rtol=0, atol=0)


def test_task_modules_are_shared_across_robots_and_robot_modules_across_tasks(device, params_with_grad):
    model = grid(device)
    x = torch.randn(8, 8, device=device)

    def modules(output: str) -> set[str]:
        return {".".join(n.split(".")[:2]) for n in params_with_grad(model, model(x)[output].square().sum())}

    assert modules("r3_push") == {"task_modules.push", "robot_modules.r3"}
    assert modules("r4_push") == {"task_modules.push", "robot_modules.r4"}
    assert modules("r3_reach") == {"task_modules.reach", "robot_modules.r3"}
    own = {id(p) for p in model.task_specific_parameters("r4_push")}  # r4 only serves this pair
    assert own == {id(p) for p in model.robot_modules["r4"].parameters()}
    assert not list(model.task_specific_parameters("r3_push"))  # both its modules serve other pairs


def test_an_unseen_pair_improves_zero_shot(fit):
    """Targets come from a grid of linear 'task' and 'robot' maps; train three pairs, test the fourth."""
    g = torch.Generator().manual_seed(1)
    task_maps = {k: torch.randn(6, 4, generator=g) for k in ("push", "reach")}
    robot_maps = {r: torch.randn(6, 2, generator=g) for r in ("r3", "r4")}  # reads [task code, robot state]

    def target(x: torch.Tensor, robot: str, task: str) -> torch.Tensor:
        return torch.cat([x[:, :6] @ task_maps[task], x[:, 6:]], dim=1) @ robot_maps[robot]

    model = grid(torch.device("cpu"), seed=2)
    x = torch.randn(64, 8, generator=g)
    targets = {o: target(x, *pair) for o, pair in PAIRS.items()}
    held_out = target(x, "r4", "reach")
    before = (model.compose(x, "r4", "reach") - held_out).square().mean().item()
    fit(model, x, lambda out: sum((out[o] - targets[o]).square().mean() for o in out), 60, 2e-2)
    after = (model.compose(x, "r4", "reach") - held_out).square().mean().item()
    assert after < 0.6 * before


def test_one_task_module_is_shared_bottom(device):
    torch.manual_seed(3)
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
    model = build("modular_policy_networks", problem).to(device)
    assert model.pairs == {"a": ("a", "task"), "b": ("b", "task")}
    hard = SharedBottom(problem.tasks, copy.deepcopy(model.task_modules["task"]), copy.deepcopy(model.robot_modules))
    x = torch.randn(4, 6, device=device)
    for t in problem.tasks:
        torch.testing.assert_close(model(x)[t], hard(x)[t])


def test_parameter_count(n_params):
    w, obs, rob = 8, 6, 2
    model = build("modular_policy_networks", GRID, width=w, robot_obs_dim=rob, pairs=PAIRS)
    task_modules = 2 * (obs * w + w)
    robot_modules = 2 * (((w + rob) * w + w) + (w * 2 + 2))
    assert n_params(model) == task_modules + robot_modules  # R + K modules for R x K pairs


def test_a_robot_has_one_action_space():
    """One robot module serves all its outputs, so they must agree on the width (was: the last one won)."""
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 3})
    with pytest.raises(ValueError, match="different widths"):
        build("modular_policy_networks", problem, pairs={"a": ("r", "t1"), "b": ("r", "t2")})


def test_images_take_no_robot_state():
    with pytest.raises(ValueError, match="robot_obs_dim"):
        build("modular_policy_networks", Problem(("a",), (3, 4, 4), {"a": 1}), robot_obs_dim=2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("modular_policy_networks", device)
    first, last = short_training("modular_policy_networks", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("modular_policy_networks", GRID, pairs=PAIRS)
    assert type(model) is ModularPolicyNetwork and model.name == "modular_policy_networks"


def test_each_output_owns_the_modules_no_other_pair_uses(split_by_task):
    """Whichever order the pairs come in: r1_a owns task module a (robot r1 also serves r1_b,
    listed after r2_b), r2_b owns robot module r2, r1_b shares both of its modules."""
    pairs = {"r1_a": ("r1", "a"), "r2_b": ("r2", "b"), "r1_b": ("r1", "b")}
    torch.manual_seed(0)
    model = build("modular_policy_networks", Problem(tuple(pairs), (8,), {o: 2 for o in pairs}),
                  width=8, robot_obs_dim=2, pairs=pairs)
    own = {"r1_a": names_under(model, "task_modules.a."), "r2_b": names_under(model, "robot_modules.r2."),
           "r1_b": set()}
    assert_each_task_owns_exactly(split_by_task(model, torch.randn(4, 8)), own.__getitem__)


@pytest.mark.parametrize("dense", (True, False))
def test_an_image_robot_module_is_a_hidden_3x3_conv_layer_then_the_head(n_params, dense):
    """Task module: one 3x3 conv 2 -> 8 (152); robot modules: a 3x3 conv 8 -> 8 (584), then a
    head to the output's width (8 d + d)."""
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=dense)
    model = build("modular_policy_networks", problem, width=8)
    assert n_params(model.task_modules["task"]) == 152
    assert [n_params(model.robot_modules[r]) for r in ("a", "b")] == [584 + 18, 584 + 9]


def test_a_pair_naming_a_missing_robot_or_task_module_is_refused():
    """Every pair needs both its robot module g_r and its task module f_k, checked when built."""
    modules = {"push": torch.nn.Linear(6, 8)}
    robots = {"r3": torch.nn.Linear(8, 2)}
    with pytest.raises(ValueError, match="r4"):
        ModularPolicyNetwork(("x", "y"), {"x": ("r3", "push"), "y": ("r4", "push")}, modules, robots)
    with pytest.raises(ValueError, match="reach"):
        ModularPolicyNetwork(("x", "y"), {"x": ("r3", "push"), "y": ("r3", "reach")}, modules, robots)
