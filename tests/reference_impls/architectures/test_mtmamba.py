"""MTMamba: the S6 scan against its recurrence, four-way SS2D, the CTM gate, gradient paths."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.mtmamba import (
    CTMBlock, ExpandingEncoder, MTMamba, SS2D, SelectiveSSM, STMBlock, map_heads, selective_scan,
)

from .conftest import reached_by_no_other

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device):
    torch.manual_seed(0)
    return MTMamba(TASKS, 3, OUT, channels=8).to(device)


def naive_scan(x, delta, A, B, C, D):
    """The recurrence written out one step at a time."""
    b, L, d = x.shape
    h = torch.zeros(b, d, A.shape[1], dtype=x.dtype, device=x.device)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, dim=1)


def scan_inputs(device, b=2, L=37, d=3, n=4):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    return (rand(b, L, d), torch.nn.functional.softplus(rand(b, L, d)), -rand(d, n).abs() - 0.1,
            rand(b, L, n), rand(b, L, n), rand(d))


def test_chunked_scan_equals_the_step_by_step_recurrence(device):
    args = scan_inputs(device)  # L = 37: chunks of 16 leave a partial last chunk
    expected = naive_scan(*args)
    for chunk in (1, 5, 16, 64):
        torch.testing.assert_close(selective_scan(*args, chunk=chunk), expected)


def test_hand_computed_two_step_scan(device):
    x = torch.tensor([[[1.0], [2.0]]], device=device)
    delta = torch.tensor([[[0.5], [1.0]]], device=device)
    A = torch.tensor([[-2.0]], device=device)
    B = torch.tensor([[[3.0], [1.0]]], device=device)
    C = torch.tensor([[[1.0], [4.0]]], device=device)
    D = torch.tensor([0.5], device=device)
    h1 = 0.5 * 3.0 * 1.0  # Δ1 B1 x1
    h2 = torch.exp(torch.tensor(-2.0)).item() * h1 + 1.0 * 1.0 * 2.0  # exp(Δ2 A) h1 + Δ2 B2 x2
    expected = torch.tensor([[[1.0 * h1 + 0.5], [4.0 * h2 + 1.0]]], device=device)
    torch.testing.assert_close(selective_scan(x, delta, A, B, C, D), expected)


def test_fast_forgetting_limit_keeps_only_the_current_token(device):
    x, delta, A, B, C, D = scan_inputs(device)
    y = selective_scan(x, delta, A * 1e4, B, C, D)  # exp(Δ A) ~ 0: no memory of the past
    expected = (C * B).sum(-1, keepdim=True) * delta * x + D * x
    torch.testing.assert_close(y, expected)


def test_ss2d_every_pixel_sees_every_other_pixel(device):
    torch.manual_seed(0)
    ssm = SS2D(4, 8).to(device)
    x = torch.randn(1, 5, 6, 4, device=device)
    with torch.no_grad():
        before = ssm(x)
        for i, j in [(0, 0), (4, 5), (2, 3)]:
            x2 = x.clone()
            x2[0, i, j] += 1.0
            changed = (ssm(x2) - before).abs().amax(-1)
            assert (changed > 1e-7).all(), (i, j)  # forward and reversed scans cover both sides


def test_ctm_shared_branch_reads_all_tasks_and_the_gate_selects_it(device):
    torch.manual_seed(0)
    ctm = CTMBlock(TASKS, 4).to(device)
    feats = {t: torch.randn(2, 3, 3, 4, device=device) for t in TASKS}
    moved = {**feats, "depth": feats["depth"] + torch.randn_like(feats["depth"])}
    with torch.no_grad():
        assert not torch.allclose(ctm(feats)["seg"], ctm(moved)["seg"])  # learned gate: depth reaches seg
        zeros = {t: torch.zeros(2, 3, 3, 8, device=device) for t in TASKS}
        # g = 0: only the task's own scan -> seg ignores depth entirely.
        torch.testing.assert_close(ctm(feats, zeros)["seg"], ctm(moved, zeros)["seg"])
        ones = {t: torch.ones_like(z) for t, z in zeros.items()}
        shared = ctm.shared(ctm.shared_norm(torch.cat([feats[t] for t in TASKS], -1)))
        torch.testing.assert_close(ctm(feats, ones)["seg"], feats["seg"] + ctm.out["seg"](shared))
        g = ctm.gates(feats)["seg"]
        assert ((g > 0) & (g < 1)).all() and g.shape == (2, 3, 3, 8)


def test_task_loss_reaches_every_stm_block_but_only_its_own_private_ctm_parts(device, params_with_grad):
    model = make(device)
    out = model(torch.randn(2, 3, 16, 16, device=device))
    names = params_with_grad(model, out["seg"].square().mean())
    for t in TASKS:
        assert any(n.startswith(f"stm.{t}.") for n in names), t  # via the shared CTM scan
    assert any(n.startswith("ctm.shared.") for n in names)
    assert not any(n.startswith(("ctm.own.depth", "ctm.gate.depth", "ctm.out.depth", "heads.depth")) for n in names)
    specific = {id(p) for p in model.task_specific_parameters("depth")}
    assert not any(id(p) in specific for n, p in model.named_parameters() if n in names)


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("mtmamba", device)
    for dense in (True, False):
        first, last = short_training("mtmamba", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("mtmamba", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_ctm_by_hand_each_task_gates_with_its_own_features(device):
    """F_t + W_t(g_t * shared + (1 - g_t) * SS2D_t(LN_t F_t)), g_t = sigmoid(W_g,t LN_t F_t), for every task."""
    torch.manual_seed(0)
    ctm = CTMBlock(TASKS, 4).to(device)
    feats = {t: torch.randn(2, 3, 3, 4, device=device) for t in TASKS}
    with torch.no_grad():
        out = ctm(feats)
        shared = ctm.shared(ctm.shared_norm(torch.cat([feats[t] for t in TASKS], -1)))
        for t in TASKS:
            z = ctm.norm[t](feats[t])
            g = torch.sigmoid(ctm.gate[t](z))
            expected = feats[t] + ctm.out[t](g * shared + (1 - g) * ctm.own[t](z))
            torch.testing.assert_close(out[t], expected)


def test_stm_block_by_hand(device):
    """F + W_out(SS2D(LN F) * SiLU(W_z LN F))."""
    torch.manual_seed(0)
    block = STMBlock(4).to(device)
    x = torch.randn(2, 3, 5, 4, device=device)
    with torch.no_grad():
        z = block.norm(x)
        expected = x + block.out(block.ssm(z) * torch.nn.functional.silu(block.gate(z)))
        torch.testing.assert_close(block(x), expected)


def test_ss2d_by_hand_four_directions_folded_back_to_their_pixels(device):
    """Each direction's scan output returns to the pixel it was read from (checked with a raster loop)."""
    torch.manual_seed(0)
    ssm = SS2D(4, 6).to(device)
    x = torch.randn(2, 3, 5, 4, device=device)
    with torch.no_grad():
        u = torch.nn.functional.silu(ssm.conv(ssm.in_proj(x).permute(0, 3, 1, 2)))  # (b, c, h, w)
        rows = u.flatten(2).transpose(1, 2)
        cols = u.transpose(2, 3).flatten(2).transpose(1, 2)
        ys = ssm.ssm(torch.stack([rows, cols, rows.flip(1), cols.flip(1)]))
        folded = torch.zeros(2, 3, 5, 6, device=device)
        for i in range(3):
            for j in range(5):
                r, c = i * 5 + j, j * 3 + i  # position of pixel (i, j) in row- and column-major order
                folded[:, i, j] = ys[0][:, r] + ys[2][:, 14 - r] + ys[1][:, c] + ys[3][:, 14 - c]
        torch.testing.assert_close(ssm(x), ssm.out_norm(folded))


