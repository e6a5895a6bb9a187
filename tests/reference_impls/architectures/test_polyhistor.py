"""Polyhistor-Lite: Kronecker-scaled templates, a parameter count that follows the formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_impls.architectures.polyhistor import PolyhistorLite

TASKS = ("seg", "depth", "normal", "edge")
OUT = {"seg": 4, "depth": 1, "normal": 3, "edge": 1}


def build(device, **kw):
    torch.manual_seed(0)
    return PolyhistorLite(TASKS, 3, OUT, base_width=8, stage_scales=(1, 2, 4), reduction=4,
                          embed_dim=6, rank=2, **kw).to(device)


def test_trainable_parameter_count_follows_formula(device):
    model = build(device)
    T, e, a, b, k = 4, 6, 8, 2, 2
    scales = (1, 2, 4)
    adapters = T * e + 2 * (e * b * k + e * a * k) + 2 * sum(s * s for s in scales)
    heads = sum((8 * 4 + 1) * OUT[t] for t in TASKS)  # 1x1 conv on 32 channels
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapters + heads
    assert model.adapter_parameter_count()["polyhistor_lite"] == adapters == 306
    per_task = T * sum(2 * (s * a) * (s * b) for s in scales)
    assert model.adapter_parameter_count()["per_task_adapters"] == per_task == 2688
    assert adapters * 5 < per_task  # much smaller than storing adapters per task and layer


def low_rank_template(hyper, embedding, u_shape, v_shape):
    """The hypernetwork's template U Vᵀ for one task embedding, computed from its weights."""
    u = (hyper.to_u.weight @ embedding).view(u_shape)
    v = (hyper.to_v.weight @ embedding).view(v_shape)
    return u @ v.T


def test_adapter_weight_is_kronecker_of_scaling_and_low_rank_template(device):
    model = build(device)
    with torch.no_grad():
        for s in model.down_scaling:
            s.normal_()
    template = low_rank_template(model.down_hyper, model.task_embeddings["depth"], (2, 2), (8, 2))  # b x a, rank <= 2
    down, up = model.adapter_weights("depth", 2)
    assert down.shape == (8, 32) and up.shape == (32, 8)
    expected = torch.zeros(8, 32, device=device)
    S = model.down_scaling[2]
    for i in range(4):
        for j in range(4):
            expected[2 * i : 2 * i + 2, 8 * j : 8 * j + 8] = S[i, j] * template
    torch.testing.assert_close(down, expected)
    # Different tasks, same layer: same scaling kernel, different template.
    other, _ = model.adapter_weights("seg", 2)
    assert not torch.allclose(other, down)


def test_backbone_frozen_and_gradients_to_shared_factors(device):
    model = build(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    out = model(x)
    assert out["normal"].shape == (2, 3, 16, 16)
    out["depth"].square().mean().backward()
    assert all(p.grad is None for p in [*model.merges.parameters(), *model.blocks.parameters()])
    assert model.task_embeddings["depth"].grad.abs().sum() > 0
    assert model.task_embeddings["seg"].grad is None
    for p in [*model.down_hyper.parameters(), *model.up_hyper.parameters(),
              *model.down_scaling, *model.up_scaling]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.heads["seg"].parameters())


def test_adapters_change_the_frozen_features_per_task(device):
    model = build(device, dense=False)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        model.heads["edge"].load_state_dict(model.heads["depth"].state_dict())
        out = model(x)
        assert not torch.allclose(out["edge"], out["depth"])  # different task embeddings
        model.task_embeddings["edge"].copy_(model.task_embeddings["depth"])
        out = model(x)
    torch.testing.assert_close(out["edge"], out["depth"])


def test_trains(device, fit):
    model = build(device)
    x = torch.randn(4, 3, 8, 8, device=device)
    target = {t: torch.randn(4, OUT[t], 8, 8, device=device) for t in TASKS}
    losses = fit(model, x, lambda out: sum(F.mse_loss(out[t], target[t]) for t in TASKS), steps=30, lr=0.02)
    assert losses[-1] < 0.9 * losses[0]


def test_polyhistor_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("polyhistor", device)


def test_every_stage_is_merge_block_then_residual_gelu_adapter_by_hand(device):
    """h <- merge(h); h <- h + block(h); h <- h + W_up GELU(W_down h), at every stage."""
    model = build(device, dense=False)
    with torch.no_grad():
        for s in [*model.down_scaling, *model.up_scaling]:
            s.normal_()
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    for t in ("seg", "edge"):
        torch.testing.assert_close(out[t], model.heads[t](adapted_features_by_hand(model, t, x)).mean(dim=(2, 3)))


def adapted_features_by_hand(model, task, x):
    """The last stage's features of ``task``: per stage merge, residual block, residual GELU adapter."""
    h = x
    for layer, (merge, block) in enumerate(zip(model.merges, model.blocks)):
        h = merge(h)
        h = h + block(h)
        down, up = model.adapter_weights(task, layer)
        hidden = F.gelu(torch.einsum("rd,bdhw->brhw", down, h))
        h = h + torch.einsum("dr,brhw->bdhw", up, hidden)
    return h


