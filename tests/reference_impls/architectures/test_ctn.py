"""CTN: a pixel's prediction depends only on the task painted there; one shared decoder."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.ctn import CompositeTaskingNet, SpatialAffine, TaskComposition, TaskRepresentation
from reference_impls.architectures.encoders import ConvEncoder

TASKS = ("seg", "depth", "edge")
OUT = {"seg": 3, "depth": 1, "edge": 1}


def make(**kw):
    torch.manual_seed(0)
    return CompositeTaskingNet(TASKS, ConvEncoder(3, (6, 6)), 6, OUT, latent_dim=5, **kw)


def trained(device):
    """A few steps so that the batch-norm running statistics are not the identity."""
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 3, 6, 6, device=device)
    for _ in range(3):
        opt.zero_grad()
        sum(o.square().mean() for o in model(x).values()).backward()
        opt.step()
    return model.eval()


def test_uniform_palette_gives_the_single_task_output(device):
    model = trained(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    out = model(x)
    for k, t in enumerate(TASKS):
        palette = torch.full((2, 6, 6), k, dtype=torch.long, device=device)
        torch.testing.assert_close(model.forward_composite(x, palette)[:, : OUT[t]], out[t])
    assert not torch.allclose(out["depth"], out["edge"])  # the code alone changes the answer


def test_each_pixel_predicts_the_task_painted_there(device):
    model = trained(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    g = torch.Generator().manual_seed(3)
    palette = torch.randint(0, len(TASKS), (2, 6, 6), generator=g).to(device)
    composite = model.forward_composite(x, palette)
    z = model.encode(x)
    singles = torch.stack([
        model.decode_composite(z, torch.full_like(palette, k)) for k in range(len(TASKS))
    ])  # (K, B, C, H, W)
    expected = singles.gather(0, palette[None, :, None].expand(1, -1, singles.shape[2], -1, -1))[0]
    torch.testing.assert_close(composite, expected)


def test_changing_one_pixels_task_changes_only_that_pixel(device):
    model = trained(device)
    x = torch.randn(1, 3, 6, 6, device=device)
    palette = torch.zeros(1, 6, 6, dtype=torch.long, device=device)
    before = model.forward_composite(x, palette)
    palette[0, 2, 4] = 1
    after = model.forward_composite(x, palette)
    changed = (before - after).abs().sum(dim=1)[0] > 1e-6
    assert changed[2, 4] and changed.sum() == 1


def test_every_parameter_is_shared_and_one_task_trains_all(device, params_with_grad):
    model = make().to(device)
    assert all(list(model.task_specific_parameters(t)) == [] for t in TASKS)
    assert "task_codes" not in dict(model.named_parameters())
    out = model(torch.randn(2, 3, 6, 6, device=device))
    # norm's batch statistics carry no parameters; everything else is reached by one task
    assert params_with_grad(model, out["depth"].square().sum()) == {n for n, _ in model.named_parameters()}


def test_parameter_count_does_not_grow_with_the_palette():
    c, lat, K = 6, 5, len(TASKS)
    affine = (lat * lat + lat) + 2 * (lat * c + c)  # shared hidden map, gamma, beta (1x1)
    block = c * c + affine  # the conv has no bias: batch norm follows
    expected = (
        (3 * c * 9 + c) + (c * c * 9 + c)  # encoder
        + (K * lat + lat) + (lat * lat + lat)  # task representation, 2 layers
        + 2 * block + (c * 3 + 3)  # decoder + shared output layer (max width 3)
    )
    assert sum(p.numel() for p in make().parameters()) == expected


def test_spatial_affine_uses_gamma_and_beta_per_pixel(device):
    torch.manual_seed(0)
    layer = SpatialAffine(4, 3, 5).to(device)
    x, w = 3 * torch.randn(2, 4, 3, 3, device=device) + 1, torch.randn(2, 3, 3, 3, device=device)
    h = layer.shared(w)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    by_hand = (x - mean) / (var + 1e-5).sqrt() * layer.gamma(h) + layer.beta(h)
    torch.testing.assert_close(layer(x, w), by_hand, atol=1e-5, rtol=1e-4)
    assert torch.all(layer.gamma.bias == 1) and torch.all(layer.beta.bias == 0)  # starts as scale 1, shift 0


def test_spatial_affine_hidden_map_is_a_leaky_relu_of_a_conv_of_the_latent_map(device):
    """gamma and beta read leaky_relu(conv(W)) (slope 0.01), written out from the weights."""
    torch.manual_seed(0)
    layer = SpatialAffine(4, 3, 5).to(device).double()
    x = 3 * torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64) + 1
    w = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64)
    conv = layer.shared[0]
    h = F.leaky_relu(F.conv2d(w, conv.weight, conv.bias), 0.01)
    assert (h < 0).any()  # the negative slope is exercised
    gamma = F.conv2d(h, layer.gamma.weight, layer.gamma.bias)
    beta = F.conv2d(h, layer.beta.weight, layer.beta.bias)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    by_hand = (x - mean) / (var + 1e-5).sqrt() * gamma + beta
    torch.testing.assert_close(layer(x, w), by_hand, rtol=1e-10, atol=1e-10)


def test_registry_shapes_training_and_vector_rejection(device, registry_output_shapes, short_training):
    registry_output_shapes("ctn", device)
    for dense in (True, False):
        first, last = short_training("ctn", dense, device, steps=15)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError):
        registry.build("ctn", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_composition_block_by_hand(device):
    """leaky_relu(gamma(W) * BN(conv(x)) + beta(W)), the non-linearity after the affine transform."""
    torch.manual_seed(0)
    block = TaskComposition(4, 3, 5).to(device)
    x, w = torch.randn(2, 4, 3, 3, device=device), torch.randn(2, 3, 3, 3, device=device)
    y = block.conv(x)
    mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    h = block.affine.shared(w)
    by_hand = F.leaky_relu((y - mean) / (var + 1e-5).sqrt() * block.affine.gamma(h) + block.affine.beta(h))
    torch.testing.assert_close(block(x, w), by_hand, atol=1e-5, rtol=1e-4)


def test_task_representation_normalises_the_code_then_leaky_fully_connected_layers():
    torch.manual_seed(0)
    representation = TaskRepresentation(3, 4)
    codes = torch.randn(5, 3, dtype=torch.float64)
    representation.double()
    h = codes / codes.norm(dim=-1, keepdim=True)
    for linear in (representation.mapping[0], representation.mapping[2]):
        h = F.leaky_relu(h @ linear.weight.T + linear.bias, 0.2)
    torch.testing.assert_close(representation(codes), h)
    torch.testing.assert_close(representation(3 * codes), h)  # only the code's direction counts


def test_image_level_tasks_average_their_map_over_pixels(device):
    model = make(dense=False).to(device).eval()
    x = torch.randn(2, 3, 6, 6, device=device)
    out, z = model(x), model.encode(x)
    for k, t in enumerate(TASKS):
        task_map = model.decode_composite(z, torch.full((2, 6, 6), k, dtype=torch.long, device=device))
        torch.testing.assert_close(out[t], task_map[:, : OUT[t]].mean(dim=(2, 3)))


def test_decoder_runs_its_blocks_in_turn_on_the_painted_latent_map(device):
    model = make().to(device)
    g = torch.Generator().manual_seed(4)
    z, palette = torch.randn(2, 6, 6, 6, generator=g), torch.randint(0, len(TASKS), (2, 6, 6), generator=g)
    z, palette = z.to(device), palette.to(device)
    w = model.representation(model.task_codes)  # (K, latent): w_t of every task
    painted = torch.einsum("bhwk,kl->blhw", F.one_hot(palette, len(TASKS)).to(w.dtype), w)
    torch.testing.assert_close(model.latent_map(palette), painted)
    h = z  # the encoder's features go into the first block unchanged
    for block in model.blocks:
        h = block(h, painted)
    torch.testing.assert_close(model.decode_composite(z, palette), model.output(h))


@pytest.mark.parametrize("k", [3, 5])
def test_kernel_size_sets_every_decoder_convolution_and_keeps_the_map_size(k):
    """``kernel_size`` (also through ``from_problem``) is the size of each block's convolution and of
    its affine transform's convolutions, each padded to keep H x W; with k > 1 a pixel's prediction
    also reads its neighbours' tasks, so the decoder is no longer per pixel."""
    model = make(kernel_size=k).eval()
    built = CompositeTaskingNet.from_problem(registry.Problem(TASKS, (3, 6, 6), OUT, dense=True), width=6,
                                             kernel_size=k)
    for net in (model, built):
        convs = [m for block in net.blocks for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 4 * len(net.blocks) and all(c.kernel_size == (k, k) for c in convs)
    x = torch.randn(2, 3, 6, 6)
    task_map = torch.zeros(2, 6, 6, dtype=torch.long)
    with torch.no_grad():
        before = model.forward_composite(x, task_map)
        task_map[:, 3, 3] = 1
        changed = (model.forward_composite(x, task_map) - before).abs().amax(dim=(0, 1)) > 0
    assert before.shape == (2, 3, 6, 6) and changed[3, 3]
    assert changed[3, 3 - k // 2] and changed[3 + k // 2, 3]  # neighbours within the kernel see the new task