def test_expanding_encoder_by_hand(device):
    """Per task: 2x2 patch expanding (with its LayerNorm) of the 1/4 map, concatenated with the 1/2 skip, projected."""
    torch.manual_seed(0)
    enc = ExpandingEncoder(TASKS, 3, 4).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        half = enc.down_half(enc.stem(x))
        quarter = enc.down_quarter(half)
        out = enc(x)
        for t in TASKS:
            expanded = enc.expand[t](quarter.permute(0, 2, 3, 1)).reshape(2, 2, 2, 4, 2, 2)  # (b, h, w, c, dy, dx)
            up = expanded.permute(0, 1, 4, 2, 5, 3).reshape(2, 4, 4, 4)  # pixel (2h + dy, 2w + dx), channels last
            up = enc.expand_norm[t](up)
            expected = enc.fuse_skip[t](torch.cat([up, half.permute(0, 2, 3, 1)], dim=-1))
            torch.testing.assert_close(out[t], expected)


def test_patch_expanding_ends_in_a_layer_norm(device):
    """Swin-Unet's patch expanding (used by the official decoder): linear expand, 2x2 rearrange, LayerNorm.

    The norm makes the expanded features invariant to the scale of the expanding weights (weights
    scaled up first so that the norm's eps is negligible).
    """
    torch.manual_seed(0)
    enc = ExpandingEncoder(TASKS, 3, 4).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        for t in TASKS:
            enc.expand[t].weight.mul_(100.0)
        before = enc(x)
        for t in TASKS:
            enc.expand[t].weight.mul_(10.0)
        after = enc(x)
    for t in TASKS:
        torch.testing.assert_close(after[t], before[t], atol=1e-4, rtol=1e-4)


