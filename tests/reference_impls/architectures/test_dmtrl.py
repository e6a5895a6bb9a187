import pytest
import torch

from reference_impls.architectures.dmtrl import DMTRL, DMTRLLayer, FactorisedTensor
from reference_impls.architectures.encoders import heads_for, trunk_for
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (3,), {"a": 1, "b": 2})
IMAGE = Problem(("a", "b"), (2, 5, 5), {"a": 1, "b": 2}, dense=True)


def test_tucker_tensor_is_the_core_times_its_factors():
    g = torch.Generator().manual_seed(0)
    t = FactorisedTensor(torch.randn(5, 4, 3, generator=g), "tucker", rank=2)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    s, (u1, u2, u3) = t.core, t.factors
    torch.testing.assert_close(t(), torch.einsum("abc,ia,jb,kc->ijk", s, u1, u2, u3))


def test_tensor_train_is_the_product_of_its_cores():
    g = torch.Generator().manual_seed(0)
    t = FactorisedTensor(torch.randn(5, 4, 3, generator=g), "tt", rank=2)
    g1, g2, g3 = t.factors
    assert (g1.shape, g2.shape, g3.shape) == ((1, 5, 2), (2, 4, 2), (2, 3, 1))
    expected = torch.einsum("xia,ajb,bky->ijk", g1, g2, g3)
    torch.testing.assert_close(t(), expected)
    for i, j, k in ((0, 0, 0), (4, 3, 2), (2, 1, 0)):  # entry = G1[i] G2[j] G3[k], a 1x1 product
        torch.testing.assert_close(t()[i, j, k], (g1[:, i] @ g2[:, j] @ g3[:, k]).squeeze())


@pytest.mark.parametrize("method", ("tucker", "tt"))
def test_full_rank_decomposition_reproduces_the_initial_weights(method):
    w = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(FactorisedTensor(w, method, rank=100)(), w)


def test_low_rank_tucker_ties_the_task_slices():
    w = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(1))
    tied = FactorisedTensor(w, "tucker", rank=1)()  # task mode rank 1: slices are multiples
    slices = tied.reshape(-1, 3)
    assert torch.linalg.matrix_rank(slices).item() == 1


def test_identity_factors_give_independent_networks(device):
    torch.manual_seed(0)
    model = build("dmtrl", VEC, width=4, depth=2, rank=10).to(device)
    with torch.no_grad():
        for layer in model.layers:
            for u in layer.weights.factors:
                assert u.shape[0] == u.shape[1]  # full rank in every mode
                u.copy_(torch.eye(u.shape[0]))
    x = torch.randn(5, 3, device=device)
    out = model(x)
    for k, t in enumerate(VEC.tasks):
        h = x
        for layer in model.layers:  # task k's network: the core's k-th slice as its weights
            h = torch.relu(h @ layer.weights.core[..., k].T + layer.biases[k])
        torch.testing.assert_close(out[t], model.heads[t](h))


def test_parameter_count_follows_the_tucker_and_tt_formulas(n_params):
    d, w, T, r = 3, 8, 2, 2
    heads = (w + 1) + (2 * w + 2)
    tucker = build("dmtrl", VEC, width=w, depth=2, rank=r)
    layer0 = r * r * r + (w * r + d * r + T * r)  # shape (w, d, T)
    layer1 = r * r * r + (w * r + w * r + T * r)  # shape (w, w, T)
    assert n_params(tucker) == layer0 + layer1 + 2 * T * w + heads
    tt = build("dmtrl", VEC, width=w, depth=2, rank=r, method="tt")
    layer0 = w * r + r * d * r + r * T  # TT ranks (1, r, r, 1)
    layer1 = w * r + r * w * r + r * T
    assert n_params(tt) == layer0 + layer1 + 2 * T * w + heads


def test_factors_are_shared_and_biases_task_specific(device, params_with_grad):
    torch.manual_seed(0)
    model = build("dmtrl", VEC, width=8).to(device)
    touched = params_with_grad(model, model(torch.randn(6, 3, device=device))["a"].sum())
    assert "layers.0.weights.core" in touched and "layers.1.weights.factors.2" in touched
    assert "layers.0.biases.0" in touched and "layers.0.biases.1" not in touched
    assert not any(n.startswith("heads.b") for n in touched)


