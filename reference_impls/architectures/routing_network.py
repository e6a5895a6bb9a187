"""Routing networks: a per-task router picks one function block per depth, trained by RL.

Rosenbaum, Klinger, Riemer, "Routing Networks: Adaptive Selection of Non-Linear Functions for
Multi-Task Learning", ICLR 2018, arXiv:1711.01239.

A routing network is a router plus pools of function blocks. Given an input and its task, the
router makes one decision per depth: which block of that depth's pool to apply next. The
output of the chosen block is handed back to the router, until a fixed recursion depth is
reached; the task's head reads the result. Tasks that pick the same block share it; tasks
that pick different blocks do not interfere there. The decisions are discrete, so the router
is not trained by back-propagation: the paper treats it as a reinforcement learning problem
(single-agent, or multi-agent with one agent per task) with rewards derived from the final
prediction (e.g. +1 when correct, or the negative loss; the released code gives -1 when wrong).

Here each task owns a tabular softmax policy over the blocks of every depth,

    pi_t(a_d = j) = softmax(theta[t, d])_j,

and :meth:`RoutingNetwork.reinforce` applies REINFORCE with a running-mean baseline b_t:

    theta[t, d] += lr * (r_t - b_t) * (onehot(a_d) - pi_t(. at depth d))     (grad of log pi)
    b_t         += beta * (r_t - b_t)

so a route that earns more than the usual reward becomes more likely (tested). The training
loop (``reference_impls.train``) calls :meth:`observe_step_losses` in every step, right after
the forward pass (before a gradient method can run the model again and sample other routes),
which reinforces each task's route with the reward r_t = -L_t, the negative of the task's loss on
the batch (one of the paper's rewards; +1 for a correct answer is the other). The blocks and
heads are trained by ordinary gradient descent through the chosen route only (tested: blocks
not on the route get no gradient). In training mode every forward pass samples one route per
task (from a CPU ``torch.Generator``, so routes do not depend on the device) and remembers it
for the next :meth:`reinforce`; in eval mode the router is greedy. With one block per depth the
model is a plain shared-bottom network.

The paper's equations are not cited by number: its text was not available to check them.

Left out: per-example routing (one route per task per batch here), routers that read the
representation (only the task-conditioned tabular policy is kept), the paper's other RL
learners (Q-learning, the weighted policy learner used for MARL) and its per-action
collaboration reward that favours re-used blocks, and the experiments on MNIST,
mini-ImageNet and CIFAR-100.

Compared with the authors' library, github.com/cle-ros/RoutingNetworks (PytorchRouting/:
DecisionLayers/Decision.py, PolicyStorage.py and ReinforcementLearning/REINFORCE.py,
CoreLayers/Selection.py and Loss.py, RewardFunctions/, Examples/Models.py). Where it differs:
its plain REINFORCE uses no baseline (its REINFORCEBl variants learn a value estimate), so the
running-mean baseline is our choice; its example model routes the output layer as well, where
we keep one fixed head per task; its tabular policies are stepped by SGD on the policy-gradient
loss in the same step as the blocks (at a fraction of their learning rate), not by a separate
update with its own rate (about 9e-4 per step in its example, ``router_lr`` 0.5 here). Its own
example trains the router with the weighted policy learner, not REINFORCE, and rewards each
example separately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .encoders import conv_block, heads_for, mlp_block
from .registry import Problem

Route = tuple[int, ...]


class RoutingNetwork(MultiTaskModel):
    """A shared stem, ``depth`` pools of ``num_blocks`` blocks, a tabular router and a head per task."""

    name = "routing_network"

    def __init__(self, tasks: Sequence[str], stem: nn.Module, make_block: Callable[[], nn.Module],
                 num_blocks: int, depth: int, heads: Mapping[str, nn.Module],
                 router_lr: float = 0.5, baseline_decay: float = 0.1, seed: int = 0):
        super().__init__(tasks)
        require_positive(depth=depth, num_blocks=num_blocks)
        self.stem = stem
        self.pools = nn.ModuleList(
            nn.ModuleList(make_block() for _ in range(num_blocks)) for _ in range(depth)
        )
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        # theta[t, d, j]: the router's preference for block j at depth d for task t (not a gradient parameter)
        self.register_buffer("policy_logits", torch.zeros(len(self.tasks), depth, num_blocks))
        self.register_buffer("baseline", torch.zeros(len(self.tasks)))
        self.router_lr, self.baseline_decay = router_lr, baseline_decay
        self.generator = torch.Generator().manual_seed(seed)
        self.last_routes: dict[str, Route] = {}

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 2, num_blocks: int = 3,
                     **kwargs: object) -> "RoutingNetwork":
        shape = tuple(problem.input_shape)
        if problem.is_image:
            stem, block = conv_block(shape[0], width), conv_block
        else:
            stem, block = mlp_block(shape[0], width), mlp_block
        return cls(problem.tasks, stem, lambda: block(width, width), num_blocks, depth,
                   heads_for(problem, width), **kwargs)

    def policy(self, task: str) -> Tensor:
        """pi_t as a (depth, num_blocks) matrix; every row is a distribution."""
        return torch.softmax(self.policy_logits[self.tasks.index(task)], dim=-1)

    def route_probability(self, task: str, route: Route) -> Tensor:
        """Probability that the router picks exactly ``route`` for ``task``."""
        pi = self.policy(task)
        return pi[torch.arange(len(route)), torch.tensor(route, device=pi.device)].prod()

    def choose_route(self, task: str) -> Route:
        """A sampled route in training mode, the greedy one in eval mode."""
        pi = self.policy(task).cpu()
        if self.training:
            return tuple(int(torch.multinomial(p, 1, generator=self.generator)) for p in pi)
        return tuple(int(j) for j in pi.argmax(dim=-1))

    def run_route(self, x: Tensor, route: Route) -> Tensor:
        """Compose the chosen blocks: block[d][route[d]] for d = 0 .. depth - 1, after the stem."""
        h = self.stem(x)
        for pool, j in zip(self.pools, route, strict=True):
            h = pool[j](h)
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.last_routes = {t: self.choose_route(t) for t in self.tasks}
        return {t: self.heads[t](self.run_route(x, r)) for t, r in self.last_routes.items()}

    @torch.no_grad()
    def reinforce(self, rewards: Mapping[str, float], routes: Mapping[str, Route] | None = None) -> None:
        """REINFORCE step of each task's policy for its route (default: the last forward's)."""
        routes = self.last_routes if routes is None else routes
        for task, reward in rewards.items():
            t = self.tasks.index(task)
            advantage = float(reward) - float(self.baseline[t])
            for d, j in enumerate(routes[task]):
                grad_log_pi = -torch.softmax(self.policy_logits[t, d], dim=-1)
                grad_log_pi[j] += 1.0
                self.policy_logits[t, d] += self.router_lr * advantage * grad_log_pi
            self.baseline[t] += self.baseline_decay * (float(reward) - float(self.baseline[t]))

    def observe_step_losses(self, losses: Tensor) -> None:
        """In a training step: reinforce each task's last route with reward -L_t."""
        if self.training and self.last_routes:
            self.reinforce({t: -float(loss) for t, loss in zip(self.tasks, losses)})

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
