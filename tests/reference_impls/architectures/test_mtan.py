import copy

import torch

from reference_impls.architectures.encoders import ConvEncoder, conv_head
from reference_impls.architectures.mtan import MTAN
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (3, 6, 6), {"a": 4, "b": 1}, dense=True)


def test_masks_lie_strictly_between_zero_and_one(device):
    for problem in (VEC, IMG):
        torch.manual_seed(4)
        model = build("mtan", problem, width=8, depth=3).to(device)
        masks = model.attention_masks(torch.randn(5, *problem.input_shape, device=device))
        for t in problem.tasks:
            assert len(masks[t]) == 3
            for m in masks[t]:
                assert m.shape[1] == 8 and (m > 0).all() and (m < 1).all()


def test_open_masks_reduce_to_hard_sharing(device):
    torch.manual_seed(4)
    model = build("mtan", IMG, width=8).to(device)
    with torch.no_grad():
        for chain in model.attention.values():
            for module in chain:
                module.h.weight.zero_()
                module.h.bias.fill_(60.0)  # sigmoid(60) == 1 in float32
    hard = SharedBottom(IMG.tasks, copy.deepcopy(model.encoder), copy.deepcopy(model.heads))
    x = torch.randn(2, 3, 6, 6, device=device)
    out, expected = model(x), hard(x)
    for t in IMG.tasks:
        torch.testing.assert_close(out[t], expected[t])


def test_attention_modules_are_task_specific(device, params_with_grad):
    torch.manual_seed(4)
    model = build("mtan", VEC, width=8, depth=2).to(device)
    x = torch.randn(8, 6, device=device)
    for task, other in (("a", "b"), ("b", "a")):  # both, so sharing the first task's chain fails
        touched = params_with_grad(model, model(x)[task].sum())
        assert not any(n.startswith((f"attention.{other}", f"heads.{other}")) for n in touched)
        # every module of the task's chain reaches its output: block 1's mask only through
        # f(a^(1)) into block 2's mask, so this fails if a mask stops reading the previous one
        assert {n for n, _ in model.named_parameters() if n.startswith(f"attention.{task}")} <= touched
        assert any(n.startswith("encoder") for n in touched) and any(n.startswith("carry") for n in touched)


def test_parameter_count(n_params):
    T, d, w = 2, 6, 8
    model = build("mtan", VEC, width=w, depth=2)
    trunk = (d * w + w) + (w * w + w)
    attention = (w * w + w + w * w + w) + (2 * w * w + w + w * w + w)  # block 1, block 2
    carry = w * w + w
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == trunk + T * attention + carry + heads


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links this paper to MTAN; the registry name must build exactly it."""
    model = build("mtan", IMG, width=8)
    assert type(model) is MTAN
    assert model.name == "mtan"


def _pointwise(layer, x):
    """A ChannelLinear written out: channels moved last, x W^T + b, moved back."""
    y = x.movedim(1, -1) @ layer.weight.T
    return (y + layer.bias if layer.bias is not None else y).movedim(-1, 1)


def test_forward_by_hand(device):
    """p^(j) from the shared trunk alone; a^(1) = sigmoid(h(ReLU(g(p^(1))))), a^(2) reads
    [p^(2) ; ReLU(f(a^(1) * p^(1)))]; the head reads a^(2) * p^(2). Catches a dropped ReLU in g
    or f, a trunk that runs on attended features, and f fed with anything but a^ * p."""
    for problem in (VEC, IMG):
        torch.manual_seed(5)
        model = build("mtan", problem, width=4, depth=2).to(device)
        with torch.no_grad():  # negative biases, so that a missing ReLU changes the numbers
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p) - 0.2)
        x = torch.randn(3, *problem.input_shape, device=device)
        p1 = model.encoder.blocks[0](x)
        p2 = model.encoder.blocks[1](p1)  # the trunk never sees attention

        def mask(module, inputs):
            return torch.sigmoid(_pointwise(module.h, torch.relu(_pointwise(module.g, inputs))))

        out = model(x)
        for t in problem.tasks:
            chain = model.attention[t]
            attended1 = mask(chain[0], p1) * p1
            carried = torch.relu(_pointwise(model.carry[0][0], attended1))
            attended2 = mask(chain[1], torch.cat([p2, carried], dim=1)) * p2
            torch.testing.assert_close(out[t], model.heads[t](attended2))


def test_forward_by_hand_at_depth_3(device):
    """Block j's mask reads [p^(j) ; f^(j)(a^(j-1))] with block j's own f^(j): at depth 3 a chain that
    reused f^(2) at block 3 (or the first f everywhere) gives other numbers."""
    for problem in (VEC, IMG):
        torch.manual_seed(5)
        model = build("mtan", problem, width=4, depth=3).to(device)
        assert len(model.carry) == 2
        x = torch.randn(3, *problem.input_shape, device=device)

        def mask(module, inputs):
            return torch.sigmoid(_pointwise(module.h, torch.relu(_pointwise(module.g, inputs))))

        out = model(x)
        for t in problem.tasks:
            p = model.encoder.blocks[0](x)
            attended = mask(model.attention[t][0], p) * p
            for j in (1, 2):
                p = model.encoder.blocks[j](p)
                carried = torch.relu(_pointwise(model.carry[j - 1][0], attended))
                attended = mask(model.attention[t][j], torch.cat([p, carried], dim=1)) * p
            torch.testing.assert_close(out[t], model.heads[t](attended))


def test_every_carry_layer_trains_at_depth_3(device, params_with_grad):
    """Each f^(j) is used once, between blocks j-1 and j, so every carry layer gets gradient from every task."""
    torch.manual_seed(4)
    model = build("mtan", IMG, width=8, depth=3).to(device)
    assert len(model.carry) == 2  # f^(2) and f^(3)
    x = torch.randn(2, 3, 6, 6, device=device)
    for task in IMG.tasks:
        touched = params_with_grad(model, model(x)[task].square().sum())
        assert names_under(model, "carry.0.", "carry.1.") <= touched, task


def test_a_task_claims_exactly_its_attention_chain_and_head(split_by_task):
    """The trunk and f are shared by every task's chain; what only task t's output reaches is its
    attention modules and its head, and task_specific_parameters must claim all of it."""
    for problem in (VEC, IMG):
        torch.manual_seed(4)
        model = build("mtan", problem, width=8, depth=3)
        split = split_by_task(model, torch.randn(4, *problem.input_shape))
        assert_each_task_owns_exactly(split, lambda t: names_under(model, f"attention.{t}.", f"heads.{t}."))


def test_carry_maps_each_block_width_to_the_next_for_uneven_widths(device):
    """f^(j) takes block j-1's attended features (width c_{j-1}) to block j's width c_j. The default
    trunks have equal widths, so only an encoder with uneven widths shows which width f reads."""
    torch.manual_seed(4)
    encoder = ConvEncoder(3, (4, 6, 5))
    heads = {"a": conv_head(5, 4), "b": conv_head(5, 1)}
    model = MTAN(IMG.tasks, encoder, heads).to(device)
    assert [(f[0].weight.shape[1], f[0].weight.shape[0]) for f in model.carry] == [(4, 6), (6, 5)]
    x = torch.randn(2, 3, 6, 6, device=device)
    masks = model.attention_masks(x)
    for t in IMG.tasks:
        assert [m.shape[1] for m in masks[t]] == [4, 6, 5]
    out = model(x)
    assert out["a"].shape == (2, 4, 6, 6) and out["b"].shape == (2, 1, 6, 6)
