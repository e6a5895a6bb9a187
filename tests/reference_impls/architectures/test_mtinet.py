"""MTI-Net: every task's features at every scale reach every final output; FPM; supervision."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.mtinet import MTINet, SqueezeExcitationGate, _upsample_to

TASKS = ("seg", "depth", "normals")
OUT = {"seg": 3, "depth": 1, "normals": 3}


def make():
    torch.manual_seed(0)
    return MTINet(TASKS, 3, OUT, channels=6)


def grad_norm(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("target", TASKS)
def test_final_prediction_depends_on_every_tasks_features_at_every_scale(device, target):
    model = make().to(device)
    final, _ = model.forward_with_intermediate(torch.randn(2, 3, 8, 8, device=device))
    final[target].square().sum().backward()
    for t in TASKS:
        assert grad_norm(model.coarse_blocks[t]) > 0, ("coarse", t)
        assert grad_norm(model.fine_blocks[t]) > 0, ("fine", t)
    # Aggregation reads the distilled features of both scales.
    assert grad_norm(model.fine_distillation[target]) > 0
    assert grad_norm(model.coarse_distillation[target]) > 0
    for t in TASKS:
        if t != target:
            assert grad_norm(model.aggregation_heads[t]) == 0
            assert grad_norm(model.fine_distillation[t]) == 0
            assert grad_norm(model.coarse_distillation[t]) == 0


def test_feature_propagation_lets_coarse_features_of_all_tasks_shape_fine_predictions(device):
    model = make().to(device)
    _, intermediate = model.forward_with_intermediate(torch.randn(2, 3, 8, 8, device=device))
    intermediate["scale0"]["depth"].square().sum().backward()
    for t in TASKS:
        assert grad_norm(model.coarse_blocks[t]) > 0, t
    assert grad_norm(model.propagation.select["depth"]) > 0
    assert grad_norm(model.propagation.select["seg"]) == 0  # another task's selection
    assert grad_norm(model.fine_blocks["seg"]) == 0  # no distillation before initial predictions


def test_intermediate_predictions_at_both_scales(device):
    model = make().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    final, intermediate = model.forward_with_intermediate(x)
    assert set(intermediate) == {"scale0", "scale1"}
    for scale in intermediate.values():
        assert {t: tuple(p.shape) for t, p in scale.items()} == {t: (2, d, 8, 8) for t, d in OUT.items()}
    assert {t: tuple(p.shape) for t, p in final.items()} == {t: (2, d, 8, 8) for t, d in OUT.items()}
    # The coarse initial prediction is computed at half resolution and then upsampled.
    coarse = model.coarse_predictors["seg"](model.coarse_blocks["seg"](model.backbone_coarse(model.backbone_fine(x))))
    assert coarse.shape[-1] == 4
    for t, o in model(x).items():
        assert torch.equal(o, final[t])


def test_parameter_count():
    c, K = 6, len(TASKS)
    conv3 = lambda i, o: i * o * 9 + o  # noqa: E731
    se = (c * 1 + 1) + (1 * c + c)  # hidden width max(1, 6 // 4) = 1
    shared = (conv3(3, c) + conv3(c, c)  # backbone
              + K * conv3(c, c) + K * conv3(2 * c, c)  # task blocks, both scales
              + conv3(K * c, c) + K * se)  # FPM fuse + per-task SE
    distill = 2 * (K - 1) * conv3(c, c)  # a mask and a message per other task
    per_task = {t: 2 * distill + conv3(2 * c, c) + (c * o + o) + 2 * (c * o + o) for t, o in OUT.items()}
    model = make()
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    assert sum(p.numel() for p in model.parameters()) == shared + sum(per_task.values())


@pytest.mark.parametrize("dense", (True,))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("mtinet", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("mtinet", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_fpm_adds_each_tasks_selection_to_its_own_features(device):
    """FPM output for task t is SE_t(fuse([F_1; ...; F_T])) + F_t (residual, as in the official FPM)."""
    model = make().to(device)
    feats = {t: torch.randn(2, 6, 4, 4, device=device) for t in TASKS}
    out = model.propagation(feats)
    fused = model.propagation.fuse(torch.cat([feats[t] for t in TASKS], dim=1))
    for t in TASKS:
        torch.testing.assert_close(out[t], model.propagation.select[t](fused) + feats[t])


@pytest.mark.parametrize("scale", ("fine_distillation", "coarse_distillation"))
def test_distillation_messages_are_gated_by_their_source_not_the_target(device, scale):
    """MTI-Net distils with F_k + sum_{l != k} sigmoid(A_kl * F_l) ⊙ (W_kl * F_l): only the residual reads F_k."""
    model = make().to(device)
    distil = getattr(model, scale)["seg"]
    feats = {t: torch.randn(2, 6, 4, 4, device=device) for t in TASKS}
    other_target = {**feats, "seg": torch.randn(2, 6, 4, 4, device=device)}
    with torch.no_grad():
        torch.testing.assert_close(distil(feats) - feats["seg"], distil(other_target) - other_target["seg"])
        # With a single source the message is exactly that source's own mask times its transformed features.
        pair = {"seg": feats["seg"], "depth": feats["depth"]}
        single = type(distil)("seg", ("seg", "depth"), 6).to(device)
        expected = torch.sigmoid(single.masks["depth"](pair["depth"])) * single.messages["depth"](pair["depth"])
        torch.testing.assert_close(single(pair), pair["seg"] + expected)


def test_squeeze_excitation_gate_formula(device):
    """SE: x * sigmoid(W2 ReLU(W1 avgpool(x))), one factor in (0, 1) per sample and channel."""
    torch.manual_seed(0)
    se = SqueezeExcitationGate(8).to(device)
    x = torch.randn(2, 8, 3, 3, device=device)
    lin1, lin2 = se.fc[0], se.fc[2]
    hidden = torch.relu(x.mean(dim=(2, 3)) @ lin1.weight.T + lin1.bias)
    scale = torch.sigmoid(hidden @ lin2.weight.T + lin2.bias)
    torch.testing.assert_close(se(x), x * scale[:, :, None, None])
    assert torch.all((scale > 0) & (scale < 1))
    assert hidden.shape[1] == 2  # 8 channels, reduced 4-fold


def test_fine_task_block_reads_backbone_and_propagated_coarse_features(device):
    """Fine initial features: block_t([B_0; up(FPM_t)]), the FPM fed the coarse task features."""
    model = make().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    _, intermediate = model.forward_with_intermediate(x)
    fine = model.backbone_fine(x)
    coarse = {t: model.coarse_blocks[t](model.backbone_coarse(fine)) for t in TASKS}
    propagated = model.propagation(coarse)
    for t in TASKS:
        feats = model.fine_blocks[t](torch.cat([fine, _upsample_to(propagated[t], fine)], dim=1))
        torch.testing.assert_close(intermediate["scale0"][t], model.fine_predictors[t](feats))


def test_scale1_intermediate_is_the_coarse_prediction_before_the_fpm_upsampled_bilinearly(device):
    """Scale 1's deep supervision scores the initial coarse prediction, P_t^1 = predictor_t(block_t(B_1)),
    read before the FPM adds other tasks, resized like the harness (bilinear, align_corners=False)."""
    model = make().to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    _, intermediate = model.forward_with_intermediate(x)
    coarse = model.backbone_coarse(model.backbone_fine(x))
    for t in TASKS:
        prediction = model.coarse_predictors[t](model.coarse_blocks[t](coarse))  # half resolution
        expected = F.interpolate(prediction, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(intermediate["scale1"][t], expected)


def test_scale1_intermediate_reads_only_its_own_coarse_path(device, params_with_grad):
    """Before the FPM, the coarse initial prediction depends on no other task and not on the FPM."""
    model = make().to(device)
    _, intermediate = model.forward_with_intermediate(torch.randn(2, 3, 8, 8, device=device))
    touched = params_with_grad(model, intermediate["scale1"]["depth"].square().sum())
    assert {n.split(".")[0] for n in touched} == {"backbone_fine", "backbone_coarse", "coarse_blocks",
                                                 "coarse_predictors"}
    assert {n.split(".")[1] for n in touched if n.startswith(("coarse_blocks", "coarse_predictors"))} == {"depth"}


def test_the_final_prediction_aggregates_fine_and_bilinearly_upsampled_coarse_distillation():
    """final_t = aggregation_t([D_fine,t ; bilinear_up(D_coarse,t)]): no residual, bilinear resize."""
    from torch.nn import functional as F
    from reference_impls.architectures.registry import Problem, build

    torch.manual_seed(0)
    model = build("mtinet", Problem(("a", "b"), (3, 16, 16), {"a": 1, "b": 2}, dense=True))
    x = torch.randn(2, 3, 16, 16)
    captured = {}
    for scale in ("fine", "coarse"):
        for t, module in getattr(model, f"{scale}_distillation").items():
            module.register_forward_hook(lambda m, args, out, key=(scale, t): captured.__setitem__(key, out))
    final = model(x)
    for t in model.tasks:
        fine, coarse = captured[("fine", t)], captured[("coarse", t)]
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(final[t], model.aggregation_heads[t](torch.cat([fine, up], dim=1)))


def test_only_dense_image_problems_are_accepted():
    """MTI-Net predicts per-pixel maps from an image: an image problem with vector targets, or a
    "dense" problem without an image, is refused rather than answered with maps of the wrong shape."""
    for problem in (registry.Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 2}, dense=False),
                    registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}, dense=True)):
        with pytest.raises(ValueError):
            registry.build("mtinet", problem)


def test_from_problem_takes_width_and_accepts_the_smallest_image_its_encoder_can_halve():
    """``width`` is the channel count of every stage; a 2x2 image has a 1x1 coarse scale and works."""
    torch.manual_seed(0)
    problem = registry.Problem(("a", "b"), (3, 2, 2), {"a": 2}, dense=True)
    model = registry.build("mtinet", problem, width=8)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in MTINet(("a", "b"), 3, {"a": 2, "b": 1}, channels=8).parameters())
    out = model(torch.randn(2, 3, 2, 2))
    assert out["a"].shape == (2, 2, 2, 2) and out["b"].shape == (2, 1, 2, 2)


def test_from_problem_refuses_options_instead_of_ignoring_them():
    """``channels`` comes from ``width`` and cannot also be given; an unknown option is an error too."""
    problem = registry.Problem(("a", "b"), (3, 4, 4), {"a": 1}, dense=True)
    with pytest.raises(ValueError):
        registry.build("mtinet", problem, channels=8)
    with pytest.raises(TypeError):
        registry.build("mtinet", problem, no_such_option=1)
