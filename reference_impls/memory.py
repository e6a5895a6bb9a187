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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .hooks import ConfigurationError

#: Copies of every parameter that training with Adam keeps: weights, gradients, two moments.
TRAINING_COPIES = 4
#: Where cgroup v2 and v1 state a memory limit.
CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


@dataclass(frozen=True)
class MetaSize:
    """What a model needs, found on the meta device: its parameter count, the bytes that
    training keeps for the whole run, and the largest tensor one forward pass keeps for the
    backward pass (bytes, shape), None where that pass could not run on meta."""

    params: int
    training_bytes: int
    largest_saved: tuple[int, tuple[int, ...]] | None


def meta_size(make: Callable[[], nn.Module], batch: tuple[int, ...] | None = None) -> MetaSize | None:
    """``make()``'s size, built on the meta device without allocating anything, and with a
    ``batch`` shape a forward pass on meta; None when it cannot be built there (its constructor
    reads values, which meta tensors do not hold, or refuses: the real build then says why)."""
    try:
        with torch.device("meta"):
            model = make()
    except Exception:  # noqa: BLE001 - any failure here is the real build's to report
        return None
    params = sum(p.numel() for p in model.parameters())
    needed = sum(TRAINING_COPIES * p.numel() * p.element_size() for p in model.parameters())
    needed += sum(b.numel() * b.element_size() for b in model.buffers())
    return MetaSize(params, needed, None if batch is None else largest_saved_tensor(model, batch))


def largest_saved_tensor(model: nn.Module, batch: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """(bytes, shape) of the largest tensor a training forward pass of ``model`` (on meta) on a
    ``batch``-shaped input keeps for backward: an attention matrix over every position, say.
    None when the pass reads values, which meta tensors do not hold."""
    largest: tuple[int, tuple[int, ...]] = (0, ())

    def pack(saved: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, (saved.numel() * saved.element_size(), tuple(saved.shape)))
        return saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            model.train()(torch.empty(batch, device="meta"))
    except Exception:  # noqa: BLE001 - data-dependent models train as before
        return None
    return largest


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


def require_fits(label: str, make: Callable[[], nn.Module], device: torch.device,
                 batch: tuple[int, ...] | None = None) -> None:
    """ConfigurationError naming ``label`` when training ``make()`` on ``device`` needs more
    memory than the device has: for the model alone, or with the largest tensor that a forward
    pass on a ``batch``-shaped input keeps for backward. The model is built on the CPU first,
    so its weights must also fit in the machine's memory. Each is a lower bound of what
    training takes, so nothing that would fit is refused."""
    size, available = meta_size(make, batch), device_memory(device)
    if size is None or available is None:
        return
    start = f"{label}: this model has {size.params:,} parameters for this problem; "
    advice = "Use fewer tasks, smaller inputs (--data-kw downsample=N or size=N) or a smaller width"
    if size.training_bytes > available:
        raise ConfigurationError(f"{start}training it on {device} takes at least {readable(size.training_bytes)}, "
                                 f"more than the {readable(available)} there is. {advice}")
    if size.largest_saved is not None and size.training_bytes + size.largest_saved[0] > available:
        saved, shape = size.largest_saved
        raise ConfigurationError(
            f"{start}a forward pass on a batch of {batch[0]} keeps a tensor of shape {shape} ({readable(saved)}) "
            f"for the backward pass, which with the model's {readable(size.training_bytes)} is more than the "
            f"{readable(available)} on {device}. {advice}, or a smaller --batch-size")
    cpu = device_memory(torch.device("cpu")) if device.type != "cpu" else None
    if cpu is not None and 4 * size.params > cpu:
        raise ConfigurationError(f"{start}building it in this machine's memory takes at least "
                                 f"{readable(4 * size.params)}, more than the {readable(cpu)} there is. {advice}")
