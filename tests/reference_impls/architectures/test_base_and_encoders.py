"""The architecture contract (base.py) and the small default encoders and heads (encoders.py).

Each test recomputes by hand what the docstring promises on a tiny case, so that a changed
split, padding, pooling, activation or width shows up here and not only as a slower model.
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.architectures.base import MultiTaskModel, require_image_side, split_width
from reference_impls.architectures.encoders import (
    ChannelLinear, ConvEncoder, MLPEncoder, channel_linear, conv_block, conv_geometry, conv_head, head_for, image_head,
    mlp_head, pooled_head, run_layer, trunk_for,
)


def assert_close(actual, expected):
    """torch.testing.assert_close costs seconds on its first call; this is all the check needs."""
    assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=1e-6), (actual, expected)


class TwoHeads(MultiTaskModel):
    """A trunk every task reads and one linear head per task."""

    def __init__(self, tasks=("a", "b")):
        super().__init__(tasks)
        self.trunk = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

    def forward(self, x):
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}

    def task_specific_parameters(self, task):
        return self.heads[task].parameters()


def test_shared_parameters_are_the_ones_no_task_claims():
    model = TwoHeads(("a", "b", "c"))
    assert [id(p) for p in model.shared_parameters()] == [id(model.trunk.weight), id(model.trunk.bias)]


@pytest.mark.parametrize("tasks, message", [((), "needs at least one task"),
                                            (("a", "b", "a"), r"must be unique, got \['a', 'b', 'a'\]")])
def test_task_names_must_be_given_and_unique(tasks, message):
    with pytest.raises(ValueError, match=message):
        TwoHeads(tasks)


@pytest.mark.parametrize("method", ["encode", "decode"])
def test_a_model_without_one_trunk_names_itself_when_asked_to_encode(method):
    with pytest.raises(NotImplementedError, match="^TwoHeads has no single shared representation$"):
        getattr(TwoHeads(), method)(torch.zeros(1, 3))


def test_a_fresh_model_loads_state_made_after_construction():
    class Exported(TwoHeads):
        def __init__(self):
            super().__init__()
            self.register_buffer("prompt", torch.empty(0))

    trained = Exported()
    trained.prompt = torch.arange(6.0).view(2, 3)
    fresh = Exported()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.prompt, trained.prompt)


def test_equations_checked_in_belongs_to_the_class_that_sets_it_not_to_its_subclasses():
    """A subclass is another paper: it must not claim the parent's checked text."""
    class Paper(TwoHeads):
        equations_checked_in = "arXiv:0000.00000v1"

    class Variant(Paper):
        pass

    assert Paper.equations_checked_in == "arXiv:0000.00000v1"
    assert Variant.equations_checked_in is None and TwoHeads.equations_checked_in is None


class KeepsAuxiliaryTerm(TwoHeads):
    """Leaves a term with its autograd graph in ``aux`` on every forward pass."""

    per_pass_attributes = ("aux",)

    def forward(self, x):
        outputs = super().forward(x)
        self.aux = sum(o.square().mean() for o in outputs.values())
        return outputs


def test_copies_and_pickles_drop_the_per_pass_term_and_the_original_keeps_it():
    """A non-leaf tensor cannot be deep-copied; the term belongs to the pass that made it."""
    model = KeepsAuxiliaryTerm()
    model(torch.randn(2, 3))
    assert model.aux.grad_fn is not None
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.aux is None
        assert torch.equal(clone.trunk.weight, model.trunk.weight)
    assert model.aux.grad_fn is not None


def test_split_width_divides_evenly_or_names_width_and_parts():
    assert split_width(12, 3) == 4
    assert split_width(7, 1) == 7  # one part is the whole width, whatever it is
    for width, parts in ((10, 3), (8, 0), (8, -2)):
        with pytest.raises(ValueError, match=f"^width {width} does not split into {parts} heads of equal size$"):
            split_width(width, parts, "heads")


def test_an_image_side_at_the_minimum_passes_and_a_shorter_one_is_named():
    require_image_side((1, 4, 5), 4, "two poolings")
    require_image_side((9, 4, 4), 4, "two poolings")  # the channel count is not a side
    with pytest.raises(ValueError, match="^a 3x8 image is too small: two poolings, so both sides must be at least 4$"):
        require_image_side((1, 3, 8), 4, "two poolings")


