"""CMTR: coevolution of shared modules and of one evolved routing per task.

Liang, Meyerson, Miikkulainen, "Evolutionary Architecture Search for Deep Multitask
Networks", GECCO 2018 (arXiv:1803.03745, doi:10.1145/3205455.3205489). The paper starts
from soft layer ordering (``soft_order.py``: every task mixes the same D shared layers at
every depth) and evolves, instead of one shared ordering, a distinct routing for each task.

CTR (coevolution of task routing), the routing half of CMTR
------------------------------------------------------------
There are K shared modules F_1..F_K (here one weight layer and a ReLU, all of one width).
Each task t owns individuals (E_t, G_t, D_t): a task encoder E_t, a routing G_t (a directed
acyclic graph whose vertices each name one shared module) and a task decoder D_t. With
vertex 0 the encoder output, a vertex v with module m(v) and in-edges from I(v) computes

    h_0 = E_t(x),   h_v = F_m(v)( mean_{u in I(v)} h_u ),   y_t = D_t( mean_{u in O} h_u )

where O are the vertices feeding the decoder. A module is *shared*: its one set of weights
is used at every vertex, of every task, that names it (tested), and it is trained through
all of them; a task's output depends only on the modules its own graph names (tested).

Evolution is a (1+1) strategy per task with weights carried forward (the authors' demo page:
one set of shared modules is trained throughout evolution instead of being re-initialised
for every new architecture). One *meta-iteration* (:func:`meta_iteration`):

1. every task's champion (E_t1, G_t1, D_t1) is copied into a challenger (E_t2, G_t2, D_t2)
   whose graph is mutated (:meth:`CMTR.spawn_challengers`, :func:`insert_node`);
2. all 2T individuals are trained jointly, sharing the modules, for M steps (the caller's
   ``train`` callback; :meth:`CMTR.individual_outputs` gives every individual's output);
3. each is scored on validation data (the caller's ``fitness`` callback), and a challenger
   that scores higher than its champion replaces it (:meth:`CMTR.promote`); otherwise the
   champion stays, so a task's champion fitness never drops at selection (tested).

The model's ``forward`` returns the champions' outputs, as a multi-task model must.

Module coevolution, the "M" of CMTR (simplified here)
-----------------------------------------------------
CMTR combines CM (module architectures evolved by CoDeepNEAT) with CTR; the abstract and the
patent abstract say only that, so judging a candidate module set by how well CTR does with
it is this file's reading. CoDeepNEAT itself (module species, module-internal
graphs, crossover, speciation, blueprint populations) is *not* reproduced. What is kept is
the outer loop's shape, as plain functions over module hyperparameters: each module gets a
gene ``{"layers": L, "hidden": H}`` (:func:`module_from_gene`), a population of module sets
is scored by a caller's fitness (typically: build a CMTR with them, run a few
meta-iterations, average the champions' fitness), the best ``num_elite`` survive unchanged
and the rest are refilled by mutated copies of elites (:func:`mutate_module_genes` changes
exactly one hyperparameter of one module; :func:`next_module_population`).

Choices where the paper's text was not available to check
---------------------------------------------------------
Only the abstract, the inventors' patent claim (US 11,030,529: champion/challenger tuples,
joint training for M iterations, validation, replacement) and the authors' demo page were
read. These details are therefore choices, not the paper's stated rules:

* the mutation inserts one vertex: a random existing vertex s (the encoder output
  included) feeds a new vertex with a uniformly drawn module, whose output goes to a random
  later vertex or to the decoder; every existing edge is kept;
* several inputs (and several decoder inputs) are averaged, not summed;
* a new routing is the smallest graph that uses a module: E_t -> one random module -> D_t;
* the challenger's encoder and decoder start as copies of the champion's (weights carried
  forward); a tie keeps the champion;
* routings live in the model's extra state, so a checkpoint carries the evolved graphs.

Left out: CoDeepNEAT (see above), the Omniglot experiments, the paper's module design,
training schedule and number of meta-iterations; fitness and training are the caller's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import require_at_least, require_positive
from .base import MultiTaskModel
from .encoders import conv_block, head_for, mlp_block, trunk_for
from .registry import Problem

CHAMPION, CHALLENGER = 0, 1


@dataclass(frozen=True)
class Routing:
    """A task's graph. ``nodes[v - 1] = (module index, input vertices)`` for vertex v >= 1;
    vertex 0 is the encoder output. Inputs always name earlier vertices, so the list order
    is a topological order and the graph is acyclic. ``outputs`` feed the decoder."""

    nodes: tuple[tuple[int, tuple[int, ...]], ...]
    outputs: tuple[int, ...]

    def modules_used(self) -> set[int]:
        return {m for m, _ in self.nodes}


def single_module_routing(module: int) -> Routing:
    """E_t -> F_module -> D_t: the routing every task starts from."""
    return Routing(nodes=((module, (0,)),), outputs=(1,))


def insert_node_at(routing: Routing, source: int, destination: int | None, module: int) -> Routing:
    """Insert vertex s+1 with ``module``, fed by vertex ``source`` and feeding ``destination``
    (a vertex after ``source``, or None: the decoder). Later vertices are renumbered by one;
    every other vertex keeps its module and edges."""
    n = len(routing.nodes)
    if not 0 <= source <= n:
        raise ValueError(f"source must be a vertex in [0, {n}], got {source}")
    if destination is not None and not source < destination <= n:
        raise ValueError(f"destination must be a vertex in ({source}, {n}] or None, got {destination}")
    new = source + 1

    def shift(v: int) -> int:  # vertices from position `new` on move one place down
        return v + 1 if v >= new else v

    nodes = [(m, tuple(shift(u) for u in inputs)) for m, inputs in routing.nodes]
    outputs = tuple(shift(u) for u in routing.outputs)
    nodes.insert(new - 1, (module, (source,)))
    if destination is None:
        outputs = outputs + (new,)
    else:
        m, inputs = nodes[shift(destination) - 1]
        nodes[shift(destination) - 1] = (m, inputs + (new,))
    return Routing(tuple(nodes), outputs)


def insert_node(routing: Routing, num_modules: int, generator: torch.Generator) -> Routing:
    """The routing mutation: a vertex with a random module between a random vertex and a
    random later vertex (or the decoder)."""
    n = len(routing.nodes)
    source = int(torch.randint(n + 1, (), generator=generator))
    choice = int(torch.randint(n - source + 1, (), generator=generator))  # vertices source+1..n, or the decoder
    destination = None if choice == n - source else source + 1 + choice
    module = int(torch.randint(num_modules, (), generator=generator))
    return insert_node_at(routing, source, destination, module)


class CMTR(MultiTaskModel):
    """K shared modules; per task a champion and a challenger (encoder, routing, decoder)."""

    name = "cmtr"
    training_procedure = ("each task's routing over the shared modules is evolved by cmtr.meta_iteration(): "
                          "a mutated challenger trains jointly with the champion and replaces it if fitter")

    def __init__(self, tasks: Sequence[str], make_module: Callable[[int], nn.Module], num_modules: int,
                 encoders: Mapping[str, nn.Module], decoders: Mapping[str, nn.Module], seed: int = 0):
        super().__init__(tasks)
        require_positive(num_modules=num_modules)
        self.num_modules = num_modules
        self.shared = nn.ModuleList(make_module(k) for k in range(num_modules))  # F_1..F_K
        # slot 0: the champion's encoder / decoder, slot 1: the challenger's (a copy at first)
        self.encoders = nn.ModuleDict({t: nn.ModuleList([encoders[t], copy.deepcopy(encoders[t])]) for t in self.tasks})
        self.decoders = nn.ModuleDict({t: nn.ModuleList([decoders[t], copy.deepcopy(decoders[t])]) for t in self.tasks})
        self.generator = torch.Generator().manual_seed(seed)  # CPU: evolution does not depend on the device
        self.routings: dict[str, list[Routing]] = {}
        for t in self.tasks:
            start = single_module_routing(int(torch.randint(num_modules, (), generator=self.generator)))
            self.routings[t] = [start, start]

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, num_modules: int = 4, seed: int = 0,
                     module_genes: Sequence[Mapping[str, int]] | None = None) -> "CMTR":
        shape = tuple(problem.input_shape)
        if module_genes is not None and len(module_genes) != num_modules:
            raise ValueError(f"module_genes has {len(module_genes)} entries for num_modules={num_modules}")
        require_positive(num_modules=num_modules)

        def make_module(k: int) -> nn.Module:
            if module_genes is None:
                return (conv_block if problem.is_image else mlp_block)(width, width)
            return module_from_gene(shape, width, module_genes[k])

        encoders = {t: trunk_for(shape, width, 1) for t in problem.tasks}
        decoders = {t: head_for(shape, width, d, problem.dense) for t, d in problem.out_dims.items()}
        return cls(problem.tasks, make_module, num_modules, encoders, decoders, seed)

    # --- the network ---------------------------------------------------------------------------

    def run_routing(self, h0: Tensor, routing: Routing) -> Tensor:
        """h_v = F_m(v)(mean of its inputs), vertex by vertex; the mean of the outputs."""
        h = [h0]
        for module, inputs in routing.nodes:
            h.append(self.shared[module](torch.stack([h[u] for u in inputs]).mean(0)))
        return torch.stack([h[u] for u in routing.outputs]).mean(0)

    def individual(self, x: Tensor, task: str, slot: int = CHAMPION) -> Tensor:
        """D_t(G_t(E_t(x))) for the champion (slot 0) or the challenger (slot 1) of ``task``."""
        h = self.run_routing(self.encoders[task][slot](x), self.routings[task][slot])
        return self.decoders[task][slot](h)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.individual(x, t, CHAMPION) for t in self.tasks}

    def individual_outputs(self, x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """(champion, challenger) output per task: the 2T networks trained jointly."""
        return {t: (self.individual(x, t, CHAMPION), self.individual(x, t, CHALLENGER)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.encoders[task].parameters()
        yield from self.decoders[task].parameters()

    # --- evolution of the routings ---------------------------------------------------------------

    def spawn_challengers(self) -> None:
        """Step 1: every challenger becomes a copy of its champion (weights too) with one inserted vertex."""
        for t in self.tasks:
            for part in (self.encoders[t], self.decoders[t]):
                part[CHALLENGER].load_state_dict(part[CHAMPION].state_dict())
            self.routings[t][CHALLENGER] = insert_node(self.routings[t][CHAMPION], self.num_modules, self.generator)

    def promote(self, task: str) -> None:
        """Step 3 for a winning challenger: it becomes the champion, trained weights included."""
        for part in (self.encoders[task], self.decoders[task]):
            part[CHAMPION].load_state_dict(part[CHALLENGER].state_dict())
        self.routings[task][CHAMPION] = self.routings[task][CHALLENGER]

    def get_extra_state(self) -> dict[str, Any]:
        return {t: [(r.nodes, r.outputs) for r in pair] for t, pair in self.routings.items()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.routings = {t: [Routing(tuple((m, tuple(i)) for m, i in nodes), tuple(outputs))
                             for nodes, outputs in pair] for t, pair in state.items()}


def meta_iteration(model: CMTR, train: Callable[[CMTR], None],
                   fitness: Callable[[CMTR, str, int], float]) -> dict[str, bool]:
    """One CTR meta-iteration: mutate, train all 2T individuals jointly, keep the fitter of
    each champion / challenger pair. ``fitness(model, task, slot)`` scores
    ``model.individual(x, task, slot)`` on validation data (higher is better). Returns, per
    task, whether the challenger won."""
    model.spawn_challengers()
    train(model)
    won = {}
    for t in model.tasks:
        won[t] = fitness(model, t, CHALLENGER) > fitness(model, t, CHAMPION)
        if won[t]:
            model.promote(t)
    return won


# --- module coevolution (a simplified stand-in for CoDeepNEAT's module evolution) -------------------

MODULE_CHOICES: dict[str, tuple[int, ...]] = {"layers": (1, 2, 3), "hidden": (8, 16, 32)}


def module_from_gene(input_shape: Sequence[int], width: int, gene: Mapping[str, int]) -> nn.Module:
    """A shared module from its hyperparameters: ``layers`` blocks, width -> hidden -> ... -> width."""
    layers, hidden = gene["layers"], gene["hidden"]
    require_positive(layers=layers, hidden=hidden)
    block = conv_block if len(input_shape) == 3 else mlp_block
    widths = [width, *([hidden] * (layers - 1)), width]
    return nn.Sequential(*(block(a, b) for a, b in zip(widths[:-1], widths[1:])))


def mutate_module_genes(genes: Sequence[Mapping[str, int]], generator: torch.Generator,
                        choices: Mapping[str, Sequence[int]] = MODULE_CHOICES) -> tuple[dict[str, int], ...]:
    """A copy of a module set with exactly one hyperparameter of one module set to another allowed value."""
    out = tuple(dict(g) for g in genes)
    k = int(torch.randint(len(out), (), generator=generator))
    key = sorted(choices)[int(torch.randint(len(choices), (), generator=generator))]
    others = [v for v in choices[key] if v != out[k][key]]
    if others:
        out[k][key] = others[int(torch.randint(len(others), (), generator=generator))]
    return out


def next_module_population(population: Sequence[Sequence[Mapping[str, int]]], fitnesses: Sequence[float],
                           num_elite: int, generator: torch.Generator,
                           choices: Mapping[str, Sequence[int]] = MODULE_CHOICES) -> list[tuple[dict[str, int], ...]]:
    """Elitist selection: the ``num_elite`` fittest module sets survive unchanged (fittest
    first), the rest of the population is refilled with mutated copies of random elites."""
    require_at_least(1, num_elite=num_elite)
    if num_elite > len(population) or len(fitnesses) != len(population):
        raise ValueError(f"num_elite={num_elite} and {len(fitnesses)} fitnesses for a population of {len(population)}")
    order = sorted(range(len(population)), key=lambda i: -fitnesses[i])
    elite = [tuple(dict(g) for g in population[i]) for i in order[:num_elite]]
    children = [mutate_module_genes(elite[int(torch.randint(num_elite, (), generator=generator))], generator, choices)
                for _ in range(len(population) - num_elite)]
    return elite + children
