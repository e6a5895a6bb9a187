import pytest
import torch

from reference_impls.architectures.ple import PLE
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under
from .test_gradients_match_finite_differences import TOLERANCE, autograd_and_difference

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 3})


def test_all_gates_are_distributions_with_the_right_width(device):
    torch.manual_seed(7)
    model = build("ple", VEC, num_levels=3, shared_experts=2, task_experts=2).to(device)
    levels = model.gate_probabilities(torch.randn(5, 6, device=device) * 3)
    assert len(levels) == 3
    for j, gates in enumerate(levels):
        assert ("shared" in gates) == (j < 2)  # no shared gate at the last level
        for key, g in gates.items():
            assert g.shape[-1] == (2 * 2 + 2 if key == "shared" else 2 + 2)
            assert (g >= 0).all()
            torch.testing.assert_close(g.sum(-1), torch.ones(5, device=device))


def test_one_level_equals_cgc(device):
    torch.manual_seed(7)
    ple = build("ple", VEC, num_levels=1, shared_experts=2, task_experts=1).to(device)
    cgc = build("cgc", VEC, shared_experts=2, task_experts=1).to(device)
    state = {k.removeprefix("levels.0."): v for k, v in ple.state_dict().items()}
    cgc.load_state_dict(state)
    x = torch.randn(4, 6, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(ple(x)[t], cgc(x)[t])


def test_only_last_level_task_experts_are_private(device, params_with_grad):
    torch.manual_seed(7)
    model = build("ple", VEC, num_levels=2).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 6, device=device))["a"].sum())
    # level 0: b's experts feed the shared gate, hence level 1's shared experts, hence a
    assert any(n.startswith("levels.0.task_experts.b") for n in touched)
    assert not any(n.startswith(("levels.1.task_experts.b", "levels.1.gates.b", "towers.b"))
                   for n in touched)
    assert not any(n.startswith("levels.0.gates.b") for n in touched)  # read by b's path only
    specific_b = {id(p) for p in model.task_specific_parameters("b")}
    named = dict(model.named_parameters())
    assert not any(id(named[n]) in specific_b for n in touched)
    # and everything task b's loss does not reach from a is b's or another task's: the
    # split is tight, not just safe
    touched_b = params_with_grad(model, model(torch.randn(8, 6, device=device))["b"].sum())
    private_b = {n for n in touched_b if n not in touched}
    assert {id(named[n]) for n in private_b} == specific_b


def test_parameter_count(n_params):
    T, d, w, ms, mk = 2, 6, 16, 2, 1
    model = build("ple", VEC, width=w, depth=1, num_levels=2, shared_experts=ms, task_experts=mk)
    level0 = (ms + T * mk) * (d * w + w) + T * d * (mk + ms) + d * (T * mk + ms)
    level1 = (ms + T * mk) * (w * w + w) + T * w * (mk + ms)
    towers = (w + 1) + (3 * w + 3)
    assert n_params(model) == level0 + level1 + towers


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links this paper to PLE; the registry name must build exactly it."""
    model = build("ple", VEC, num_levels=1, shared_experts=2, task_experts=1)
    assert type(model) is PLE
    assert model.name == "ple"


def test_each_gate_reads_its_own_path_of_the_level_below(device):
    """g^{k,j} = w^{k,j}(g^{k,j-1}) S^{k,j}: task k's gate reads task k's previous output,
    the shared gate the previous shared output."""
    torch.manual_seed(7)
    model = build("ple", VEC, num_levels=3).to(device)
    x = torch.randn(5, 6, device=device)
    below, shared_below, _ = model.levels[0]({t: x for t in VEC.tasks}, x)
    gates = model.gate_probabilities(x)[1]
    torch.testing.assert_close(gates["shared"], model.levels[1].shared_gate(shared_below))
    for t in VEC.tasks:
        assert not torch.allclose(below[t], shared_below)
        torch.testing.assert_close(gates[t], model.levels[1].gates[t](below[t]))


def _level_by_hand(level, task_inputs, shared_input, tasks):
    """One extraction level written out from Eqs. (2)-(4) and (6): task k's experts and gate read
    task k's path, shared experts and the shared gate read the shared path."""
    def mix(gate, selector, experts, inputs):
        w = torch.softmax(selector.flatten(1) @ gate[1].weight.T, -1)
        return sum(w[:, i : i + 1] * e(h) for i, (e, h) in enumerate(zip(experts, inputs)))

    shared, s_in = list(level.shared_experts), [shared_input] * len(level.shared_experts)
    own = {t: list(level.task_experts[t]) for t in tasks}
    out = {t: mix(level.gates[t], task_inputs[t], own[t] + shared, [task_inputs[t]] * len(own[t]) + s_in)
           for t in tasks}
    every = [e for t in tasks for e in own[t]] + shared
    every_in = [task_inputs[t] for t in tasks for _ in own[t]] + s_in
    return out, (mix(level.shared_gate, shared_input, every, every_in) if level.shared_gate else None)


def test_three_levels_follow_eq_6_and_7_by_hand(device):
    """Every level's experts read their own path: task experts g^{k,j-1}, shared ones g^{s,j-1}."""
    torch.manual_seed(7)
    model = build("ple", VEC, num_levels=3, shared_experts=2, task_experts=2).to(device)
    x = torch.randn(5, 6, device=device)
    task_inputs, shared_input = {t: x for t in VEC.tasks}, x
    for level in model.levels:
        actual, actual_shared, _ = level(task_inputs, shared_input)
        task_inputs, shared_input = _level_by_hand(level, task_inputs, shared_input, VEC.tasks)
        if shared_input is None:  # the last level has no shared gate, hence no shared output
            assert actual_shared is None
        else:
            torch.testing.assert_close(actual_shared, shared_input)
        for t in VEC.tasks:
            torch.testing.assert_close(actual[t], task_inputs[t])
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.towers[t](task_inputs[t]))  # Eq. (7)


def test_three_levels_train_by_the_derivative_of_their_forward_pass():
    """At three levels the middle shared gate reads a learned path (at two, only the input):
    autograd along a random direction equals the finite difference, so nothing is cut off."""
    torch.manual_seed(7)
    model = build("ple", VEC, num_levels=3, shared_experts=2, task_experts=2).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    exact, difference, scale = autograd_and_difference(model, x)
    assert abs(exact - difference) <= TOLERANCE * scale


@pytest.mark.parametrize("num_levels", [1, 3])
def test_a_task_claims_exactly_what_lies_past_the_last_shared_gate(split_by_task, num_levels):
    """Task k owns the last level's experts and gate, the gate of the level below (if any) and
    its tower; with one level that is CGC's split, with three it must not be the middle level's."""
    torch.manual_seed(7)
    model = build("ple", VEC, num_levels=num_levels, shared_experts=2, task_experts=1)
    last = num_levels - 1

    def own(t):
        below = (f"levels.{last - 1}.gates.{t}.",) if last > 0 else ()
        return names_under(model, f"levels.{last}.task_experts.{t}.", f"levels.{last}.gates.{t}.", *below,
                           f"towers.{t}.")

    assert_each_task_owns_exactly(split_by_task(model, torch.randn(8, 6)), own)