def test_channel_linear_maps_dimension_one_of_vectors_and_maps_with_nn_linear_init():
    torch.manual_seed(0)
    layer = ChannelLinear(3, 2)
    torch.manual_seed(0)
    assert torch.equal(layer.weight, nn.Linear(3, 2).weight)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0]))
    vectors, maps = torch.randn(4, 3), torch.randn(4, 3, 5, 6)
    assert_close(layer(vectors), vectors @ layer.weight.T + layer.bias)
    assert_close(layer(maps), F.conv2d(maps, layer.weight[:, :, None, None], layer.bias))
    assert ChannelLinear(3, 2, bias=False).bias is None


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 7), (4, 3, 5, 6), (4, 3, 2, 5, 6), (2, 3, 2, 2, 3, 2)])
def test_channel_linear_is_the_map_over_dimension_one_at_every_position(shape):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(shape), torch.randn(2, 3), torch.randn(2)
    moved = x.movedim(1, -1)  # (B, ..., C): every position's channel vector
    assert_close(channel_linear(x, weight, bias), (moved @ weight.T + bias).movedim(-1, 1))
    assert_close(channel_linear(x, weight), (moved @ weight.T).movedim(-1, 1))


@pytest.mark.parametrize("shape", [(4, 6, 8), (4, 6, 8, 8), (4, 6, 3, 4, 4)])
def test_maps_applied_to_one_input_keep_that_input_for_backward_not_a_copy_each(shape):
    """NDDR-style: T task maps over one concatenation of every task's features. An einsum kept a
    permuted copy of the input per map; 40 CelebA tasks at 64 x 64 ran out of memory. Sequences,
    maps and volumes all have a convolution that keeps the input itself."""
    x = torch.randn(*shape, requires_grad=True)
    layers = [ChannelLinear(6, 2) for _ in range(5)]
    storages = set()

    def keep(saved):
        if saved.numel() == x.numel():
            storages.add(saved.untyped_storage().data_ptr())
        return saved

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda saved: saved):
        outputs = [layer(x) for layer in layers]
    assert storages == {x.untyped_storage().data_ptr()}
    sum(o.sum() for o in outputs).backward()
    per_channel = sum(layer.weight.sum(0) for layer in layers)
    assert_close(x.grad, per_channel.view(1, 6, *[1] * (x.ndim - 2)).expand_as(x))


def test_mlp_encoder_is_a_relu_after_every_layer_output_included():
    torch.manual_seed(0)
    encoder = MLPEncoder(3, [5, 7], 4)
    assert (encoder.in_dim, encoder.out_dim, encoder.widths) == (3, 4, (3, 5, 7, 4))
    x = torch.randn(6, 3)
    expected = x
    for block in encoder.blocks:
        expected = F.relu(F.linear(expected, block[0].weight, block[0].bias))
    assert_close(encoder(x), expected)
    assert [(b[0].in_features, b[0].out_features) for b in encoder.blocks] == [(3, 5), (5, 7), (7, 4)]


def test_conv_block_is_a_zero_padded_3x3_conv_relu_then_2x2_max_pool():
    torch.manual_seed(0)
    block, x = conv_block(2, 3, pool=True), torch.randn(1, 2, 6, 6)
    conv = block[0]
    assert conv.kernel_size == (3, 3)
    assert_close(block(x), F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 2))


def test_conv_blocks_pad_any_odd_kernel_to_keep_the_resolution():
    """Same padding is (k - 1) / 2 on each side for an odd kernel k, so a 5x5 block keeps H and W too."""
    torch.manual_seed(0)
    block, x = conv_block(2, 3, kernel_size=5), torch.randn(1, 2, 6, 7)
    conv = block[0]
    assert_close(block(x), F.relu(F.conv2d(F.pad(x, (2, 2, 2, 2)), conv.weight, conv.bias)))
    assert ConvEncoder(2, (3, 4), kernel_size=5)(x).shape == (1, 4, 6, 7)


