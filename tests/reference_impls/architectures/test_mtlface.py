import pytest
import torch

import torch.nn.functional as F

from reference_impls.architectures.mtlface import (
    AgeIdentityDecomposition, ConditionalResidualBlock, MTLFace, group_channel_masks)
from reference_impls.architectures.registry import Problem, build

IMAGE = Problem(("identity", "age", "gender"), (3, 6, 6), {"identity": 4, "age": 2, "gender": 1})


def test_parts_add_up_and_the_age_share_is_a_mean_of_a_channel_and_a_position_weight():
    """x_age / x = (c[channel] + s[position]) / 2: differences across channels do not depend on
    the position, differences across positions do not depend on the channel."""
    torch.manual_seed(0)
    model = build("mtlface", IMAGE, width=6).eval()
    z = model.encode(torch.randn(2, 3, 6, 6)) + 0.5  # keep x away from 0 so the ratio is defined
    x_id, x_age = model.decompose(z)
    torch.testing.assert_close(x_id + x_age, z)
    share = x_age / z
    assert 0 < share.min() and share.max() < 1
    across_channels = share - share[:, :1]  # (B, C, H, W) minus channel 0
    torch.testing.assert_close(across_channels, across_channels[:, :, :1, :1].expand_as(share))
    across_positions = share - share[:, :, :1, :1]
    torch.testing.assert_close(across_positions, across_positions[:, :1].expand_as(share))


def test_identity_head_reads_x_id_and_age_heads_read_x_age():
    torch.manual_seed(0)
    model = build("mtlface", IMAGE, width=6).eval()
    x = torch.randn(3, 3, 6, 6)
    out = model(x)
    x_id, x_age = model.decompose(model.encode(x))
    torch.testing.assert_close(out["identity"], model.heads["identity"](x_id))
    for t in ("age", "gender"):
        torch.testing.assert_close(out[t], model.heads[t](x_age))
    chosen = build("mtlface", IMAGE, width=6, age_tasks=("gender",))
    assert chosen.age_tasks == ("gender",)
    with pytest.raises(ValueError, match="age_tasks"):
        build("mtlface", IMAGE, age_tasks=("height",))


def test_neighbouring_age_groups_share_sigma_of_a_block():
    masks = group_channel_masks(7, 10, 0.2)  # blocks of 10 channels starting every 8
    assert masks.shape == (7, 10 + 6 * 8)
    assert (masks.sum(dim=1) == 10).all()
    overlap = masks @ masks.T
    assert (torch.diagonal(overlap, 1) == 2).all()  # sigma * unit channels in common
    assert (torch.diagonal(overlap, 2) == 0).all()
    assert (masks.sum(dim=0) > 0).all()  # no channel is unused by every group
    assert (group_channel_masks(3, 4, 0.0) @ group_channel_masks(3, 4, 0.0).T == 4 * torch.eye(3)).all()


def test_synthesis_at_an_age_group_uses_only_that_groups_channels():
    torch.manual_seed(0)
    model = build("mtlface", IMAGE, width=6, unit_channels=3, sigma=1 / 3).eval()
    x = torch.randn(2, 3, 6, 6)
    group = torch.tensor([2, 2])
    before = model.synthesize(x, group)
    assert before.shape == x.shape
    outside = model.icm.masks[2] == 0
    with torch.no_grad():
        for block in model.icm.blocks:  # change every channel group 2 does not own
            block.conv1[0].weight[outside] += 1.0
            block.conv2[0].weight[outside] -= 1.0
        model.icm.project[0].weight[outside] *= 3.0
    torch.testing.assert_close(model.synthesize(x, group), before)
    assert not torch.allclose(model.synthesize(x, torch.tensor([5, 5])), before)


def test_synthesis_trains_the_module_and_reaches_the_shared_encoder(params_with_grad):
    torch.manual_seed(0)
    model = build("mtlface", IMAGE, width=6)
    x = torch.randn(4, 3, 6, 6)
    reached = params_with_grad(model, model.synthesize(x, torch.arange(4)).square().sum())
    assert "icm.project.0.weight" in reached and "trunk.blocks.0.0.weight" in reached
    assert not any(n.startswith("heads.") for n in reached)


def test_refusals_and_registry(device, short_training, registry_output_shapes):
    with pytest.raises(ValueError, match="image"):
        build("mtlface", Problem(("a", "b"), (5,)))
    with pytest.raises(ValueError, match="sigma"):
        build("mtlface", IMAGE, sigma=-0.5)
    assert type(build("mtlface", IMAGE)) is MTLFace
    registry_output_shapes("mtlface", device)
    before, after = short_training("mtlface", True, device, 30)
    assert after < 0.5 * before


