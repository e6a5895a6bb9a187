"""PathNet: evolved pathways through a grid of modules, frozen once their task is learned.

Fernando, Banarse, Blundell, Zwols, Ha, Rusu, Pritzel, Wierstra, "PathNet: Evolution Channels
Gradient Descent in Super Neural Networks", arXiv:1701.08734, 2017.

The network is a grid of L layers with M modules each (a module: one linear or convolution layer
and a ReLU). A pathway, the genotype, names at most N modules per layer, stored as an L x N
matrix of module indices. Running a pathway means: in every layer, apply the pathway's modules to
the previous layer's result and sum their outputs; the sum feeds the next layer, and the last sum
feeds the task's own output layer (the readout is never shared). Modules off the pathway take no
part in the forward pass (tested), so they get no gradient either.

Which pathway a task uses is found by a tournament genetic algorithm over a population of
genotypes (serial version, used for the supervised tasks): draw two genotypes at random, train
each for a while along its pathway and measure its fitness (e.g. the negative training loss);
the loser's genotype is overwritten by a copy of the winner's, and the copy is mutated, every
entry independently with probability 1 / (N L), by adding an integer drawn uniformly from
[-2, 2] (tested against a hand computation). Gradient descent trains the weights, evolution
chooses which weights are used.

When a task is done, the parameters of the modules on its best pathway are fixed for good
(:meth:`PathNet.fix_path`; tested: they get no gradient afterwards) and the modules that no
fixed pathway uses are re-initialised, before a new population evolves for the next task. A
later task may route through frozen modules and re-use their features, but cannot change them.
Here each task keeps the pathway it was last given (a random one at construction), so
``forward`` returns every task's output as a multi-task model must. The pathways, the population
and the evolution's random state travel in ``state_dict`` (tested: a model of another seed that
loads it computes the same outputs and freezes the same modules).

The paper states these rules in prose (no numbered equations). An index pushed past 0 or
M - 1 by a mutation wraps around modulo M, as in kimhc6028/pathnet-pytorch (genotype.py; the
other public port, jsikyoon/pathnet, clamps to the edges); the paper's own boundary rule was
not checked. A pathway listing a module twice uses it once.

Left out: the asynchronous (A3C) parallel tournament for reinforcement learning, the Atari,
Labyrinth, binary-MNIST and CIFAR/SVHN experiments, the paper's module sizes (M = 10, L = 3-4,
N = 3-4 with 20-neuron modules) and the learning schedule; fitness is whatever the caller
measures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import conv_block, heads_for, mlp_block
from .registry import Problem

Path = tuple[tuple[int, ...], ...]  # per layer: the distinct active module indices, sorted


def path_of(genotype: Tensor) -> Path:
    """The pathway an L x N genotype encodes: each layer's distinct module indices."""
    return tuple(tuple(sorted({int(j) for j in row})) for row in genotype)


