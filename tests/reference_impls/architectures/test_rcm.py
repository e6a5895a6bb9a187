"""RCM: frozen bank, learning modulators, identity modulator = shared conv, no interference."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.rcm import Modulator, RCMConv2d, RCMNet

TASKS = ("a", "b")
OUT = {"a": 2, "b": 1}


def make(normalized=True, channels=(6, 8)):
    torch.manual_seed(0)
    return RCMNet(TASKS, 3, OUT, channels=channels, normalized=normalized)


def perturb_modulators(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("normalized", [True, False])
def test_identity_modulator_equals_shared_conv(device, normalized):
    torch.manual_seed(0)
    conv = RCMConv2d(3, 5, TASKS, normalized=normalized).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    torch.testing.assert_close(conv(x, "a"), conv.shared_conv(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.task_weight("b"), conv.filter_bank)


def test_composed_weight_equals_bank_then_modulator(device):
    torch.manual_seed(0)
    conv = RCMConv2d(3, 5, TASKS).to(device)
    perturb_modulators(conv)
    x = torch.randn(2, 3, 6, 6, device=device)
    bank_out = conv.shared_conv(x)
    mixed = torch.einsum("om,bmhw->bohw", conv.modulators["a"].matrix(), bank_out)
    torch.testing.assert_close(conv(x, "a"), mixed, rtol=1e-4, atol=1e-5)


def test_nff_rows_have_norm_equal_to_gain(device):
    torch.manual_seed(0)
    conv = RCMConv2d(3, 5, TASKS).to(device)
    perturb_modulators(conv)
    m = conv.modulators["a"]
    torch.testing.assert_close(m.matrix().norm(dim=1), m.gain.abs())


def test_filter_bank_gets_no_gradient_modulators_do(device):
    model = make().to(device)
    perturb_modulators(model)
    x = torch.randn(2, 3, 5, 5, device=device)
    sum(o.square().mean() for o in model(x).values()).backward()
    for conv in model.convs:
        assert not conv.filter_bank.requires_grad and conv.filter_bank.grad is None
        assert all(id(conv.filter_bank) != id(p) for p in model.parameters())
        for t in TASKS:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.modulators[t].parameters())
    assert model.shared_parameters() == []


def test_training_task_a_leaves_task_b_output_bitwise_unchanged(device):
    model = make().to(device)
    x = torch.randn(4, 3, 5, 5, device=device)
    before_b = model.forward_task(x, "b").detach().clone()
    before_a = model.forward_task(x, "a").detach().clone()
    bank = [c.filter_bank.clone() for c in model.convs]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model.forward_task(x, "a").square().mean().backward()
        opt.step()
    assert torch.equal(model.forward_task(x, "b"), before_b)
    assert not torch.allclose(model.forward_task(x, "a"), before_a)
    assert all(torch.equal(b, c.filter_bank) for b, c in zip(bank, model.convs))


def test_task_a_loss_gives_zero_grad_to_task_b(device):
    model = make().to(device)
    model.forward_task(torch.randn(2, 3, 5, 5, device=device), "a").sum().backward()
    assert all(p.grad is None for p in model.task_specific_parameters("b"))
    assert all(p.grad is not None for p in model.task_specific_parameters("a"))


@pytest.mark.parametrize("normalized", [True, False])
def test_parameter_count(normalized):
    channels = (6, 8)
    model = make(normalized=normalized, channels=channels)
    per_task = {t: sum(c * c + (c if normalized else 0) for c in channels) + 8 * o + o for t, o in OUT.items()}
    assert sum(p.numel() for p in model.parameters()) == sum(per_task.values())
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    frozen = sum(c.filter_bank.numel() for c in model.convs)
    assert frozen == 3 * 6 * 9 + 6 * 8 * 9


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("rcm", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("rcm", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_nff_matrix_is_signed_gain_times_unit_rows(device):
    """NFF: W_t[o] = g_o v_o / ||v_o||, with the gain's sign kept (not only its magnitude)."""
    torch.manual_seed(0)
    m = RCMConv2d(3, 4, TASKS).to(device).modulators["a"]
    with torch.no_grad():
        m.direction.copy_(torch.randn(4, 4, device=device))
        m.gain.copy_(torch.tensor([2.0, -1.5, 0.5, -3.0], device=device))
    v = m.direction.detach()
    expected = m.gain.detach()[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(m.matrix(), expected)


def test_defaults_use_nff_modulators():
    """The docstring's default is the weight-normalised modulator, for the layer and for the network."""
    assert Modulator(4, 4).gain is not None
    assert RCMConv2d(3, 4, TASKS).modulators["a"].gain is not None
    model = RCMNet(TASKS, 3, OUT)
    assert all(conv.modulators[t].gain is not None for conv in model.convs for t in TASKS)


def test_features_apply_a_relu_after_every_reparameterised_convolution():
    torch.manual_seed(0)
    model = registry.build("rcm", registry.Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 1}, dense=True))
    x = torch.randn(2, 3, 8, 8)
    for task in model.tasks:
        expected = x
        for conv in model.convs:
            expected = torch.relu(conv(expected, task))
        torch.testing.assert_close(model.features(x, task), expected)
        assert (model.features(x, task) >= 0).all() and (model.features(x, task) == 0).any()


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_reparameterised_convolution_keeps_the_spatial_size_for_any_odd_kernel(kernel_size):
    """Padding k // 2 on each side: the task's convolution, like the bank's, is "same"-sized."""
    torch.manual_seed(0)
    conv = RCMConv2d(3, 4, TASKS, kernel_size=kernel_size)
    x = torch.randn(2, 3, 6, 7)
    assert conv(x, "a").shape == conv.shared_conv(x).shape == (2, 4, 6, 7)


def test_the_network_predicts_dense_maps_by_default():
    """RCM is a dense-prediction method (segmentation, depth, ...): by default every head keeps the
    input's resolution."""
    model = make()
    out = model(torch.randn(2, 3, 5, 5))
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: (2, o, 5, 5) for t, o in OUT.items()}


def test_from_problem_passes_options_on_to_the_network():
    """``build("rcm", problem, normalized=False)`` must give plain modulators, not silently NFF ones."""
    problem = registry.Problem(("a", "b"), (3, 6, 6), {"a": 1, "b": 1}, dense=True)
    plain = registry.build("rcm", problem, normalized=False)
    assert all(conv.modulators[t].gain is None for conv in plain.convs for t in problem.tasks)
