"""TaskDiffusion: cosine log-SNR schedule, DDIM step, joint task map, cross-task gating, training."""

import math

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.taskdiffusion import (
    TaskDiffusion,
    alpha_sigma,
    cosine_log_snr,
    cross_task_mix,
)

TASKS = ("seg", "depth", "normals")
OUT = {"seg": 3, "depth": 1, "normals": 3}


def make(device, **kw):
    torch.manual_seed(0)
    return TaskDiffusion(TASKS, 3, OUT, channels=8, **kw).to(device)


def test_log_snr_schedule_is_the_cosine_schedule_by_hand():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    theta = (t + 2e-4) / (1 + 2.5e-4) * math.pi / 2
    alpha, sigma = alpha_sigma(cosine_log_snr(t))
    torch.testing.assert_close(alpha, torch.cos(theta))
    torch.testing.assert_close(sigma, torch.sin(theta))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    ends = alpha_sigma(cosine_log_snr(torch.tensor([0.0, 1.0])))[0]
    assert ends[0] > 0.99 and ends[1] < 0.01  # clean at t = 0, pure noise at t = 1


def test_ddim_step_by_hand_and_exact_when_the_clean_estimate_is_right():
    l_now, l_next = cosine_log_snr(torch.tensor(0.8)), cosine_log_snr(torch.tensor(0.3))
    (a, s), (a2, s2) = alpha_sigma(l_now), alpha_sigma(l_next)
    z0, eps = torch.randn(5), torch.randn(5)
    z_t = a * z0 + s * eps
    torch.testing.assert_close(TaskDiffusion.ddim_step(z_t, z0, l_now, l_next), a2 * z0 + s2 * eps)
    wrong = z0 + 1.0
    by_hand = a2 * wrong + s2 * (z_t - a * wrong) / s
    torch.testing.assert_close(TaskDiffusion.ddim_step(z_t, wrong, l_now, l_next), by_hand)


def test_step_times_follow_the_asymmetric_intervals():
    model = make("cpu")
    expected = [(1.0, 1 / 3), (2 / 3, 0.0), (1 / 3, 0.0)]
    for got, want in zip(model.step_times(), expected):
        assert got == pytest.approx(want)


