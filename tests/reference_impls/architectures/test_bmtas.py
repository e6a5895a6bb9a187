import copy
import itertools

import pytest
import torch

from reference_impls.architectures.bmtas import BMTAS, MAX_TASKS, first_appearance_labels, induced_partition
from reference_impls.architectures.bmtn import partitions, refines, tree_cost
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under
from .harness_probe import harness_step

VEC = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 2, "c": 1})


def _set_alphas(model, *rows):
    with torch.no_grad():
        model.alphas.copy_(torch.tensor(rows, dtype=torch.float32))


def test_one_layer_resource_loss_is_the_exact_expected_cost():
    torch.manual_seed(0)
    model = BMTAS(VEC.tasks, [torch.nn.Linear(2, 2)], {t: torch.nn.Identity() for t in VEC.tasks}, layer_costs=[3.0])
    with torch.no_grad():
        model.alphas.normal_()
    p = torch.softmax(model.alphas[0], -1)
    expected = sum(
        p[0, i] * p[1, j] * p[2, k] * len(set((i, j, k))) * 3.0 for i, j, k in itertools.product(range(3), repeat=3)
    )
    torch.testing.assert_close(model.resource_loss(), expected)


def test_one_hot_choices_give_the_fixed_tree_and_its_cost():
    model = build("bmtas", VEC, depth=2)
    big = 30.0
    # layer 0: a, b, c all pick copy 0; layer 1: a, c pick copy 1, b picks copy 2
    _set_alphas(model, [[big, 0, 0], [big, 0, 0], [big, 0, 0]], [[0, big, 0], [0, 0, big], [0, big, 0]])
    tree = model.branch_tree()
    assert tree == ((("a", "b", "c"),), (("a", "c"), ("b",)))
    torch.testing.assert_close(model.resource_loss(), torch.tensor(tree_cost(tree, model.layer_costs)))


def test_branch_tree_never_merges_groups_split_above():
    model = build("bmtas", VEC, depth=2)
    _set_alphas(model, [[9.0, 0, 0], [0, 9.0, 0], [9.0, 0, 0]], [[9.0, 0, 0], [9.0, 0, 0], [9.0, 0, 0]])
    assert model.branch_tree() == ((("a", "c"), ("b",)), (("a", "c"), ("b",)))


def test_fixed_tree_network_reproduces_the_supergraph(device):
    torch.manual_seed(1)
    model = build("bmtas", VEC, depth=2).to(device).eval()
    _set_alphas(model, [[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]], [[0, 5.0, 0], [0, 0, 5.0], [0, 0, 5.0]])
    with torch.no_grad():
        for p in model.copies.parameters():
            p.normal_()  # copies start as equal deep copies: make each one's weights its own
    branched = model.to_branched()
    x = torch.randn(4, 5, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], branched(x)[t])


def test_resource_loss_gradient_favours_sharing():
    model = build("bmtas", VEC, depth=2)
    uniform = model.resource_loss().detach()
    _set_alphas(model, *[[[4.0, 0, 0]] * 3] * 2)  # every task leans to the same copy
    assert model.resource_loss() < uniform
    model.resource_loss().backward()
    assert model.alphas.grad[:, :, 0].sum() < 0  # and leaning further lowers the cost


def test_two_layer_resource_loss_follows_the_recursion_by_hand():
    """Two tasks: P_0(shared) = s_0, P_1(shared) = s_1 * s_0, the rest is two branches."""
    torch.manual_seed(2)
    tasks = ("a", "b")
    model = BMTAS(tasks, [torch.nn.Linear(2, 2)] * 2, {t: torch.nn.Identity() for t in tasks}, layer_costs=[3.0, 5.0])
    with torch.no_grad():
        model.alphas.normal_()
    p = torch.softmax(model.alphas, -1)
    s0, s1 = ((p[l, 0] * p[l, 1]).sum() for l in range(2))
    shared1 = s1 * s0  # shared at layer 1 needs shared at layer 0 too
    expected = 3.0 * (s0 + 2 * (1 - s0)) + 5.0 * (shared1 + 2 * (1 - shared1))
    torch.testing.assert_close(model.resource_loss(), expected)


def test_choices_that_rejoin_a_split_count_as_all_separate():
    """As in the official recursion: the layer's partition must refine the one above, or it
    counts as task-specific (here 3 copies at layer 1, where the fixed tree keeps 2)."""
    model = build("bmtas", VEC, depth=2)
    _set_alphas(model, [[30.0, 0, 0], [0, 30.0, 0], [30.0, 0, 0]], [[30.0, 0, 0]] * 3)
    costs = model.layer_costs
    torch.testing.assert_close(model.resource_loss(), torch.tensor(2 * costs[0] + 3 * costs[1]))


def test_one_task_resource_loss_is_a_tensor_of_the_single_path_cost():
    model = build("bmtas", Problem(("a",), (5,), {"a": 1}), depth=2).double()
    loss = model.resource_loss()
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(sum(model.layer_costs), dtype=torch.float64))


