"""The shared helper that finds the layers adapters, masks and LoRA wrap in a backbone.

The models that wrap them run the wrapped layers in turn with a ReLU after each, so the helper
accepts only a backbone that is exactly that; anything else would be dropped without a word.
"""

import re

import pytest
import torch
from torch import nn

from reference_impls.architectures import registry
from reference_impls.architectures.encoders import ConvEncoder, backbone_layers, trunk_for


def test_finds_linear_and_conv_layers_in_order_and_freezes_only_when_asked():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()))
    assert backbone_layers(backbone) == [backbone[0], backbone[2][0]]
    assert all(p.requires_grad for p in backbone.parameters())
    backbone_layers(backbone, freeze=True)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_default_trunks_have_one_layer_per_depth():
    assert len(backbone_layers(trunk_for((5,), width=8, depth=3))) == 3
    assert len(backbone_layers(trunk_for((3, 8, 8), width=8, depth=2))) == 2


def test_a_backbone_without_such_layers_names_the_purpose_and_stays_trainable():
    backbone = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d layer to mask"):
        backbone_layers(backbone, freeze=True, purpose="mask")
    assert all(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("backbone, where", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), "'2' is BatchNorm2d where a layer belongs"),
    (ConvEncoder(3, (4, 4), pool=True), "'blocks.0.2' is MaxPool2d where a layer belongs"),
    (nn.Sequential(nn.Linear(3, 4), nn.GELU()), "'1' is GELU where an nn.ReLU belongs"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "the last layer, '2', has no nn.ReLU after it"),
])
def test_a_backbone_the_model_could_not_rerun_is_refused_naming_the_module(backbone, where):
    with pytest.raises(ValueError, match="to mask its layers.*" + re.escape(where)):
        backbone_layers(backbone, freeze=True, purpose="mask")
    assert all(p.requires_grad for p in backbone.parameters())  # nothing changed


@pytest.mark.parametrize("conv, what", [
    (nn.Conv2d(3, 4, 3, dilation=2), r"dilation \(2, 2\)"),
    (nn.Conv2d(4, 4, 3, groups=2), "groups 2"),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), "padding mode 'reflect'"),
])
def test_convolutions_the_wrappers_do_not_reproduce_are_refused(conv, what):
    with pytest.raises(ValueError, match=f"'0' has .*{what}"):
        backbone_layers(nn.Sequential(conv, nn.ReLU()))


def test_a_strided_backbone_gives_the_same_features_once_wrapped():
    """Masks, packing and sparse sharing run the convolutions themselves: with nothing masked or
    pruned, a strided backbone's features come out unchanged."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for name in ("piggyback", "packnet", "sparse_sharing"):
        backbone = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        heads = {t: nn.Flatten() for t in ("a", "b")}
        model = registry.get(name)(("a", "b"), backbone, heads)
        for t in ("a", "b"):
            torch.testing.assert_close(model(x)[t], backbone(x).flatten(1), msg=name)
