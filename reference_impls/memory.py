"""Refuse a model too big for the machine before building it, with its size, not after.

A small default instance can still be huge for some problems: AFA's spatial aggregation
maps every H*W feature map to K of them for each of K tasks, 27 billion weights for 40
CelebA attributes at 64 x 64. Built for real, such a model fails inside PyTorch's
allocator or gets the process killed by the kernel, with no word on why. Built on the
meta device first, it only gives its size, which is compared with the memory that training
it needs: float32 weights, their gradients and Adam's two moments. Run on meta for one batch,
it also shows what its forward pass keeps for the backward pass: PAP's affinity of every
pixel to every other is (8, 110592, 110592) for a batch of 8 NYUv2 images, 391 GB.
"""

from __future__ import annotations

import itertools
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
class Saved:
    """What one training forward pass keeps for the backward pass: the bytes of every storage
    it keeps (each once, parameters and buffers left out) and its largest tensor (bytes, shape)."""

    total: int
    largest: tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class MetaSize:
    """What training a model needs, found on the meta device: its parameter count; the bytes
    it keeps for the whole run, weights and Adam's two moments plus buffers (``persistent``);
    and what a forward pass keeps for backward, None where that pass could not run on meta."""

    params: int
    persistent: int
    parameter_bytes: int
    saved: Saved | None

    @property
    def at_step(self) -> int:
        """Bytes while the optimiser steps: the persistent ones and a gradient per parameter."""
        return self.persistent + self.parameter_bytes


def meta_size(make: Callable[[], nn.Module], batch: tuple[int, ...] | None = None) -> MetaSize | None:
    """``make()``'s size, built on the meta device without allocating anything, and with a
    ``batch`` shape a forward pass on meta; None when it cannot be built there (its constructor
    reads values, which meta tensors do not hold, or refuses: the real build then says why)."""
    try:
        with torch.device("meta"):
            model = make()
    except Exception:  # noqa: BLE001 - any failure here is the real build's to report
        return None
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return MetaSize(sum(p.numel() for p in model.parameters()), (TRAINING_COPIES - 1) * parameter_bytes + buffers,
                    parameter_bytes, None if batch is None else saved_for_backward(model, batch))


def saved_for_backward(model: nn.Module, batch: tuple[int, ...]) -> Saved | None:
    """What a training forward pass of ``model`` (on meta) on a ``batch``-shaped input keeps
    for backward: activations, attention matrices over every position... Storages are told
    apart by their C++ address (``_cdata``), as views share one and meta tensors have no data
    pointer. None when the pass reads values, which meta tensors do not hold."""
    def storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata

    own = {storage(t) for t in itertools.chain(model.parameters(), model.buffers())}
    kept: dict[int, int] = {}
    largest: tuple[int, tuple[int, ...]] = (0, ())

    def pack(saved: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if storage(saved) not in own:
            kept[storage(saved)] = saved.untyped_storage().nbytes()
            largest = max(largest, (saved.numel() * saved.element_size(), tuple(saved.shape)))
        return saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            outputs = model.train()(torch.empty(batch, device="meta"))
    except Exception:  # noqa: BLE001 - data-dependent models train as before
        return None
    del outputs  # kept alive until here, so that no storage address was reused during the pass
    return Saved(sum(kept.values()), largest)


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


def address_space_limit() -> int | None:
    """This process's address-space limit (``ulimit -v``, common on shared clusters), if set."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def address_space_used() -> int | None:
    """This process's virtual size now (``/proc/self/statm``, Linux): the interpreter, torch's
    libraries, the data already loaded. All of it counts against ``ulimit -v``."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def address_space_left() -> int | None:
    """What the address-space limit leaves this process, if one is set: the limit less what is
    mapped already. (Memory freed into the allocator's own pools could be mapped again without
    growing the size; for the large blocks tensors use, the allocator returns it instead.)"""
    limit = address_space_limit()
    if limit is None:
        return None
    used = address_space_used()
    return limit if used is None else max(limit - used, 0)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device``: the card's for CUDA; for the CPU the machine's, or its
    control group's limit or what this process's address-space limit leaves it, where lower.
    None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that reports it
        return None
    return min(x for x in (total, cgroup_limit(), address_space_left()) if x is not None)


def readable(size: int) -> str:
    """Bytes in GB or MB, or as a count below a megabyte."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size:,} bytes"


def require_fits(label: str, make: Callable[[], nn.Module], device: torch.device,
                 batch: tuple[int, ...] | None = None) -> None:
    """ConfigurationError naming ``label`` when training ``make()`` on ``device`` needs more
    memory than the device has: at the optimiser's step (weights, gradients, Adam's moments), or
    at the end of a forward pass on a ``batch``-shaped input (weights, moments and what the pass
    keeps for backward). The model is built on the CPU first, so its weights must also fit in
    the machine's memory. Each is a lower bound of what training takes, so nothing that would
    fit is refused."""
    available = device_memory(device)
    size = None if available is None else meta_size(make, batch)  # no meta build where nothing is compared
    if size is None:
        return
    start = f"{label}: this model has {size.params:,} parameters for this problem; "
    advice = "Use fewer tasks, smaller inputs (--data-kw downsample=N or size=N) or a smaller width"
    if size.at_step > available:
        raise ConfigurationError(f"{start}training it on {device} takes at least {readable(size.at_step)}, "
                                 f"more than the {readable(available)} there is. {advice}")
    if size.saved is not None and size.persistent + size.saved.total > available:
        largest, shape = size.saved.largest
        raise ConfigurationError(
            f"{start}a forward pass on a batch of {batch[0]} keeps {readable(size.saved.total)} for the backward "
            f"pass (its largest tensor of shape {shape}, {readable(largest)}), which with the model's "
            f"{readable(size.persistent)} is more than the {readable(available)} on {device}. {advice}, "
            f"or a smaller --batch-size")
    cpu = device_memory(torch.device("cpu")) if device.type != "cpu" else None
    if cpu is not None and size.parameter_bytes > cpu:
        raise ConfigurationError(f"{start}building it in this machine's memory takes at least "
                                 f"{readable(size.parameter_bytes)}, more than the {readable(cpu)} there is. "
                                 f"{advice}")
