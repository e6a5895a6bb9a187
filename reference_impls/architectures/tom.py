"""TOM: every input and output variable is a learned location; one model reads them all.

Meyerson & Miikkulainen, "The Traveling Observer Model: Multi-task Learning Through
Spatial Variable Embeddings", ICLR 2021 (arXiv:2010.02354); official code at
github.com/cognizant-ai-labs/tom-release (its model is "Section 4" of the paper).

Tasks with unrelated input and output spaces cannot share a network whose first and last
layers are tied to one task's variables. TOM gives every scalar variable ``i`` (an input
feature, a pixel, an output) a learned *variable embedding* (VE) ``z_i``: a point in a
small shared space (2-D in most of the paper's experiments and the official script; 128-D
in its UCI-121 experiment, Sec. 4.4). One model then handles any set of variables
(together the three lines are the paper's Eq. 4, y_j = g(h(sum_i f(x_i, z_i)), z_j);
Eq. 2 is the same without the core h):

    encoder:  e_i  = E(x_i, z_i)                  (every input value with its VE)
    pooling:  s    = C(sum_i e_i)                 (order-free summary, then the core)
    decoder:  y_j  = D(s, z_j)                    (queried at each output's VE)

E and D are FiLM networks: the VE sets a per-unit scale and shift of the value path
(Eq. 3, F(h) = W*(z) ⊙ h + W+(z); encoder: ``scale(z) * value(x) + shift(z)``; the
decoder's last layer modulates before its linear map). Residual blocks start as the
identity (a learned factor initialised at 0, "skipinit", as in the official code). Because
the input side sums over variables, permuting the input variables together with their VEs
changes nothing, and permuting output VEs permutes the outputs: both are tested.
Everything is shared by all tasks except the output VEs of each task; here all tasks read
the same input, so input VEs are shared too. Images are handled variable by variable
(every pixel of every channel is an input variable; for dense problems every output pixel
is an output variable). VEs start at N(0, ve_std^2) with ve_std = 1 by default so that a
few steps already tell variables apart; the official code starts them near 0 (std 0.001)
and lets training spread them. The structure above follows the official code, which was
read to check it; equation numbers are those of the paper's ICLR 2021 submission text
(Secs. 3 and 4.1).

Left out: tasks with different inputs (each with its own input VEs), the official code's
dropout, and the paper's experiments (UCI tasks, concentric hyperspheres, CIFAR / MNIST /
Omniglot images). The official repository has no attention variant; the sparse (entmax)
attention code that also names its model traveling_observer_model.py
(anonymousauthorforblindreview/sve) belongs to a different paper, on shared variable
embeddings.

Equation numbers checked in a Markdown transcript of the ICLR 2021 submission, found in the public
GitHub index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .registry import Problem


class FiLMLinear(nn.Module):
    """scale(z) * value(v) + shift(z): a VE modulates every unit of a linear map of v."""

    def __init__(self, in_dim: int, out_dim: int, ve_dim: int):
        super().__init__()
        self.value = nn.Linear(in_dim, out_dim)
        self.scale = nn.Linear(ve_dim, out_dim)
        self.shift = nn.Linear(ve_dim, out_dim)

    def forward(self, v: Tensor, z: Tensor) -> Tensor:
        """v: (B, N, in), z: (N, ve_dim), one VE per variable."""
        return self.scale(z) * self.value(v) + self.shift(z)


class InverseFiLMLinear(nn.Module):
    """value(scale(z) * v + shift(z)): modulate first, then map (the decoder's last layer)."""

    def __init__(self, in_dim: int, out_dim: int, ve_dim: int):
        super().__init__()
        self.value = nn.Linear(in_dim, out_dim)
        self.scale = nn.Linear(ve_dim, in_dim)
        self.shift = nn.Linear(ve_dim, in_dim)

    def forward(self, v: Tensor, z: Tensor) -> Tensor:
        return self.value(self.scale(z) * v + self.shift(z))


class ResidualBlock(nn.Module):
    """h + alpha * layer(relu(h)), alpha starting at 0; FiLM-modulated when a VE is given."""

    def __init__(self, hidden: int, ve_dim: int | None = None):
        super().__init__()
        self.layer = nn.Linear(hidden, hidden) if ve_dim is None else FiLMLinear(hidden, hidden, ve_dim)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, h: Tensor, z: Tensor | None = None) -> Tensor:
        update = self.layer(torch.relu(h)) if z is None else self.layer(torch.relu(h), z)
        return h + self.alpha * update


class TravelingObserverModel(MultiTaskModel):
    """Encoder over (value, VE) pairs, sum, core, decoder queried at each task's output VEs."""

    name = "tom"
    equations_checked_in = "a Markdown transcript of the ICLR 2021 submission"

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = False,
        hidden: int = 32,
        ve_dim: int = 2,
        encoder_layers: int = 2,
        core_layers: int = 2,
        decoder_layers: int = 2,
        ve_std: float = 1.0,
    ):
        super().__init__(tasks)
        require_positive(ve_dim=ve_dim)
        self.input_shape = tuple(input_shape)
        self.spatial = self.input_shape[1:] if dense else ()
        num_inputs = int(torch.tensor(self.input_shape).prod())
        self.out_dims = {t: out_dims[t] for t in self.tasks}
        self.input_ves = nn.Parameter(ve_std * torch.randn(num_inputs, ve_dim))
        per_output = int(torch.tensor(self.spatial).prod()) if self.spatial else 1
        self.output_ves = nn.ParameterDict(
            {t: nn.Parameter(ve_std * torch.randn(self.out_dims[t] * per_output, ve_dim)) for t in self.tasks}
        )
        self.encoder_in = FiLMLinear(1, hidden, ve_dim)
        self.encoder = nn.ModuleList(ResidualBlock(hidden, ve_dim) for _ in range(encoder_layers - 1))
        self.core = nn.ModuleList(ResidualBlock(hidden) for _ in range(core_layers))
        self.decoder = nn.ModuleList(ResidualBlock(hidden, ve_dim) for _ in range(decoder_layers - 1))
        self.decoder_out = InverseFiLMLinear(hidden, 1, ve_dim)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, **kwargs: object) -> TravelingObserverModel:
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dense=problem.dense,
                   hidden=width, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        """s = C(sum_i E(x_i, z_i)): the shared, order-free state of the whole input."""
        h = self.encoder_in(x.flatten(1).unsqueeze(-1), self.input_ves)
        for block in self.encoder:
            h = block(h, self.input_ves)
        s = h.sum(dim=1)
        for block in self.core:
            s = block(s)
        return s

    def decode_at(self, s: Tensor, ves: Tensor) -> Tensor:
        """y_j = D(s, z_j) for every VE row z_j: (B, number of VEs)."""
        h = s.unsqueeze(1).expand(-1, ves.shape[0], -1)
        for block in self.decoder:
            h = block(h, ves)
        return self.decoder_out(h, ves).squeeze(-1)

    def decode(self, s: Tensor) -> dict[str, Tensor]:
        return {t: self.decode_at(s, self.output_ves[t]).view(s.shape[0], self.out_dims[t], *self.spatial)
                for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.output_ves[task]  # the only thing that tells one task from another
