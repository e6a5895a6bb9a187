"""Buffers sized on first use still load from a checkpoint, and only those are resized."""

import pytest
import torch
from torch import nn

from reference_impls.buffers import resize_empty_buffers


class SizedOnFirstUse(nn.Module):
    """An empty buffer filled on first use, a fixed-size one and an unset (None) one."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("initial", torch.empty(0))
        self.register_buffer("fixed", torch.zeros(2))
        self.register_buffer("unset", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        resize_empty_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def nested() -> nn.Module:
    return nn.Sequential(nn.Identity(), SizedOnFirstUse())


def test_a_fresh_nested_module_loads_a_used_ones_state():
    used = nested()
    used[1].initial = torch.tensor([[1.0, 2.0, 3.0]])
    fresh = nested()
    fresh.load_state_dict(used.state_dict())  # keys are "1.initial", "1.fixed"
    assert torch.equal(fresh[1].initial, used[1].initial) and fresh[1].unset is None


def test_the_resized_buffer_keeps_its_own_dtype():
    fresh = SizedOnFirstUse()
    fresh.load_state_dict({"initial": torch.tensor([0.5, 1.5], dtype=torch.float64), "fixed": torch.ones(2)})
    assert fresh.initial.dtype == torch.float32 and fresh.initial.tolist() == [0.5, 1.5]


def test_a_buffer_that_has_a_size_is_not_resized_to_a_wrong_checkpoint():
    fresh = SizedOnFirstUse()
    with pytest.raises(RuntimeError, match="fixed"):
        fresh.load_state_dict({"initial": torch.ones(1), "fixed": torch.ones(3)})
    assert fresh.fixed.shape == (2,)


def test_a_one_element_checkpoint_buffer_is_loaded_too():
    fresh = SizedOnFirstUse()
    fresh.load_state_dict({"initial": torch.tensor([7.0]), "fixed": torch.ones(2)})
    assert fresh.initial.tolist() == [7.0]


def test_an_integer_buffer_stays_integer_and_a_meta_one_stays_on_meta():
    module = SizedOnFirstUse()
    module.initial = torch.empty(0, dtype=torch.int64)
    resize_empty_buffers(module, {"initial": torch.ones(2, 3)}, "")
    assert module.initial.shape == (2, 3) and module.initial.dtype == torch.int64
    on_meta = SizedOnFirstUse().to("meta")
    resize_empty_buffers(on_meta, {"initial": torch.ones(4)}, "")
    assert on_meta.initial.device.type == "meta" and on_meta.initial.shape == (4,)
