"""AdaShare: every task learns which shared residual blocks to run and which to skip.

Sun, Panda, Feris & Saenko, "AdaShare: Learning What To Share For Efficient Deep
Multi-Task Learning", NeurIPS 2020, arXiv:1911.12423.

One backbone of ``L`` residual blocks serves all tasks. Task ``k`` owns a policy: for
each block ``l`` two logits (select, skip). The block is applied or bypassed,

    x_{l+1} = u_{l,k} * F_l(x_l) + (1 - u_{l,k}) * x_l        (F_l: the whole residual block)

where ``u_{l,k}`` is the "select" entry of a sample from the policy (the Gumbel-max
sample of Eq. 1). Skipping a residual block is the identity, so the resolution and width
never change. During training the discrete choice is relaxed with Gumbel-Softmax at
temperature ``tau`` (Eq. 2: soft samples, or straight-through one-hot ones with
``hard=True``); at evaluation the policy is deterministic: select when the select logit is
at least the skip logit.

Two regularisers shape the policies (the paper's sparsity and sharing losses):

* sparsity (Eq. 3): ``sum_{l,k} log p_{l,k}`` (``p`` the select probability) rewards skipping;
* sharing (Eq. 4): ``sum_{k1,k2} sum_{l=1..L} (L - l)/L * |p_{l,k1} - p_{l,k2}|`` (every
  ordered pair of tasks) pushes tasks to agree, more strongly on the low blocks; the top
  block's weight is 0.

The policies learn together with the network from the task losses plus both regularisers
(Eq. 5): :meth:`AdaShare.auxiliary_loss` gives ``sparsity_weight`` x sparsity +
``sharing_weight`` x sharing, which the training harness adds every step (the defaults, 0.01
and 0.05, are ours; the released configs use 0.001-0.05 and 0.005-0.1, on the differently
scaled losses below).

Equation numbers are those of the NeurIPS 2020 camera-ready copy kept on the second author's
site (data/NeurIPS_2020.pdf of rpand002/rpand002.github.io, snapshot c122e15, file committed
2020-10-22). Eqs. 3 and 4 are followed as printed: the sharing sum runs over ordered pairs
(each pair twice) and blocks l = 1..L, so the last block's disagreement costs nothing. The
paper anneals tau from 5 towards 0 and, after training, samples the policy from the learned
distribution (both left out here, see below).

Left out: the ResNet backbone, the curriculum that unfreezes the policy block by block,
the warm-up phase and re-training from scratch with the sampled policy
(:attr:`AdaShare.training_procedure` says so when the harness trains it).

Compared with the authors' release, github.com/sunxm2357/AdaShare (models/deeplab_resnet.py:
Deeplab_ResNet_Backbone.forward, MTL2; envs/blockdrop_env.py: get_sparsity_loss2,
get_hamming_loss, backward_policy, backward_network, decay_temperature; train.py; re-train.py;
yamls/adashare/*.yml). The block mixing, the (select, skip) column order, Gumbel-Softmax at an
initial temperature of 5 and equal initial select/skip probabilities agree. Where the release
departs from the formulas above: its sparsity term is, per task, the mean cross-entropy towards
"skip" over the blocks the curriculum has freed, i.e. -log(1 - p); its sharing term compares
raw select logits, not probabilities, and (all released configs) weights block l by (l+1)/L,
so disagreement costs more on the high blocks. It also alternates network steps (task losses
only) with policy steps (task losses plus both terms, a separate Adam), lowers the temperature
by 0.965 after each policy phase (here tau stays fixed), and in its configs samples the evaluation
and re-training policies from the softmax instead of taking the deterministic choice used here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_above, require_non_negative, require_positive
from .base import MultiTaskModel
from .encoders import image_head
from .registry import Problem


class ResidualBlock(nn.Module):
    """``F(x) = ReLU(x + conv2(ReLU(conv1(x))))`` at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))



