"""CARE: attention over encoders is a distribution set by the context, output = weighted sum."""

import pytest
import torch

from reference_impls.architectures.care import CARE
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 2, "c": 1})
META = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, -1.0], [1.0, 0.0, 0.0, 2.0]])  # c = a


def test_attention_weights_are_a_distribution(device):
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=5).to(device)
    for t in VEC.tasks:
        alpha = model.attention_weights(t)
        assert alpha.shape == (5,) and (alpha >= 0).all()
        torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, device=device))


def test_output_is_the_attention_weighted_sum_of_encoders_plus_context(device):
    for problem in (VEC, Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)):
        torch.manual_seed(0)
        model = build("care", problem, width=6, num_encoders=3, context_dim=4).to(device)
        x = torch.randn(2, *problem.input_shape, device=device)
        out = model(x)
        for t in problem.tasks:
            meta = model.learned_metadata[t]
            z_context = model.context_encoder[2](torch.relu(model.context_encoder[0](meta)))
            alpha = torch.softmax(model.attention.weight @ z_context + model.attention.bias, dim=0)
            z_enc = sum(alpha[i] * model.encoders[i](x) for i in range(3))
            ctx = z_context.view(1, 4, *([1] * (z_enc.ndim - 2))).expand(2, 4, *z_enc.shape[2:])
            torch.testing.assert_close(out[t], model.heads[t](torch.cat([z_enc, ctx], dim=1)))


def test_context_decides_the_mixture(device):
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=4, metadata=META).to(device)
    alpha = {t: model.attention_weights(t) for t in VEC.tasks}
    assert torch.equal(alpha["a"], alpha["c"])  # same metadata, same mixture
    assert (alpha["a"] - alpha["b"]).abs().max() > 1e-3  # different metadata, different mixture
    model.temperature = 1e6  # a flat softmax: every task gets the uniform mixture
    torch.testing.assert_close(model.attention_weights("b"), torch.full((4,), 0.25, device=device))


def test_one_encoder_is_a_shared_encoder_with_the_context_appended(device):
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=1, context_dim=3).to(device)
    x = torch.randn(4, 5, device=device)
    for t in VEC.tasks:
        assert model.attention_weights(t).item() == 1.0
        ctx = model.context(t).expand(4, 3)
        torch.testing.assert_close(model(x)[t], model.heads[t](torch.cat([model.encoders[0](x), ctx], dim=1)))


def test_the_head_trains_the_context_through_z_context(device, params_with_grad):
    """With one encoder alpha is constant, so the context encoder learns only through [z_enc, z_context]."""
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=1, context_dim=3).to(device)
    touched = params_with_grad(model, model(torch.randn(4, 5, device=device))["a"].square().sum())
    assert {"context_encoder.2.weight", "context_encoder.2.bias", "learned_metadata.a"} <= touched
    assert "attention.weight" not in touched  # the softmax over one encoder has no gradient


def test_which_parameters_learn(device, params_with_grad):
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=3).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 5, device=device))["b"].square().sum())
    assert "learned_metadata.b" in touched and "attention.weight" in touched
    assert all(any(n.startswith(f"encoders.{i}.") for n in touched) for i in range(3))
    assert not any(n.startswith(("learned_metadata.a", "learned_metadata.c", "heads.a", "heads.c")) for n in touched)
    fixed = build("care", VEC, width=6, num_encoders=3, metadata=META).to(device)
    assert "metadata" in dict(fixed.named_buffers()) and fixed.learned_metadata is None
    touched = params_with_grad(fixed, fixed(torch.randn(8, 5, device=device))["b"].square().sum())
    assert "context_encoder.0.weight" in touched


def test_each_task_owns_its_metadata_and_head_only(device, split_by_task):
    """The encoders, context encoder and attention map are shared; a task's learned metadata and head are its own."""
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=3).to(device)
    split = split_by_task(model, torch.randn(4, 5, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"learned_metadata.{t}", f"heads.{t}."))
    fixed = build("care", VEC, width=6, num_encoders=3, metadata=META).to(device)
    split = split_by_task(fixed, torch.randn(4, 5, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(fixed, f"heads.{t}."))


def test_given_metadata_is_a_fixed_copy():
    torch.manual_seed(0)
    meta = META.clone()
    model = build("care", VEC, width=6, num_encoders=4, metadata=meta)
    before = model.attention_weights("b")
    meta.mul_(-3.0)  # the caller's tensor changes afterwards; the model's descriptions must not
    assert torch.equal(model.metadata, META) and torch.equal(model.attention_weights("b"), before)


def test_parameter_count(n_params):
    d, w, k, c, m = 5, 6, 3, 4, 8
    model = build("care", VEC, width=w, depth=1, num_encoders=k, context_dim=c, metadata_dim=m)
    encoders = k * (d * w + w)
    context = (m * c + c) + (c * c + c) + (c * k + k)
    heads = (w + c + 1) + 2 * (w + c + 1) + (w + c + 1)
    assert n_params(model) == encoders + context + 3 * m + heads
    assert isinstance(model, CARE)


def test_metadata_needs_one_row_per_task():
    with pytest.raises(ValueError):
        build("care", VEC, metadata=META[:2])


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("care", device)
    first, last = short_training("care", dense, device, steps=15)
    assert last < 0.7 * first


def test_given_metadata_row_i_is_the_context_of_task_i(device):
    """With a fixed metadata matrix, task i's context is g(row i), here with all three rows distinct."""
    meta = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0], [3.0, 1.0, 0.0]], device=device)
    torch.manual_seed(0)
    model = build("care", VEC, width=6, num_encoders=3, context_dim=4, metadata=meta).to(device)
    g = model.context_encoder
    for i, t in enumerate(VEC.tasks):
        by_hand = g[2].weight @ torch.relu(g[0].weight @ meta[i] + g[0].bias) + g[2].bias
        torch.testing.assert_close(model.context(t), by_hand)
