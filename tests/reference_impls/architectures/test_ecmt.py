"""ECMT: nested slimmable SubNets; preference widens decoders, budget sets the encoder; CI-KD."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from reference_impls import train
from reference_impls.architectures.ecmt import ECMT, WIDTHS, SlimmableLayer
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under
from .harness_probe import harness_step

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})
IMAGE = Problem(("seg", "depth"), (3, 6, 6), {"seg": 4, "depth": 1}, dense=True)


def model_for(problem: Problem, device: torch.device) -> ECMT:
    torch.manual_seed(0)
    return build("ecmt", problem, width=8).to(device)


def test_slim_layer_is_the_leading_slice(device):
    torch.manual_seed(0)
    layer = SlimmableLayer(6, 8, image=True).to(device)
    x = torch.randn(2, 4, 5, 5, device=device)  # only 4 of 6 input channels
    expected = F.conv2d(x, layer.weight[:3, :4], layer.bias[:3], padding=1)
    torch.testing.assert_close(layer(x, 3), expected)
    vec = SlimmableLayer(6, 8, image=False).to(device)
    v = torch.randn(2, 5, device=device)
    torch.testing.assert_close(vec(v, 2), v @ vec.weight[:2, :5, 0, 0].T + vec.bias[:2])


def test_narrow_subnet_uses_only_leading_weights(device, params_with_grad):
    model = model_for(VEC, device)
    model.configure(0.5, {"a": 0.25, "b": 1.0, "c": 1.0})
    out = model(torch.randn(5, 6, device=device))
    model.zero_grad()
    out["a"].sum().backward()
    hidden_enc = model.encoder[0].weight.grad  # 8 channels at ratio 0.5 -> first 4 rows
    assert hidden_enc[:4].abs().sum() > 0 and hidden_enc[4:].abs().sum() == 0
    dec = model.decoders["a"][0].weight.grad  # 8 channels at 0.25 -> first 2 rows
    assert dec[:2].abs().sum() > 0 and dec[2:].abs().sum() == 0
    assert model.decoders["b"][0].weight.grad is None


def test_encoder_by_hand_slim_hidden_layer_full_width_output(device):
    """Width 8 at ratio 0.5: ReLU of the first 4 hidden units, then all 8 output units from those 4."""
    model = model_for(VEC, device)
    model.configure(0.5, {})
    x = torch.randn(3, 6, device=device)
    (w0, b0), (w1, b1) = ((layer.weight[:, :, 0, 0], layer.bias) for layer in model.encoder)
    hidden = torch.relu(x @ w0[:4].T + b0[:4])
    torch.testing.assert_close(model.encode(x), torch.relu(hidden @ w1[:, :4].T + b1))


def test_decoder_by_hand_relu_of_the_slim_hidden_layer_then_the_head(device):
    """Decoder at ratio 0.25 of width 8: head(ReLU(first 2 hidden units of z)), from the weights."""
    model = model_for(VEC, device).double()
    model.configure(1.0, {"b": 0.25})
    z = torch.randn(4, 8, device=device, dtype=torch.float64)
    (wh, bh), (wo, bo) = ((layer.weight[:, :, 0, 0], layer.bias) for layer in model.decoders["b"])
    hidden = torch.relu(z @ wh[:2].T + bh[:2])
    torch.testing.assert_close(model.decode(z)["b"], hidden @ wo[:, :2].T + bo, rtol=1e-12, atol=1e-12)


def test_each_task_owns_exactly_its_decoder(device, split_by_task):
    model = model_for(VEC, device)
    split = split_by_task(model, torch.randn(4, 6, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"decoders.{t}."))


def test_decoder_width_changes_only_its_task(device):
    model = model_for(VEC, device)
    x = torch.randn(4, 6, device=device)
    full = model(x)
    model.configure(1.0, {"a": 0.25, "b": 1.0, "c": 1.0})
    slim_a = model(x)
    assert not torch.allclose(slim_a["a"], full["a"])
    torch.testing.assert_close(slim_a["b"], full["b"])
    model.configure(0.5, {t: 1.0 for t in VEC.tasks})
    slim_enc = model(x)
    assert all(not torch.allclose(slim_enc[t], full[t]) for t in VEC.tasks)  # the encoder is shared


def test_cost_counts_active_parameters(n_params):
    model = build("ecmt", VEC, width=8)
    assert model.cost(1.0, {t: 1.0 for t in VEC.tasks}) == n_params(model)
    # encoder 6 -> 4 (ratio .5) -> 8 (fixed output); decoders: 8 -> {2, 8, 4} -> out
    ratios = {"a": 0.25, "b": 1.0, "c": 0.5}
    enc = 4 * (6 + 1) + 8 * (4 + 1)
    dec = (2 * 9 + 1 * 3) + (8 * 9 + 2 * 9) + (4 * 9 + 1 * 5)
    assert model.cost(0.5, ratios) == enc + dec


def test_controller_follows_preference_and_budget():
    model = build("ecmt", VEC, width=8)
    full = model.cost(1.0, {t: 1.0 for t in VEC.tasks})
    assert model.controller({"a": 1, "b": 1, "c": 1}, 1.0) == (1.0, {t: 1.0 for t in VEC.tasks})
    previous_encoder = 0.0
    for budget in (0.3, 0.5, 0.7, 0.9, 1.0):
        for pref in itertools.product((0.1, 0.3, 0.6), repeat=3):
            preference = dict(zip(VEC.tasks, pref))
            enc, dec = model.controller(preference, budget)
            assert model.cost(enc, dec) <= budget * full
            for s, t in itertools.permutations(VEC.tasks, 2):
                if preference[s] > preference[t]:
                    assert dec[s] >= dec[t]  # the preferred task never gets a narrower decoder
        enc, _ = model.controller({"a": 0.6, "b": 0.3, "c": 0.1}, budget)
        assert enc >= previous_encoder  # more budget never shrinks the encoder
        previous_encoder = enc
    assert set(model.controller({"a": 0.6, "b": 0.3, "c": 0.1}, 1.0)[1].values()) <= set(WIDTHS)


def test_controller_by_hand_preference_widths_and_widest_fitting_encoder():
    """Decoder ratio: smallest grid width >= preference / max; encoder: the widest that fits."""
    model = build("ecmt", VEC, width=8)
    full = model.cost(1.0, {t: 1.0 for t in VEC.tasks})
    preference = {"a": 1.0, "b": 0.5, "c": 0.2}
    decoders = {"a": 1.0, "b": 0.5, "c": 0.25}
    assert model.controller(preference, 1.0) == (1.0, decoders)
    for r_low, r_high in zip(WIDTHS[:-1], WIDTHS[1:]):  # a budget between two encoder widths
        budget = (model.cost(r_low, decoders) + model.cost(r_high, decoders)) / 2 / full
        assert model.controller(preference, budget) == (r_low, decoders)


def test_controller_reads_the_preference_relative_to_its_largest_value():
    """Only the ratios of the preference count: preference / max preference picks the decoder widths."""
    model = build("ecmt", VEC, width=8)
    decoders = {"a": 1.0, "b": 0.5, "c": 0.25}
    for scale in (0.4, 1.0, 3.0):
        preference = {"a": 1.0 * scale, "b": 0.5 * scale, "c": 0.2 * scale}
        assert model.controller(preference, 1.0) == (1.0, decoders)


def test_controller_narrows_every_decoder_one_step_when_no_encoder_fits():
    """Below the narrowest encoder's cost, each decoder drops one grid width, then the widest encoder
    that fits is taken; below everything, the narrowest SubNet."""
    model = build("ecmt", VEC, width=8)
    full = model.cost(1.0, {t: 1.0 for t in VEC.tasks})
    preference = {"a": 1.0, "b": 0.5, "c": 0.2}
    decoders, once = {"a": 1.0, "b": 0.5, "c": 0.25}, {"a": 0.75, "b": 0.25, "c": 0.25}
    assert model.cost(0.25, once) < model.cost(0.25, decoders)
    assert model.controller(preference, (model.cost(0.25, once) + 0.5) / full) == (0.25, once)
    assert model.controller(preference, 1e-6) == (0.25, {t: 0.25 for t in VEC.tasks})


def test_configure_leaves_unnamed_decoders_at_full_width(device):
    model = model_for(VEC, device)
    x = torch.randn(4, 6, device=device)
    model.configure(0.5, {"a": 0.25})
    partial = model(x)
    model.configure(0.5, {"a": 0.25, "b": 1.0, "c": 1.0})
    torch.testing.assert_close(partial, model(x))


def test_pooled_image_outputs_are_the_spatial_means_of_the_maps(device):
    model = model_for(Problem(("seg", "depth"), (3, 6, 6), {"seg": 4, "depth": 1}), device)
    x = torch.randn(2, 3, 6, 6, device=device)
    pooled = model(x)
    model.pool = False
    maps = model(x)
    for t in ("seg", "depth"):
        torch.testing.assert_close(pooled[t], maps[t].mean(dim=(2, 3)))


def test_ci_kd_is_the_mse_to_the_full_width_representation(device):
    model = model_for(IMAGE, device)
    x = torch.randn(2, 3, 6, 6, device=device)
    target = model.encode(x)
    model.configure(0.5, {})
    student = model.encode(x)
    model.configure(1.0, {})
    torch.testing.assert_close(model.ci_kd_loss(x, 0.5), (student - target).square().mean())


def test_ci_kd_is_zero_at_full_width_and_trains_only_the_encoder(device, params_with_grad):
    model = model_for(IMAGE, device)
    x = torch.randn(2, 3, 6, 6, device=device)
    assert model.ci_kd_loss(x, 1.0).item() == 0.0
    loss = model.ci_kd_loss(x, 0.25)
    assert loss > 0 and model.encoder_ratio == 1.0  # configuration restored
    touched = params_with_grad(model, loss)
    assert touched and all(n.startswith("encoder.") for n in touched)
    grad = model.encoder[0].weight.grad
    assert grad[2:].abs().sum() == 0  # the full-width target is fixed: only the slim slice learns


def test_supernet_training_lowers_full_and_narrow_losses(device):
    model = model_for(VEC, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g).to(device)
    y = {t: x[:, :d] * (i + 1) for i, (t, d) in enumerate(VEC.out_dims.items())}
    narrow = (0.25, {"a": 0.25, "b": 0.5, "c": 0.25})

    def loss_at(config) -> torch.Tensor:
        model.configure(*config)
        return sum(F.mse_loss(o, y[t]) for t, o in model(x).items())

    full = (1.0, {t: 1.0 for t in VEC.tasks})
    before = [loss_at(full).item(), loss_at(narrow).item()]
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = loss_at(full) + loss_at(narrow) + model.ci_kd_loss(x, narrow[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [loss_at(full).item(), loss_at(narrow).item()]
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1]


def test_trains(device, short_training):
    first, last = short_training("ecmt", True, device, 30)
    assert last < 0.5 * first


def test_ecmt_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("ecmt", device)
    assert type(build("ecmt", VEC)) is ECMT


def test_ci_kd_restores_the_model_width_even_when_a_pass_fails(device):
    model = model_for(IMAGE, device)
    model.configure(0.5, {})
    with pytest.raises(RuntimeError):
        model.ci_kd_loss(torch.randn(2, 5, 6, 6, device=device), 0.25)  # wrong channel count
    assert model.encoder_ratio == 0.5


def test_auxiliary_loss_is_the_weighted_ci_kd_at_a_drawn_width_and_the_training_step_follows_it():
    """The harness adds auxiliary_loss() every step: without it CI-KD never trained the narrow encoders."""
    x = torch.randn(8, 6)
    targets = {t: torch.randn(8, d) for t, d in VEC.out_dims.items()}
    torch.manual_seed(0)
    model = build("ecmt", VEC, width=8, ci_kd_weight=0.5, seed=3)
    ratio = WIDTHS[int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(3)))]
    model(x)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * model.ci_kd_loss(x, ratio))
    assert model.auxiliary_loss().item() > 0
    model.eval()(x)
    assert model.auxiliary_loss().item() == 0.0  # evaluation draws nothing
    moved = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = build("ecmt", VEC, width=8, ci_kd_weight=weight, seed=3)
        start = copy.deepcopy(model)
        harness_step(model, x, targets, lr=1.0)
        moved[weight] = [p0 - p1 for p0, p1 in zip(start.parameters(), model.parameters())]
        assert (weight == 0) == (train.auxiliary_loss(model).item() == 0.0)
    grads = torch.autograd.grad(0.5 * start.ci_kd_loss(x, ratio), list(start.parameters()), allow_unused=True)
    reached = {n for (n, _), g in zip(start.named_parameters(), grads) if g is not None and g.abs().sum() > 0}
    assert reached and all(n.startswith("encoder.") for n in reached)
    for with_aux, without, g in zip(moved[0.5], moved[0.0], grads):
        torch.testing.assert_close(with_aux - without, torch.zeros_like(without) if g is None else g)
    with pytest.raises(ValueError, match="ci_kd_weight"):
        build("ecmt", VEC, ci_kd_weight=-1.0)


def test_a_checkpoint_runs_the_configured_subnet(device):
    """configure() picks the SubNet forward runs; a fresh model loading the state_dict runs the
    same one and draws the same CI-KD widths next."""
    configured = build("ecmt", VEC, seed=0).to(device).eval()
    configured.configure(0.5, {"a": 0.25, "c": 0.75})
    fresh = build("ecmt", VEC, seed=1).to(device).eval()
    fresh.load_state_dict(configured.state_dict())
    assert (fresh.encoder_ratio, fresh.decoder_ratios) == (0.5, {"a": 0.25, "b": 1.0, "c": 0.75})
    x = torch.randn(5, 6, device=device)
    for task, output in configured(x).items():
        torch.testing.assert_close(fresh(x)[task], output, rtol=0, atol=0)
    draw = (lambda m: torch.randint(len(WIDTHS) - 1, (4,), generator=m.generator))
    assert torch.equal(draw(fresh), draw(configured))


def test_active_channels_round_and_never_drop_below_one():
    from reference_impls.architectures.ecmt import active
    assert [active(8, r) for r in WIDTHS] == [2, 4, 6, 8]
    assert active(4, 0.25) == 1 and active(2, 0.25) == 1 and active(1, 0.25) == 1  # "at least one"


def test_slim_layer_defaults_to_full_width_and_keeps_the_spatial_size():
    torch.manual_seed(0)
    vec = SlimmableLayer(6, 8, image=False)
    assert vec(torch.randn(2, 6)).shape == (2, 8)  # no out_channels: every output channel
    wide = SlimmableLayer(3, 4, image=True, kernel_size=5)
    x = torch.randn(1, 3, 7, 7)
    torch.testing.assert_close(wide(x), F.conv2d(x, wide.weight, wide.bias, padding=2))  # "same" padding


def test_image_cost_counts_active_parameters_of_k_by_k_kernels(n_params):
    """3 x 3 hidden convolutions: out (in 3 3 + 1) each; the task heads are 1 x 1."""
    model = build("ecmt", IMAGE, width=8)
    assert model.cost(1.0, {t: 1.0 for t in IMAGE.tasks}) == n_params(model)
    assert all(model.decoders[t][1].weight.shape[-2:] == (1, 1) for t in IMAGE.tasks)
    enc = 4 * (3 * 9 + 1) + 8 * (4 * 9 + 1)
    dec = (2 * (8 * 9 + 1) + 4 * (2 + 1)) + (8 * (8 * 9 + 1) + 1 * (8 + 1))
    assert model.cost(0.5, {"seg": 0.25, "depth": 1.0}) == enc + dec


def test_decoder_ratio_slims_the_decoder_width_not_the_encoder_width(n_params):
    """With decoder_width 4 != width 8, ratio 0.5 keeps 2 decoder hidden units (by hand and in the cost)."""
    torch.manual_seed(0)
    model = ECMT(("a", "b"), (6,), {"a": 1, "b": 2}, width=8, decoder_width=4).double()
    assert model.cost(1.0, {"a": 1.0, "b": 1.0}) == n_params(model)
    model.configure(1.0, {"a": 0.5})
    z = torch.randn(3, 8, dtype=torch.float64)
    (wh, bh), (wo, bo) = ((layer.weight[:, :, 0, 0], layer.bias) for layer in model.decoders["a"])
    torch.testing.assert_close(model.decode(z)["a"], torch.relu(z @ wh[:2].T + bh[:2]) @ wo[:, :2].T + bo)
    enc = 8 * (6 + 1) + 8 * (8 + 1)
    assert model.cost(1.0, {"a": 0.5, "b": 1.0}) == enc + (2 * 9 + 1 * 3) + (4 * 9 + 2 * 5)


def test_auxiliary_loss_is_zero_before_any_forward_pass_and_the_weight_defaults_to_one():
    shallow = ECMT(("a",), (6,), {"a": 1}, depth=1)
    assert shallow.auxiliary_loss().item() == 0.0  # nothing drawn yet, also with a one-layer encoder
    model = ECMT(("a",), (6,), {"a": 1}, seed=5)
    twin = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6)
    for step in range(6):  # the widths come from the model's own generator, whatever the global seed
        torch.manual_seed(step)
        model(x)
        ratio = WIDTHS[int(torch.randint(len(WIDTHS) - 1, (1,), generator=twin))]
        torch.testing.assert_close(model.auxiliary_loss(), 1.0 * model.ci_kd_loss(x, ratio))  # default weight 1
