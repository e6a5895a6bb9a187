"""Refuse a model too big for the machine before building it, with its size, not after.

A small default instance can still be huge for some problems: AFA's spatial aggregation
maps every H*W feature map to K of them for each of K tasks, 27 billion weights for 40
CelebA attributes at 64 x 64. Built for real, such a model fails inside PyTorch's
allocator or gets the process killed by the kernel, with no word on why. Built on the
meta device first, it only gives its size, which is compared with the memory that training
it needs: float32 weights, their gradients and Adam's two moments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .hooks import ConfigurationError

#: Copies of every parameter that training with Adam keeps: weights, gradients, two moments.
TRAINING_COPIES = 4
#: Where cgroup v2 and v1 state a memory limit.
CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def meta_size(make: Callable[[], nn.Module]) -> tuple[int, int] | None:
    """(parameters, bytes to train them) of ``make()``, built on the meta device without
    allocating anything; None when it cannot be built there (its constructor reads values,
    which meta tensors do not hold, or refuses: the real build then says why)."""
    try:
        with torch.device("meta"):
            model = make()
    except Exception:  # noqa: BLE001 - any failure here is the real build's to report
        return None
    params = sum(p.numel() for p in model.parameters())
    needed = sum(TRAINING_COPIES * p.numel() * p.element_size() for p in model.parameters())
    needed += sum(b.numel() * b.element_size() for b in model.buffers())
    return params, needed


def cgroup_limit() -> int | None:
    """The memory limit of this process's control group (containers), if one is set."""
    for path in CGROUP_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    return None


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device``: the card's for CUDA; for the CPU the machine's, or its
    control group's limit where lower. None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None
    return min(x for x in (total, cgroup_limit()) if x is not None)


def readable(size: int) -> str:
    """Bytes in GB or MB, or as a count below a megabyte."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size:,} bytes"


def require_fits(label: str, make: Callable[[], nn.Module], device: torch.device) -> None:
    """ConfigurationError naming ``label`` when training ``make()`` on ``device`` needs more
    memory than the device has. The model is built on the CPU first, so its weights must also
    fit in the machine's memory."""
    size, available = meta_size(make), device_memory(device)
    if size is None or available is None:
        return
    params, needed = size
    cpu = device_memory(torch.device("cpu")) if device.type != "cpu" else None
    for what, need, has in ((f"training it on {device}", needed, available),
                            ("building it in this machine's memory", params * 4, cpu)):
        if has is not None and need > has:
            raise ConfigurationError(
                f"{label}: this model has {params:,} parameters for this problem; {what} takes at least "
                f"{readable(need)}, more than the {readable(has)} there is. Use fewer tasks, smaller inputs or "
                f"a smaller width")
