"""Modular policy networks: task modules and robot modules, mixed and matched across pairs.

Devin, Gupta, Darrell, Abbeel, Levine, "Learning Modular Neural Network Policies for Multi-Task
and Multi-Robot Transfer", ICRA 2017, arXiv:1609.07088.

With R robots and K tasks there are R x K robot-task pairs, but only R + K modules: every task
k owns a task module f_k and every robot r a robot module g_r, and the policy of the pair is
their composition,

    pi_{r,k}(o) = g_r( f_k(o_task), o_robot ).

The task module reads what the task is about (the task's part of the observation, e.g. the
image or object positions) and hands a representation to the robot module, which adds the
robot's own state (joint angles) and emits that robot's actions. A task module is shared by
every robot that does the task and a robot module by every task on that robot (tested), so task
knowledge (perception) travels between robots and robot knowledge (kinematics, dynamics)
between tasks. Pairs never trained together compose all the same (tested: training three
pairs of a 2 x 2 grid also lowers the error of the fourth, unseen pair).

The order (task module first, robot module on top) follows the abstract's split into task
information such as perception and robot information such as dynamics; the paper's equations
could not be checked, so none is cited by number.

Here each output of a multi-task problem is one robot-task pair (``pairs[output] = (robot,
task)``); the input's last ``robot_obs_dim`` features are the robot's own state, the rest the
task's observation. ``from_problem`` gives each output its own robot (outputs may differ in
width, as action spaces do) and one task module shared by all, which is shared-bottom with
two-layer heads (tested); a grid of robots and tasks is passed as ``pairs``. Images: the task
module is a small convolutional encoder and robot states are not supported.

Left out: reinforcement-learning training in simulation, the experiments' arms and tasks, and
any regularisation of the interface between the modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import conv_block, image_head, mlp_head, trunk_for
from .registry import Problem

Pair = tuple[str, str]  # (robot, task)


class ModularPolicyNetwork(MultiTaskModel):
    """Task modules f_k and robot modules g_r; output ``o`` is g_r(f_k(.)) for ``pairs[o] = (r, k)``."""

    name = "modular_policy_networks"

    def __init__(self, outputs: Sequence[str], pairs: Mapping[str, Pair], task_modules: Mapping[str, nn.Module],
                 robot_modules: Mapping[str, nn.Module], robot_obs_dim: int = 0):
        super().__init__(outputs)
        self.pairs: dict[str, Pair] = {o: tuple(pairs[o]) for o in self.tasks}
        missing = {r for r, _ in self.pairs.values()} - set(robot_modules)
        missing |= {k for _, k in self.pairs.values()} - set(task_modules)
        if missing:
            raise ValueError(f"no module for {sorted(missing)}")
        self.task_modules = nn.ModuleDict(dict(task_modules))  # f_k
        self.robot_modules = nn.ModuleDict(dict(robot_modules))  # g_r
        self.robot_obs_dim = robot_obs_dim

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 1, robot_obs_dim: int = 0,
                     pairs: Mapping[str, Pair] | None = None) -> "ModularPolicyNetwork":
        pairs = pairs or {o: (o, "task") for o in problem.tasks}
        shape = tuple(problem.input_shape)
        if problem.is_image and robot_obs_dim:
            raise ValueError("robot states are vectors: robot_obs_dim must be 0 for image inputs")
        task_shape = shape if problem.is_image else (shape[0] - robot_obs_dim,)
        widths: dict[str, set[int]] = {}
        for o, (r, _) in pairs.items():
            widths.setdefault(r, set()).add(problem.task_out_dims[o])
        if clash := sorted(r for r, w in widths.items() if len(w) > 1):
            raise ValueError(f"robots {clash} serve outputs of different widths; one robot has one action space")
        tasks = {k: trunk_for(task_shape, width, depth) for _, k in pairs.values()}
        robots = {r: cls.robot_module(problem, width, robot_obs_dim, problem.task_out_dims[o])
                  for o, (r, _) in pairs.items()}
        return cls(problem.tasks, pairs, tasks, robots, robot_obs_dim)

    @staticmethod
    def robot_module(problem: Problem, width: int, robot_obs_dim: int, action_dim: int) -> nn.Module:
        """g_r: a hidden layer on [task features, robot state], then the robot's actions."""
        if problem.is_image:
            return nn.Sequential(conv_block(width, width), image_head(width, action_dim, problem.dense))
        return mlp_head(width + robot_obs_dim, action_dim, hidden_dims=(width,))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(task observation, robot state): the robot's state is the last ``robot_obs_dim`` features."""
        if not self.robot_obs_dim:
            return x, None
        return x[:, : -self.robot_obs_dim], x[:, -self.robot_obs_dim:]

    def compose(self, x: Tensor, robot: str, task: str) -> Tensor:
        """pi_{r,k}(o) = g_r(f_k(o_task), o_robot), for any robot and task, trained together or not."""
        o_task, o_robot = self.split(x)
        z = self.task_modules[task](o_task)
        if o_robot is not None:
            z = torch.cat([z, o_robot], dim=1)
        return self.robot_modules[robot](z)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {o: self.compose(x, r, k) for o, (r, k) in self.pairs.items()}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The modules of ``task``'s pair that no other output uses."""
        robot, task_module = self.pairs[task]
        others = [self.pairs[o] for o in self.tasks if o != task]
        if all(r != robot for r, _ in others):
            yield from self.robot_modules[robot].parameters()
        if all(k != task_module for _, k in others):
            yield from self.task_modules[task_module].parameters()
