import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.etr_nlp import ETRNLP, ETRNLPBlock
from reference_impls.architectures.registry import Problem, build

DENSE = Problem(("seg", "depth", "edge"), (3, 6, 6), {"seg": 4, "depth": 1, "edge": 1}, dense=True)


def test_primitives_are_not_parameters_and_do_not_train(device):
    torch.manual_seed(0)
    model = build("etr_nlp", DENSE, width=10).to(device)
    names = {n for n, _ in model.named_parameters()}
    assert not any(".primitives." in n for n in names)
    frozen = {n: b.clone() for n, b in model.named_buffers() if ".primitives." in n}
    assert len(frozen) == 2 * 2  # a random conv and a dilated one in each of the two blocks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6, device=device)
    for _ in range(2):
        opt.zero_grad()
        sum(o.square().mean() for o in model(x).values()).backward()
        opt.step()
    for n, b in model.named_buffers():
        if n in frozen:
            assert torch.equal(b, frozen[n])


def test_block_is_shared_combination_of_primitives_and_a_private_conv():
    torch.manual_seed(0)
    model = build("etr_nlp", DENSE, width=10, gamma=0.6).double()
    block = model.blocks[0]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w_conv, w_dil = (m.weight for m in block.primitives[:2])
    responses = torch.cat([F.conv2d(x, w_conv, padding=1), F.conv2d(x, w_dil, padding=2, dilation=2),
                           F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), F.max_pool2d(x, 3, 1, 1)], 1)
    shared = F.conv2d(responses, block.shared.weight, block.shared.bias)
    private = F.conv2d(x, block.specific["depth"].weight, block.specific["depth"].bias, padding=1)
    torch.testing.assert_close(block(x, "depth"), torch.relu(torch.cat([shared, private], 1)))
    assert shared.shape[1] == 6 and private.shape[1] == 4  # floor(gamma * C_out) shared channels


def test_first_block_shares_its_shared_channels_and_routes_the_rest():
    torch.manual_seed(0)
    model = build("etr_nlp", DENSE, width=10, gamma=0.5)
    x = torch.randn(2, 3, 6, 6)
    h = {t: model.blocks[0](x, t) for t in DENSE.tasks}
    for t in ("depth", "edge"):
        torch.testing.assert_close(h[t][:, :5], h["seg"][:, :5])  # one shared branch
        assert not torch.allclose(h[t][:, 5:], h["seg"][:, 5:])  # its own route


def test_a_task_loss_reaches_only_the_shared_combination_and_its_own_route(params_with_grad):
    torch.manual_seed(0)
    model = build("etr_nlp", DENSE, width=10)
    touched = params_with_grad(model, model(torch.randn(2, 3, 6, 6))["depth"].square().sum())
    shared = {f"blocks.{i}.shared.{p}" for i in range(2) for p in ("weight", "bias")}
    own = {f"blocks.{i}.specific.depth.{p}" for i in range(2) for p in ("weight", "bias")}
    assert touched == shared | own | {"heads.depth.0.weight", "heads.depth.0.bias"}


@pytest.mark.parametrize("gamma, shared", [(0.0, 0), (1.0, 8), (0.7, 5)])  # floor(0.7 * 8) = 5
def test_gamma_sets_the_split_from_private_to_fully_shared(gamma, shared):
    torch.manual_seed(0)
    model = build("etr_nlp", DENSE, width=8, gamma=gamma)
    block = model.blocks[1]
    assert block.shared_channels == shared
    assert (block.shared is None) == (shared == 0) and (not block.specific) == (shared == 8)
    out = model(torch.randn(2, 3, 6, 6))
    assert out["seg"].shape == (2, 4, 6, 6)
    if shared == 8:  # nothing private but the heads: every task reads the same features
        torch.testing.assert_close(model.features(torch.ones(1, 3, 6, 6), "seg"),
                                   model.features(torch.ones(1, 3, 6, 6), "edge"))


@pytest.mark.parametrize("gamma, channels", [(0.7, 90), (0.29, 100), (0.58, 50)])
def test_an_integer_share_is_not_lost_to_rounding(gamma, channels):
    # gamma * C_out is an integer here but rounds just below it in floating point; floor must give
    # that integer, the same count as a gamma 1e-9 larger, not one channel fewer.
    at, above = (ETRNLPBlock(["a"], 3, channels, g, ("avg_pool",)).shared_channels for g in (gamma, gamma + 1e-9))
    assert at == above == round(gamma * channels)


@pytest.mark.parametrize("kwargs, message", [
    ({"gamma": -1.0}, "gamma .* must be in \\[0, 1\\], got -1.0"), ({"gamma": 1.5}, "got 1.5"),
    ({"gamma": float("nan")}, "got nan"), ({"num_blocks": 0}, "num_blocks must be at least 1"),
    ({"primitives": ()}, "at least one primitive"), ({"primitives": ("sobel",)}, "unknown primitive 'sobel'"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("etr_nlp", DENSE, **kwargs)


def test_vectors_are_refused():
    with pytest.raises(ValueError, match="needs image inputs"):
        build("etr_nlp", Problem(("a", "b"), (4,)))


def test_registry_name_builds_the_catalogued_class():
    model = build("etr_nlp", DENSE)
    assert type(model) is ETRNLP and model.name == "etr_nlp"


def test_fixed_random_filters_have_variance_one_over_fan_in():
    """A fixed 3x3 primitive over C channels draws its weights from N(0, 1 / (9 C)), so its
    response keeps the scale of its input, as a variance-preserving random convolution should."""
    torch.manual_seed(0)
    model = build("etr_nlp", Problem(("a",), (16, 6, 6), {"a": 1}, dense=True), width=32)
    for block, channels in zip(model.blocks, (16, 32)):
        for conv in block.primitives[:2]:
            assert conv.weight.var().item() == pytest.approx(1 / (9 * channels), rel=0.1)


@pytest.mark.parametrize("kwargs, message", [({"in_channels": 0}, "^in_channels must be"),
                                             ({"channels": 0}, "^channels must be")])
def test_zero_input_or_block_channels_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ETRNLP(DENSE.tasks, out_dims=DENSE.out_dims, **{"in_channels": 3, **kwargs})


def test_an_image_level_problem_gets_one_vector_per_image():
    problem = Problem(("a", "b"), (3, 6, 6), {"a": 2, "b": 1}, dense=False)
    out = build("etr_nlp", problem, width=4)(torch.randn(2, 3, 6, 6))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 1)
