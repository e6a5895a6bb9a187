"""State that is sized on first use, and still loads from a checkpoint.

Some modules only know a tensor's shape once they have run: a loss weighting's initial
losses, a model's exported prompts or split masks. They register it as an empty buffer;
loading a checkpoint into a fresh module must then resize that buffer to the saved shape
before ``load_state_dict`` copies into it (which refuses a shape mismatch).
"""

from __future__ import annotations

import torch
from torch import nn


def resize_empty_buffers(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Give every still-empty buffer of ``module`` the shape the checkpoint holds for it."""
    for name, buffer in module._buffers.items():
        saved = state_dict.get(prefix + name)
        if buffer is not None and buffer.numel() == 0 and saved is not None and saved.numel() > 0:
            module._buffers[name] = torch.empty(saved.shape, dtype=buffer.dtype, device=buffer.device)
