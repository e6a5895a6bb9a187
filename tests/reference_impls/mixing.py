"""A TorchFunctionMode that fails any torch call mixing devices or floating dtypes.

Used by the device and dtype tests of the architectures and the optimization methods.
Deliberate moves (``.to``, ``copy_``, ``type_as``) are allowed, and so are 0-dim tensors on
another device, as CUDA allows CPU scalars.
"""

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.type_as}


class OneDeviceOneDtype(TorchFunctionMode):
    """Raise on any torch call whose non-scalar tensor arguments mix devices or floating dtypes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MOVES:
            leaves, _ = tree_flatten((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0]
            for kind, values in (("devices", {str(t.device) for t in tensors}),
                                 ("dtypes", {str(t.dtype) for t in tensors if t.is_floating_point()})):
                if len(values) > 1:
                    raise AssertionError(f"{getattr(func, '__name__', func)} mixes {kind} {sorted(values)}")
        return func(*args, **kwargs)