def test_task_specific_parameters_are_own_biases_and_head(params_with_grad):
    """Task k claims its bias in every layer and its head; its output reaches those and the factors only."""
    torch.manual_seed(0)
    model = build("dmtrl", VEC, width=8)
    names = {id(p): n for n, p in model.named_parameters()}
    shared = {n for n in names.values() if ".weights." in n}
    for k, t in enumerate(VEC.tasks):
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert own == {f"layers.0.biases.{k}", f"layers.1.biases.{k}"} | {n for n in names.values() if n.startswith(f"heads.{t}.")}
        assert params_with_grad(model, model(torch.randn(6, 3))[t].sum()) == own | shared


@pytest.mark.parametrize("problem", (VEC, IMAGE), ids=("linear", "conv"))
def test_full_rank_start_is_the_single_task_networks_it_decomposes(problem):
    """At full rank the factorised layers start as exactly the per-task layers they were built from
    (weights and each task's own biases)."""
    torch.manual_seed(0)
    columns = [trunk_for(problem.input_shape, 4, 2).double() for _ in problem.tasks]  # decomposed in float64
    layers = [DMTRLLayer([c.blocks[j][0] for c in columns], "tt", rank=100) for j in range(2)]
    model = DMTRL(problem.tasks, layers, heads_for(problem, 4)).double()
    x = torch.randn(5, *problem.input_shape, dtype=torch.float64)
    out = model(x)
    for k, t in enumerate(VEC.tasks):
        torch.testing.assert_close(out[t], model.heads[t](columns[k](x)))


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    registry_output_shapes("dmtrl", device)
    for dense in (True, False):
        before, after = short_training("dmtrl", dense, device, 30)
        assert after < 0.5 * before


def test_registry_name_builds_the_catalogued_class():
    model = build("dmtrl", VEC)
    assert type(model) is DMTRL and model.name == "dmtrl"


def _exact_rank_two(method: str) -> torch.Tensor:
    """A 5 x 4 x 3 tensor of Tucker ranks (2, 2, 2), resp. tensor-train ranks (2, 2)."""
    g = torch.Generator().manual_seed(3)
    if method == "tucker":
        core = torch.randn(2, 2, 2, generator=g, dtype=torch.float64)
        u = [torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (5, 4, 3)]
        return torch.einsum("abc,ia,jb,kc->ijk", core, *u)
    g1, g2, g3 = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((5, 2), (2, 4, 2), (2, 3)))
    return torch.einsum("ia,ajb,bk->ijk", g1, g2, g3)


@pytest.mark.parametrize("method", ("tucker", "tt"))
def test_truncation_keeps_the_leading_singular_directions(method):
    """Truncated at the tensor's exact ranks, HOSVD and TT-SVD lose nothing: they keep the leading
    singular vectors, which span each unfolding's column space."""
    w = _exact_rank_two(method)
    torch.testing.assert_close(FactorisedTensor(w, method, rank=2)(), w)


def test_tensor_train_reproduces_a_tensor_with_an_odd_number_of_entries():
    """TT-SVD peels one mode at a time; no mode size or entry count is special (5 x 3 x 3 = 45)."""
    w = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(FactorisedTensor(w, "tt", rank=100)(), w)


def test_the_default_factorisation_is_tucker():
    """Tucker (the paper's first variant) unless told otherwise: a core and one factor per mode."""
    w = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    default = FactorisedTensor(w, rank=2)
    assert default.method == "tucker" and len(default.factors) == 3
    torch.testing.assert_close(default(), FactorisedTensor(w, "tucker", rank=2)())


def test_a_layer_on_its_own_uses_its_factors_and_one_task_is_a_model():
    """Without a precomputed tensor a layer reconstructs its own weights; a single task is a DMTRL too."""
    torch.manual_seed(0)
    model = build("dmtrl", Problem(("a",), (3,), {"a": 2}), width=4, depth=2)
    x = torch.randn(5, 3)
    layer = model.layers[0]
    torch.testing.assert_close(layer(x, 0), x @ layer.weights()[..., 0].T + layer.biases[0])
    h = torch.relu(layer(x, 0))
    torch.testing.assert_close(model(x)["a"], model.heads["a"](torch.relu(model.layers[1](h, 0))))
