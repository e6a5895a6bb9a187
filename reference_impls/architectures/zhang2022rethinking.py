"""Separate bottom, shared top: hard parameter sharing turned upside down for multi-domain learning.

Zhang, Yang, Liu & Guan, "Rethinking Hard-Parameter Sharing in Multi-Domain Learning",
ICME 2022, arXiv:2107.11359.

The usual hard sharing (:mod:`.shared_bottom`) lets every domain use the same bottom
layers and gives each its own top layers. This empirical study on image classification
over diverse visual domains reports the opposite split working better: give each domain
its own *bottom* parameters and share the *top* ones. A small share of domain-specific
bottom parameters matches or beats independent models. The paper's explanations (Sec. 6):
top layers of CNNs are wider and more redundant, so they have room for every domain,
while the narrower bottom layers are the ones that domains pull apart; and the shared
rest acts as implicit data augmentation. The model is therefore

    y_d = h_d( g( f_d(x) ) )      f_d: the first k layers, one copy per domain d
                                  g:   the remaining layers, shared;  h_d: domain head

with k = ``separate_bottom``. Per domain that is the parameters of the first k layers plus
the head; everything else is stored once (tested layer by layer). The paper's proposal is
this split used as the new baseline, not a new module: k = 0 is the usual shared-bottom
model (tested) and k = depth gives independent models that share nothing but the loss
(tested).

The paper chooses the domain-specific parameters by filters, not whole layers, so that
both strategies can be compared at the same percentage of domain-specific weights (0 to
100 % in steps of 10 %, Sec. 4): a domain's filters replace the matching activation maps
of the shared backbone's layer. Here whole blocks are split, the coarser version of the
same bottom-first choice. The paper numbers no equations; this was checked in the copy on
the last author's site (guanh01/guanh01.github.io, files/2022rethinking.pdf).

At this scale the domains are the problem's tasks and the layers are the blocks of
``trunk_for`` (a plain MLP or resolution-keeping conv stack); each domain's bottom blocks
are initialised independently.

Left out: the filter-level split just described; the backbones (MobileNetV2, ResNet-50,
MNasNet, SqueezeNet) and their ImageNet pretraining; the fine-grained and Decathlon
benchmarks and the comparison with the common practice at equal parameter budgets; and the
paper's separate batch-norm layers for every domain, in the shared layers too (Sec. 3):
the small trunk here has no normalisation layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for
from .registry import Problem


class SeparateBottom(MultiTaskModel):
    """Per domain: its own copy of the first ``separate_bottom`` blocks and a head; the rest shared."""

    name = "zhang2022rethinking"
    equations_checked_in = "guanh01/guanh01.github.io, files/2022rethinking.pdf"

    def __init__(
        self,
        tasks: Sequence[str],
        trunks: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        separate_bottom: int = 1,
    ):
        super().__init__(tasks)
        depth = len(trunks[self.tasks[0]].blocks)
        if not 0 <= separate_bottom <= depth:
            raise ValueError(f"separate_bottom must be in [0, {depth}], got {separate_bottom}")
        self.separate_bottom = separate_bottom
        self.bottom = nn.ModuleDict({t: nn.Sequential(*trunks[t].blocks[:separate_bottom]) for t in self.tasks})  # f_d
        self.top = nn.Sequential(*trunks[self.tasks[0]].blocks[separate_bottom:])  # g, one copy for all
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})  # h_d

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2,
                     separate_bottom: int = 1) -> "SeparateBottom":
        trunks = {t: trunk_for(problem.input_shape, width, depth) for t in problem.tasks}
        return cls(problem.tasks, trunks, heads_for(problem, width), separate_bottom)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.top(self.bottom[t](x))) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.bottom[task].parameters()
        yield from self.heads[task].parameters()
