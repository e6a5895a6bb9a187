import copy

import pytest
import torch

from reference_impls.architectures.encoders import heads_for, trunk_for
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.splitnet import (
    SplitNet, balance_regulariser, disjoint_regulariser, group_weight_regulariser,
)

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_group_weight_regulariser_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (out, in)
    hard = torch.eye(2)  # group 0 = output 0 / input 0, group 1 = output 1 / input 1
    # group 0: rows outside g0 on g0's input: |w10| = 3; columns outside g0 on g0's output: |w01| = 2
    # group 1: |w01| = 2 and |w10| = 3 -> 10 in all; diagonal weights are free
    torch.testing.assert_close(group_weight_regulariser(w, hard, hard), torch.tensor(10.0))
    torch.testing.assert_close(group_weight_regulariser(torch.diag(torch.tensor([5.0, 7.0])), hard, hard),
                               torch.tensor(0.0))
    half = torch.full((2, 2), 0.5)
    # every weight scaled by 0.25; per group rows 0.25 * (|[1, 2]| + |[3, 4]|), columns
    # 0.25 * (|[1, 3]| + |[2, 4]|); two groups
    expected = 2 * 0.25 * (5**0.5 + 5.0 + 10**0.5 + 20**0.5)
    torch.testing.assert_close(group_weight_regulariser(w, half, half), torch.tensor(expected))


def test_group_weight_regulariser_by_hand_with_different_input_and_output_groups():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (out, in)
    out_assign = torch.eye(2)  # output 0 -> group 0, output 1 -> group 1
    in_assign = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # inputs 0, 1 -> group 0, input 2 -> group 1
    # group 0: output 1 on inputs 0, 1: |[4, 5]|; input 2 on output 0: |3|
    # group 1: output 0 on input 2: |3|; inputs 0 and 1 on output 1, one column each: |4| + |5|
    expected = 41**0.5 + 3.0 + 3.0 + 4.0 + 5.0
    torch.testing.assert_close(group_weight_regulariser(w, out_assign, in_assign), torch.tensor(expected))


def test_group_weight_regulariser_with_soft_assignments_entry_by_entry():
    """Soft (G=3) assignments: row o of group g is ((1 - p_go) q_gi w_oi)_i, column i is (p_go (1 - q_gi) w_oi)_o."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 5, generator=g)
    p, q = torch.rand(3, 4, generator=g).softmax(0), torch.rand(3, 5, generator=g).softmax(0)
    expected = 0.0
    for k in range(3):
        for o in range(4):
            expected += sum(((1 - p[k, o]) * q[k, i] * w[o, i]) ** 2 for i in range(5)) ** 0.5
        for i in range(5):
            expected += sum((p[k, o] * (1 - q[k, i]) * w[o, i]) ** 2 for o in range(4)) ** 0.5
    torch.testing.assert_close(group_weight_regulariser(w, p, q), expected)


def test_group_weight_regulariser_takes_a_whole_kernel_as_one_row_or_column():
    """A conv weight (out, in, kh, kw): each row / column is the L2 norm over its input / output and every kernel position."""
    w = torch.zeros(2, 2, 1, 2)
    w[0, 1, 0] = torch.tensor([6.0, 8.0])  # input 1 -> output 0, norm 10
    w[1, 0, 0] = torch.tensor([3.0, 4.0])  # input 0 -> output 1, norm 5
    w[0, 0, 0], w[1, 1, 0] = torch.tensor([7.0, 9.0]), torch.tensor([2.0, 5.0])  # within groups: free
    hard = torch.eye(2)
    # each group penalises one foreign row and one foreign column: (5 + 10) per group
    torch.testing.assert_close(group_weight_regulariser(w, hard, hard), torch.tensor(30.0))


def test_disjoint_and_balance_regularisers_by_hand():
    a = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    torch.testing.assert_close(disjoint_regulariser(a), torch.tensor(0.25))  # only item 2 overlaps
    torch.testing.assert_close(balance_regulariser(a), torch.tensor(1.5**2 + 1.5**2))
    assert disjoint_regulariser(torch.eye(2)) == 0
    assert balance_regulariser(torch.tensor([[1.0, 1.0], [0.0, 0.0]])) > balance_regulariser(torch.eye(2))


def test_assignment_logits_start_near_zero_with_std_0_01():
    """Logits drawn with std 0.01 (as in the authors' code): every soft assignment starts close to uniform."""
    torch.manual_seed(0)
    tasks = tuple(f"t{i}" for i in range(20))
    model = build("splitnet", Problem(tasks, (6,), {t: 1 for t in tasks}), width=64)
    for logits in (torch.cat([l.flatten() for l in model.feature_logits]), model.task_logits.flatten()):
        assert 0.0085 < logits.std().item() < 0.0115 and abs(logits.mean().item()) < 0.002


def test_assignments_are_distributions_over_groups():
    model = build("splitnet", VEC, width=8)
    for a in [*model.feature_assignments(), model.task_assignment()]:
        torch.testing.assert_close(a.sum(0), torch.ones(a.shape[1]))


def _hard_split(model):
    with torch.no_grad():
        for logit in model.feature_logits:
            logit.zero_()
            logit[0, ::2], logit[1, 1::2] = 5.0, 5.0  # even features -> group 0, odd -> group 1
        model.task_logits.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))  # a -> 0, b -> 1
    model.split()