def test_induced_partition_groups_equal_choices():
    assert induced_partition([2, 0, 2], ("a", "b", "c")) == (("a", "c"), ("b",))


def test_first_appearance_labels_are_equal_exactly_for_choices_that_group_the_tasks_alike():
    choices = torch.tensor([[2, 0, 2], [1, 2, 1], [0, 0, 1], [2, 2, 0], [1, 1, 1]])
    torch.testing.assert_close(first_appearance_labels(choices),
                               torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]]))


def enumerated_resource_loss(model: BMTAS) -> torch.Tensor:
    """The recursion written out: a Python sum over every joint choice of copies and every partition."""
    tasks, n = model.tasks, len(model.tasks)
    key = lambda p: frozenset(frozenset(g) for g in p)  # noqa: E731 - a partition regardless of order
    separate = key((t,) for t in tasks)
    total, above = 0.0, None
    for p_l, cost in zip(torch.softmax(model.alphas, -1), model.layer_costs):
        induced = {key(p): 0.0 for p in partitions(tasks)}
        for choice in itertools.product(range(n), repeat=n):
            induced[key(induced_partition(choice, tasks))] += p_l[torch.arange(n), torch.tensor(choice)].prod()
        layer = {p: q * (1.0 if above is None else sum(a_q for a, a_q in above.items() if refines(p, a)))
                 for p, q in induced.items() if p != separate}
        layer[separate] = 1 - sum(layer.values())
        total = total + sum(q * len(p) * cost for p, q in layer.items())
        above = layer
    return total