class AdaShare(MultiTaskModel):
    """Shared stem + residual blocks, a select/skip policy per task, one head per task."""

    name = "adashare"
    equations_checked_in = "data/NeurIPS_2020.pdf of rpand002/rpand002.github.io"
    training_procedure = ("the network is warmed up before the policies learn, a curriculum frees the policy block "
                          "by block, and the network is then retrained from scratch under a policy sampled from them")

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: dict[str, int],
        channels: int = 16,
        num_blocks: int = 4,
        tau: float = 5.0,
        hard: bool = False,
        dense: bool = True,
        sparsity_weight: float = 0.01,
        sharing_weight: float = 0.05,
    ):
        super().__init__(tasks)
        require_above(0, tau=tau)
        require_non_negative(sparsity_weight=sparsity_weight, sharing_weight=sharing_weight)
        require_positive(channels=channels, num_blocks=num_blocks)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(channels) for _ in range(num_blocks))
        # policy_logits[k][l] = (select, skip); equal logits = select probability 1/2.
        self.policy_logits = nn.ParameterDict({t: nn.Parameter(torch.zeros(num_blocks, 2)) for t in tasks})
        self.heads = nn.ModuleDict({t: image_head(channels, out_dims[t], dense) for t in tasks})
        self.tau = tau
        self.hard = hard
        self.sparsity_weight, self.sharing_weight = sparsity_weight, sharing_weight

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> AdaShare:
        if not problem.is_image:
            raise ValueError("this AdaShare uses conv residual blocks; it needs image inputs")
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, channels=width,
                   dense=problem.dense, **kwargs)

    def select_probabilities(self, task: str) -> Tensor:
        """``p_{l,k}``: softmax probability of "select" for each block."""
        return self.policy_logits[task].softmax(dim=-1)[:, 0]

    def policy(self, task: str) -> Tensor:
        """``u_{l,k}`` for every block: Gumbel-Softmax samples in training, 0/1 in eval."""
        logits = self.policy_logits[task]
        if self.training:
            return F.gumbel_softmax(logits, tau=self.tau, hard=self.hard, dim=-1)[:, 0]
        return (logits[:, 0] >= logits[:, 1]).to(logits.dtype)

    def run_blocks(self, x: Tensor, u: Tensor) -> Tensor:
        """Apply the blocks under a given policy vector ``u`` (one entry per block)."""
        for block, u_l in zip(self.blocks, u):
            x = u_l * block(x) + (1 - u_l) * x  # select: F_l(x); skip: identity
        return x

    def features(self, x: Tensor, task: str) -> Tensor:
        return self.run_blocks(torch.relu(self.stem(x)), self.policy(task))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def sparsity_loss(self) -> Tensor:
        """Sum of log select-probabilities: minimising it makes tasks skip blocks."""
        # log_softmax, not log(softmax): the same value, without -inf once a probability underflows
        return sum(self.policy_logits[t].log_softmax(dim=-1)[:, 0].sum() for t in self.tasks)

    def sharing_loss(self) -> Tensor:
        """Eq. 4: disagreement of every ordered pair of task policies, block l = 1..L weighted (L - l)/L."""
        num_blocks = len(self.blocks)
        probs = torch.stack([self.select_probabilities(t) for t in self.tasks])  # (tasks, blocks)
        # (L - l)/L computed in the policy's dtype: built in float32 and cast, 2/3 lost precision in float64
        blocks = torch.arange(1, num_blocks + 1, dtype=probs.dtype, device=probs.device)
        weights = (num_blocks - blocks) / num_blocks
        gaps = (probs[:, None, :] - probs[None, :, :]).abs()  # every (k1, k2), k1 = k2 included (0)
        return (weights * gaps).sum()

    def auxiliary_loss(self) -> Tensor:
        """``sparsity_weight`` x sparsity + ``sharing_weight`` x sharing (no forward pass needed)."""
        return self.sparsity_weight * self.sparsity_loss() + self.sharing_weight * self.sharing_loss()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.policy_logits[task]
        yield from self.heads[task].parameters()
