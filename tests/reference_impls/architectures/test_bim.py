"""BIM: task-first / position-first orders, BI-Scan causality and full coverage, gradient paths."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.bim import (
    BIM, BiInteractionScan, CrossTaskRefine, MultiScaleSingleTask, position_first, task_first, undo_position_first, undo_task_first,
)

from .conftest import assert_each_task_owns_exactly, names_under

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device):
    torch.manual_seed(0)
    return BIM(TASKS, 3, OUT, channels=8).to(device)


def test_scan_orders_by_hand_and_their_inverses(device):
    # token value = 10 * task + position, 2 tasks x 3 positions, one channel
    seqs = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]], device=device).view(1, 2, 3, 1)
    assert task_first(seqs).flatten().tolist() == [0, 1, 2, 10, 11, 12]
    assert position_first(seqs).flatten().tolist() == [0, 10, 1, 11, 2, 12]
    torch.testing.assert_close(undo_task_first(task_first(seqs), 2), seqs)
    torch.testing.assert_close(undo_position_first(position_first(seqs), 2), seqs)


def test_forward_half_is_causal_in_task_then_position_order(device):
    torch.manual_seed(0)
    scan = BiInteractionScan(4).to(device)
    seqs = torch.randn(1, 2, 5, 4, device=device)
    other = torch.randn_like(seqs)
    other[:, 0, 0] = seqs[:, 0, 0]  # keep only task 0 at position 0
    with torch.no_grad():
        fwd, bwd = scan.halves(seqs)
        fwd2, bwd2 = scan.halves(other)
        # the first token of both forward orders sees only itself ...
        torch.testing.assert_close(fwd[:, 0, 0], fwd2[:, 0, 0])
        assert not torch.allclose(bwd[:, 0, 0], bwd2[:, 0, 0])  # ... the backward half sees the rest
        # and symmetrically the last task's last position, read right to left, sees only itself
        third = torch.randn_like(seqs)
        third[:, -1, -1] = seqs[:, -1, -1]
        torch.testing.assert_close(scan.halves(third)[1][:, -1, -1], bwd[:, -1, -1])


def test_every_task_position_reaches_every_other(device):
    torch.manual_seed(0)
    block = CrossTaskRefine(TASKS, 4).to(device)
    feats = {t: torch.randn(1, 3, 4, 4, device=device) for t in TASKS}
    with torch.no_grad():
        before = block(feats)["seg"]
        for i, j in [(0, 0), (2, 3), (1, 1)]:
            moved = {**feats, "depth": feats["depth"].clone()}
            moved["depth"][0, i, j] += torch.randn(4, device=device)  # one pixel of the *other* task
            changed = (block(moved)["seg"] - before).abs().amax(-1)
            assert (changed > 1e-7).all(), (i, j)


def test_sequence_is_linear_in_tasks(device):
    torch.manual_seed(0)
    scan = BiInteractionScan(4).to(device)
    seqs = torch.randn(2, 3, 6, 4, device=device)  # 3 tasks x 6 positions
    assert task_first(seqs).shape == position_first(seqs).shape == (2, 18, 4)  # T*L tokens, not T^2
    assert scan(seqs).shape == seqs.shape


def test_task_loss_reaches_every_tasks_features_but_not_other_private_parts(device, params_with_grad):
    model = make(device)
    out = model(torch.randn(2, 3, 16, 16, device=device))
    names = params_with_grad(model, out["seg"].square().mean())
    for t in TASKS:
        assert f"encoder.fuse_skip.{t}.weight" in names, t  # every task's features reach seg via BI-Scan
    assert any(n.startswith("cross.scan.") for n in names)
    assert any(n.startswith("single.seg.coarse.") for n in names)  # the half-resolution scan is used
    assert not any(n.startswith(("cross.out.depth", "single.depth", "heads.depth")) for n in names)


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("bim", device)
    for dense in (True, False):
        first, last = short_training("bim", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("bim", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def scan_copy(ssm, k, seq):
    """Copy ``k`` of a batched SelectiveSSM, scanning ``seq`` left to right."""
    return ssm(torch.stack([seq, seq]))[k]


def halves_by_hand(scan, seqs):
    """The forward half (channels :2) scanned task-first then position-first, and the backward
    half (channels 2:) the same way with every sequence reversed, from the two scans' weights."""
    fwd, bwd = seqs[..., :2], seqs[..., 2:]
    f = undo_task_first(scan_copy(scan.task_scan, 0, task_first(fwd)), 3)
    f = undo_position_first(scan_copy(scan.position_scan, 0, position_first(f)), 3)
    b = undo_task_first(scan_copy(scan.task_scan, 1, task_first(bwd).flip(1)).flip(1), 3)
    b = undo_position_first(scan_copy(scan.position_scan, 1, position_first(b).flip(1)).flip(1), 3)
    return f, b


def test_bi_scan_by_hand_task_first_then_position_first_each_half_in_its_direction(device):
    torch.manual_seed(0)
    scan = BiInteractionScan(4).to(device)
    seqs = torch.randn(2, 3, 5, 4, device=device)  # 3 tasks x 5 positions
    with torch.no_grad():
        f, b = halves_by_hand(scan, seqs)
        got_f, got_b = scan.halves(seqs)
    torch.testing.assert_close(got_f, f)
    torch.testing.assert_close(got_b, b)


