import math

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.routing_network import RoutingNetwork

from .harness_probe import harness_step

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_a_fixed_route_is_the_plain_composition_of_its_blocks(device):
    torch.manual_seed(0)
    model = build("routing_network", VEC, depth=3, num_blocks=3).to(device)
    x = torch.randn(5, 6, device=device)
    route = (2, 0, 1)
    h = model.pools[2][1](model.pools[1][0](model.pools[0][2](model.stem(x))))
    torch.testing.assert_close(model.run_route(x, route), h, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():  # a greedy router that prefers `route` for task b
        model.policy_logits[1] = -5.0
        model.policy_logits[1, torch.arange(3), torch.tensor(route)] = 5.0
    assert model.choose_route("b") == route
    torch.testing.assert_close(model(x)["b"], model.heads["b"](h))


def test_only_the_chosen_blocks_get_gradient(device, params_with_grad):
    torch.manual_seed(1)
    model = build("routing_network", VEC, depth=2, num_blocks=3).to(device)
    x = torch.randn(8, 6, device=device)
    touched = params_with_grad(model, model.heads["a"](model.run_route(x, (1, 2))).square().sum())
    blocks = {n.rsplit(".", 2)[0] for n in touched if n.startswith("pools.")}
    assert blocks == {"pools.0.1", "pools.1.2"}
    assert any(n.startswith("stem.") for n in touched)
    assert not any(n.startswith("heads.b") for n in touched)
    assert "policy_logits" not in dict(model.named_parameters())  # trained by RL, not by gradients


def test_reinforce_makes_a_rewarded_route_more_likely_and_a_punished_one_less():
    model = build("routing_network", VEC, depth=2, num_blocks=3, router_lr=0.5)
    route = (2, 0)
    before = model.route_probability("a", route).item()
    assert before == pytest.approx(1 / 9)
    model.reinforce({"a": 1.0}, {"a": route})
    after = model.route_probability("a", route).item()
    assert after > before
    # hand-computed REINFORCE step: theta += lr * (r - b) * (onehot - 1/3), b = 0
    expected = torch.full((3,), -0.5 / 3)
    expected[2] += 0.5
    torch.testing.assert_close(model.policy_logits[0, 0], expected)
    assert model.route_probability("b", route).item() == pytest.approx(1 / 9)  # other task untouched
    assert model.baseline[0].item() == pytest.approx(0.1)
    model.reinforce({"a": -1.0}, {"a": route})  # below the baseline: less likely again
    assert model.route_probability("a", route).item() < after


def test_reinforce_uses_the_advantage_over_the_running_baseline():
    """Only r - b moves the policy: a reward equal to the baseline changes nothing."""
    model = build("routing_network", VEC, depth=2, num_blocks=3, router_lr=0.5, baseline_decay=0.5)
    route = (1, 0)
    model.reinforce({"a": 2.0}, {"a": route})  # b: 0 -> 1
    assert model.baseline[0].item() == pytest.approx(1.0)
    logits = model.policy_logits.clone()
    model.reinforce({"a": 1.0}, {"a": route})  # r = b: no update, b stays 1
    torch.testing.assert_close(model.policy_logits, logits)
    pi = model.policy("a")[0]
    model.reinforce({"a": 0.5}, {"a": route})  # positive reward, below the baseline: advantage -0.5
    expected = logits[0, 0] + 0.5 * -0.5 * (torch.nn.functional.one_hot(torch.tensor(1), 3) - pi)
    torch.testing.assert_close(model.policy_logits[0, 0], expected)
    assert model.baseline[0].item() == pytest.approx(0.75)


def test_reinforce_steps_each_depth_with_that_depths_own_policy():
    model = build("routing_network", VEC, depth=2, num_blocks=3, router_lr=0.5).double()
    with torch.no_grad():
        model.policy_logits[0, 1] = torch.tensor([1.0, 0.0, -1.0])
    model.reinforce({"a": 2.0}, {"a": (2, 0)})  # b = 0: advantage 2
    z = math.e + 1 + 1 / math.e
    pi_1 = [math.e / z, 1 / z, 1 / (math.e * z)]  # softmax(1, 0, -1), not depth 0's uniform row
    expected_1 = [1.0 + 0.5 * 2 * (1 - pi_1[0]), 0.0 - 0.5 * 2 * pi_1[1], -1.0 - 0.5 * 2 * pi_1[2]]
    expected_0 = [-1 / 3, -1 / 3, 2 / 3]  # 0.5 * 2 * (onehot(2) - 1/3)
    torch.testing.assert_close(model.policy_logits[0], torch.tensor([expected_0, expected_1], dtype=torch.float64))


def test_in_training_each_task_follows_the_route_its_own_policy_samples():
    torch.manual_seed(0)
    model = build("routing_network", VEC, depth=2, num_blocks=3).train()
    preferred = {"a": (0, 1), "b": (2, 2)}
    with torch.no_grad():  # each row all but certain: the sample is the preferred block
        for k, route in enumerate(preferred.values()):
            model.policy_logits[k] = -50.0
            model.policy_logits[k, torch.arange(2), torch.tensor(route)] = 50.0
    x = torch.randn(4, 6)
    out = model(x)
    assert model.last_routes == preferred
    for t, route in preferred.items():
        torch.testing.assert_close(out[t], model.heads[t](model.run_route(x, route)))


def test_each_task_keeps_its_own_baseline():
    model = build("routing_network", VEC, depth=2, num_blocks=3, router_lr=0.5)
    model.reinforce({"a": 1.0}, {"a": (0, 0)})  # b_a: 0 -> 0.1, b_b stays 0
    model.reinforce({"b": 0.5}, {"b": (1, 1)})  # advantage 0.5 - 0, not 0.5 - 0.1
    torch.testing.assert_close(model.baseline, torch.tensor([0.1, 0.05]))
    torch.testing.assert_close(model.policy_logits[1, 0], torch.tensor([-1 / 12, 1 / 6, -1 / 12]))


def test_eval_router_is_greedy_and_training_router_samples():
    model = build("routing_network", VEC, depth=2, num_blocks=3, seed=5)
    with torch.no_grad():  # a mild preference for (2, 1): sampling often picks something else
        model.policy_logits[0] = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.3, 0.0]])
    model.eval()
    assert {model.choose_route("a") for _ in range(30)} == {(2, 1)}
    model.train()
    assert len({model.choose_route("a") for _ in range(30)}) > 1


