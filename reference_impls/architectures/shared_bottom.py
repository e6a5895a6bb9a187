"""Hard parameter sharing: one shared encoder, one head per task.

Caruana, "Multitask Learning", Machine Learning 28 (1997); the name and the contrast with
soft sharing follow Ruder, "An Overview of Multi-Task Learning in Deep Neural Networks"
(arXiv:1706.05098). In the notation of Ma et al. (KDD 2018), Eq. (1):

    y_k = h^k(f(x)),   k = 1..K

with a shared bottom ``f`` and a tower ``h^k`` per task. Everything the tasks have in
common must pass through ``f``; that is the baseline every other architecture here is
compared with. Nothing is left out: the method *is* this wiring.

Caruana's own text was not available to us, so the only equation number cited is that of Ma
et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts";
it was read in Ma et al.'s KDD 2018 ACM copy, Papers/multitask/MMOE/3219819.3220007.pdf of
anmingyu11/Gor-rok (commit 70760e1, p. 3).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import heads_for, trunk_for


class SharedBottom(MultiTaskModel):
    """``encoder`` shared by all tasks, ``heads[task]`` on top of its output."""

    name = "shared_bottom"
    equations_checked_in = ("Ma et al.'s KDD 2018 ACM copy, "
                            "Papers/multitask/MMOE/3219819.3220007.pdf of anmingyu11/Gor-rok")

    def __init__(self, tasks: Sequence[str], encoder: nn.Module, heads: Mapping[str, nn.Module]):
        super().__init__(tasks)
        if set(heads) != set(self.tasks):
            raise ValueError(f"need one head per task {self.tasks}, got heads for {sorted(heads)}")
        self.encoder = encoder
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 32, depth: int = 2) -> "SharedBottom":
        encoder = trunk_for(problem.input_shape, width, depth)
        heads = heads_for(problem, width)
        return cls(problem.tasks, encoder, heads)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # f(x), the one shared representation

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}  # Eq. (1): h^k(f(x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads[task].parameters()