def test_dense_output_is_the_head_map_upsampled_bilinearly_to_the_input(device):
    """Dense tasks: the head's coarse map (1/8 of the input after three merges) is resized to the
    input bilinearly with align_corners=False; a 16x16 input leaves a 2x2 map, so nearest differs."""
    model = build(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    out = model(x)
    for t in ("seg", "depth"):
        head_map = model.heads[t](adapted_features_by_hand(model, t, x))
        assert head_map.shape[-2:] == (2, 2)
        expected = F.interpolate(head_map, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[t], expected)


def test_registry_gives_a_task_without_a_width_one_output_channel():
    """Problem.task_out_dims: a task the problem leaves without a width gets 1 (was a KeyError)."""
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (2, 8, 8), {"a": 2}, dense=True)
    out = registry.build("polyhistor", problem)(torch.randn(1, 2, 8, 8))
    assert out["a"].shape == (1, 2, 8, 8) and out["b"].shape == (1, 1, 8, 8)


def test_up_weight_is_scaling_kronecker_up_template_and_scalings_start_as_identity(device):
    """W_up = S_l^up ⊗ (U V^T) from up_hyper, d_l x r_l; every S_l starts as I (diagonal blocks).

    Before, up = K ⊗ S (Kronecker factors swapped) and a random S_l initialisation both passed."""
    model = build(device)
    for scalings in (model.down_scaling, model.up_scaling):
        for s, scaling in zip(model.stage_scales, scalings):
            torch.testing.assert_close(scaling, torch.eye(s, device=device))
    with torch.no_grad():
        for s in model.up_scaling:
            s.normal_()
    template = low_rank_template(model.up_hyper, model.task_embeddings["normal"], (8, 2), (2, 2))  # a x b = 8 x 2
    _, up = model.adapter_weights("normal", 1)
    S = model.up_scaling[1]
    expected = torch.zeros(16, 4, device=device)
    for i in range(2):
        for j in range(2):
            expected[8 * i : 8 * i + 8, 2 * j : 2 * j + 2] = S[i, j] * template
    torch.testing.assert_close(up, expected)


def test_a_task_claims_exactly_its_embedding_and_head(split_by_task):
    """Hypernetworks and scaling kernels are shared by all tasks; the frozen backbone gets no gradient."""
    model = build("cpu")
    shared = {n for n, _ in model.named_parameters() if n.startswith(("down_", "up_"))}
    for t, (own, reached) in split_by_task(model, torch.randn(2, 3, 8, 8)).items():
        assert own == {f"task_embeddings.{t}", f"heads.{t}.weight", f"heads.{t}.bias"}
        assert reached == own | shared


def test_frozen_blocks_are_residual_gelu_mlps(device):
    """The stand-in for a Swin block's MLP: W2 GELU(W1 h + b1) + b2 per pixel (added to h in forward)."""
    model = build(device)
    for block, scale in zip(model.blocks, model.stage_scales):
        h = torch.randn(2, 8 * scale, 3, 3, device=device)
        first, second = block[0], block[-1]
        expected = F.conv2d(F.gelu(F.conv2d(h, first.weight, first.bias)), second.weight, second.bias)
        torch.testing.assert_close(block(h), expected)


def test_small_default_has_as_many_halving_stages_as_the_shorter_side_allows_up_to_three():
    """from_problem: each stage halves the map (2x2 merge) and doubles the width, base_width = width;
    the number of stages is how often the shorter side can be halved, at most three."""
    import pytest

    from reference_impls.architectures import registry

    for size in ((2, 2), (3, 5), (4, 4), (4, 16), (9, 5), (8, 8), (16, 16)):
        side, stages = min(size), 0
        while side >= 2 and stages < 3:
            side, stages = side // 2, stages + 1
        problem = registry.Problem(("a", "b"), (2, *size), {"a": 2}, dense=True)
        torch.manual_seed(0)
        model = registry.build("polyhistor", problem, width=4)
        assert model.stage_scales == tuple(2 ** i for i in range(stages)), size
        assert [m.out_channels for m in model.merges] == [4 * 2 ** i for i in range(stages)], size
        assert model(torch.randn(1, 2, *size))["a"].shape == (1, 2, *size)
    with pytest.raises(ValueError):
        registry.build("polyhistor", registry.Problem(("a", "b"), (2, 1, 4), {"a": 2}, dense=True))


def test_a_base_width_below_one_is_refused():
    """0 would pass the divisibility check (0 % reduction == 0) and build empty layers."""
    import pytest

    for width in (0, -4):
        with pytest.raises(ValueError, match="base_width"):
            PolyhistorLite(TASKS, 3, OUT, base_width=width)