def test_task_specific_parameters_are_the_heads(split_by_task):
    torch.manual_seed(0)
    model = build("mtlface", IMAGE, width=6)
    for t, (own, reached) in split_by_task(model, torch.randn(3, 3, 6, 6)).items():
        assert own and own <= reached
        assert not any(n.startswith("icm.") for n in reached)


def _perturb_batch_norm(norm: torch.nn.BatchNorm2d, seed: int) -> None:
    """Running statistics and affine parameters far from the identity, so dropping the norm shows."""
    g = torch.Generator().manual_seed(seed)
    n = norm.num_features
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.2)
        norm.weight.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 2)
        norm.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64))


def _eval_norm(norm: torch.nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    return (y - norm.running_mean.view(shape)) * scale.view(shape) + norm.bias.view(shape)


def test_pyramid_is_average_plus_max_pooling_to_1x1_2x2_and_3x3_grids():
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    parts = []
    for s in (1, 2, 3):  # a 6x6 map cut into s x s cells of side 6 / s
        cells = x.reshape(2, 3, s, 6 // s, s, 6 // s)
        parts.append(cells.mean(dim=(3, 5)).flatten(1) + cells.amax(dim=(3, 5)).flatten(1))
    expected = torch.cat(parts, dim=1)
    assert expected.shape == (2, 3 * 14)
    torch.testing.assert_close(AgeIdentityDecomposition.pyramid(x), expected[:, :, None, None])


def test_default_reduction_is_16_and_spatial_kernel_is_7():
    module = AgeIdentityDecomposition(16)
    assert module.channel[0].in_channels == 16 * 14 and module.channel[0].out_channels == 14  # 224 // 16
    assert module.spatial[0].kernel_size == (7, 7)
    built = build("mtlface", IMAGE, width=8).decompose
    assert built.channel[0].out_channels == 7 and built.spatial[0].kernel_size == (7, 7)  # 112 // 16


def test_channel_and_spatial_weights_by_hand_with_batch_norm_before_each_sigmoid():
    torch.manual_seed(1)
    module = AgeIdentityDecomposition(4, reduction=4, kernel_size=3).double().eval()
    _perturb_batch_norm(module.channel[3], 1)
    _perturb_batch_norm(module.spatial[1], 2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    pyramid = module.pyramid(x)
    hidden = torch.relu(F.conv2d(pyramid, module.channel[0].weight))
    per_channel = torch.sigmoid(_eval_norm(module.channel[3], F.conv2d(hidden, module.channel[2].weight)))
    stacked = torch.stack([x.max(dim=1).values, x.mean(dim=1)], dim=1)  # channel max first, then mean
    per_position = torch.sigmoid(_eval_norm(module.spatial[1], F.conv2d(stacked, module.spatial[0].weight, padding=1)))
    got_channel, got_position = module.weights(x)
    torch.testing.assert_close(got_channel, per_channel)
    torch.testing.assert_close(got_position, per_position)
    x_id, x_age = module(x)
    torch.testing.assert_close(x_age, x * (per_channel + per_position) / 2)


def test_group_blocks_start_where_the_accumulated_integer_steps_land():
    # unit 4, sigma 0.1: a step of 3.6 channels, truncated after each addition: 0, 3, 6, 9
    # (int(g * 3.6) would give 0, 3, 7, 10)
    masks = group_channel_masks(4, 4, 0.1)
    assert masks.argmax(dim=1).tolist() == [0, 3, 6, 9]
    assert masks.shape == (4, 13)


def test_default_icm_has_seven_groups_of_four_channels_sigma_0_1_and_four_residual_blocks():
    icm = build("mtlface", IMAGE, width=6).icm
    assert icm.masks.shape == (7, 22)  # starts 0, 3, ..., 18 (steps of 3.6 truncated), last block ends at 22
    assert icm.masks.argmax(dim=1).tolist() == [0, 3, 6, 9, 12, 15, 18]
    assert (icm.masks.sum(dim=1) == 4).all()
    assert len(icm.blocks) == 4
    wide = build("mtlface", IMAGE, width=6, unit_channels=10).icm.masks  # sigma 0.1 of 10: one channel shared
    assert wide.argmax(dim=1).tolist() == [0, 9, 18, 27, 36, 45, 54]
    assert (torch.diagonal(wide @ wide.T, 1) == 1).all()


def test_conditional_residual_block_by_hand():
    torch.manual_seed(2)
    block = ConditionalResidualBlock(5).double().eval()
    for i, norm in enumerate((block.conv1[1], block.conv2[1])):
        _perturb_batch_norm(norm, 10 + i)
    with torch.no_grad():
        block.act1.weight.fill_(0.25)
        block.act2.weight.fill_(-0.5)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)[None, :, None, None]

    def prelu(v, slope):
        return torch.where(v > 0, v, slope * v)

    h = prelu(_eval_norm(block.conv1[1], F.conv2d(x, block.conv1[0].weight, padding=1)) * mask, 0.25)
    expected = prelu(x + _eval_norm(block.conv2[1], F.conv2d(h, block.conv2[0].weight, padding=1)) * mask, -0.5)
    torch.testing.assert_close(block(x, mask), expected)


def test_synthesis_adds_a_residual_made_from_x_id_to_the_input_image():
    torch.manual_seed(3)
    model = build("mtlface", IMAGE, width=6).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    group = torch.tensor([1, 4])
    x_id, x_age = model.decompose(model.encode(x))
    torch.testing.assert_close(model.synthesize(x, group), model.icm(x, x_id, group))
    assert not torch.allclose(model.icm(x, x_age, group), model.icm(x, x_id, group))
    with torch.no_grad():  # no residual at all: the synthesised face is the input image
        model.icm.to_image.weight.zero_()
        model.icm.to_image.bias.zero_()
    torch.testing.assert_close(model.synthesize(x, group), x)


def test_refusals_of_sizes_and_of_sigma_outside_0_to_1():
    """Channel counts, kernel size and residual block count must be positive; sigma, a share of a
    block, may be anything in [0, 1], both ends included."""
    from reference_impls.architectures.mtlface import IdentityConditionalModule
    for kw in ({"channels": 0}, {"kernel_size": 0}):
        with pytest.raises(ValueError):
            AgeIdentityDecomposition(**{"channels": 4, **kw})
    with pytest.raises(ValueError):
        IdentityConditionalModule(4, 3, residual_blocks=0)
    with pytest.raises(ValueError, match="sigma"):
        IdentityConditionalModule(4, 3, sigma=1.5)
    assert IdentityConditionalModule(4, 3, sigma=0.0).masks.shape == (7, 28)  # disjoint blocks of 4
    assert (IdentityConditionalModule(4, 3, sigma=1.0).masks == 1).all()  # every group owns the same block


def test_identity_conditional_module_defaults_follow_the_authors_code():
    """Seven age groups, blocks of four channels overlapping by sigma = 0.1, four residual blocks."""
    from reference_impls.architectures.mtlface import IdentityConditionalModule
    icm = IdentityConditionalModule(6, 3)
    assert icm.masks.argmax(dim=1).tolist() == [0, 3, 6, 9, 12, 15, 18] and icm.masks.shape == (7, 22)
    assert (icm.masks.sum(dim=1) == 4).all() and len(icm.blocks) == 4


def test_mtlface_passes_reduction_and_residual_blocks_on():
    model = build("mtlface", IMAGE, width=8, reduction=4, residual_blocks=2)
    assert model.decompose.channel[0].out_channels == 8 * 14 // 4
    assert len(model.icm.blocks) == 2


def test_identity_conditional_module_by_hand():
    """image + to_image(PReLU(BN(conv1x1(blocks(mask * PReLU(BN(conv1x1(x_id)))))))): 1x1 projection,
    batch norm and PReLU, the group's channels kept, the residual blocks, the same way back, added to the image."""
    from reference_impls.architectures.mtlface import IdentityConditionalModule
    torch.manual_seed(4)
    icm = IdentityConditionalModule(5, 3, age_groups=3, unit_channels=2, sigma=0.5, residual_blocks=1).double().eval()
    _perturb_batch_norm(icm.project[1], 20)
    _perturb_batch_norm(icm.back[1], 21)
    with torch.no_grad():
        icm.project[2].weight.fill_(0.2)
        icm.back[2].weight.fill_(-0.3)
    image = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x_id = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    group = torch.tensor([0, 2])
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float64)[:, :, None, None]  # starts 0, 1, 2

    def prelu(v, slope):
        return torch.where(v > 0, v, slope * v)

    h = prelu(_eval_norm(icm.project[1], F.conv2d(x_id, icm.project[0].weight)), 0.2) * mask
    h = icm.blocks[0](h, mask)
    back = prelu(_eval_norm(icm.back[1], F.conv2d(h, icm.back[0].weight)), -0.3)
    expected = image + F.conv2d(back, icm.to_image.weight, icm.to_image.bias)
    torch.testing.assert_close(icm(image, x_id, group), expected)
