"""Polyhistor-Lite: adapters for all tasks and all layers from a few shared factors.

Liu, Ma, Tian, He, Kira. "Polyhistor: Parameter-Efficient Multi-Task Adaptation for Dense
Vision Tasks", NeurIPS 2022 (arXiv:2210.03265).

A frozen hierarchical backbone (stage widths d_l grow with depth) is adapted to several
dense tasks with bottleneck adapters h <- h + W_up act(W_down h). Storing one adapter per
task and layer costs T * sum_l 2 d_l r_l, quadratic in the stage scale. Polyhistor-Lite
shares almost all of it:

  Decomposed (lite) hypernetworks (Sec. 4.1): from the task embedding e_t, two small
      hypernetworks produce low-rank factors of a *template kernel* shared by all layers:
          K_t = U_t V_t^T,  U_t = reshape(H_U e_t) (b x k),  V_t = reshape(H_V e_t) (a x k)
  Layer-wise scaling kernels (Sec. 4.2): each layer l with d_l = s_l a, r_l = s_l b owns a
      task-agnostic s_l x s_l kernel S_l that scales the template up to its size:
          W^{t,l} = S_l ⊗ K_t            (Kronecker product, r_l x d_l)
  Polyhistor-Lite (Sec. 4.3) combines the two, separately for down and up projections.

Trainable parameters: T e + 2 (e b k + e a k) + 2 sum_l s_l^2 (+ task heads), against
T sum_l 2 s_l^2 a b for independent per-task adapters (see :meth:`adapter_parameter_count`).

Left out: the pretrained Swin transformer (a tiny convolutional stand-in with frozen random
weights keeps the hierarchy of widths), the full Polyhistor variant, and adapter biases.

What looks like the authors' code (in the public GitHub index, by Yen-Cheng Liu, with the
Polyhistor-Lite variant; repository name not shown there) differs from the form above: each
layer has its own embedding into a small MLP hypernetwork, several templates per layer, and a
*sum* of Kronecker products, with an adapter in every block beside or after the feed-forward
layer (here one per stage, after the residual sum), and other scaling-kernel shapes and
starting values. The paper's Secs. 4.2-4.3 were not available to settle which form it states,
so the single shared template here may be a misreading.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_each_positive, require_positive
from .base import MultiTaskModel, require_image_side


class DecomposedHyperNetwork(nn.Module):
    """e_t -> K_t = U_t V_t^T, a (rows x cols) template kernel of rank <= k."""

    def __init__(self, embed_dim: int, rows: int, cols: int, rank: int):
        super().__init__()
        self.rows, self.cols, self.rank = rows, cols, rank
        self.to_u = nn.Linear(embed_dim, rows * rank, bias=False)
        self.to_v = nn.Linear(embed_dim, cols * rank, bias=False)

    def forward(self, task_embedding: Tensor) -> Tensor:
        u = self.to_u(task_embedding).view(self.rows, self.rank)
        v = self.to_v(task_embedding).view(self.cols, self.rank)
        return u @ v.T


class PolyhistorLite(MultiTaskModel):
    """Frozen hierarchical backbone + hypernetwork-generated, Kronecker-scaled adapters."""

    name = "polyhistor"

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        out_dims: Mapping[str, int],
        base_width: int = 8,
        stage_scales: Sequence[int] = (1, 2, 4),
        reduction: int = 4,
        embed_dim: int = 8,
        rank: int = 2,
        dense: bool = True,
    ):
        super().__init__(tasks)
        require_positive(base_width=base_width, embed_dim=embed_dim, rank=rank, reduction=reduction)
        require_each_positive("stage_scales", stage_scales)
        if base_width % reduction:
            raise ValueError("reduction must divide base_width")
        self.template = (base_width // reduction, base_width)  # (b, a): down kernel shape
        self.stage_scales = tuple(stage_scales)
        self.dense = dense
        widths = [base_width * s for s in self.stage_scales]

        # Frozen "pretrained" hierarchy: a strided stem/merge per stage and a residual MLP block.
        self.merges = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 2, stride=2) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w, 2 * w, 1), nn.GELU(), nn.Conv2d(2 * w, w, 1)) for w in widths
        )
        for p in [*self.merges.parameters(), *self.blocks.parameters()]:
            p.requires_grad_(False)

        b, a = self.template
        self.task_embeddings = nn.ParameterDict({t: nn.Parameter(torch.randn(embed_dim)) for t in self.tasks})
        self.down_hyper = DecomposedHyperNetwork(embed_dim, b, a, rank)
        self.up_hyper = DecomposedHyperNetwork(embed_dim, a, b, rank)
        # S_l starts as the identity, so at first every layer sees the template on its diagonal blocks.
        self.down_scaling = nn.ParameterList(nn.Parameter(torch.eye(s)) for s in self.stage_scales)
        self.up_scaling = nn.ParameterList(nn.Parameter(torch.eye(s)) for s in self.stage_scales)
        self.heads = nn.ModuleDict({t: nn.Conv2d(widths[-1], out_dims[t], 1) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem, width: int = 8, **kwargs):  # noqa: ANN001, ANN206
        if not problem.is_image:
            raise ValueError("PolyhistorLite adapts a hierarchical vision backbone: it needs images")
        require_image_side(problem.input_shape, 2, "its first stage merges 2x2 patches")
        # Every stage halves the map and doubles the width (Swin's hierarchy): use as many stages
        # (up to three) as the image allows.
        stages = max(1, min(3, min(problem.input_shape[1:]).bit_length() - 1))
        kwargs.setdefault("stage_scales", (1, 2, 4)[:stages])
        return cls(problem.tasks, problem.input_shape[0], problem.task_out_dims, base_width=width,
                   dense=problem.dense, **kwargs)

    def adapter_weights(self, task: str, layer: int) -> tuple[Tensor, Tensor]:
        """W_down (r_l x d_l) and W_up (d_l x r_l) of ``task`` at ``layer``: S_l ⊗ K_t."""
        e = self.task_embeddings[task]
        down = torch.kron(self.down_scaling[layer], self.down_hyper(e))
        up = torch.kron(self.up_scaling[layer], self.up_hyper(e))
        return down, up

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outputs = {}
        for t in self.tasks:
            h = x
            for layer, (merge, block) in enumerate(zip(self.merges, self.blocks)):
                h = merge(h)
                h = h + block(h)
                down, up = self.adapter_weights(t, layer)
                h = h + F.conv2d(F.gelu(F.conv2d(h, down[:, :, None, None])), up[:, :, None, None])
            out = self.heads[t](h)
            outputs[t] = (
                F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
                if self.dense else out.mean(dim=(2, 3))
            )
        return outputs

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.task_embeddings[task]
        yield from self.heads[task].parameters()

    def adapter_parameter_count(self) -> dict[str, int]:
        """Trainable adapter parameters: this model vs. independent per-task adapters."""
        b, a = self.template
        e, k = self.down_hyper.to_u.in_features, self.down_hyper.rank
        scales = self.stage_scales
        lite = len(self.tasks) * e + 2 * (e * b * k + e * a * k) + 2 * sum(s * s for s in scales)
        per_task = len(self.tasks) * sum(2 * (s * a) * (s * b) for s in scales)
        return {"polyhistor_lite": lite, "per_task_adapters": per_task}
