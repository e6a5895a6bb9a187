"""PEPNet: gates computed from prior features rescale the embedding and every tower layer.

Chang, Zhang, Hui, Leng, Niu, Song, Gai, "PEPNet: Parameter and Embedding Personalized
Network for Infusing with Personalized Prior Information", KDD 2023 (arXiv:2302.01115),
Sec. 2.2. The building block is the Gate Neural Unit, two layers whose sigmoid output is
stretched to (0, gamma), gamma = 2, so that a gate can damp *or* amplify around 1:

    x' = ReLU(x W + b),  delta = gamma * Sigmoid(x' W' + b')             Eqs. (2), (3)

EPNet personalises the shared embedding E (Eq. (4)) with a gate read from domain-side
prior features and a stop-gradient copy of E; PPNet personalises each layer of every
task tower with a gate read from user/item prior features and a stop-gradient copy of
EPNet's output, one gate of size h * T split into T task slices:

    delta_domain = U_ep(E(F_d) (+) sg(E)),   O_ep = delta_domain * E        Eqs. (5), (6)
    delta_task^l = U_pp(O_prior (+) sg(O_ep)),  O_pp^l = delta_task^l * H^l  Eqs. (7), (8)
    H^{l+1} = f(O_pp^l W^l + b^l)                                         Eq. (9)

The stop-gradients keep the gates from steering the embedding they read (tested).

Prior features at small scale: the problem gives one input, so the first ``prior_dim``
features of a vector stand in for both the domain features F_d and the user/item/author
prior O_prior (they stay part of the general input E too); for an image the prior is its
per-channel mean. Images are
gated per channel; dense problems keep the maps, image-level problems average O_ep over
space before the towers.

Left out: separate domain and user/item prior inputs, sparse ID embeddings (the "embedding"
is a small encoder layer), the final sigmoid of Eq. (9) (outputs stay raw so regression
tasks work) and the paper's serving and training-schedule engineering (Sec. 2.3).

The equation numbers cited here were not checked against a text of the paper.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_each_positive, require_positive
from .base import MultiTaskModel
from .encoders import ChannelLinear, trunk_for


def summary(t: Tensor) -> Tensor:
    """A (B, C) vector of a (B, C) or (B, C, H, W) tensor: gates read per-example vectors."""
    return t if t.ndim == 2 else t.mean(dim=(2, 3))


def per_channel(gate: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B, C) gate to multiply ``like`` channel-wise."""
    return gate.view(*gate.shape, *([1] * (like.ndim - 2)))


class GateNU(nn.Module):
    """Eqs. (2)-(3): ``gamma * sigmoid`` of a two-layer ReLU network, values in (0, gamma)."""

    def __init__(self, in_features: int, out_features: int, hidden: int, gamma: float = 2.0):
        super().__init__()
        self.first = nn.Linear(in_features, hidden)
        self.second = nn.Linear(hidden, out_features)
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return self.gamma * torch.sigmoid(self.second(torch.relu(self.first(x))))


class PEPNet(MultiTaskModel):
    """Embedding, EPNet gate, and per task a tower whose every layer a PPNet gate rescales."""

    name = "pepnet"

    def __init__(self, tasks: Sequence[str], embedding: nn.Module, embed_dim: int, prior_dim: int,
                 hidden_dims: Sequence[int], out_dims: Mapping[str, int], gate_hidden: int = 16,
                 pool: bool = False):
        super().__init__(tasks)
        require_positive(gate_hidden=gate_hidden, prior_dim=prior_dim)
        require_each_positive("hidden_dims", hidden_dims)
        self.embedding, self.prior_dim, self.pool = embedding, prior_dim, pool
        self.ep_gate = GateNU(prior_dim + embed_dim, embed_dim, gate_hidden)  # U_ep
        widths = [embed_dim, *hidden_dims]
        self.pp_gates = nn.ModuleList(  # U_pp per tower layer, h * T outputs
            GateNU(prior_dim + embed_dim, w * len(self.tasks), gate_hidden) for w in widths
        )
        self.towers = nn.ModuleDict({
            t: nn.ModuleList(ChannelLinear(a, b) for a, b in zip(widths, [*widths[1:], out_dims[t]]))
            for t in self.tasks
        })

    @classmethod
    def from_problem(cls, problem, width: int = 16, hidden_dims: Sequence[int] = (16,),
                     prior_dim: int = 8, gate_hidden: int = 16) -> "PEPNet":
        shape = tuple(problem.input_shape)
        prior = shape[0] if problem.is_image else min(prior_dim, shape[0])
        return cls(problem.tasks, trunk_for(shape, width, 1), width, prior, hidden_dims,
                   problem.task_out_dims, gate_hidden, pool=problem.is_image and not problem.dense)

    def prior(self, x: Tensor) -> Tensor:
        """The stand-in prior features: a vector's first ``prior_dim`` entries, an image's channel means."""
        return x[:, : self.prior_dim] if x.ndim == 2 else x.mean(dim=(2, 3))

    def personalize(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """E, delta_domain and delta_task^l for every tower layer (each (B, h * T))."""
        prior, e = self.prior(x), self.embedding(x)  # E, Eq. (4)
        delta_domain = self.ep_gate(torch.cat([prior, summary(e).detach()], -1))  # Eq. (5)
        o_ep = per_channel(delta_domain, e) * e  # Eq. (6)
        gate_in = torch.cat([prior, summary(o_ep).detach()], -1)
        return e, delta_domain, [gate(gate_in) for gate in self.pp_gates]  # Eq. (7)

    def towers_with(self, e: Tensor, delta_domain: Tensor, delta_task: Sequence[Tensor]) -> dict[str, Tensor]:
        """Eqs. (6), (8), (9) for given gates: O_ep, then each tower layer on its gated input."""
        o_ep = per_channel(delta_domain, e) * e
        if self.pool:
            o_ep = o_ep.mean(dim=(2, 3))
        outputs = {}
        for k, t in enumerate(self.tasks):
            h = o_ep
            for l, layer in enumerate(self.towers[t]):
                gate = delta_task[l].chunk(len(self.tasks), dim=-1)[k]  # task t's slice
                h = layer(per_channel(gate, h) * h)  # Eq. (8), then Eq. (9)
                if l < len(self.towers[t]) - 1:
                    h = torch.relu(h)
            outputs[t] = h
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.towers_with(*self.personalize(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.towers[task].parameters()  # PPNet gates serve all tasks with one network