def test_cross_task_mix_by_hand():
    g = torch.Generator().manual_seed(0)
    gates, feats = torch.randn(2, 3, 3, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    mixed = cross_task_mix(gates, feats)
    for i in range(3):
        by_hand = sum(torch.sigmoid(gates[:, i, j, None]) * feats[:, j] for j in range(3))
        torch.testing.assert_close(mixed[:, i], by_hand)


def test_one_joint_map_for_all_tasks_and_other_tasks_labels_change_a_task(device):
    model = make(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    targets = {t: torch.randn(2, d, 6, 6, device=device) for t, d in OUT.items()}
    joint = model.encode_tasks(targets)
    assert joint.shape == (2, 8, 6, 6) and joint.abs().max() < 0.01  # one map, squashed to scale
    with torch.no_grad():
        before = model.denoising_outputs(x, targets, torch.Generator().manual_seed(0))
        moved = dict(targets, depth=targets["depth"] + 3.0)  # only another task's label changes
        after = model.denoising_outputs(x, moved, torch.Generator().manual_seed(0))
    assert (after["seg"] - before["seg"]).abs().max() > 1e-7


def test_each_task_reads_every_tasks_features_and_heads_mix_only_across_steps(device, params_with_grad):
    x = torch.randn(2, 3, 6, 6, device=device)
    own = ("heads.depth", "refiners.depth", "decoder.specific.depth")
    one_step = make(device, num_steps=1)
    names = params_with_grad(one_step, one_step(x)["seg"].square().mean())
    for t in TASKS:
        assert any(n.startswith(f"decoder.task_features.{t}.") for n in names), t  # cross-task gates
    assert not any(n.startswith(own) for n in names)
    specific = {id(p) for t in ("depth", "normals") for p in one_step.task_specific_parameters(t)}
    assert specific and all(id(p) not in specific for n, p in one_step.named_parameters() if n in names)
    # Joint denoising: another task's earlier prediction re-enters through the joint map.
    three_steps = make(device, num_steps=3)
    names = params_with_grad(three_steps, three_steps(x)["seg"].square().mean())
    assert any(n.startswith(own) for n in names)
    assert any(n.startswith("label_encoders.depth.") for n in names)
    assert list(three_steps.task_specific_parameters("depth")) == []


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("taskdiffusion", device)
    for dense in (True, False):
        first, last = short_training("taskdiffusion", dense, device, steps=20)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("taskdiffusion", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_zero_denoising_steps_is_refused_when_built():
    with pytest.raises(ValueError, match="at least one denoising step, got num_steps=0"):
        registry.build("taskdiffusion", registry.Problem(("a",), (3, 8, 8), {"a": 1}, dense=True), num_steps=0)


def test_gates_and_task_layers_are_film_modulated_convolutions_by_hand(device):
    """As the code's ``Conv_withtime``: gate logits and each task's specific layer are a convolution
    modulated by the time embedding, ``conv(x) (1 + scale) + shift``, with no activation after it."""
    torch.manual_seed(0)
    model = make(device)
    dec, c = model.decoder, 8
    noisy, feats, time = (torch.randn(2, c, 5, 5, device=device), torch.randn(2, c, 5, 5, device=device),
                          torch.randn(2, c, device=device))

    def film_conv(layer, x):
        scale, shift = layer.film(time)[:, :, None, None].chunk(2, dim=1)
        return layer.conv(x) * (1 + scale) + shift

    with torch.no_grad():
        shared = noisy
        for layer in dec.shared:
            shared = layer(shared, time)
        gates = film_conv(dec.gates, shared).reshape(2, 3, 3, 5, 5)
        task_feats = torch.stack([dec.task_features[t](feats) for t in TASKS], dim=1)
        out = dec(noisy, feats, time)
        for i, t in enumerate(TASKS):
            mixed = sum(torch.sigmoid(gates[:, i, j, None]) * task_feats[:, j] for j in range(3))
            torch.testing.assert_close(out[t], film_conv(dec.specific[t], mixed))


def test_task_feature_readers_use_gelu(device):
    """Each task's features F_j: 3x3 convolution, GELU, 1x1 convolution (the code's ``feat_task``)."""
    torch.manual_seed(0)
    model = make(device)
    x = torch.randn(2, 8, 5, 5, device=device)
    with torch.no_grad():
        for t in TASKS:
            reader = model.decoder.task_features[t]
            first, second = [m for m in reader.modules() if isinstance(m, torch.nn.Conv2d)]
            torch.testing.assert_close(reader(x), second(torch.nn.functional.gelu(first(x))))


def test_task_encoding_is_a_zero_centred_squash_to_the_default_scale_by_hand():
    """Joint map = (2 sigmoid(fused) - 1) * 0.01: zero when the fused map is zero, odd in it, and
    bounded by the released configs' scale 0.01 (here 0.01 tanh(b / 2) for a constant fused map b)."""
    model = make("cpu")
    maps = {t: torch.randn(2, d, 3, 3) for t, d in OUT.items()}
    b = torch.tensor([-4.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0, 6.0])
    with torch.no_grad():
        model.integrate.weight.zero_()
        model.integrate.bias.copy_(b)
        joint = model.encode_tasks(maps)
    torch.testing.assert_close(joint, (0.01 * torch.tanh(b / 2))[None, :, None, None].expand(2, 8, 3, 3))
    model = make("cpu")
    with torch.no_grad():
        embedded = torch.cat([torch.nn.functional.conv2d(maps[t], model.label_encoders[t].weight,
                                                         model.label_encoders[t].bias) for t in TASKS], dim=1)
        fused = torch.nn.functional.conv2d(embedded, model.integrate.weight, model.integrate.bias)
        torch.testing.assert_close(model.encode_tasks(maps), (2 * torch.sigmoid(fused) - 1) * 0.01)


def test_training_noises_the_encoded_labels_as_alpha_z0_plus_sigma_eps(monkeypatch):
    """Two label sets, same noise draw: the noisy maps differ by alpha_t (z0 - z0'), with alpha_t the
    signal scale of the log-SNR handed to the decoder, and the rest is sigma_t eps."""
    model = make("cpu")
    x = torch.randn(3, 3, 4, 4)
    seen = []
    monkeypatch.setattr(model, "decode", lambda feats, noisy, log_snr: seen.append((noisy, log_snr)) or {})
    labels = [{t: torch.randn(3, d, 4, 4) for t, d in OUT.items()} for _ in range(2)]
    with torch.no_grad():
        for targets in labels:
            model.denoising_outputs(x, targets, torch.Generator().manual_seed(3))
        z0 = [model.encode_tasks(targets) for targets in labels]
    (noisy, log_snr), (noisy2, log_snr2) = seen
    torch.testing.assert_close(log_snr, log_snr2)
    alpha, sigma = (s[:, None, None, None] for s in alpha_sigma(log_snr))
    assert (alpha - sigma).abs().min() > 0.05  # the two scales tell a swap apart
    torch.testing.assert_close(noisy - noisy2, alpha * (z0[0] - z0[1]))
    eps = (noisy - alpha * z0[0]) / sigma
    g = torch.Generator().manual_seed(3)
    u = torch.rand(3, generator=g)  # the time draw comes first (uniform, kept below 1), then the noise
    torch.testing.assert_close(log_snr, cosine_log_snr(u * 0.999))
    torch.testing.assert_close(eps, torch.randn(eps.shape, generator=g))


def test_film_scale_and_shift_are_a_linear_map_of_the_silu_of_the_time_embedding(device):
    """Every FiLM convolution: conv(x) (1 + scale) + shift with [scale; shift] = W silu(time) + b, from the weights."""
    model = make(device).double()
    dec = model.decoder
    time = 3 * torch.randn(2, 8, device=device, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, device=device, dtype=torch.float64)
    layers = [dec.gates, *(layer.modulated for layer in dec.shared), *dec.specific.values()]
    for layer in layers:
        linear = layer.film[-1]
        scale, shift = torch.nn.functional.linear(torch.nn.functional.silu(time), linear.weight, linear.bias).chunk(2, 1)
        conv = torch.nn.functional.conv2d(x, layer.conv.weight, layer.conv.bias, padding=layer.conv.padding)
        want = conv * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        torch.testing.assert_close(layer(x, time), want, rtol=1e-10, atol=1e-10)


def _time_conv(layer, x, time, residual):
    """TimeConv by hand: FiLM convolution, GELU, 1x1 convolution, plus the input if residual."""
    scale, shift = layer.modulated.film(time)[:, :, None, None].chunk(2, dim=1)
    y = layer.modulated.conv(x) * (1 + scale) + shift
    y = layer.out(torch.nn.functional.gelu(y))
    return x + y if residual else y


def test_decode_by_hand(device):
    """Time embedding of the log-SNR; [features; noisy map] projected and denoised by non-residual
    TimeConvs into gates; task readers see the image features; then residual refiners and a head."""
    model = make(device)
    feats, noisy = torch.randn(2, 8, 5, 5, device=device), torch.randn(2, 8, 5, 5, device=device)
    log_snr = torch.tensor([-1.5, 2.0], device=device)
    dec = model.decoder
    with torch.no_grad():
        time = model.time(log_snr)
        shared = model.condition_input(torch.cat([feats, noisy], 1))
        for layer in dec.shared:
            shared = _time_conv(layer, shared, time, residual=False)
        scale, shift = dec.gates.film(time)[:, :, None, None].chunk(2, dim=1)
        gates = (dec.gates.conv(shared) * (1 + scale) + shift).reshape(2, 3, 3, 5, 5)
        read = torch.stack([dec.task_features[t](feats) for t in TASKS], dim=1)
        out = model.decode(feats, noisy, log_snr)
        for i, t in enumerate(TASKS):
            mixed = sum(torch.sigmoid(gates[:, i, j, None]) * read[:, j] for j in range(3))
            scale, shift = dec.specific[t].film(time)[:, :, None, None].chunk(2, dim=1)
            one_by_one = dec.specific[t].conv  # a 1x1 convolution: a per-pixel linear map
            y = torch.einsum("oc,bchw->bohw", one_by_one.weight[:, :, 0, 0], mixed) + one_by_one.bias[:, None, None]
            y = y * (1 + scale) + shift
            for block in model.refiners[t]:
                y = _time_conv(block, y, time, residual=True)
            torch.testing.assert_close(out[t], model.heads[t](y))


def test_sampler_by_hand_from_pure_noise(device):
    """DDIM from N(0, I) drawn from the generator: decode, re-encode the predictions as z0, step to the
    next time of step_times(); the last step's predictions are the outputs, pooled by the spatial mean."""
    model = make(device).double()
    x = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float64)
    with torch.no_grad():
        model.condition_input.weight[:, 8:] *= 100  # let the noisy map weigh on the answer
        feats = model.backbone(x)
        z = torch.randn(feats.shape, generator=torch.Generator().manual_seed(5)).to(feats)
        for now, nxt in [(1.0, 1 / 3), (2 / 3, 0.0), (1 / 3, 0.0)]:
            l_now, l_next = (cosine_log_snr(torch.full((2,), v, device=device)) for v in (now, nxt))
            preds = model.decode(feats, z, l_now)
            (a, s), (a2, s2) = (tuple(u[:, None, None, None] for u in alpha_sigma(v)) for v in (l_now, l_next))
            z0 = model.encode_tasks(preds)
            z = a2 * z0 + s2 * (z - a * z0) / s
        out = model(x, torch.Generator().manual_seed(5))
        other = model(x, torch.Generator().manual_seed(6))
        model.dense = False
        pooled = model(x, torch.Generator().manual_seed(5))
    for t in TASKS:
        torch.testing.assert_close(out[t], preds[t])
        torch.testing.assert_close(pooled[t], preds[t].mean(dim=(2, 3)))
        assert (other[t] - out[t]).abs().max() > 1e-6  # the start is noise: another draw, another answer


def test_refiner_count_is_two_by_default_and_follows_num_blocks_after_shared_time_convs():
    """'3 refiner blocks per task (2 here)': num_blocks residual TimeConvs per task; before the gates the
    decoder runs shared (non-residual) time-conditioned convolutions."""
    from reference_impls.architectures.taskdiffusion import TimeConv

    assert all(len(blocks) == 2 for blocks in make("cpu").refiners.values())
    model = make("cpu", num_blocks=3)
    assert all(len(blocks) == 3 and all(b.residual for b in blocks) for blocks in model.refiners.values())
    shared = list(model.decoder.shared)
    assert shared and all(isinstance(layer, TimeConv) and not layer.residual for layer in shared)


def test_the_training_pass_runs_without_a_generator_and_in_double_precision():
    """denoising_outputs draws from the global RNG when given no generator, and keeps the model's dtype."""
    model = make("cpu").double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    targets = {t: torch.randn(2, d, 4, 4, dtype=torch.float64) for t, d in OUT.items()}
    torch.manual_seed(0)
    out = model.denoising_outputs(x, targets)
    assert all(out[t].dtype == torch.float64 and out[t].shape == targets[t].shape for t in TASKS)


def test_with_two_or_more_steps_no_parameter_is_task_specific():
    """After every step but the last the predictions are re-encoded into the joint map all tasks decode
    next, so only a one-step sampler has task-specific parts."""
    assert list(make("cpu", num_steps=1).task_specific_parameters("seg"))
    for steps in (2, 3):
        assert not list(make("cpu", num_steps=steps).task_specific_parameters("seg"))