def test_router_learns_the_best_route_from_rewards():
    torch.manual_seed(2)
    model = build("routing_network", VEC, depth=2, num_blocks=3, seed=3).train()
    x = torch.randn(4, 6)
    for _ in range(200):
        model(x)
        model.reinforce({t: float(model.last_routes[t] == (1, 2)) for t in VEC.tasks})
    model.eval()
    assert all(model.choose_route(t) == (1, 2) for t in VEC.tasks)
    assert model.route_probability("a", (1, 2)).item() > 0.8


def test_training_routes_are_sampled_and_seeded():
    one, two = (build("routing_network", VEC, seed=7).train() for _ in range(2))
    routes = [[m.choose_route("a") for _ in range(20)] for m in (one, two)]
    assert routes[0] == routes[1] and len(set(routes[0])) > 1


def test_one_block_per_depth_is_shared_bottom(device):
    torch.manual_seed(3)
    model = build("routing_network", VEC, depth=2, num_blocks=1).to(device)
    x = torch.randn(3, 6, device=device)
    h = model.pools[1][0](model.pools[0][0](model.stem(x)))
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.heads[t](h))


def test_parameter_count(n_params):
    d, w, depth, n = 6, 16, 2, 3
    model = build("routing_network", VEC, width=w, depth=depth, num_blocks=n)
    assert n_params(model) == (d * w + w) + depth * n * (w * w + w) + (w + 1) + (2 * w + 2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("routing_network", device)
    first, last = short_training("routing_network", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("routing_network", VEC)
    assert type(model) is RoutingNetwork and model.name == "routing_network"


def test_the_training_loop_reinforces_each_route_with_the_negative_task_loss(monkeypatch):
    """The loop used to leave the router at its uniform start; now each step calls
    reinforce({t: -L_t}) for the routes that step's forward pass sampled."""
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    torch.manual_seed(0)
    model = build("routing_network", problem)
    seen = []
    original = model.reinforce
    monkeypatch.setattr(model, "reinforce", lambda rewards, routes=None: (seen.append(
        (dict(rewards), dict(model.last_routes))), original(rewards, routes)))
    x, y = torch.randn(16, 6), {"a": torch.randn(16, 1), "b": torch.randn(16, 1)}
    before = model.policy_logits.clone()
    log = harness_step(model, x, y)
    (rewards, routes), = seen
    assert rewards == pytest.approx({"a": -log.losses[0].item(), "b": -log.losses[1].item()})
    assert not torch.equal(model.policy_logits, before)
    model.eval()
    model(x)
    model.observe_step_losses(torch.ones(2))  # evaluation passes teach the router nothing
    assert len(seen) == 1


@pytest.mark.parametrize("method", ("fs_mtl", "modo"))
def test_the_reward_goes_to_the_routes_that_earned_it_when_the_method_runs_the_model_again(method, monkeypatch):
    """FS-MTL's perturbed passes and MoDo's half batches run the model again within the step,
    each pass sampling new routes; the step's losses come from its first pass, so the router
    must reinforce that pass's routes (it reinforced the last pass's)."""
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    torch.manual_seed(0)
    model = build("routing_network", problem, num_blocks=6, depth=3)
    sampled, reinforced = [], []
    original_forward, original_reinforce = model.forward, model.reinforce

    def forward(x):
        out = original_forward(x)
        sampled.append(dict(model.last_routes))
        return out

    def reinforce(rewards, routes=None):
        reinforced.append(dict(model.last_routes if routes is None else routes))
        return original_reinforce(rewards, routes)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(model, "reinforce", reinforce)
    x, y = torch.randn(16, 6), {"a": torch.randn(16, 1), "b": torch.randn(16, 1)}
    harness_step(model, x, y, method=method)
    assert len(sampled) > 1 and sampled[-1] != sampled[0]  # the method did sample other routes
    assert reinforced == [sampled[0]]


def test_router_learning_rate_defaults_to_one_half():
    """The docstring's router_lr 0.5: one step with reward 1 from a uniform policy moves the chosen
    logit by 0.5 * (1 - 1/3) and the others by -0.5 / 3."""
    model = build("routing_network", VEC, depth=2, num_blocks=3)
    assert model.router_lr == 0.5
    model.reinforce({"a": 1.0}, {"a": (1, 1)})
    torch.testing.assert_close(model.policy_logits[0, 0], torch.tensor([-0.5 / 3, 0.5 - 0.5 / 3, -0.5 / 3]))


def test_a_route_must_name_one_block_per_depth():
    """A route shorter or longer than the depth is refused, not silently truncated."""
    model = build("routing_network", VEC, depth=2, num_blocks=3)
    x = torch.randn(2, 6)
    for route in ((0,), (0, 1, 2)):
        with pytest.raises(ValueError):
            model.run_route(x, route)
