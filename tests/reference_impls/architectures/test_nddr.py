import copy

import torch

from reference_impls.architectures.nddr import NDDR
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 2, "c": 1})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 2, "b": 1}, dense=True)


def test_identity_initialised_reduction_equals_separate_networks(device):
    """With (1, 0) and no BN each task keeps its own features, so NDDR is K separate networks,
    K = 1 (a lone column) included."""
    for problem in (VEC, IMG, Problem(("a",), (5,), {"a": 2})):
        torch.manual_seed(3)
        model = build("nddr", problem, width=8, init=(1.0, 0.0), batch_norm=False).to(device)
        x = torch.randn(3, *problem.input_shape, device=device)
        out = model(x)
        for t in problem.tasks:
            alone = torch.nn.Sequential(copy.deepcopy(model.columns[t]), copy.deepcopy(model.heads[t]))
            torch.testing.assert_close(out[t], alone(x))


def test_diagonal_initialisation():
    model = build("nddr", VEC, width=4, init=(0.9, 0.1))
    w = model.fusions[0]["b"].reduce.weight  # (C, K*C), task b is index 1
    eye = torch.eye(4)
    torch.testing.assert_close(w, torch.cat([0.1 * eye, 0.9 * eye, 0.1 * eye], dim=1))


def test_gradients_follow_the_fusion(device, params_with_grad):
    torch.manual_seed(3)
    model = build("nddr", VEC, width=8, depth=2).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 5, device=device))["a"].sum())
    assert any(n.startswith("fusions.0.b") for n in touched)  # feeds column b, then a
    assert not any(n.startswith(("fusions.1.b", "fusions.1.c", "heads.b", "heads.c")) for n in touched)


def test_parameter_count(n_params):
    T, d, w, L = 3, 5, 8, 2
    model = build("nddr", VEC, width=w, depth=L)
    column = (d * w + w) + (w * w + w)
    fusion = w * T * w + 2 * w  # 1x1 conv without bias (BN follows), BN affine
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == T * column + L * T * fusion + heads


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links this paper to NDDR; the registry name must build exactly it."""
    model = build("nddr", VEC, width=4, init=(0.9, 0.1))
    assert type(model) is NDDR
    assert model.name == "nddr"


def test_nddr_layer_is_relu_of_batch_norm_of_the_reduction(device):
    """F_k <- ReLU(BN(W_k [F_1, ..., F_K])), BN in training mode over batch and positions,
    for image maps and for vectors alike."""
    for problem, shape in ((IMG, (3, 8, 5, 5)), (VEC, (6, 12))):
        torch.manual_seed(3)
        model = build("nddr", problem, width=4).to(device)
        layer = model.fusions[0]["a"]
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 2.0)
            layer.norm.bias.uniform_(-1.0, 1.0)
        concatenated = torch.randn(*shape, device=device)
        y = layer.reduce(concatenated)
        axes, view = (0, *range(2, y.ndim)), (1, -1, *[1] * (y.ndim - 2))
        mean, var = y.mean(dim=axes, keepdim=True), y.var(dim=axes, unbiased=False, keepdim=True)
        normed = (y - mean) / torch.sqrt(var + layer.norm.eps)
        expected = torch.relu(normed * layer.norm.weight.view(view) + layer.norm.bias.view(view))
        torch.testing.assert_close(layer(concatenated), expected)


def test_defaults_are_diagonal_init_09_01_with_batch_norm():
    """The docstring's defaults: (alpha, beta) = (0.9, 0.1) and batch norm on, at every layer."""
    model = build("nddr", VEC, width=4, depth=2)
    eye = torch.eye(4)
    for fusion in model.fusions:
        for k, t in enumerate(VEC.tasks):
            blocks = [(0.9 if i == k else 0.1) * eye for i in range(3)]
            torch.testing.assert_close(fusion[t].reduce.weight.detach(), torch.cat(blocks, dim=1))
            assert isinstance(fusion[t].norm, torch.nn.BatchNorm1d) and fusion[t].reduce.bias is None


def test_a_task_claims_exactly_its_last_fusion_and_head(split_by_task):
    """Fusion k at layer j < L feeds column k, which every task's next NDDR layer reads; only the last
    layer's fusion and the head are task k's alone, and task_specific_parameters must claim both."""
    for problem in (VEC, IMG):
        torch.manual_seed(3)
        model = build("nddr", problem, width=8, depth=3)
        last = len(model.fusions) - 1
        split = split_by_task(model, torch.randn(6, *problem.input_shape))
        assert_each_task_owns_exactly(split, lambda t: names_under(model, f"fusions.{last}.{t}.", f"heads.{t}."))


def test_without_batch_norm_each_reduction_has_a_bias(n_params):
    """The bias is left out only because BN would subtract it again; without BN the 1x1
    convolution keeps it (zero at first, so the identity initialisation still holds)."""
    T, d, w, L = 3, 5, 8, 2
    model = build("nddr", VEC, width=w, depth=L, batch_norm=False)
    column = (d * w + w) + (w * w + w)
    fusion = w * T * w + w
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == T * column + L * T * fusion + heads
    assert all(torch.equal(f.reduce.bias, torch.zeros(w)) for layer in model.fusions for f in layer.values())


def test_depth_sets_the_number_of_blocks_and_of_nddr_layers():
    """One NDDR layer per task after every block of the column: depth blocks, depth layers."""
    for depth in (1, 3):
        model = build("nddr", IMG, width=4, depth=depth)
        assert model.num_blocks == len(model.fusions) == len(model.columns["a"].blocks) == depth