class PathNet(MultiTaskModel):
    """An L x M grid of modules, one readout per task, a pathway per task and a genotype population."""

    name = "pathnet"
    training_procedure = "pathways are chosen by tournament() selection between evaluated genotypes"

    def __init__(self, tasks: Sequence[str], make_module: Callable[[int], nn.Module], num_layers: int,
                 num_modules: int, active: int, heads: Mapping[str, nn.Module],
                 population: int = 8, seed: int = 0):
        super().__init__(tasks)
        require_positive(num_layers=num_layers)
        if not 1 <= active <= num_modules:
            raise ValueError(f"active modules per layer must be in [1, {num_modules}], got {active}")
        self.layers = nn.ModuleList(
            nn.ModuleList(make_module(layer) for _ in range(num_modules)) for layer in range(num_layers)
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.register_buffer("frozen", torch.zeros(num_layers, num_modules, dtype=torch.bool))
        self.num_layers, self.num_modules, self.active = num_layers, num_modules, active
        self.generator = torch.Generator().manual_seed(seed)  # CPU: evolution does not depend on the device
        self.population: list[Tensor] = [self.random_genotype() for _ in range(population)]
        self.paths: dict[str, Path] = {t: path_of(self.random_genotype()) for t in self.tasks}
        self.register_load_state_dict_post_hook(PathNet._follow_frozen)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, num_layers: int = 3, num_modules: int = 4,
                     active: int = 2, **kwargs: int) -> "PathNet":
        shape = tuple(problem.input_shape)
        block = conv_block if problem.is_image else mlp_block

        def make_module(layer: int) -> nn.Module:
            return block(shape[0] if layer == 0 else width, width)

        return cls(problem.tasks, make_module, num_layers, num_modules, active, heads_for(problem, width), **kwargs)

    # --- the network ---------------------------------------------------------------------------

    def run_path(self, x: Tensor, path: Path) -> Tensor:
        """Sum the outputs of the pathway's modules layer by layer; the readout's input."""
        for layer, chosen in zip(self.layers, path, strict=True):
            x = sum(layer[j](x) for j in chosen)
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.run_path(x, self.paths[t])) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()

    # --- checkpoints ---------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, object]:
        """What ``state_dict`` must carry besides weights: each task's pathway, the population
        and the evolution's random state (a checkpoint would otherwise run other pathways)."""
        return {"paths": dict(self.paths), "population": [g.clone() for g in self.population],
                "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, object]) -> None:
        """Restore :meth:`get_extra_state`."""
        self.paths = {t: tuple(tuple(layer) for layer in path) for t, path in state["paths"].items()}
        self.population = [g.clone() for g in state["population"]]
        self.generator.set_state(state["generator"])

    def _follow_frozen(self, *_: object) -> None:
        """After any ``load_state_dict``: the modules ``frozen`` marks learn no more, the others do."""
        for d, layer in enumerate(self.layers):
            for j, module in enumerate(layer):
                module.requires_grad_(not bool(self.frozen[d, j]))

    # --- evolution -----------------------------------------------------------------------------

    def random_genotype(self) -> Tensor:
        """L x N module indices drawn uniformly from [0, M)."""
        return torch.randint(self.num_modules, (self.num_layers, self.active), generator=self.generator)

    def mutate(self, genotype: Tensor) -> Tensor:
        """Each entry, with probability 1 / (N L), moves by a uniform integer in [-2, 2] (mod M)."""
        hit = torch.rand(genotype.shape, generator=self.generator) < 1.0 / genotype.numel()
        shift = torch.randint(-2, 3, genotype.shape, generator=self.generator)
        return (genotype + hit * shift) % self.num_modules

    def tournament(self, fitness: Callable[[Path], float]) -> tuple[int, int]:
        """One binary tournament: the loser becomes a mutated copy of the winner. Returns (winner, loser)."""
        i, j = (int(k) for k in torch.randperm(len(self.population), generator=self.generator)[:2])
        fit_i, fit_j = fitness(path_of(self.population[i])), fitness(path_of(self.population[j]))
        winner, loser = (i, j) if fit_i >= fit_j else (j, i)
        self.population[loser] = self.mutate(self.population[winner].clone())
        return winner, loser

    def fix_path(self, task: str, path: Path, reinit_others: bool = True) -> None:
        """End of ``task``: it keeps ``path``, whose modules are frozen; unfrozen modules start afresh."""
        self.paths[task] = path
        for layer, chosen in zip(self.layers, path, strict=True):
            for j in chosen:
                layer[j].requires_grad_(False)
        for d, chosen in enumerate(path):
            self.frozen[d, list(chosen)] = True
        if reinit_others:
            for d, layer in enumerate(self.layers):
                for j, module in enumerate(layer):
                    if not self.frozen[d, j]:
                        for m in module.modules():
                            if hasattr(m, "reset_parameters"):
                                m.reset_parameters()
        self.population = [self.random_genotype() for _ in self.population]  # a new search for the next task
