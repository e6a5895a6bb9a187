"""LTB: one-hot branching = the hard tree; Gumbel samples train the branching logits."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.ltb import LearnToBranch

TASKS = ("a", "b", "c")
OUT = {"a": 2, "b": 1, "c": 1}


def make(widths=(2, 3), **kw):
    torch.manual_seed(0)
    return LearnToBranch(TASKS, 3, OUT, channels=5, widths=widths, **kw)


def point_logits(model, parents):
    with torch.no_grad():
        for l, chosen in enumerate(parents):
            for j, p in enumerate(chosen):
                if len(model.branch_logits[l]) == 0:
                    continue
                logits = model.branch_logits[l][j]
                logits.fill_(-3.0)
                logits[p] = 3.0


@pytest.mark.parametrize("parents", [[[0, 0], [1, 0, 1]], [[0, 0], [0, 0, 0]], [[0, 0], [1, 1, 0]]])
def test_one_hot_branching_equals_hard_tree(device, parents):
    model = make().to(device).eval()
    point_logits(model, parents)
    x = torch.randn(2, 3, 5, 5, device=device)
    out, tree = model(x), model.hard_tree(x, parents)
    for t in TASKS:
        assert torch.equal(out[t], tree[t])


def test_three_level_tree(device):
    model = make(widths=(2, 2, 3)).to(device).eval()
    parents = [[0, 0], [1, 0], [0, 1, 1]]
    point_logits(model, parents)
    x = torch.randn(2, 3, 5, 5, device=device)
    for t in TASKS:
        assert torch.equal(model(x)[t], model.hard_tree(x, parents)[t])
    # Choosing other parents gives a different function.
    other = model.hard_tree(x, [[0, 0], [0, 1], [0, 1, 1]])
    assert not torch.allclose(model(x)["a"], other["a"])


def test_soft_training_mixes_parents_and_trains_logits(device):
    model = make().to(device).train()
    x = torch.randn(2, 3, 5, 5, device=device)
    d = model.branching(1, 0)
    assert torch.all(d > 0) and torch.isclose(d.sum(), torch.tensor(1.0, device=device))
    model(x)["a"].square().sum().backward()
    assert model.branch_logits[1][0].grad.abs().sum() > 0
    # A soft sample mixes both layer-0 nodes into task a's input, so both receive gradient.
    assert all(model.layers[0][j][0].weight.grad.abs().sum() > 0 for j in range(2))
    assert len(model.branch_logits[0]) == 0  # the stem is the only parent: nothing to learn
    # Task a's loss never touches task b's leaf node, logits or head.
    assert all(p.grad is None for p in model.task_specific_parameters("b"))


def test_hard_straight_through_samples_are_one_hot_and_follow_logits(device):
    model = make(hard=True).to(device).train()
    with torch.no_grad():
        model.branch_logits[1][2].copy_(torch.tensor([2.0, 0.0], device=device))
    torch.manual_seed(0)
    samples = torch.stack([model.branching(1, 2) for _ in range(400)])
    assert set(samples.unique().tolist()) == {0.0, 1.0}
    assert torch.all(samples.sum(dim=1) == 1)
    # P(parent 0) = sigmoid(2) ~ 0.88
    assert abs(samples[:, 0].mean().item() - torch.sigmoid(torch.tensor(2.0)).item()) < 0.06


def test_parameter_count():
    c, widths = 5, (2, 3)
    model = make(widths=widths)
    node = c * c * 9 + c
    stem = 3 * c * 9 + c
    logits = 3 * 2  # layer 0 has one possible parent (the stem), so no logits
    heads = sum(c * o + o for o in OUT.values())
    assert sum(p.numel() for p in model.parameters()) == stem + sum(widths) * node + logits + heads
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == node + 2 + c * 2 + 2


def test_last_layer_must_match_tasks():
    with pytest.raises(ValueError):
        make(widths=(2, 2))


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("ltb", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("ltb", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_soft_samples_carry_gumbel_noise_scaled_by_tau(device):
    """d_j = softmax((theta_j + g) / tau): random at tau = 1, ~uniform at a huge tau, ~one-hot at a tiny one."""
    model = make().to(device).train()
    torch.manual_seed(3)
    noisy = torch.stack([model.branching(1, 0) for _ in range(100)])
    assert noisy[:, 0].std() > 0.1  # equal logits: only the noise moves the sample
    model.tau = 1e4
    flat = torch.stack([model.branching(1, 0) for _ in range(100)])
    torch.testing.assert_close(flat, torch.full_like(flat, 0.5), atol=2e-3, rtol=0)
    # A sample is one-hot to 1e-3 once its two noisy logits differ by 7 tau; at tau = 1e-3 a draw
    # of 100 misses that about once in three seeds (CUDA's seed-3 stream did), at 1e-6 once in ~3000.
    model.tau = 1e-6
    sharp = torch.stack([model.branching(1, 0) for _ in range(100)])
    assert torch.all((sharp < 1e-3) | (sharp > 1 - 1e-3))


def test_hard_samples_pass_gradient_straight_through(device):
    """hard=True: the forward value is one-hot, yet the logits get the soft sample's gradient."""
    model = make(hard=True).to(device).train()
    torch.manual_seed(1)
    d = model.branching(1, 0)
    assert set(d.tolist()) == {0.0, 1.0}
    (d * torch.tensor([1.0, -2.0], device=device)).sum().backward()
    assert model.branch_logits[1][0].grad.abs().sum() > 0
    model.zero_grad()
    model(torch.randn(2, 3, 5, 5, device=device))["a"].square().sum().backward()
    assert model.branch_logits[1][0].grad.abs().sum() > 0


