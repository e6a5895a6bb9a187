"""Soft modularization: a routing network softly rewires a base network of modules per task.

Yang, Xu, Wu, Wang, "Multi-Task Reinforcement Learning with Soft Modularization", NeurIPS
2020, arXiv:2003.13661.

The base network has L layers of n modules each. Instead of choosing one route per task, a
routing network predicts, for every pair of consecutive layers, an n x n matrix of connection
weights, each row a softmax distribution over the modules of the layer below (tested); the
input of module j in layer l+1 is the weighted mix of all modules of layer l,

    f^{l+1}_j = module^{l+1}_j( ReLU( sum_i p^l[j, i] f^l_i ) ),

(tested against a hand computation) so every possible route is used with a soft weight. The
router sees both the input and the task: the input's encoding D(s) is multiplied element-wise
with the task embedding F(z_t), and that product conditions every routing layer,

    g = D(s) * F(z_t)
    logits^1     = W_d^1 ReLU(g)
    logits^{l+1} = W_d^{l+1} ReLU( (W_u^l vec(p^l)) * g ),      p^l = row-softmax(logits^l)

so different tasks route the same input differently (tested) and the routes can change from
input to input. As in the authors' code, a last routing output is a distribution over the top
layer's n modules, which mixes them into the head's input.

Images: D(s) is a 3x3 convolution, the modules are 3x3 convolutions, and the router reads the
spatial mean of D(s); the routing weights are per example, shared by all pixels.

The paper's equations are not cited by number: its text was not available to check them.

Left out: SAC and the Meta-World tasks, the task-specific entropy temperatures and the loss
re-weighting derived from them, batch normalisation in the modules and the authors' variant
that conditions each routing layer on all earlier routing outputs (their only behaviour; here
the previous one, as in the paper's description; the same for two layers). Also simplified
relative to the authors' code (RchalYang/Soft-Module at e6d7c8a): D(s) is a single linear map
here (an MLP there; F(z_t) is one linear map in both), their routing output layers start in
U(±3e-3), so routes begin almost uniform (PyTorch's defaults here), batch norm is off in all
their configurations, and their code passes g through extra fully connected
layers (``num_gating_layers``, 2 in its Meta-World configs) before the first routing layer,
the result also standing in for g in the later products.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import heads_for
from .registry import Problem


def mix_modules(weights: Tensor, outputs: Tensor) -> Tensor:
    """weights (B, n_out, n_in) applied to outputs (n_in, B, ...) -> (n_out, B, ...)."""
    return torch.einsum("bji,ib...->jb...", weights, outputs)


class RoutingNetwork(nn.Module):
    """From g = D(s) * F(z_t) of shape (B, D): L - 1 row-softmax (B, n, n) matrices and a (B, n) output mix."""

    def __init__(self, width: int, num_layers: int, num_modules: int):
        super().__init__()
        n2 = num_modules * num_modules
        self.num_modules = num_modules
        self.down = nn.ModuleList(nn.Linear(width, n2) for _ in range(num_layers - 1))  # W_d^l
        self.up = nn.ModuleList(nn.Linear(n2, width) for _ in range(num_layers - 1))  # W_u^l
        self.last = nn.Linear(width, num_modules)

    def forward(self, g: Tensor) -> tuple[list[Tensor], Tensor]:
        n = self.num_modules
        hidden, weights = torch.relu(g), []
        for down, up in zip(self.down, self.up):
            p = torch.softmax(down(hidden).view(-1, n, n), dim=-1)  # row j: where module j reads from
            weights.append(p)
            hidden = torch.relu(up(p.flatten(1)) * g)
        return weights, torch.softmax(self.last(hidden), dim=-1)


class SoftModularization(MultiTaskModel):
    """Encoder D, task embeddings F(z_t), an L x n base network of modules, a router and task heads."""

    name = "soft_modularization"

    def __init__(self, tasks: Sequence[str], encoder: nn.Module, make_module: Callable[[], nn.Module],
                 width: int, num_layers: int, num_modules: int, heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        require_positive(num_modules=num_modules)
        if num_layers < 2:
            raise ValueError(f"soft modularization routes between layers: num_layers must be >= 2, got {num_layers}")
        self.encoder = encoder  # D(s)
        self.task_embeddings = nn.ParameterDict({t: nn.Parameter(torch.randn(width)) for t in self.tasks})
        self.layers = nn.ModuleList(
            nn.ModuleList(make_module() for _ in range(num_modules)) for _ in range(num_layers)
        )
        self.router = RoutingNetwork(width, num_layers, num_modules)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, num_layers: int = 2, num_modules: int = 2
                     ) -> "SoftModularization":
        shape = tuple(problem.input_shape)
        if problem.is_image:
            encoder = nn.Conv2d(shape[0], width, 3, padding=1)
            make_module: Callable[[], nn.Module] = lambda: nn.Conv2d(width, width, 3, padding=1)
        else:
            encoder = nn.Linear(shape[0], width)
            make_module = lambda: nn.Linear(width, width)
        return cls(problem.tasks, encoder, make_module, width, num_layers, num_modules, heads_for(problem, width))

    def routing_input(self, state: Tensor, task: str) -> Tensor:
        """g = D(s) * F(z_t), with D(s) averaged over pixels for images."""
        pooled = state.flatten(2).mean(-1) if state.ndim > 2 else state
        return pooled * self.task_embeddings[task]

    def routing_weights(self, x: Tensor, task: str) -> tuple[list[Tensor], Tensor]:
        """The L - 1 (B, n, n) connection matrices and the (B, n) output mix for ``task``."""
        return self.router(self.routing_input(self.encoder(x), task))

    def base_network(self, state: Tensor, weights: Sequence[Tensor], last: Tensor) -> Tensor:
        """Run the modules under given routing weights; returns the head's input."""
        h = torch.relu(state)
        outputs = torch.stack([m(h) for m in self.layers[0]])  # (n, B, ...)
        for layer, p in zip(self.layers[1:], weights, strict=True):
            inputs = torch.relu(mix_modules(p, outputs))
            outputs = torch.stack([m(inp) for m, inp in zip(layer, inputs)])
        return torch.relu(torch.einsum("bi,ib...->b...", last, outputs))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        state = self.encoder(x)
        out = {}
        for t in self.tasks:
            weights, last = self.router(self.routing_input(state, t))
            out[t] = self.heads[t](self.base_network(state, weights, last))
        return out

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.task_embeddings[task]
        yield from self.heads[task].parameters()