def test_cross_task_refine_by_hand_each_task_maps_its_own_slice(device):
    torch.manual_seed(0)
    block = CrossTaskRefine(TASKS, 4).to(device)
    feats = {t: torch.randn(2, 3, 4, 4, device=device) for t in TASKS}
    with torch.no_grad():
        out = block(feats)
        seqs = torch.stack([block.norm(feats[t]).reshape(2, 12, 4) for t in TASKS], dim=1)
        mixed = block.scan(seqs)
        for i, t in enumerate(TASKS):
            torch.testing.assert_close(out[t], feats[t] + block.out[t](mixed[:, i].reshape(2, 3, 4, 4)))


def test_multi_scale_block_by_hand(device):
    """x + W_out((SS2D_fine(z) + up(SS2D_coarse(avgpool_2(z)))) * SiLU(W_g z)), z = LN(x)."""
    torch.manual_seed(0)
    block = MultiScaleSingleTask(4).to(device)
    x = torch.randn(2, 4, 6, 4, device=device)
    with torch.no_grad():
        z = block.norm(x)
        small = torch.nn.functional.avg_pool2d(z.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (2, 2, 3, 4)
        coarse = torch.nn.functional.interpolate(block.coarse(small).permute(0, 3, 1, 2), size=(4, 6),
                                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        expected = x + block.out((block.fine(z) + coarse) * torch.nn.functional.silu(block.gate(z)))
        torch.testing.assert_close(block(x), expected)


def test_each_task_owns_its_cross_task_projection_multi_scale_block_and_head(split_by_task):
    """BI-Scan makes the expand/skip layers and the scans shared; what only task t's output
    reaches is its own output projection in the cross-task block, its MS-Scan block and its head."""
    model = make("cpu")
    split = split_by_task(model, torch.randn(2, 3, 16, 16))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"cross.out.{t}.", f"single.{t}.", f"heads.{t}."))


def test_multi_scale_block_pools_an_odd_grid_with_the_edge_windows_cut_short(device):
    """Caffe-style ceil pooling: on a 5 x 3 map the coarse branch reads a 3 x 2 grid of 2x2
    means, the last row and column of windows averaging only the cells that exist."""
    torch.manual_seed(0)
    block = MultiScaleSingleTask(4).to(device).double()
    x = torch.randn(2, 5, 3, 4, device=device, dtype=torch.float64)
    with torch.no_grad():
        z = block.norm(x)
        rows = [torch.stack([z[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2)) for j in range(2)], 1)
                for i in range(3)]
        small = torch.stack(rows, 1)  # (2, 3, 2, 4)
        coarse = torch.nn.functional.interpolate(block.coarse(small).permute(0, 3, 1, 2), size=(5, 3),
                                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        expected = x + block.out((block.fine(z) + coarse) * torch.nn.functional.silu(block.gate(z)))
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_bi_scan_output_puts_the_forward_half_first_and_the_backward_half_last(device):
    """forward() = [forward-half result, backward-half result] on the channel axis, each half
    rebuilt here from the two scans (not from halves())."""
    torch.manual_seed(0)
    scan = BiInteractionScan(4).to(device).double()
    seqs = torch.randn(2, 3, 5, 4, device=device, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(scan(seqs), torch.cat(halves_by_hand(scan, seqs), dim=-1), rtol=1e-10, atol=1e-10)


def test_the_state_size_reaches_every_scan_and_the_defaults_build():
    """d_state (from the registry's keyword arguments too) sizes every selective scan: the BI-Scan's
    task and position scans and both MS-Scan SS2Ds; the constructor's defaults give a working model."""
    from reference_impls.architectures.mtmamba import SelectiveSSM

    problem = registry.Problem(TASKS, (3, 8, 8), OUT, dense=True)
    model = registry.build("bim", problem, width=4, d_state=3)
    scans = [m for m in model.modules() if isinstance(m, SelectiveSSM)]
    assert len(scans) == 2 + 2 * len(TASKS) and all(m.d_state == 3 for m in scans)
    assert all(m.A_log.shape[-1] == 3 for m in scans)
    default = BIM(TASKS, 3, OUT)
    assert default(torch.randn(1, 3, 8, 8))["seg"].shape == (1, 3, 8, 8)


def test_gate_and_output_projections_have_no_bias_and_heads_read_one_pixel():
    """x + W_out((fine + coarse) * SiLU(W_g z)) with plain matrices, and a 1x1 conv per task as head."""
    torch.manual_seed(0)
    block = MultiScaleSingleTask(4)
    x = torch.randn(2, 4, 6, 4)
    with torch.no_grad():
        z = block.norm(x)
        small = torch.nn.functional.avg_pool2d(z.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        coarse = torch.nn.functional.interpolate(block.coarse(small).permute(0, 3, 1, 2), size=(4, 6),
                                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        gated = (block.fine(z) + coarse) * torch.nn.functional.silu(z @ block.gate.weight.T)
        torch.testing.assert_close(block(x), x + gated @ block.out.weight.T)
    model = make("cpu")
    f = torch.randn(1, 8, 5, 5)
    for t in TASKS:
        head = model.heads[t]
        by_pixel = torch.einsum("oc,bchw->bohw", head.weight.flatten(1), f) + head.bias[:, None, None]
        torch.testing.assert_close(head(f), by_pixel)
