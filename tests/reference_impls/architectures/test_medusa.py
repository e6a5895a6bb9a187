"""Medusa: per-task spatial masks in (0, 1) over shared features, softmax over scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_impls.architectures.medusa import Medusa

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def build(device, **kw):
    torch.manual_seed(0)
    return Medusa(TASKS, 3, OUT, channels=(4, 8, 8), head_channels=6, **kw).to(device)


def test_masks_are_spatial_per_task_and_in_unit_interval(device):
    model = build(device)
    feats = model.backbone(torch.randn(2, 3, 8, 8, device=device))
    assert [f.shape[-1] for f in feats] == [8, 4, 2]
    masks = {t: model.heads[t].masks(feats) for t in TASKS}
    for t in TASKS:
        for m, f in zip(masks[t], feats):
            assert m.shape == (2, 1, *f.shape[-2:])  # one weight per pixel, shared by channels
            assert ((m > 0) & (m < 1)).all()
    assert not torch.allclose(masks["seg"][0], masks["depth"][0])  # each task selects its own


def test_head_equals_masked_multiscale_attention_by_hand(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    feats = model.backbone(x)
    head = model.heads["depth"]
    masks = head.masks(feats)
    projected = [F.interpolate(p(m * f), size=(8, 8), mode="bilinear", align_corners=False)
                 for p, m, f in zip(head.projections, masks, feats)]
    weights = head.scale_weights(projected)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 8, 8, device=device))
    fused = weights[:, 0:1] * projected[0] + weights[:, 1:2] * projected[1] + weights[:, 2:3] * projected[2]
    torch.testing.assert_close(model(x)["depth"], head.out(fused))


def test_mask_and_scale_weights_by_hand_and_pooled_output(device):
    """m^s = sigmoid(conv(F^s)); alpha = softmax_s(W [G^1; ...; G^S] + b); pooled = mean over pixels."""
    model = build(device, dense=False)
    x = torch.randn(2, 3, 8, 8, device=device)
    feats = model.backbone(x)
    head = model.heads["seg"]
    for conv, f, m in zip(head.mask_convs, feats, head.masks(feats)):
        torch.testing.assert_close(m, torch.sigmoid(F.conv2d(f, conv.weight, conv.bias, padding=1)))
    projected = [torch.randn(2, 6, 8, 8, device=device) for _ in range(3)]
    w = head.scale_scores.weight[:, :, 0, 0]
    scores = torch.einsum("sc,bchw->bshw", w, torch.cat(projected, 1)) + head.scale_scores.bias[:, None, None]
    torch.testing.assert_close(head.scale_weights(projected), torch.softmax(scores, dim=1))
    torch.testing.assert_close(model(x)["seg"], head(feats).mean(dim=(2, 3)))


def test_registry_gives_a_task_without_a_width_one_output_channel():
    """Problem.task_out_dims: a task the problem leaves without a width gets 1 (was a KeyError)."""
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 8, 8), {"a": 2}, dense=True)
    out = registry.build("medusa", problem)(torch.randn(1, 2, 8, 8))
    assert out["a"].shape == (1, 2, 8, 8) and out["b"].shape == (1, 1, 8, 8)


def test_backbone_shared_heads_independent(device):
    model = build(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    assert out["seg"].shape == (2, 3, 8, 8)
    out["seg"].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.heads["depth"].parameters())
    assert all(p.grad is not None for p in model.heads["seg"].mask_convs.parameters())
    # Removing a task does not change the other task's prediction (no decoder coupling).
    solo = Medusa(("seg",), 3, {"seg": 3}, channels=(4, 8, 8), head_channels=6).to(device)
    solo.backbone.load_state_dict(model.backbone.state_dict())
    solo.heads["seg"].load_state_dict(model.heads["seg"].state_dict())
    torch.testing.assert_close(solo(x)["seg"], out["seg"])


def test_trains(device, fit):
    model = build(device, dense=False)
    x = torch.randn(16, 3, 8, 8, device=device)
    target = {"seg": (x[:, 0].mean((1, 2)) > 0).long(), "depth": x[:, 1].mean((1, 2))[:, None]}
    def loss_of(out):
        return F.cross_entropy(out["seg"][:, :2], target["seg"]) + F.mse_loss(out["depth"], target["depth"])

    losses = fit(model, x, loss_of, steps=30, lr=0.02)
    assert losses[-1] < 0.7 * losses[0]


def test_medusa_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("medusa", device)


def test_a_task_claims_exactly_its_head(split_by_task):
    """The head (SFA masks, MSA decoder, output) is the task's own; the backbone is what all reach."""
    model = build("cpu")
    backbone = {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    for t, (own, reached) in split_by_task(model, torch.randn(2, 3, 8, 8)).items():
        assert own == {n for n, _ in model.named_parameters() if n.startswith(f"heads.{t}.")}
        assert reached == own | backbone


def test_width_doubles_the_channels_at_each_halving_and_sets_the_head_width():
    """from_problem: stages of width/2, width, 2 width channels; every head projects to width."""
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 8, 8), {"a": 2}, dense=True)
    model = registry.build("medusa", problem, width=6)
    assert [stage[0].out_channels for stage in model.backbone.stages] == [3, 6, 12]
    for head in model.heads.values():
        assert [p.out_channels for p in head.projections] == [6, 6, 6]
        assert head.out.in_channels == 6


def test_sizes_the_small_default_derives_from_width_are_refused():
    """registry.build: an option from_problem sets itself is refused (ValueError), not silently dropped."""
    import pytest

    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 8, 8), {"a": 2}, dense=True)
    for option in ({"head_channels": 4}, {"channels": (2, 4, 8)}):
        with pytest.raises(ValueError, match=next(iter(option))):
            registry.build("medusa", problem, **option)
