"""TSN: outputs differ only through the task code; all weights shared; constant size."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.tsn import AdaIN, TaskSwitchingNetwork

TASKS = ("a", "b", "c")
OUT = {"a": 2, "b": 2, "c": 1}


def make(tasks=TASKS, out=OUT, **kw):
    torch.manual_seed(0)
    return TaskSwitchingNetwork(tasks, 3, out, channels=6, latent_dim=5, **kw)


def test_same_code_same_output_other_code_other_output(device):
    model = make().to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    out = model(x)
    assert not torch.allclose(out["a"], out["b"])
    with torch.no_grad():
        model.task_codes[1] = model.task_codes[0]
    out = model(x)
    assert torch.equal(out["a"], out["b"])
    assert torch.equal(out["c"], model.decode_with_code(model.encode(x), model.task_codes[2])[:, :1])


def test_every_parameter_is_shared(device):
    model = make().to(device)
    for t in TASKS:
        assert list(model.task_specific_parameters(t)) == []
    assert len(model.shared_parameters()) == len(list(model.parameters()))
    assert "task_codes" not in dict(model.named_parameters())


def test_one_task_loss_reaches_every_parameter(device):
    model = make().to(device)
    model.decode_task(model.encode(torch.randn(2, 3, 6, 6, device=device)), "a").square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_parameter_count_is_independent_of_task_count():
    c, lat, code, k, in_c = 6, 5, 8, 9, 3
    expected = (
        (in_c * c * k + c) + (c * c * k + c)  # encoder
        + (code * lat + lat) + (lat * lat + lat)  # task embedding network
        + 2 * (c * c * k) + 2 * (lat * 2 * c + 2 * c)  # bias-free decoder convs + AdaIN styles
        + (c * 2 + 2)  # shared output layer, max(out_dims) = 2
    )
    two = make(("a", "b"), {"a": 2, "b": 1})
    three = make()
    assert sum(p.numel() for p in two.parameters()) == expected
    assert sum(p.numel() for p in three.parameters()) == expected


def test_adain_output_has_predicted_statistics(device):
    torch.manual_seed(0)
    adain = AdaIN(4, 3).to(device)
    x = 5 * torch.randn(2, 4, 8, 8, device=device) + 3
    w = torch.randn(3, device=device)
    gamma, beta = adain.to_style(w).chunk(2)
    y = adain(x, w)
    torch.testing.assert_close(y.mean(dim=(2, 3)), beta.expand(2, 4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.std(dim=(2, 3), unbiased=False), gamma.abs().expand(2, 4), atol=1e-3, rtol=1e-3)


def test_too_many_tasks_rejected():
    with pytest.raises(ValueError):
        make(code_dim=2)


def test_output_shapes(device):
    model = make().to(device)
    out = model(torch.randn(2, 3, 6, 6, device=device))
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: (2, d, 6, 6) for t, d in OUT.items()}


@pytest.mark.parametrize("dense", (True,))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("tsn", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("tsn", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_decoder_is_adain_conditioned_at_every_layer_by_hand(device):
    """Each decoder layer is LeakyReLU(AdaIN(conv(z), E(c_t))), the style from the task's own code."""
    model = make().to(device)
    z = torch.randn(2, 6, 5, 5, device=device)
    for i, t in enumerate(TASKS):
        w = model.task_embedding(torch.eye(8, device=device)[i])
        h = z
        for conv, adain in zip(model.decoder_convs, model.decoder_adains):
            gamma, beta = (adain.to_style.weight @ w + adain.to_style.bias).chunk(2)
            u = conv(h)
            mu = u.mean(dim=(2, 3), keepdim=True)
            sd = (u.var(dim=(2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
            h = torch.nn.functional.leaky_relu(gamma.view(1, -1, 1, 1) * (u - mu) / sd + beta.view(1, -1, 1, 1), 0.01)
        torch.testing.assert_close(model.decode_task(z, t), model.output(h)[:, : OUT[t]])


def test_decoder_activation_keeps_negative_values_like_the_official_leaky_relu(device):
    """The official convrelu block ends in nn.LeakyReLU() (slope 0.01), not ReLU."""
    model = make().to(device)
    z = torch.randn(2, 6, 5, 5, device=device)
    w = model.task_embedding(model.task_codes[0])
    pre = model.decoder_adains[0](model.decoder_convs[0](z), w)
    h = torch.nn.functional.leaky_relu(pre, 0.01)
    pre2 = model.decoder_adains[1](model.decoder_convs[1](h), w)
    expected = model.output(torch.nn.functional.leaky_relu(pre2, 0.01))[:, :2]
    assert (pre < 0).any()
    torch.testing.assert_close(model.decode_task(z, "a"), expected)


def test_adain_starts_near_the_identity_restyle_as_the_official_style_layers():
    # the official style layer's bias is 1 for the scale and 0 for the shift, so a fresh AdaIN
    # passes the normalised features through (plus what the weights add), not about zero times them
    torch.manual_seed(0)
    adain = AdaIN(channels=6, latent_dim=4)
    assert torch.equal(adain.to_style.bias[:6], torch.ones(6))
    assert torch.equal(adain.to_style.bias[6:], torch.zeros(6))
    with torch.no_grad():
        adain.to_style.weight.zero_()
    x = torch.randn(1, 6, 5, 5)
    normalised = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.var(dim=(2, 3), keepdim=True, unbiased=False)
                                                           + adain.eps).sqrt()
    torch.testing.assert_close(adain(x, torch.randn(4)), normalised)


def test_the_encoder_is_a_stack_of_relu_convolutions_and_the_task_embedding_has_a_relu():
    from torch.nn import functional as F

    torch.manual_seed(0)
    model = registry.build("tsn", registry.Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=True))
    x = torch.randn(2, 3, 8, 8)
    expected = x
    for block in model.encoder:
        expected = F.relu(block[0](expected))
    torch.testing.assert_close(model.encode(x), expected)
    first, second = model.task_embedding[0], model.task_embedding[-1]
    code = -torch.ones(1, first.in_features)  # a code whose first layer has negative entries
    assert (first(code) < 0).any()
    torch.testing.assert_close(model.task_embedding(code), second(F.relu(first(code))))


def test_up_to_code_dim_tasks_fit_and_a_width_of_zero_is_refused():
    """The docstring: parameters do not grow "up to ``code_dim`` tasks", so code_dim tasks get the one-hot codes."""
    model = make(code_dim=3)
    assert torch.equal(model.task_codes, torch.eye(3))
    with pytest.raises(ValueError, match="channels must be at least 1, got 0"):
        TaskSwitchingNetwork(TASKS, 3, OUT, channels=0)


def test_from_problem_needs_a_dense_image_problem_and_uses_the_width():
    """The decoder is dense: an image problem with image-level targets is refused, not given pixel maps."""
    with pytest.raises(ValueError):
        registry.build("tsn", registry.Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=False))
    model = registry.build("tsn", registry.Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), width=6)
    assert model.output.in_channels == 6 and model.encoder[0][0].out_channels == 6
