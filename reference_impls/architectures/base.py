"""The contract every architecture in this package follows.

A multi-task model maps an input batch to ``{task_name: output}`` and says which of its
parameters are shared by all tasks and which belong to one task. Gradient-balancing
methods need exactly that split: they compute per-task gradients of the shared
parameters only.

Subclasses implement :meth:`forward` and :meth:`task_specific_parameters`; shared
parameters are everything else. Models with a single shared trunk feeding task heads
(hard parameter sharing and its relatives) also implement :meth:`encode` and
:meth:`decode`, so representation-level methods (MGDA-UB) can differentiate the task
losses with respect to the shared representation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

from torch import Tensor, nn

from reference_impls.buffers import resize_empty_buffers


class MultiTaskModel(nn.Module, ABC):
    """Base class: ``forward(x) -> {task: output}`` plus the shared / task-specific split."""

    #: What the paper does beyond training the network on the task losses in one loop (a
    #: pruning schedule, a teacher to distil, an evolutionary search), in one line, or None.
    #: The training harness then trains the network only and says so; the site shows it.
    training_procedure: ClassVar[str | None] = None

    #: The text of the paper that the docstring's equation numbers (or its remark that the
    #: method has none) were checked against, e.g. "arXiv:2404.19245v2", or None when no text
    #: was at hand: any number the docstring then cites is unchecked, and it says so. The site
    #: shows it beside the implementation. Not inherited: a subclass is another paper.
    equations_checked_in: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.equations_checked_in = vars(cls).get("equations_checked_in")

    #: Attributes in which a training forward pass leaves a term for ``auxiliary_loss`` (a
    #: tensor still holding its autograd graph). They belong to that pass: copies and pickles
    #: start with None there, since a non-leaf tensor cannot be deep-copied.
    per_pass_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        if not tasks:
            raise ValueError("a multi-task model needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        self.tasks: tuple[str, ...] = tuple(tasks)

    @abstractmethod
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Return one output per task, keyed by task name."""

    @abstractmethod
    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only ``task``'s output depends on."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not specific to one task."""
        specific = {id(p) for t in self.tasks for p in self.task_specific_parameters(t)}
        return [p for p in self.parameters() if id(p) not in specific]

    def encode(self, x: Tensor) -> Tensor:
        """Shared representation (models with one shared trunk only)."""
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        """Task outputs from the shared representation (pairs with :meth:`encode`)."""
        raise NotImplementedError(f"{type(self).__name__} has no single shared representation")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {**state, **{name: None for name in self.per_pass_attributes if name in state}}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """State made after construction (exported prompts, split masks) is an empty buffer
        until then; a fresh model must still load the checkpoint of one that made it."""
        resize_empty_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def split_width(width: int, parts: int, what: str = "attention heads") -> int:
    """``width // parts``, or a ValueError when the width does not split evenly.

    Attention splits its width over heads (an LSTM over two directions, rotary embeddings
    over axes); an uneven split would surface later as torch's AssertionError or a reshape
    error mid-forward, which the training CLI cannot report as a bad flag.
    """
    if parts < 1 or width % parts:
        raise ValueError(f"width {width} does not split into {parts} {what} of equal size")
    return width // parts


def require_image_side(input_shape: Sequence[int], minimum: int, why: str) -> None:
    """A ValueError when an image side is shorter than ``minimum``, instead of a pooling or
    convolution error deep in the first forward pass."""
    height, width = input_shape[-2:]
    if min(height, width) < minimum:
        raise ValueError(f"a {height}x{width} image is too small: {why}, so both sides must be at least {minimum}")
