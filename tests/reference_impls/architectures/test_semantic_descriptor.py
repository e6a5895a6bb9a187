"""Semantic descriptors: W(z) is linear in z; one-hot z = independent models, equal z = one model."""

import pytest
import torch
from torch import nn

from reference_impls.architectures import registry
from reference_impls.architectures.semantic_descriptor import DescriptorLinear, SemanticDescriptorNet

TASKS = ("a", "b", "c")


def linear_model(descriptors=None, shared_term=False, d=6, out=2):
    """f_P = identity: the paper's linear setting, one generated d -> out model per task."""
    torch.manual_seed(0)
    model = SemanticDescriptorNet(TASKS, nn.Identity(), d, {t: out for t in TASKS}, descriptors, shared_term)
    with torch.no_grad():
        model.generator.bias.normal_()  # non-zero biases so the hand computations check them too
    return model


def test_generated_weight_by_hand_and_linear_in_descriptor(device):
    torch.manual_seed(0)
    layer = DescriptorLinear(4, 3, descriptor_dim=5).to(device)
    with torch.no_grad():
        layer.bias.normal_()
    z1, z2 = torch.randn(5, device=device), torch.randn(5, device=device)
    w, b = layer.generate(z1)
    torch.testing.assert_close(w, sum(z1[i] * layer.weight[i] for i in range(5)))
    torch.testing.assert_close(b, sum(z1[i] * layer.bias[i] for i in range(5)))
    w_mix, _ = layer.generate(2 * z1 - 3 * z2)
    torch.testing.assert_close(w_mix, 2 * w - 3 * layer.generate(z2)[0])
    h = torch.randn(7, 4, 2, 2, device=device)  # per-pixel on maps
    torch.testing.assert_close(layer(h, z1), torch.einsum("oi,bihw->bohw", w, h) + b.view(1, -1, 1, 1))


def test_one_hot_descriptors_give_independent_linear_models(device, params_with_grad):
    model = linear_model().to(device)
    x = torch.randn(5, 6, device=device)
    out = model(x)
    for k, t in enumerate(TASKS):  # task k's model is exactly slice k of the generator
        torch.testing.assert_close(out[t], x @ model.generator.weight[k].T + model.generator.bias[k])
    model.zero_grad()
    out["a"].square().sum().backward()
    for g in (model.generator.weight.grad, model.generator.bias.grad):  # the generated bias is learned too
        assert g[0].abs().sum() > 0 and torch.count_nonzero(g[1:]) == 0  # b and c untouched


def test_equal_descriptors_give_one_shared_model(device):
    z = torch.tensor([0.5, -1.0, 2.0])
    model = linear_model(descriptors=z.expand(3, 3)).to(device)
    x = torch.randn(5, 6, device=device)
    out = model(x)
    w = sum(z[i] * model.generator.weight[i] for i in range(3))
    b = sum(z[i] * model.generator.bias[i] for i in range(3))
    for t in TASKS:
        torch.testing.assert_close(out[t], x @ w.T + b)
    assert torch.equal(out["a"], out["c"])


def test_one_hot_plus_constant_is_shared_weight_plus_task_offset(device):
    model = linear_model(shared_term=True).to(device)
    assert model.descriptors.tolist() == [[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]]
    x = torch.randn(5, 6, device=device)
    q, c = model.generator.weight, model.generator.bias
    torch.testing.assert_close(model(x)["b"], x @ (q[3] + q[1]).T + c[3] + c[1])


def test_unseen_descriptor_generates_a_model_zero_shot(device):
    """A descriptor mixing two tasks' codes generates the same mix of their predictions."""
    model = linear_model().to(device)
    x = torch.randn(4, 6, device=device)
    h = model.encode(x)
    out = model(x)
    mixed = model.decode_with_descriptor(h, torch.tensor([0.3, 0.7, 0.0], device=device))
    torch.testing.assert_close(mixed, 0.3 * out["a"] + 0.7 * out["b"])


