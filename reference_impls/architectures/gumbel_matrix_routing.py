"""Gumbel-Matrix routing: learned binary allocation of shared components to tasks, per layer.

Maziarz, Kokiopoulou, Gesmundo, Sbaiz, Bartok, Berent, "Flexible Multi-task Networks by
Learning Parameter Allocation", ICLR 2021 Workshop (earlier title "Gumbel-Matrix Routing for
Flexible Multi-task Learning"), arXiv:1910.04915.

Every layer holds C parallel components shared by all tasks. A binary allocation matrix
M_l (tasks x components) says which components task t uses in layer l; the task's layer output
combines only its allocated components. Which tasks share what is thus learned per layer,
from fully shared (all ones: every task averages every component, tested) to disjoint. Each
entry M_l[t, c] is a Bernoulli variable with a learned logit; to train the logits by
back-propagation, the binary sample is relaxed with the Gumbel-softmax trick over the two
outcomes, which for a Bernoulli is the Gumbel-sigmoid (relaxed Bernoulli):

    u ~ U(0, 1),  m = sigmoid((logit + log u - log(1 - u)) / tau),    P(m > 1/2) = sigmoid(logit)

(the second identity is tested). ``hard=True`` rounds m to {0, 1} in the forward pass and keeps
the relaxed gradient (straight-through). At evaluation the allocation is deterministic:
m = 1 exactly when sigmoid(logit) >= 1/2. Logits start at ``init_logit`` = 2.5 (probability
0.92), so training starts close to a fully shared network. A task's layer output is the
allocation-weighted mean of the components,

    h_{l+1} = sum_c m_c f_{l,c}(h_l) / max(sum_c m_c, eps)

so an all-zero row gives zeros rather than dividing by zero.

The paper's equations are not cited by number: its text was not available to check them.

Left out: the paper's exact initialisation, temperature and aggregation choices for its
experiments (set here as documented defaults), the per-layer budget/sparsity variants, and the
MNIST/Omniglot experiments. In the authors' code (google-research, learning_parameter_allocation)
the training samples are always hard with the straight-through gradient (``hard=True`` here;
the default here is the relaxed sample), the temperature decays as 50 / sqrt(step + 1) down to
a floor of 0.5 (fixed ``tau`` here), the connection probabilities start at 0.5 by default
(0.92 here), and a task's allocation is divided by max(sum_c m_c, 1) rather than by
max(sum_c m_c, eps), which differs from the mean here only for relaxed samples summing below 1.
Its training takes one optimizer step per task, on that task's own batch, in shuffled order,
with a separate Adam for the routers (lr 2e-3 against the model's 1e-4 in its Omniglot
experiment, which starts the probabilities at 0.97); it keeps two logits per connection, so at
one learning rate its allocation moves about twice as fast as with the single logit here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_above, require_positive
from .base import MultiTaskModel
from .encoders import conv_block, heads_for, mlp_block
from .registry import Problem


def gumbel_sigmoid(logits: Tensor, tau: float, generator: torch.Generator, hard: bool = False) -> Tensor:
    """Relaxed Bernoulli sample with the probabilities sigmoid(logits); straight-through if ``hard``."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits)
    soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / tau)
    if not hard:
        return soft
    return (soft >= 0.5).to(soft) + soft - soft.detach()


def mean_of_allocated(m: Tensor, outputs: Sequence[Tensor], eps: float = 1e-6) -> Tensor:
    """sum_c m_c outputs[c] / max(sum_c m_c, eps) for outputs of shape (B, ...)."""
    total = torch.einsum("c,cb...->b...", m, torch.stack(list(outputs)))
    return total / m.sum().clamp_min(eps)


class GumbelMatrixRouting(MultiTaskModel):
    """``num_layers`` layers of ``num_components`` shared components, an allocation matrix per layer."""

    name = "gumbel_matrix_routing"

    def __init__(self, tasks: Sequence[str], make_component: Callable[[int], nn.Module],
                 num_layers: int, num_components: int, heads: Mapping[str, nn.Module],
                 tau: float = 1.0, hard: bool = False, init_logit: float = 2.5, seed: int = 0):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_positive(num_components=num_components, num_layers=num_layers)
        self.layers = nn.ModuleList(
            nn.ModuleList(make_component(layer) for _ in range(num_components)) for layer in range(num_layers)
        )
        # allocation_logits[t]: (layer, component) logits of M_l[t, c]
        self.allocation_logits = nn.ParameterDict(
            {t: nn.Parameter(torch.full((num_layers, num_components), init_logit)) for t in self.tasks}
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.tau, self.hard = tau, hard
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same samples on every device

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, num_layers: int = 2, num_components: int = 3,
                     **kwargs: object) -> "GumbelMatrixRouting":
        block = conv_block if problem.is_image else mlp_block
        in_width = problem.input_shape[0]
        return cls(problem.tasks, lambda layer: block(in_width if layer == 0 else width, width),
                   num_layers, num_components, heads_for(problem, width), **kwargs)

    def allocation_probabilities(self) -> dict[str, Tensor]:
        """P(M_l[t, c] = 1) = sigmoid(logit), a (layer, component) matrix per task."""
        return {t: torch.sigmoid(self.allocation_logits[t]) for t in self.tasks}

    def allocation(self, task: str) -> Tensor:
        """M[t] for every layer: relaxed (or straight-through) samples in training, 0/1 in eval."""
        logits = self.allocation_logits[task]
        if self.training:
            return gumbel_sigmoid(logits, self.tau, self.generator, self.hard)
        return (logits >= 0).to(logits)

    def run(self, x: Tensor, m: Tensor) -> Tensor:
        """Apply the layers under allocation ``m`` (layer, component)."""
        for components, m_l in zip(self.layers, m, strict=True):
            x = mean_of_allocated(m_l, [f(x) for f in components])
        return x

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.run(x, self.allocation(t))) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.allocation_logits[task]
        yield from self.heads[task].parameters()