def test_conv_encoder_keeps_resolution_or_halves_it_per_block():
    x = torch.randn(2, 3, 16, 16)
    keep = ConvEncoder(3, (4, 5, 6))
    assert keep(x).shape == (2, 6, 16, 16)
    assert (keep.in_channels, keep.out_channels, keep.widths, keep.downsample) == (3, 6, (3, 4, 5, 6), 1)
    pooled = ConvEncoder(3, (6, 5, 4), pool=True)
    assert pooled(x).shape == (2, 4, 2, 2) and (pooled.out_channels, pooled.downsample) == (4, 8)
    with pytest.raises(ValueError, match=r"at least one block \(channels is empty\)"):
        ConvEncoder(3, ())


def test_mlp_head_has_hidden_relu_layers_then_a_linear_output():
    torch.manual_seed(0)
    head, x = mlp_head(4, 2, (6, 5)), torch.randn(3, 4)
    first, second, out = head[0][0], head[1][0], head[2]
    expected = F.linear(F.relu(F.linear(F.relu(F.linear(x, first.weight, first.bias)),
                                        second.weight, second.bias)), out.weight, out.bias)
    assert_close(head(x), expected)
    assert len(mlp_head(4, 2)) == 1


def test_conv_head_upsamples_bilinearly_then_3x3_relu_then_1x1():
    torch.manual_seed(0)
    head, x = conv_head(2, 3, hidden_channels=4, upsample=2), torch.randn(1, 2, 4, 4)
    hidden, out = head[1], head[3]
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    expected = F.conv2d(F.relu(F.conv2d(up, hidden.weight, hidden.bias, padding=1)), out.weight, out.bias)
    assert hidden.kernel_size == (3, 3) and out.kernel_size == (1, 1)
    assert_close(head(x), expected)


def test_conv_head_without_options_is_one_1x1_convolution():
    """``upsample`` 1 means no resize at all: no scale-1 Upsample layer ahead of the convolution."""
    for head in (conv_head(4, 3), conv_head(4, 3, upsample=1)):
        assert len(head) == 1 and isinstance(head[0], nn.Conv2d) and head[0].kernel_size == (1, 1)


def test_pooled_head_averages_over_the_map_then_applies_a_linear_layer():
    head, x = pooled_head(2, 3), torch.randn(4, 2, 5, 5)
    assert_close(head(x), F.linear(x.mean((2, 3)), head[-1].weight, head[-1].bias))


def test_heads_are_per_pixel_when_dense_pooled_otherwise_linear_for_vectors():
    maps = torch.randn(2, 4, 6, 6)
    for make in (lambda dense: image_head(4, 3, dense), lambda dense: head_for((4, 6, 6), 4, 3, dense)):
        assert make(True)(maps).shape == (2, 3, 6, 6)
        assert make(False)(maps).shape == (2, 3)
    assert isinstance(head_for((5,), 5, 3, dense=True), nn.Sequential)
    assert head_for((5,), 5, 3, dense=True)(torch.randn(2, 5)).shape == (2, 3)


def test_default_trunk_has_depth_layers_of_one_width_and_keeps_resolution():
    mlp = trunk_for((5,), width=8, depth=3)
    assert isinstance(mlp, MLPEncoder) and mlp.widths == (5, 8, 8, 8)
    conv = trunk_for((2, 6, 7), width=8, depth=2)
    assert isinstance(conv, ConvEncoder) and conv.widths == (2, 8, 8)
    assert conv(torch.randn(1, 2, 6, 7)).shape == (1, 8, 6, 7)
    with pytest.raises(ValueError, match="^depth must be >= 1, got 0$"):
        trunk_for((5,), depth=0)
    with pytest.raises(ValueError, match=r"\(d,\) or \(C, H, W\), got \(2, 3\)$"):
        trunk_for((2, 3))


@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(3, 4), (2, 3)),
                                         (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 6)),
                                         (lambda: nn.Conv2d(2, 3, (1, 3), stride=(1, 2)), (2, 2, 5, 7))])
def test_run_layer_with_the_layers_own_weights_is_the_layer(make, shape):
    """Masks, packing and sparse sharing rerun a wrapped layer with other weights: with its own
    weight and bias and its geometry, the result must be the layer's own output."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.bias.copy_(torch.arange(1.0, layer.bias.numel() + 1))  # a bias that cannot go unnoticed
    x = torch.randn(shape)
    assert_close(run_layer(conv_geometry(layer), x, layer.weight, layer.bias), layer(x))