def test_narrower_task_reads_the_leading_outputs_of_its_generated_layer(device):
    torch.manual_seed(0)
    model = SemanticDescriptorNet(TASKS, nn.Identity(), 6, {"a": 1, "b": 3, "c": 2}).to(device)
    x = torch.randn(4, 6, device=device)
    out = model(x)
    for k, t in enumerate(TASKS):
        full = model.decode_with_descriptor(x, model.descriptors[k])  # (4, 3): max(out_dims)
        torch.testing.assert_close(out[t], full[:, : out[t].shape[1]])


def test_a_one_hot_generated_weight_starts_at_nn_linear_scale():
    """Each slice Q_b is drawn like nn.Linear's weight: uniform in +-1/sqrt(in_features)."""
    torch.manual_seed(0)
    q = DescriptorLinear(16, 50, descriptor_dim=4).weight.detach()
    assert q.abs().max() <= 0.25 and q.abs().max() > 0.24
    assert q.std().item() == pytest.approx(0.25 / 3**0.5, rel=0.05)


def test_the_descriptors_are_fixed_at_construction():
    """The model keeps its own copy: changing the caller's tensor afterwards changes nothing."""
    codes = torch.eye(3)
    model = SemanticDescriptorNet(TASKS, nn.Identity(), 6, {t: 1 for t in TASKS}, codes)
    codes.fill_(7.0)
    assert torch.equal(model.descriptors, torch.eye(3))


def test_all_parameters_shared_and_bad_descriptors_rejected():
    model = linear_model()
    assert all(list(model.task_specific_parameters(t)) == [] for t in TASKS)
    assert "descriptors" not in dict(model.named_parameters())
    with pytest.raises(ValueError):
        SemanticDescriptorNet(TASKS, nn.Identity(), 6, {t: 1 for t in TASKS}, torch.eye(2))


def test_registry_builds_vector_and_dense_problems(device):
    vec = registry.build("semantic_descriptor", registry.Problem(("a", "b"), (10,), {"a": 1, "b": 3}), width=8)
    out = vec.to(device)(torch.randn(2, 10, device=device))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 3)
    img = registry.Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)
    out = registry.build("semantic_descriptor", img, width=8).to(device)(torch.randn(2, 3, 8, 8, device=device))
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("dense", (True, False))
def test_short_training_lowers_loss(device, dense, short_training):
    first, last = short_training("semantic_descriptor", dense, device, steps=15)
    assert last < 0.7 * first


def test_every_generated_bias_starts_at_zero(device):
    """The bias slices Q_b start at zero, so before training every described model (seen or
    zero-shot) maps a zero feature to a zero output."""
    torch.manual_seed(0)
    model = registry.build("semantic_descriptor", registry.Problem(TASKS, (5,), {"a": 2}), width=8).to(device)
    zero = torch.zeros(3, 8, device=device)
    for z in (*model.descriptors, torch.tensor([0.3, -1.2, 2.0], device=device)):
        assert torch.equal(model.decode_with_descriptor(zero, z), torch.zeros(3, 2, device=device))


def test_each_generated_output_has_its_own_bias():
    # the generated layer's bias is (out,): every output unit gets a bias of its own
    model = linear_model(out=3)
    weight, bias = model.generator.generate(model.descriptors[0])
    assert weight.shape == (3, 6) and bias.shape == (3,)
    assert model.generator.bias.shape == (3, 3)  # descriptor dim x outputs


def test_a_double_model_accepts_a_float_descriptor_from_the_caller():
    model = linear_model().double()
    weight, bias = model.generator.generate(torch.tensor([0.5, 0.5, 0.0]))
    assert weight.dtype == bias.dtype == torch.float64


def test_one_hot_descriptors_have_no_shared_column_unless_asked():
    from reference_impls.architectures.semantic_descriptor import one_hot_descriptors

    torch.testing.assert_close(one_hot_descriptors(3), torch.eye(3))
    torch.testing.assert_close(one_hot_descriptors(2, shared_term=True), torch.tensor([[1.0, 0, 1], [0, 1, 1]]))


def test_the_registry_passes_depth_and_keywords_on():
    problem = registry.Problem(("a", "b"), (10,), {"a": 1, "b": 3})
    model = registry.build("semantic_descriptor", problem, width=8, depth=3, shared_term=True)
    assert len(model.encoder.blocks) == 3 and model.descriptors.shape == (2, 3)
