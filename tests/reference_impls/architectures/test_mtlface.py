import pytest
import torch

from reference_impls.architectures.mtlface import MTLFace, group_channel_masks
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
