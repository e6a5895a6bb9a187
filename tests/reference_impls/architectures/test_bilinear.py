"""The gather-based sampler equals ``F.grid_sample`` and has second derivatives on every device."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.bilinear import grid_sample


def inputs(device, seed=0):
    """Float64 features and a grid reaching past [-1, 1], so both padding rules are exercised."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    grid = (torch.rand(2, 4, 6, 2, generator=g, dtype=torch.float64) * 2.6 - 1.3)
    return features.to(device).requires_grad_(), grid.to(device).requires_grad_()


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_values_and_gradients_equal_torch_grid_sample(padding_mode, device):
    features, grid = inputs(device)
    ours = grid_sample(features, grid, padding_mode)
    theirs = F.grid_sample(features, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    torch.testing.assert_close(ours, theirs)
    weights = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), (features, grid)),
                    torch.autograd.grad((theirs * weights).sum(), (features, grid))):
        torch.testing.assert_close(a, b)


def test_pixel_centres_read_the_pixels_exactly_and_outside_reads_zero():
    """W = 4, H = 3: column 1's centre is x = 3/4 - 1, row 2's is y = 5/3 - 1, row 1's is y = 0.
    At x = -1.3 the position is column -1.1, so both neighbours lie outside the image."""
    features = torch.arange(12.0).view(1, 1, 3, 4)
    points = torch.tensor([[[3 / 4 - 1, 5 / 3 - 1], [-1.3, 0.0]]])[:, None]  # (1, 1, 2, 2)
    assert grid_sample(features, points, "zeros").flatten().tolist() == pytest.approx([9.0, 0.0], abs=1e-6)
    assert grid_sample(features, points, "border").flatten().tolist() == pytest.approx([9.0, 4.0], abs=1e-6)


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_second_derivatives_exist_and_match_finite_differences(padding_mode, device):
    """A gradient's own gradient, which Rep-MTL, Auto-λ and MOML take. torch 2.11's grid_sample raised
    here on the CPU and on CUDA alike, so the reference is finite differences of our gradient."""
    features, grid = inputs(device)
    assert torch.autograd.gradgradcheck(lambda f, g: grid_sample(f, g, padding_mode), (features, grid))


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_a_nan_position_gives_nan_there_and_no_index_error(padding_mode, device):
    """A diverging model's NaN boxes must surface as a NaN loss, which the harness reports, not as
    an out-of-range gather (a device-side assert on CUDA)."""
    points = torch.zeros(1, 1, 3, 2, device=device)
    points[0, 0, 1, 0] = float("nan")
    out = grid_sample(torch.randn(1, 2, 4, 5, device=device), points, padding_mode)
    assert out[..., 1].isnan().all() and out[..., [0, 2]].isfinite().all()


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_a_nan_position_reads_pixel_zero_so_only_column_zero_gets_a_nan_gradient(padding_mode, device):
    """The docstring's rule for a NaN position is to read pixel 0 with a NaN weight: the NaN may reach
    the features' gradient in column 0 only, and every other pixel's gradient stays finite."""
    points = torch.zeros(1, 1, 1, 2, dtype=torch.float64, device=device)
    points[0, 0, 0, 0] = float("nan")  # x is NaN, y = 0 sits between rows 1 and 2 of 4
    features = torch.randn(1, 2, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    (grad,) = torch.autograd.grad(grid_sample(features, points, padding_mode).sum(), features)
    nan = grad.isnan()
    assert nan[..., 0].any() and not nan[..., 1:].any()


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_gradients_on_pixel_centres_are_one_sided_derivatives(padding_mode):
    """On a pixel centre the sample is piecewise linear with a kink, so the gradient must be the
    slope on one side or the other. On the last column's or row's centre (MNC warps a box of
    [0, W] to W cells) border padding once gave neither: the neighbour past the edge read 0."""
    features = torch.arange(12.0, dtype=torch.float64).view(1, 1, 3, 4)
    step = 1e-6
    for point in ([0.75, 0.0], [0.0, 2 / 3], [0.75, 2 / 3], [-0.75, -2 / 3], [0.25, 0.0]):
        grid = torch.tensor([[[point]]], dtype=torch.float64, requires_grad=True)
        gradient = torch.autograd.grad(grid_sample(features, grid, padding_mode).sum(), grid)[0].flatten()
        for axis in (0, 1):
            shift = torch.zeros(2, dtype=torch.float64)
            shift[axis] = step
            at = grid.detach()
            value = grid_sample(features, at, padding_mode).item()
            sides = ((grid_sample(features, at + shift, padding_mode).item() - value) / step,
                     (value - grid_sample(features, at - shift, padding_mode).item()) / step)
            assert min(abs(gradient[axis].item() - side) for side in sides) < 1e-4, (point, axis, sides)


def test_a_half_precision_grid_reads_the_right_pixels_of_a_large_image():
    """float16 holds whole numbers exactly only up to 2048: the flat index row * W + column of a
    128 x 128 image must be formed in integers, or it reads neighbouring pixels."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 1, 128, 128, generator=g)
    centres = (torch.randint(0, 128, (1, 50, 1, 2), generator=g) * 2 + 1) / 128 - 1  # exact pixel centres
    ours = grid_sample(features.half(), centres.half())
    exact = features[0, 0, ((centres[..., 1] + 1) * 64 - 0.5).round().long(), ((centres[..., 0] + 1) * 64 - 0.5).round().long()]
    torch.testing.assert_close(ours.float()[0, 0], exact[0], atol=5e-3, rtol=1e-3)


def test_features_and_grid_of_another_dtype_or_batch_are_refused():
    features = torch.zeros(3, 1, 2, 2)
    for grid in (torch.zeros(3, 1, 1, 2, dtype=torch.float64), torch.zeros(1, 1, 1, 2)):
        with pytest.raises(ValueError, match="dtype and batch size"):
            grid_sample(features, grid)


def test_an_unknown_padding_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="padding_mode.*'reflection'"):
        grid_sample(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 1, 2), "reflection")


def test_border_mode_clamps_infinite_positions_onto_the_edge_like_torch():
    """"border" clamps the position into the image first, so x or y = +-inf reads the edge
    pixel (as F.grid_sample does) instead of inf - inf = NaN weights."""
    features = torch.arange(12.0).view(1, 1, 3, 4)  # pixel (row r, column c) holds 4 r + c
    inf = float("inf")
    grid = torch.tensor([[[[inf, 0.0], [-inf, 0.0], [-0.75, inf], [-0.75, -inf]]]])  # y = 0: row 1; x = -0.75: col 0
    expected = torch.tensor([[[[4.0 + 3, 4.0 + 0, 8.0 + 0, 0.0 + 0]]]])
    out = grid_sample(features, grid, padding_mode="border")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, F.grid_sample(features, grid, padding_mode="border", align_corners=False))