def test_resource_loss_and_its_gradient_equal_the_sum_over_every_joint_choice_for_four_tasks():
    """The tabulated sum against the definition, on three layers whose choices mix every partition."""
    tasks = ("a", "b", "c", "d")
    model = BMTAS(tasks, [torch.nn.Linear(2, 2)] * 3, {t: torch.nn.Identity() for t in tasks},
                  layer_costs=[3.0, 5.0, 2.0]).double()
    with torch.no_grad():
        model.alphas.copy_(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    loss, expected = model.resource_loss(), enumerated_resource_loss(model)
    torch.testing.assert_close(loss, expected)
    grad, expected_grad = (torch.autograd.grad(v, model.alphas)[0] for v in (loss, expected))
    torch.testing.assert_close(grad, expected_grad)
    assert grad.abs().min() > 0  # every logit moves the cost


def test_seven_tasks_sharing_every_layer_cost_one_copy_per_layer_and_eight_are_refused():
    """The tables for 7^7 joint choices are built; 8^8 would take gigabytes, so 8 tasks are refused
    at construction, before memory runs out (11 tasks once took 24 GB and were killed)."""
    assert MAX_TASKS == 7
    tasks = tuple("abcdefg")
    model = BMTAS(tasks, [torch.nn.Linear(2, 2)] * 2, {t: torch.nn.Identity() for t in tasks}, layer_costs=[3.0, 5.0])
    with torch.no_grad():
        model.alphas[:, :, 0] = 40.0  # every task picks copy 0 in both layers
    torch.testing.assert_close(model.resource_loss(), torch.tensor(8.0))
    with torch.no_grad():
        model.alphas[1] = 40.0 * torch.eye(7)  # layer 1: each task its own copy
    torch.testing.assert_close(model.resource_loss(), torch.tensor(3.0 + 7 * 5.0))
    eight = tuple("abcdefgh")
    with pytest.raises(ValueError, match=r"8\^8 here; it supports at most 7 tasks"):
        build("bmtas", Problem(eight, (5,), {t: 1 for t in eight}))


def test_only_heads_are_task_specific_and_paths_separate(device, params_with_grad):
    model = build("bmtas", VEC, depth=2).to(device).eval()
    _set_alphas(model, [[5.0, 0, 0]] * 3, [[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    touched = params_with_grad(model, model(torch.randn(6, 5, device=device))["b"].square().sum())
    assert any(n.startswith("copies.0.0.") for n in touched) and any(n.startswith("copies.1.1.") for n in touched)
    assert not any(n.startswith(("copies.1.0.", "copies.1.2.", "heads.a", "heads.c")) for n in touched)


def test_short_training_lowers_the_loss(device, short_training):
    before, after = short_training("bmtas", True, device, 30)
    assert after < 0.7 * before


def test_registry_name_builds_the_catalogued_class():
    assert type(build("bmtas", VEC)) is BMTAS


def test_auxiliary_loss_is_the_weighted_relative_resource_loss_and_the_training_step_follows_it():
    """The harness adds auxiliary_loss() every step: without it the search ignored the cost of a tree."""
    x = torch.randn(8, 5)
    targets = {t: torch.randn(8, d) for t, d in VEC.out_dims.items()}
    moved = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = build("bmtas", VEC, resource_weight=weight)
        start = copy.deepcopy(model)
        separate = 3 * sum(model.layer_costs)
        torch.testing.assert_close(model.auxiliary_loss(), weight * model.resource_loss() / separate)
        harness_step(model, x, targets, lr=1.0)
        moved[weight] = [p0 - p1 for p0, p1 in zip(start.parameters(), model.parameters())]
    grads = torch.autograd.grad(0.5 * start.resource_loss() / separate, list(start.parameters()), allow_unused=True)
    reached = {n for (n, _), g in zip(start.named_parameters(), grads) if g is not None}
    assert reached == {"alphas"}
    for with_aux, without, g in zip(moved[0.5], moved[0.0], grads):
        torch.testing.assert_close(with_aux - without, torch.zeros_like(without) if g is None else g)
    uniform = build("bmtas", VEC).auxiliary_loss()
    assert 1 / 3 * 0.1 < uniform.item() < 0.1  # between one shared path and all separate, times the default
    with pytest.raises(ValueError, match="resource_weight"):
        build("bmtas", VEC, resource_weight=-1.0)


def test_training_mixes_copies_with_gumbel_softmax_over_copies():
    """w_l[t] = softmax((alpha_l[t] + g) / tau) over copies, g = -log(-log u), u from the model's generator."""
    torch.manual_seed(0)
    model = build("bmtas", VEC, depth=2, tau=0.5, seed=3).train()
    with torch.no_grad():
        model.alphas.normal_()
    u = torch.rand(model.alphas.shape, generator=torch.Generator().manual_seed(3))
    w = model.choice_weights()
    expected = torch.softmax((model.alphas - (-u.log()).log()) / 0.5, dim=-1)
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert (w > 0).all() and (w < 1).all()  # relaxed, not one-hot
    x = torch.randn(4, 5)
    model.generator.manual_seed(3)
    with torch.no_grad():
        out = model(x)
        for i, t in enumerate(VEC.tasks):
            h = x
            for layer_copies, w_l in zip(model.copies, expected):
                h = sum(w_l[i, j] * layer_copies[j](h) for j in range(3))
            torch.testing.assert_close(out[t], model.heads[t](h))


def test_default_layer_costs_count_one_copy_s_parameters():
    model = build("bmtas", VEC, depth=2)
    assert model.layer_costs == [float(sum(p.numel() for p in c[0].parameters())) for c in model.copies]


def test_a_task_claims_its_head_alone_since_the_search_mixes_every_copy_into_every_task(split_by_task):
    torch.manual_seed(0)
    model = build("bmtas", VEC, depth=2).train()
    split = split_by_task(model, torch.randn(4, 5))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"heads.{t}."))


def test_branch_tree_lists_tasks_and_groups_in_task_order_not_by_name():
    """Names out of alphabetical order: each group lists its tasks, and the groups come, in the order of
    the model's tasks (first task first), whatever the names' spelling."""
    problem = Problem(("z", "y", "x"), (5,), {"z": 1, "y": 1, "x": 1})
    model = build("bmtas", problem, depth=2)
    _set_alphas(model, [[9.0, 0, 0], [0, 9.0, 0], [9.0, 0, 0]], [[9.0, 0, 0], [9.0, 0, 0], [9.0, 0, 0]])
    assert model.branch_tree() == ((("z", "x"), ("y",)), (("z", "x"), ("y",)))


def test_the_fixed_tree_is_a_separate_network_also_for_one_task():
    """to_branched() starts the retraining: its weights are its own (changing them leaves the
    supergraph alone), its depth is the supergraph's, and a one-task search gives one path."""
    torch.manual_seed(2)
    model = build("bmtas", VEC, depth=3).eval()
    assert len(model.copies) == 3
    net = model.to_branched()
    own = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in own for p in net.parameters())
    single = build("bmtas", Problem(("a",), (5,), {"a": 1}), depth=2).eval()
    x = torch.randn(3, 5)
    torch.testing.assert_close(single.to_branched()(x)["a"], single(x)["a"])


def test_the_relative_resource_loss_does_not_depend_on_the_unit_of_the_layer_costs():
    """auxiliary_loss() divides by the all-separate cost, so costs in GFLOPs or in FLOPs give one loss."""
    layers, heads = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], {t: torch.nn.Identity() for t in VEC.tasks}
    losses = []
    for scale in (1.0, 1e-3, 1e3):
        model = BMTAS(VEC.tasks, layers, heads, layer_costs=[2.0 * scale, 5.0 * scale], resource_weight=0.5)
        with torch.no_grad():
            model.alphas.copy_(torch.randn(model.alphas.shape, generator=torch.Generator().manual_seed(0)))
        losses.append(model.auxiliary_loss())
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])


def test_checkpoints_hold_only_learned_tensors_not_the_derived_tables():
    """The choice tables follow from the tasks alone, so a state dict holds weights and logits only."""
    model = build("bmtas", VEC, depth=2)
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