def test_hard_assignment_gives_block_diagonal_weights(device):
    torch.manual_seed(0)
    model = build("splitnet", VEC, width=8)
    _hard_split(model)
    model = model.to(device)
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    effective = (model.blocks[1][0].weight * model.masks[0].to(device))[order][:, order]
    assert effective[:4, 4:].abs().sum() == 0 and effective[4:, :4].abs().sum() == 0
    assert effective[:4, :4].abs().sum() > 0 and effective[4:, 4:].abs().sum() > 0


def test_after_split_a_task_ignores_the_other_groups_features(device, params_with_grad):
    torch.manual_seed(0)
    model = build("splitnet", VEC, width=8)
    _hard_split(model)
    model = model.to(device)
    model(torch.randn(4, 6, device=device))["a"].sum().backward()
    w = model.blocks[1][0].weight
    assert w.grad[1::2].abs().sum() == 0  # group-1 outputs get nothing from task a
    assert w.grad[0::2].abs().sum() > 0
    assert model.heads["a"][0].weight.grad[:, 1::2].abs().sum() == 0


def test_split_masks_keep_exactly_the_within_group_weights_by_hand(device):
    torch.manual_seed(1)
    model = build("splitnet", VEC, width=4)
    with torch.no_grad():
        model.feature_logits[0].copy_(torch.tensor([[5.0, 0, 5.0, 0], [0, 5.0, 0, 5.0]]))  # inputs: 0 1 0 1
        model.feature_logits[1].copy_(torch.tensor([[5.0, 5.0, 0, 0], [0, 0, 5.0, 5.0]]))  # outputs: 0 0 1 1
        model.task_logits.copy_(torch.tensor([[0.0, 5.0], [5.0, 0.0]]))  # a -> 1, b -> 0
    model.split()
    model = model.to(device)
    layer_mask = torch.tensor([[1.0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 1]], device=device)  # (out, in)
    torch.testing.assert_close(model.masks[0], layer_mask)
    torch.testing.assert_close(model.masks[1], torch.tensor([[0.0, 0, 1, 1]], device=device))  # head a reads group 1
    torch.testing.assert_close(model.masks[2], torch.tensor([[1.0, 1, 0, 0]] * 2, device=device))  # head b: group 0
    x = torch.randn(3, 6, device=device)
    h0 = model.blocks[0](x)
    h1 = torch.relu(h0 @ (model.blocks[1][0].weight * layer_mask).T + model.blocks[1][0].bias)
    head_b = model.heads["b"][0]
    torch.testing.assert_close(model(x)["b"], h1[:, :2] @ head_b.weight[:, :2].T + head_b.bias)


