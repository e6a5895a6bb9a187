"""Progressive neural networks: one column per task, lateral adapters from earlier columns.

Rusu, Rabinowitz, Desjardins, Soyer, Kirkpatrick, Kavukcuoglu, Pascanu & Hadsell,
"Progressive Neural Networks", arXiv:1606.04671, 2016.

Tasks come in order; task ``k`` gets a fresh column of ``L`` layers, and from its second
layer on every layer also reads the previous layer of all *earlier* columns. Eq. (1)
does this with plain matrices ``U``; Eq. (2), used here, puts a small adapter on the
lateral path:

    h_1^(k) = f(W_1^(k) x)
    h_i^(k) = f(W_i^(k) h_{i-1}^(k) + U_i^(k) f(V_i^(k) (alpha_i^(k) h_{i-1}^(<k))))    Eq. (2)

``h_{i-1}^(<k)`` concatenates layer ``i-1`` of columns ``1..k-1``, ``alpha`` is one
learned scalar that rescales it, ``V`` projects it down to the width of one column (a
1x1 convolution for images, as in the paper) and ``U`` maps it like ``W`` does. ``V``
and ``U`` have no bias here, so ``alpha = 0`` switches the lateral paths off and leaves
independent columns (tested). The first column is an ordinary network.

The paper trains the columns one after another and freezes the earlier ones. Here the
lateral inputs are detached, which gives the same gradient flow even when all tasks
train together: task ``k``'s loss reaches its own column and adapters, never a column
``j < k`` (tested), so adding a task cannot disturb an old one. What differs is the
schedule: trained jointly, column ``k`` learns from earlier columns that are still
changing, not from finished ones (``training_procedure`` says so). Column ``k``'s output
depends only on columns ``1..k`` (tested), and the adapters make the parameter count
grow quadratically with the number of tasks (``V``'s input widens with every column).

Left out: the reinforcement-learning setting (A3C, Atari/Labyrinth), lateral paths into
the output layer (each column's head reads only its own column) and the paper's
transfer analysis; ``alpha`` starts at a fixed ``alpha_init``.

Equation numbers are those of a Markdown transcript of arXiv:1606.04671v4 found in the GitHub
index (find_string id 67128293442, converted from the PDF; its front matter names the version,
and the index did not name its repository), where the plain layer is tagged (1), the adapter
layer (2) and the Fisher-sensitivity display of Sec. 3 is unnumbered. An ar5iv clipping of
the same paper (id 59081753745) has the same text without tags. The paper's prose introducing the
adapters calls the plain layer "Equation 2"; the display it means is Eq. (1). Eq. (2) writes
the outer non-linearity as sigma and indexes U, V by (k:j) although they act on all earlier
columns at once; it initialises alpha to a small random value.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for
from .registry import Problem


def column_layer(in_width: int, out_width: int, image: bool, bias: bool = True) -> nn.Module:
    """``W`` (or ``U``): a linear layer for vectors, a 3x3 same-size convolution for images."""
    if image:
        return nn.Conv2d(in_width, out_width, 3, padding=1, bias=bias)
    return nn.Linear(in_width, out_width, bias=bias)


class Adapter(nn.Module):
    """Eq. (2)'s lateral path: ``U f(V (alpha h^(<k)))`` from ``num_earlier`` columns."""

    def __init__(self, num_earlier: int, width: int, out_width: int, image: bool, alpha_init: float):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha_init))
        self.project = ChannelLinear(num_earlier * width, width, bias=False)  # V: down to one column's width
        self.lateral = column_layer(width, out_width, image, bias=False)  # U

    def forward(self, earlier: list[Tensor]) -> Tensor:
        h = torch.cat(earlier, dim=1)
        return self.lateral(torch.relu(self.project(self.alpha * h)))


class Column(nn.Module):
    """The ``index``-th column (0-based): its own layers plus one adapter per layer from layer 2."""

    def __init__(self, index: int, in_width: int, width: int, depth: int, image: bool, alpha_init: float):
        super().__init__()
        widths = [in_width] + [width] * depth
        self.layers = nn.ModuleList(column_layer(a, b, image) for a, b in zip(widths[:-1], widths[1:]))
        self.adapters = nn.ModuleList(
            Adapter(index, width, width, image, alpha_init) for _ in range(depth - 1)
        ) if index > 0 else nn.ModuleList()

    def forward(self, x: Tensor, earlier: list[list[Tensor]]) -> list[Tensor]:
        """All activations ``h_1..h_L`` of this column, given those of the earlier columns."""
        hidden = [torch.relu(self.layers[0](x))]
        for i in range(1, len(self.layers)):
            pre = self.layers[i](hidden[-1])
            if earlier:
                pre = pre + self.adapters[i - 1]([h[i - 1].detach() for h in earlier])  # frozen inputs
            hidden.append(torch.relu(pre))  # Eq. (2)
        return hidden


class ProgressiveNet(MultiTaskModel):
    """One column per task, in the order of ``tasks``, each with its own head."""

    name = "progressive_nets"
    equations_checked_in = "a Markdown transcript of arXiv:1606.04671v4"
    training_procedure = ("the columns are trained one task after another, each frozen before the next is added "
                          "(detached lateral inputs keep that gradient flow here, but all columns train at once)")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        heads: Mapping[str, nn.Module],
        width: int = 32,
        depth: int = 2,
        alpha_init: float = 0.1,
    ):
        super().__init__(tasks)
        require_positive(depth=depth)
        if len(input_shape) not in (1, 3):
            raise ValueError(f"expected an input shape (d,) or (C, H, W), got {tuple(input_shape)}")
        image = len(input_shape) == 3
        self.columns = nn.ModuleList(
            Column(k, input_shape[0], width, depth, image, alpha_init) for k in range(len(self.tasks))
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, **kw: float) -> "ProgressiveNet":
        return cls(problem.tasks, problem.input_shape, heads_for(problem, width), width, depth, **kw)

    def column_activations(self, x: Tensor) -> list[list[Tensor]]:
        activations: list[list[Tensor]] = []
        for column in self.columns:
            activations.append(column(x, activations))
        return activations

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        activations = self.column_activations(x)
        return {t: self.heads[t](h[-1]) for t, h in zip(self.tasks, activations)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        # Later columns read layers 1..L-1 of this one; its top layer and adapter are its own.
        k = self.tasks.index(task)
        column = self.columns[k]
        if k == len(self.tasks) - 1:
            yield from column.parameters()
        else:
            yield from column.layers[-1].parameters()
            if len(column.adapters):
                yield from column.adapters[-1].parameters()
        yield from self.heads[task].parameters()
