"""Deep-AMTFL: task predictions feed back to reconstruct the shared features, reliable tasks more.

Lee, Yang & Hwang, "Deep Asymmetric Multi-task Feature Learning", ICML 2018
(arXiv:1708.00260; code: github.com/haebeom-lee/amtfl). A shared trunk gives features h
and task heads give predictions o_t, as in hard parameter sharing. The paper adds a
feedback map A from the task predictions back to the features,

    h_hat = ReLU(A [o_1, ..., o_T] + b),    reconstruction loss  gamma ||h - h_hat||^2

so the shared features are pulled toward what the tasks predict (knowledge flows from
tasks into the features every task reads). The flow is made asymmetric by weighting each
task's loss by how much it sends back:

    sum_t (1 + alpha ||a_t||_1) L_t      (a_t: A's weights from task t's outputs)

A task with a large loss pays a lot for every unit of outgoing weight, so the sparsity
pressure removes feedback from unreliable tasks first and reliable (low-loss) tasks shape
the shared features. The task heads also get an l1 penalty ``mu`` (as in the authors'
code). The paper's equation numbers are not cited: its text was not available to check
them; the weighting and the ReLU reconstruction follow the authors' code.

The harness only adds :meth:`AMTFL.auxiliary_loss` (gamma x reconstruction of the last
forward pass + mu x head l1) to a plain sum of task losses; the asymmetric weighting needs
the task losses, so :meth:`AMTFL.objective` takes them and gives the full training loss.
For dense image tasks the feedback is per pixel (the squared norm over channels is averaged
over inputs and pixels alike); for pooled image tasks it reconstructs the spatially averaged
features.

Left out: the authors' small per-task constant added to the loss inside the weighting
(0.001 / sqrt(N_t / mean N), N_t the number of training examples of task t), their weight
decay on the trunk, the paper's shallow (non-deep) AMTL baseline and its datasets. The authors
start the feedback matrix and the heads from N(0, 0.01²), so the per-task loss weights start
near 1.04; with PyTorch's default initialisation here they start between about 1.9 and 2.9
(measured in the audit; haebeom-lee/amtfl).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MultiTaskModel
from .encoders import ChannelLinear, heads_for, trunk_for


class AMTFL(MultiTaskModel):
    """Shared trunk, task heads, feedback A from all predictions to the features."""

    name = "amtfl"
    per_pass_attributes = ("_last_reconstruction",)
    training_procedure = ("each task's loss is weighted by 1 + alpha ||a_t||_1, a_t the feedback weights from its "
                          "outputs (objective(), which needs the task losses)")

    def __init__(self, tasks: Sequence[str], trunk: nn.Module, heads: Mapping[str, nn.Module],
                 feature_dim: int, out_dims: Mapping[str, int],
                 alpha: float = 0.1, gamma: float = 1e-2, mu: float = 1e-4):
        super().__init__(tasks)
        self.trunk = trunk
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.feedback = ChannelLinear(sum(out_dims[t] for t in self.tasks), feature_dim)
        bounds = torch.tensor([0] + [out_dims[t] for t in self.tasks]).cumsum(0).tolist()
        self.columns = {t: (bounds[i], bounds[i + 1]) for i, t in enumerate(self.tasks)}  # task t's columns of A
        self.alpha, self.gamma, self.mu = alpha, gamma, mu
        self._last_reconstruction: Tensor | None = None  # set by forward, read by auxiliary_loss

    @classmethod
    def from_problem(cls, problem, width: int = 32, **kwargs: float) -> "AMTFL":
        return cls(problem.tasks, trunk_for(problem.input_shape, width), heads_for(problem, width),
                   width, problem.task_out_dims, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def decode(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](z) for t in self.tasks}

    def reconstruct(self, outputs: Mapping[str, Tensor]) -> Tensor:
        """h_hat = ReLU(A [o_1, ..., o_T] + b)."""
        return torch.relu(self.feedback(torch.cat([outputs[t] for t in self.tasks], dim=1)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.encode(x)
        outputs = self.decode(h)
        h_hat = self.reconstruct(outputs)
        target = h if h_hat.dim() == h.dim() else h.mean(dim=(2, 3))  # pooled tasks: pooled features
        self._last_reconstruction = (target - h_hat).square().sum(dim=1).mean()
        return outputs

    def task_loss_weights(self) -> dict[str, Tensor]:
        """1 + alpha ||a_t||_1 per task: the price of task t's outgoing feedback."""
        a = self.feedback.weight
        return {t: 1 + self.alpha * a[:, lo:hi].abs().sum() for t, (lo, hi) in self.columns.items()}

    def auxiliary_loss(self) -> Tensor:
        """gamma x the last forward's reconstruction error + mu x the l1 norm of the heads' weights."""
        if self._last_reconstruction is None:
            raise RuntimeError("auxiliary_loss() needs a forward pass first")
        head_l1 = sum(p.abs().sum() for t in self.tasks for n, p in self.heads[t].named_parameters() if "weight" in n)
        return self.gamma * self._last_reconstruction + self.mu * head_l1

    def objective(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """sum_t (1 + alpha ||a_t||_1) L_t + the auxiliary terms (after a forward pass)."""
        weights = self.task_loss_weights()
        return sum(weights[t] * task_losses[t] for t in self.tasks) + self.auxiliary_loss()

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()  # A and its bias mix all tasks: shared