def test_default_tree_is_two_nodes_then_one_per_task():
    """Default widths (2, number of tasks): layer 0 reads only the stem (no logits), each
    leaf chooses between the two layer-0 nodes."""
    torch.manual_seed(0)
    model = LearnToBranch(TASKS, 3, OUT)
    assert model.widths == (2, 3)
    assert [len(nodes) for nodes in model.layers] == [2, 3]
    assert len(model.branch_logits[0]) == 0
    assert [logits.numel() for logits in model.branch_logits[1]] == [2, 2, 2]


def test_every_tree_node_is_a_relu_convolution():
    from reference_impls.architectures.ltb import _node

    torch.manual_seed(0)
    node, x = _node(3), torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(node(x), torch.relu(node[0](x)))
    assert (node(x) == 0).any()


def test_the_shared_stem_is_a_relu_convolution():
    """The root is a conv block like the nodes: without its ReLU, stem and first layer would compose
    into a single linear convolution."""
    torch.manual_seed(0)
    model, x = make(), torch.randn(2, 3, 5, 5)
    conv = model.stem[0]
    expected = torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(model.stem(x), expected)
    assert (expected == 0).any()


@pytest.mark.parametrize("widths", [(2, 2, 3), (3,), (1, 3)])
def test_each_task_owns_exactly_its_leaf_its_leaf_logits_and_head(split_by_task, widths):
    """In training every inner node is mixed (softly) into every leaf; only the leaf, the logits it
    chooses its parent with (when it has more than one) and the head are one task's own."""
    from .conftest import assert_each_task_owns_exactly, names_under

    model = make(widths=widths).train()
    last = len(widths) - 1
    choose = len(widths) > 1 and widths[-2] > 1

    def own(t):
        k = TASKS.index(t)
        logits = {f"branch_logits.{last}.{k}"} if choose else set()
        return names_under(model, f"layers.{last}.{k}.", f"heads.{t}.") | logits

    assert_each_task_owns_exactly(split_by_task(model, torch.randn(2, 3, 5, 5)), own)


def test_a_single_task_tree_still_claims_its_leaf_logits():
    """The rule does not depend on the number of tasks: a leaf with two possible parents owns its logits."""
    torch.manual_seed(0)
    model = LearnToBranch(("a",), 3, {"a": 2}, channels=4, widths=(2, 1))
    names = {id(p): n for n, p in model.named_parameters()}
    claimed = {names[id(p)] for p in model.task_specific_parameters("a")}
    leaf_and_head = {n for n in names.values() if n.startswith(("layers.1.0.", "heads.a."))}
    assert claimed == leaf_and_head | {"branch_logits.1.0"}