def test_selective_ssm_by_hand_each_direction_its_own_token_dependent_delta_b_c(device):
    """Per copy k: [dt, B, C] = x W_x,k; Δ = softplus(dt W_dt,k + b_k); A = -exp(A_log,k) < 0; the recurrence."""
    torch.manual_seed(0)
    ssm = SelectiveSSM(3, d_state=2, dt_rank=1, copies=4).to(device).double()
    x = torch.randn(4, 2, 6, 3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for p in (ssm.dt_proj, ssm.dt_bias, ssm.A_log, ssm.D):
            p.add_(0.3 * torch.randn_like(p))  # every copy's parameters differ
        out = ssm(x)
        for k in range(4):
            proj = x[k] @ ssm.x_proj[k]
            dt, B, C = proj[..., :1], proj[..., 1:3], proj[..., 3:]
            delta = torch.nn.functional.softplus(dt @ ssm.dt_proj[k] + ssm.dt_bias[k])
            A = -ssm.A_log[k].exp()
            assert (A < 0).all()
            torch.testing.assert_close(out[k], naive_scan(x[k], delta, A, B, C, ssm.D[k]))


def test_ssm_initialisation_s4d_real_a_and_delta_one_hundredth(device):
    """A = -(1, ..., N) for every channel and copy (S4D-real); softplus(dt_bias) = Δ = 0.01 at the start."""
    ssm = SelectiveSSM(3, d_state=4, copies=2).to(device)
    torch.testing.assert_close(-ssm.A_log.exp(), -torch.arange(1.0, 5.0, device=device).expand(2, 3, 4))
    torch.testing.assert_close(torch.nn.functional.softplus(ssm.dt_bias), torch.full((2, 3), 0.01, device=device))


def test_heads_predict_per_pixel_or_from_the_spatial_mean(device):
    torch.manual_seed(0)
    heads = torch.nn.ModuleDict({t: torch.nn.Conv2d(4, OUT[t], 1) for t in TASKS}).to(device)
    feats = {t: torch.randn(2, 3, 5, 4, device=device) for t in TASKS}
    with torch.no_grad():
        pooled = map_heads(heads, feats, (6, 10), dense=False)
        dense = map_heads(heads, feats, (3, 5), dense=True)
        for t in TASKS:
            per_pixel = feats[t] @ heads[t].weight[:, :, 0, 0].T + heads[t].bias  # (b, h, w, out)
            torch.testing.assert_close(dense[t], per_pixel.permute(0, 3, 1, 2))  # same size: no resampling
            torch.testing.assert_close(pooled[t], per_pixel.mean(dim=(1, 2)))


def test_a_task_claims_exactly_the_parameters_no_other_task_reaches(device, split_by_task):
    """Its CTM norm, own scan, gate and output map, and its head; STM blocks feed the shared scan."""
    model = make(device)
    split = split_by_task(model, torch.randn(2, 3, 8, 8, device=device))
    for t, (claimed, _) in split.items():
        assert claimed == reached_by_no_other(split, t)
        assert {n.split(".")[1] for n in claimed if n.startswith("ctm.")} == {"norm", "own", "gate", "out"}


def _ssms(module):
    return [m for m in module.modules() if isinstance(m, SelectiveSSM)]


def test_state_size_defaults_to_four_and_reaches_every_scan():
    """``d_state`` 4 here (module docstring), for the model and each block built alone; a chosen
    state size (also through ``from_problem``) reaches every SSM of the STM and CTM blocks."""
    for module in (MTMamba(TASKS, 3, OUT), STMBlock(4), CTMBlock(TASKS, 4), SS2D(4, 8), SelectiveSSM(4)):
        ssms = _ssms(module)
        assert ssms and all(s.d_state == 4 and s.A_log.shape[-1] == 4 for s in ssms)
    problem = registry.Problem(TASKS, (3, 8, 8), OUT, dense=True)
    for model in (MTMamba(TASKS, 3, OUT, d_state=2), MTMamba.from_problem(problem, d_state=2)):
        ssms = _ssms(model)
        assert len(ssms) == len(TASKS) + 1 + len(TASKS)  # one per STM block, the shared and each own CTM scan
        assert all(s.d_state == 2 and s.A_log.shape[-1] == 2 for s in ssms)


def test_mamba_blocks_expand_the_width_twice_and_the_model_predicts_per_pixel_by_default():
    """Mamba's expansion factor E = 2 inside STM and CTM blocks; MTMamba is a dense predictor."""
    stm, ctm = STMBlock(4), CTMBlock(TASKS, 4)
    assert stm.gate.out_features == stm.out.in_features == stm.ssm.in_proj.out_features == 8
    assert ctm.shared.in_proj.out_features == 8 and all(ctm.own[t].in_proj.out_features == 8 for t in TASKS)
    torch.manual_seed(0)
    out = MTMamba(TASKS, 3, OUT)(torch.randn(2, 3, 8, 12))
    assert {t: tuple(o.shape) for t, o in out.items()} == {"seg": (2, 3, 8, 12), "depth": (2, 1, 8, 12)}


def test_equation_linear_maps_have_no_bias_and_the_conv_is_depthwise():
    """W_z, W_out (Eq. 14-18), W_g,t, W_t (Eqs. 19-25) and SS2D's input map carry no bias: the
    docstring's swap of g_t and 1 - g_t relies on the gate's map having none. SS2D's 3x3
    convolution is depthwise: a channel's output reads only that channel."""
    torch.manual_seed(0)
    stm, ctm = STMBlock(4), CTMBlock(TASKS, 4)
    linears = [stm.gate, stm.out, stm.ssm.in_proj, ctm.shared.in_proj]
    linears += [m[t] for m in (ctm.gate, ctm.out) for t in TASKS] + [ctm.own[t].in_proj for t in TASKS]
    assert all(lin.bias is None for lin in linears)
    conv = stm.ssm.conv
    u = torch.zeros(1, 8, 5, 5)
    u[0, 3] = torch.randn(5, 5)
    with torch.no_grad():
        moved = conv(u) - conv(torch.zeros_like(u))
    assert moved[0, 3].abs().sum() > 0
    assert torch.equal(moved[0, :3], torch.zeros(3, 5, 5)) and torch.equal(moved[0, 4:], torch.zeros(4, 5, 5))