def _zero_cross_group_weights(model, masks):
    """A copy of the unsplit ``model`` whose split weights are multiplied by ``masks`` in place."""
    layers = [model.blocks[i][0] for i in range(model.first_split, len(model.blocks))]
    layers += [next(m for m in model.heads[t].modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
               for t in model.tasks]
    with torch.no_grad():
        for layer, mask in zip(layers, masks, strict=True):
            layer.weight.mul_(mask.view(*mask.shape, *([1] * (layer.weight.ndim - 2))))
    return model


@pytest.mark.parametrize("problem", (VEC, Problem(("a", "b"), (2, 5, 5), {"a": 2, "b": 1}, dense=True),
                                     Problem(("a", "b"), (2, 5, 5), {"a": 2, "b": 1})))
def test_split_network_is_the_network_with_cross_group_weights_zeroed(problem):
    """After split() every layer, linear or conv, computes with W ⊙ mask (all layers split here)."""
    torch.manual_seed(0)
    model = build("splitnet", problem, width=6, depth=2, split_layers=2).double()
    assert model.feature_logits[0].shape == (2, problem.input_shape[0])  # the data's features are assigned too
    unsplit = copy.deepcopy(model)
    model.split()
    assert all(0 < m.mean() < 1 for m in model.masks[:2])
    reference = _zero_cross_group_weights(unsplit, model.masks)
    x = torch.randn(3, *problem.input_shape, dtype=torch.float64)
    for t, out in model(x).items():
        torch.testing.assert_close(out, reference(x)[t])


def test_regularisers_cover_every_split_layer_and_the_heads():
    torch.manual_seed(2)
    model = build("splitnet", VEC, width=4, depth=3, split_layers=2)
    q, p = model.feature_assignments(), model.task_assignment()
    assert len(q) == 3  # input and output features of both split layers
    weight = sum(group_weight_regulariser(model.blocks[i][0].weight, q[i], q[i - 1]) for i in (1, 2))
    for k, t in enumerate(VEC.tasks):
        w = model.heads[t][0].weight
        weight = weight + group_weight_regulariser(w, p[:, k:k + 1].expand(-1, w.shape[0]), q[-1])
    reg = model.regularisers()
    torch.testing.assert_close(reg["weight"], weight)
    torch.testing.assert_close(reg["disjoint"], sum(disjoint_regulariser(a) for a in [*q, p]))
    torch.testing.assert_close(reg["balance"], sum(balance_regulariser(a) for a in [*q, p]))


def test_unsplit_network_is_the_plain_trunk(device):
    torch.manual_seed(0)
    model = build("splitnet", VEC, width=8).to(device)
    x = torch.randn(3, 6, device=device)
    trunk = torch.nn.Sequential(*model.blocks)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](trunk(x)))


def test_regularisers_push_toward_a_split(device):
    torch.manual_seed(0)
    model = build("splitnet", VEC, width=8).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    first = None
    for _ in range(30):
        reg = model.regularisers()
        loss = reg["weight"] + reg["disjoint"] + 0.01 * reg["balance"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_short_training_lowers_the_loss(short_training, device):
    first, last = short_training("splitnet", True, device, 15)
    assert last < first


def test_registry_name_builds_the_catalogued_class(registry_output_shapes, device):
    assert type(build("splitnet", VEC)) is SplitNet
    registry_output_shapes("splitnet", device)


def test_a_checkpoint_of_a_split_model_carries_its_masks():
    torch.manual_seed(0)
    saved = build("splitnet", VEC, width=8)
    saved.split()
    with torch.no_grad():  # later training moves the logits; the masks split() fixed must stay
        for logits in saved.feature_logits:
            logits.copy_(torch.randn_like(logits))
    torch.manual_seed(1)
    restored = build("splitnet", VEC, width=8)
    restored.load_state_dict(saved.state_dict())
    for mine, theirs in zip(restored.masks, saved.masks, strict=True):
        assert torch.equal(mine, theirs)
    x = torch.randn(4, 6)
    for t, out in restored(x).items():
        torch.testing.assert_close(out, saved(x)[t])
    assert all(m.dtype == torch.float64 for m in restored.double().masks)


def test_only_the_first_weighted_layer_of_a_module_is_masked():
    """_apply multiplies the first linear layer's weight by the mask and runs the rest as they are."""
    from reference_impls.architectures.splitnet import _apply
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    x = torch.randn(4, 3)
    first, last = module[0], module[2]
    expected = last(torch.relu(x @ (first.weight * mask).T + first.bias))
    torch.testing.assert_close(_apply(module, x, mask), expected)


def test_the_number_of_groups_can_differ_from_the_number_of_tasks():
    torch.manual_seed(0)
    trunk = trunk_for((6,), 8, 2)
    model = SplitNet(("a", "b"), list(trunk.blocks), trunk.widths, heads_for(VEC, 8), groups=3)
    assert model.task_assignment().shape == (3, 2)
    assert all(a.shape[0] == 3 for a in model.feature_assignments())
