"""The shared helper that finds the layers adapters, masks and LoRA wrap in a backbone."""

import pytest
from torch import nn

from reference_impls.architectures.encoders import backbone_layers, trunk_for


def test_finds_linear_and_conv_layers_in_order_and_freezes_only_when_asked():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    assert backbone_layers(backbone) == [backbone[0], backbone[4]]  # not the norm layer
    assert all(p.requires_grad for p in backbone.parameters())
    backbone_layers(backbone, freeze=True)
    assert not any(p.requires_grad for p in backbone.parameters())  # the norm layer too


def test_default_trunks_have_one_layer_per_depth():
    assert len(backbone_layers(trunk_for((5,), width=8, depth=3))) == 3


def test_a_backbone_without_such_layers_names_the_purpose_and_stays_trainable():
    backbone = nn.Sequential(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d layer to mask"):
        backbone_layers(backbone, freeze=True, purpose="mask")
    assert all(p.requires_grad for p in backbone.parameters())
