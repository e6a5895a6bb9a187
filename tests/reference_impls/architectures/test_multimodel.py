"""MultiModel: separable conv blocks and a noisy top-k mixture of experts shared by every task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.multimodel import (
    ConvBlock, ConvStep, MultiModel, normal_cdf, squared_cv, timing_signal)
from reference_impls.architectures.registry import Problem

VECTOR = Problem(("a", "b"), (12,), {"a": 3, "b": 1})


def make(device="cpu", **kw):
    torch.manual_seed(0)
    return MultiModel.from_problem(VECTOR, width=8, num_tokens=6, **kw).to(device)


def test_conv_step_is_relu_separable_conv_layer_norm_with_a_local_receptive_field(device):
    torch.manual_seed(0)
    step = ConvStep(4, 3).to(device)
    x = torch.randn(2, 8, 4, device=device)
    expected = step.pointwise(step.depthwise(F.relu(x).transpose(1, 2))).transpose(1, 2)
    torch.testing.assert_close(step(x), F.layer_norm(expected, (4,), step.norm.weight, step.norm.bias))
    assert step.depthwise.weight.shape == (4, 1, 3) and step.pointwise.weight.shape == (4, 4, 1)  # separable
    changed = x.clone()
    changed[:, 0] += 1.0
    torch.testing.assert_close(step(changed)[:, 2:], step(x)[:, 2:])  # kernel 3: one position each side
    assert not torch.allclose(step(changed)[:, :2], step(x)[:, :2])


def test_conv_block_adds_both_halves_to_the_input(device):
    torch.manual_seed(0)
    block = ConvBlock(4, (3, 7, 15, 31)).to(device)
    x = torch.randn(2, 6, 4, device=device)
    y = block.first(x)
    torch.testing.assert_close(block(x), x + block.second(x + y) + y)


def test_gates_keep_the_top_k_softmax_and_the_load_is_the_smooth_top_k_probability(device):
    model = make(device, num_experts=4, k=2)
    moe = model.experts
    with torch.no_grad():
        moe.w_gate.normal_()
        moe.w_noise.normal_()
    x = torch.randn(10, 8, device=device)
    clean, std = x @ moe.w_gate, F.softplus(x @ moe.w_noise) + 1e-2
    moe.eval()
    gates, load = moe.gates(x)
    top, index = clean.topk(2, dim=-1)
    torch.testing.assert_close(gates.gather(-1, index), torch.softmax(top, -1))
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(load, (gates > 0).float().sum(0))  # no noise at test time: the counts
    moe.train()
    state = moe.generator.get_state()
    gates, load = moe.gates(x)
    moe.generator.set_state(state)
    noisy = clean + torch.randn(clean.shape, generator=moe.generator).to(clean) * std
    top3 = noisy.topk(3, dim=-1).values
    torch.testing.assert_close(gates.gather(-1, noisy.topk(2, -1).indices), torch.softmax(top3[:, :2], -1))
    # an expert in the top k must stay above the third best noisy logit, one outside above the second
    inside = gates > 0
    threshold = torch.where(inside, top3[:, 2:3], top3[:, 1:2])
    torch.testing.assert_close(load, normal_cdf(clean - threshold, std).sum(0))


def test_balancing_loss_is_weighted_squared_cv_and_trains_the_noise(device):
    assert squared_cv(torch.ones(4)).item() == pytest.approx(0.0)
    assert squared_cv(torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)  # variance 1, mean 1
    model = make(device)
    out = model(torch.randn(4, 12, device=device))
    model.zero_grad()
    model.auxiliary_loss().backward()
    assert model.experts.w_noise.grad.abs().sum() > 0  # only the load estimate reaches the noise weights
    assert all(p.grad is None for p in model.heads.parameters())
    torch.testing.assert_close(model.auxiliary_loss(), 1e-2 * model._last_moe_loss)
    h = torch.randn(2, 5, 8, device=device)  # the loss of one MoE call, from its gates and load
    state = model.experts.generator.get_state()
    _, loss = model.experts(h)
    model.experts.generator.set_state(state)
    gates, load = model.experts.gates(h.reshape(-1, 8))
    torch.testing.assert_close(loss, squared_cv(gates.sum(0)) + squared_cv(load))
    assert out["a"].shape == (4, 3) and out["b"].shape == (4, 1)


def test_tasks_share_the_body_and_differ_only_in_their_output_nets(device):
    model = make(device).eval()
    x = torch.randn(3, 12, device=device)
    z = model.encode(x)
    pooled = F.relu(z).mean(1)
    out = model(x)
    for t in model.tasks:
        torch.testing.assert_close(out[t], model.heads[t](pooled))
        assert list(model.task_specific_parameters(t)) == list(model.heads[t].parameters())


def test_trains_and_refuses_bad_arguments(device, fit):
    model = make(device)
    x = torch.randn(8, 12, device=device)
    target = {"a": x[:, :3], "b": x[:, 3:4] - x[:, 4:5]}
    losses = fit(model, x, lambda out: sum((out[t] - target[t]).square().mean() for t in target)
                 + model.auxiliary_loss(), 30, 1e-2)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="num_experts"):
        MultiModel(("a",), (4,), {"a": 1}, num_experts=2, k=3)
    with pytest.raises(ValueError, match="kernels"):
        MultiModel(("a",), (4,), {"a": 1}, kernels=(3, 4, 5, 7))
    with pytest.raises(ValueError, match="dense"):
        MultiModel.from_problem(Problem(("a",), (2, 8, 8), {"a": 1}, dense=True))


def test_noise_is_added_in_training_even_when_every_expert_is_kept(device):
    # the released gating adds its noise whenever it trains (noisy_gating), also for k = num_experts,
    # where every expert is kept and the load is the plain count
    model = make(device, num_experts=3, k=3)
    moe = model.experts.train()
    with torch.no_grad():
        moe.w_gate.normal_()
        moe.w_noise.normal_()
    x = torch.randn(10, 8, device=device)
    clean, std = x @ moe.w_gate, F.softplus(x @ moe.w_noise) + 1e-2
    state = moe.generator.get_state()
    gates, load = moe.gates(x)
    moe.generator.set_state(state)
    noisy = clean + torch.randn(clean.shape, generator=moe.generator).to(clean) * std
    assert (gates - torch.softmax(clean, -1)).abs().max() > 1e-3
    torch.testing.assert_close(gates, torch.softmax(noisy, -1))
    torch.testing.assert_close(load, torch.full((3,), 10.0, device=device))


def test_timing_signal_by_hand():
    like = torch.zeros((), dtype=torch.float64)
    # dim 11: 5 timescales 1, 10, ..., 1e4 (rates 10^-i), sines then cosines, one zero column of padding
    rates = torch.tensor([1.0, 0.1, 0.01, 1e-3, 1e-4], dtype=torch.float64)
    p = torch.arange(4, dtype=torch.float64)[:, None]
    expected = torch.cat([(p * rates).sin(), (p * rates).cos(), torch.zeros(4, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(timing_signal(4, 11, like), expected)
    # from dim 32 up: 16 timescales, geometric from 1 to 1e4, the rest zero
    wide = timing_signal(3, 40, like)
    rates16 = 10.0 ** (-4 * torch.arange(16, dtype=torch.float64) / 15)
    torch.testing.assert_close(wide[2, :16], (2 * rates16).sin())
    torch.testing.assert_close(wide[2, 16:32], (2 * rates16).cos())
    assert (wide[:, 32:] == 0).all()


def test_encoder_adds_the_timing_signal_then_conv_blocks_moe_conv_blocks():
    model = make().eval().double()
    x = torch.randn(3, 12, dtype=torch.float64)
    h = model.inputs(x)
    h = h + timing_signal(h.shape[1], h.shape[2], h)
    for block in model.encoder_first:
        h = block(h)
    h, _ = model.experts(h)
    for block in model.encoder_second:
        h = block(h)
    torch.testing.assert_close(model.encode(x), h)


def test_default_kernels_and_number_of_conv_blocks():
    model = make(num_layers=4)
    assert len(model.encoder_first) == 2 and len(model.encoder_second) == 4  # num_layers // 2, then num_layers
    for block in (*model.encoder_first, *model.encoder_second):
        steps = (*block.first, *block.second)
        assert [step.depthwise.kernel_size[0] for step in steps] == [3, 7, 15, 31]
    single = make(num_layers=1)
    assert len(single.encoder_first) == 1 and len(single.encoder_second) == 1  # at least one block before


def test_moe_output_by_hand_residual_layer_norm_bias_free_relu_experts():
    model = make(num_experts=3, k=2).double()
    moe = model.experts.eval()
    assert not (moe.w_gate != 0).any()  # the gate starts at zero, as released
    with torch.no_grad():
        moe.w_gate.normal_()
        moe.norm.weight.normal_()
        moe.norm.bias.normal_()
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    tokens = h.reshape(-1, 8)
    gates, _ = moe.gates(tokens)
    mixed = torch.zeros_like(tokens)
    for n, expert in enumerate(moe.experts):
        first, last = expert[0], expert[2]
        assert first.bias is None and last.bias is None
        mixed += gates[:, n:n + 1] * (torch.relu(tokens @ first.weight.T) @ last.weight.T)
    expected = F.layer_norm(tokens + mixed, (8,), moe.norm.weight, moe.norm.bias, 1e-5)
    out, _ = moe(h)
    torch.testing.assert_close(out, expected.view(2, 5, 8))


def test_task_loss_trains_the_gate_through_the_gate_values(params_with_grad):
    model = make().eval()
    with torch.no_grad():
        model.experts.w_gate.normal_()
    reached = params_with_grad(model, model(torch.randn(4, 12))["a"].square().sum())
    assert "experts.w_gate" in reached


def test_normal_cdf_matches_the_gaussian_distribution_function():
    # the load estimate needs P(noise * std < x): checked against torch's own normal distribution
    x = torch.tensor([-2.0, -0.3, 0.0, 0.4, 1.5, 0.02], dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0, 0.3, 3.0, 0.01], dtype=torch.float64)
    expected = torch.distributions.Normal(torch.zeros_like(std), std).cdf(x)
    torch.testing.assert_close(normal_cdf(x, std), expected)


def test_timing_signal_with_two_timescales_spans_one_to_ten_thousand():
    # dim 4: two timescales, still the two ends 1 and 1e4 of the geometric range
    like = torch.zeros((), dtype=torch.float64)
    p = torch.arange(3, dtype=torch.float64)[:, None]
    rates = torch.tensor([1.0, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(timing_signal(3, 4, like), torch.cat([(p * rates).sin(), (p * rates).cos()], 1))


def test_separable_convolutions_have_no_bias_before_the_norm():
    # as released: neither the depthwise nor the pointwise convolution has a bias (a norm follows)
    step = ConvStep(4, 3)
    assert step.depthwise.bias is None and step.pointwise.bias is None
    assert sum(p.numel() for p in step.parameters()) == 4 * 3 + 4 * 4 + 2 * 4


def test_num_tokens_sets_the_sequence_length_and_missing_out_dims_default_to_one():
    torch.manual_seed(0)
    model = MultiModel(("a", "b"), (24,), {"a": 2}, dim=8, num_tokens=6)
    assert model.encode(torch.randn(2, 24)).shape == (2, 6, 8)  # 24 features cut into 6 tokens of 4
    out = model(torch.randn(2, 24))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 1)


def test_refuses_non_positive_sizes_and_a_negative_loss_weight_and_an_early_auxiliary_loss():
    for bad in ({"dim": 0}, {"num_layers": 0}, {"moe_loss_weight": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MultiModel(("a",), (4,), {"a": 1}, **bad)
    with pytest.raises(RuntimeError):
        MultiModel(("a",), (4,), {"a": 1}).auxiliary_loss()  # no forward pass yet
