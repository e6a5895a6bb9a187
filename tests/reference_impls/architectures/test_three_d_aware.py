"""3D-aware MTL: features lifted to a tri-plane, task fields volume-rendered, used in training only."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.three_d_aware import (ThreeDAwareMTL, orthographic_rays, render_field,
                                                         sample_triplane, volume_render)

from .harness_probe import harness_step

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return ThreeDAwareMTL(TASKS, 3, OUT, channels=8, **kw).to(device=device, dtype=dtype)


def bilinear(plane, col, row):
    """Reference look-up of a ``(P, h, w)`` plane at [-1, 1] coordinates, pixel centres, zero outside."""
    _, h, w = plane.shape
    u, v = ((col + 1) * w - 1) / 2, ((row + 1) * h - 1) / 2  # continuous column / row index
    u0, v0 = int(torch.floor(u)), int(torch.floor(v))
    total = torch.zeros(plane.shape[0], dtype=plane.dtype)
    for du in (0, 1):
        for dv in (0, 1):
            c, r = u0 + du, v0 + dv
            weight = (1 - abs(u - c)) * (1 - abs(v - r))
            if 0 <= c < w and 0 <= r < h:
                total += weight * plane[:, r, c]
    return total


def test_a_point_feature_is_the_sum_of_its_three_plane_lookups():
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(1, 3, 4, 5, 7, generator=g, dtype=torch.float64)  # P=4 channels, 5x7 planes
    points = torch.rand(6, 3, generator=g, dtype=torch.float64) * 2 - 1
    got = sample_triplane(planes, points)[0]
    for n, (x, y, z) in enumerate(points):
        xy, xz, yz = planes[0]
        expected = bilinear(xy, x, y) + bilinear(xz, x, z) + bilinear(yz, z, y)
        torch.testing.assert_close(got[n], expected)


def test_volume_rendering_composites_front_to_back():
    g = torch.Generator().manual_seed(1)
    sigma = torch.rand(3, 6, generator=g, dtype=torch.float64) * 4
    values = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    delta = 0.25
    rendered, weights = volume_render(sigma, values, delta)
    for r in range(3):
        seen = 0.0
        expected = torch.zeros(2, dtype=torch.float64)
        for k in range(6):
            w = torch.exp(torch.tensor(-seen)) * (1 - torch.exp(-sigma[r, k] * delta))
            torch.testing.assert_close(weights[r, k], w)
            expected += w * values[r, k]
            seen += float(sigma[r, k]) * delta
        torch.testing.assert_close(rendered[r], expected)
    # what is not absorbed is the light left after the last sample
    torch.testing.assert_close(weights.sum(-1), 1 - torch.exp(-sigma.sum(-1) * delta))


def test_orthographic_rays_are_parallel_pixel_centred_and_ordered_near_to_far():
    points, depths, delta = orthographic_rays(3, 4, 5, device="cpu", dtype=torch.float64)
    assert points.shape == (3, 4, 5, 3) and delta == pytest.approx(0.4)
    xs = torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64)
    ys = torch.tensor([-2 / 3, 0.0, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(points[..., 0], xs.view(1, 4, 1).expand(3, 4, 5))
    torch.testing.assert_close(points[..., 1], ys.view(3, 1, 1).expand(3, 4, 5))
    torch.testing.assert_close(depths, torch.tensor([-0.8, -0.4, 0.0, 0.4, 0.8], dtype=torch.float64))
    torch.testing.assert_close(points[..., 2], depths.expand(3, 4, 5))
    rotation = torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]], dtype=torch.float64)  # 90 degrees about y
    turned, _, _ = orthographic_rays(3, 4, 5, rotation, torch.tensor([0.1, 0.0, 0.0]), device="cpu",
                                     dtype=torch.float64)
    torch.testing.assert_close(turned, points @ rotation.T + torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64))


def two_walls():
    """A scene: opaque walls at z = -0.375 (value +1 around it) and z = +0.375 (value -1)."""
    planes = torch.zeros(1, 3, 2, 8, 8, dtype=torch.float64)  # channel 0 density, 1 value; rows of xz are z
    planes[0, 1, 0, 2] = 60.0  # z row 2: centre -0.375
    planes[0, 1, 0, 5] = 60.0  # z row 5: centre +0.375
    planes[0, 1, 1, :4] = 1.0  # z < 0
    planes[0, 1, 1, 4:] = -1.0  # z > 0
    decode = {"task": lambda f: (f[..., 0].clamp(min=0), f[..., 1:])}
    return planes, decode


def test_the_front_wall_hides_the_back_one_and_the_camera_behind_sees_the_other():
    planes, decode = two_walls()
    front = render_field(planes, decode, 32)["task"]
    torch.testing.assert_close(front.map, torch.ones_like(front.map), atol=1e-5, rtol=0)
    assert ((front.depth > -0.625) & (front.depth < -0.375)).all()  # the surface of the near wall
    torch.testing.assert_close(front.weights.sum(-1), torch.ones_like(front.depth), atol=1e-5, rtol=0)
    behind = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))  # 180 degrees about y
    back = render_field(planes, decode, 32, rotation=behind)["task"]
    torch.testing.assert_close(back.map, -torch.ones_like(back.map), atol=1e-5, rtol=0)
    assert ((back.depth > -0.625) & (back.depth < -0.375)).all()  # as near, from the other side


def test_moving_the_camera_moves_the_rendering():
    model = make("cpu", torch.float64, render_stride=1)
    z = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        base = {t: r.map for t, r in model.render(z).items()}
        one_pixel = torch.tensor([2 / 5, 0.0, 0.0], dtype=torch.float64)  # one column of a 5-wide image
        shifted = {t: r.map for t, r in model.render(z, translation=one_pixel).items()}
        spun = {t: r.map for t, r in model.render(z, rotation=torch.diag(torch.tensor([-1.0, -1.0, 1.0]))).items()}
    for t in TASKS:
        torch.testing.assert_close(shifted[t][..., :-1], base[t][..., 1:])
        assert not torch.allclose(shifted[t], base[t])
        torch.testing.assert_close(spun[t], base[t].flip(-1, -2))  # 180 degrees about the viewing axis


def test_a_feature_cell_reaches_exactly_its_row_and_column_of_the_rendering():
    """Cell (i, j) of f(I) sits in the xy plane at (x_j, y_i), in the xz plane at depth row i and in
    the yz plane at depth column j: it is seen by pixel (i, j), by column j and by row i only."""
    model = make("cpu", torch.float64, render_stride=1)
    z = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    i, j = 1, 4
    moved = z.clone()
    moved[0, :, i, j] += 1.0
    with torch.no_grad():
        before, after = model.render(z), model.render(moved)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[i, :] = expected[:, j] = True
    for t in TASKS:
        changed = (after[t].map - before[t].map).abs().amax(dim=(0, 1))
        assert torch.equal(changed > 1e-9, expected), t
        assert (changed[~expected] == 0).all()


def test_the_regulariser_is_dropped_at_inference(monkeypatch):
    model = make("cpu")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        final, rendered = model.forward_with_intermediate(x)
        for p in [*model.to_planes.parameters(), *model.fields.parameters()]:
            p.add_(torch.randn_like(p))
        monkeypatch.setattr(model, "render", lambda *a, **k: pytest.fail("forward ran the renderer"))
        out = model(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], final[t])
        torch.testing.assert_close(out[t], model.heads[t](model.encoder(x)))
    assert rendered["seg"].shape == (2, 3, 4, 4) and rendered["depth"].shape == (2, 1, 4, 4)


def test_a_rendered_loss_reaches_the_shared_encoder_through_the_field_only(device, params_with_grad):
    model = make(device)
    _, rendered = model.forward_with_intermediate(torch.randn(2, 3, 8, 8, device=device))
    names = params_with_grad(model, rendered["seg"].square().mean())
    assert {n.split(".")[0] for n in names} == {"encoder", "to_planes", "fields"}
    assert all(n.startswith("fields.seg.") for n in names if n.startswith("fields"))
    assert any(n.startswith("encoder.blocks.0") for n in names)  # all the way into f


def test_objective_is_the_task_losses_plus_alpha_times_the_rendered_losses():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    targets = {"seg": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)}
    losses = {t: F.mse_loss for t in TASKS}
    model = make("cpu", alpha=0.5)
    outputs, rendered = model.forward_with_intermediate(x)
    plain = sum(F.mse_loss(outputs[t], targets[t]) for t in TASKS)
    up = {t: F.interpolate(rendered[t], size=(8, 8), mode="bilinear", align_corners=False) for t in TASKS}
    regulariser = sum(F.mse_loss(up[t], targets[t]) for t in TASKS)
    torch.testing.assert_close(model.objective(x, targets, losses), plain + 0.5 * regulariser)
    model.alpha = 0.0
    torch.testing.assert_close(model.objective(x, targets, losses), plain)  # vanilla MTL


def test_fitting_the_objective_teaches_the_field_to_render_the_labels():
    torch.manual_seed(0)
    model = make("cpu", render_stride=1)
    x = torch.randn(4, 3, 6, 6)
    targets = {"seg": x.clone(), "depth": x[:, :1].clone()}
    losses = {t: F.mse_loss for t in TASKS}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)

    def rendered_loss():
        _, rendered = model.forward_with_intermediate(x)
        return sum(F.mse_loss(rendered[t], targets[t]) for t in TASKS).item()

    first = rendered_loss()
    for _ in range(40):
        opt.zero_grad()
        model.objective(x, targets, losses).backward()
        opt.step()
    assert rendered_loss() < 0.5 * first


def test_density_is_per_task_by_default_and_one_field_when_shared():
    z = torch.randn(2, 8, 6, 6)
    per_task = make("cpu").render(z)
    assert not torch.allclose(per_task["seg"].weights, per_task["depth"].weights)
    shared = make("cpu", shared_density=True)
    rendered = shared.render(z)
    torch.testing.assert_close(rendered["seg"].weights, rendered["depth"].weights)
    torch.testing.assert_close(rendered["seg"].depth, rendered["depth"].depth)
    assert shared.fields["seg"][-1].out_features == 3 and make("cpu").fields["seg"][-1].out_features == 4
    shared_names = {id(p) for p in shared.shared_parameters()}
    assert all(id(p) in shared_names for p in shared.density.parameters())


@pytest.mark.parametrize("shared_density", [False, True])
def test_densities_are_non_negative_so_ray_weights_are_a_sub_probability(shared_density):
    model = make("cpu", shared_density=shared_density)
    with torch.no_grad():
        model.to_planes.weight.mul_(10.0)  # strong features: raw density outputs of both signs
        rendered = model.render(torch.randn(2, 8, 6, 6))
    for r in rendered.values():
        assert (r.weights >= 0).all() and (r.weights.sum(-1) <= 1 + 1e-6).all()
        assert ((r.depth >= -1) & (r.depth <= 1)).all()


def test_task_specific_parameters_are_the_head_and_the_field():
    model = make("cpu")
    for t in TASKS:
        mine = {id(p) for p in model.task_specific_parameters(t)}
        assert mine == {id(p) for p in [*model.heads[t].parameters(), *model.fields[t].parameters()]}
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in [*model.encoder.parameters(), *model.to_planes.parameters()]}


def test_pooled_tasks_compare_the_rendered_map_averaged_over_space():
    problem = registry.Problem(TASKS, (3, 8, 8), OUT, dense=False)
    model = registry.build("three_d_aware", problem, width=8)
    outputs, rendered = model.forward_with_intermediate(torch.randn(2, 3, 8, 8))
    shaped = model.rendered_as_outputs(rendered, outputs)
    for t in TASKS:
        assert outputs[t].shape == shaped[t].shape == (2, OUT[t])
        torch.testing.assert_close(shaped[t], rendered[t].mean(dim=(2, 3)))


def test_registry_builds_images_trains_and_refuses_vectors_and_bad_sizes(device, registry_output_shapes,
                                                                         short_training):
    registry_output_shapes("three_d_aware", device)
    first, last = short_training("three_d_aware", True, device, steps=25)
    assert last < 0.7 * first
    with pytest.raises(ValueError, match="image inputs"):
        registry.build("three_d_aware", registry.Problem(TASKS, (5,), OUT))
    image = registry.Problem(TASKS, (3, 8, 8), OUT, dense=True)
    for argument, value in (("num_samples", 0), ("render_stride", 0), ("plane_channels", -1), ("alpha", -1.0),
                            ("depth", 0)):
        with pytest.raises(ValueError, match=argument):
            registry.build("three_d_aware", image, **{argument: value})


@pytest.mark.parametrize("shared_density", [False, True])
def test_the_rendering_by_hand_from_pooled_planes_and_relu_fields(shared_density):
    """planes = split of e(avgpool(f(I))) into three P-channel chunks; density = softplus of the
    first output of a one-hidden-ReLU MLP (or of the shared one), task vector = the other outputs."""
    model = make("cpu", torch.float64, shared_density=shared_density)
    z = torch.randn(2, 8, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        got = model.render(z)
        assert model.triplane(z[..., :7, :5]).shape[-2:] == (4, 3)  # ceil(7 / 2) x ceil(5 / 2)
        pooled = F.avg_pool2d(z, 2)
        planes = F.conv2d(pooled, model.to_planes.weight, model.to_planes.bias).reshape(2, 3, 8, 4, 3)
        torch.testing.assert_close(model.triplane(z), planes)
        points, depths, delta = orthographic_rays(4, 3, 16, device="cpu", dtype=torch.float64)
        features = sample_triplane(planes, points)

        def mlp(net, f):
            return F.linear(F.relu(F.linear(f, net[0].weight, net[0].bias)), net[2].weight, net[2].bias)

        for t in TASKS:
            out = mlp(model.fields[t], features)
            if shared_density:
                sigma, values = F.softplus(mlp(model.density, features)[..., 0]), out
            else:
                sigma, values = F.softplus(out[..., 0]), out[..., 1:]
            rendered, weights = volume_render(sigma, values, delta)
            torch.testing.assert_close(got[t].map, rendered.permute(0, 3, 1, 2))
            torch.testing.assert_close(got[t].weights, weights)
            torch.testing.assert_close(got[t].depth, (weights * depths).sum(-1))


@pytest.mark.parametrize("method_name", ["rep_mtl", "mgda_ub"])
def test_the_methods_that_read_the_representation_train_the_renderer_too(method_name):
    """Rep-MTL and MGDA-UB make the loop call encode/decode, which skipped the rendered maps:
    with these methods the tri-plane encoder and the task fields never learned."""
    model = make("cpu")
    x = torch.randn(4, 3, 8, 8)
    y = {"seg": torch.randn(4, 3, 8, 8), "depth": torch.randn(4, 1, 8, 8)}
    harness_step(model, x, y, method=method_name, lr=0.0)
    untrained = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untrained == []


def test_channel_counts_must_be_positive_and_the_width_sets_the_shared_encoder():
    for argument in ("in_channels", "channels"):
        kw = {"in_channels": 3, "channels": 4, argument: 0}
        with pytest.raises(ValueError, match=argument):
            ThreeDAwareMTL(TASKS, kw["in_channels"], OUT, channels=kw["channels"])
    model = registry.build("three_d_aware", registry.Problem(TASKS, (3, 8, 8), OUT, dense=True), width=6)
    assert model.to_planes.in_channels == 6 and model.encode(torch.randn(1, 3, 8, 8)).shape[1] == 6
