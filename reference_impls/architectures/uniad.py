"""UniAD: task modules chained through their queries, all reading one shared BEV feature.

Hu, Yang, Chen, Li, Sima, Zhu, Chai, Du, Lin, Wang, Lu, Jia, Liu, Dai, Qiao, Li.
"Planning-oriented Autonomous Driving", CVPR 2023 (arXiv:2212.10156).

UniAD does not give each task its own head on a shared backbone. Its tasks are query-based
modules run in a fixed order (tracking and mapping side by side, then motion, occupancy and
planning) over one shared bird's-eye-view (BEV) feature, and later modules read the queries
of earlier ones, each through links of its own: in the official code motion reads the track
and map queries, occupancy the track and motion queries, and the planner the ego vehicle's
motion query and its track query (detached) with a command embedding; mapping reads no
queries at all. The MotionFormer's interaction step is the pattern this file generalises to
every task, each reading the queries of *all* tasks before it (Sec. 2.2, Eq. 1):

    Q_{a/m} = MHCA(MHSA(Q), Q_A / Q_M)      queries attend to earlier tasks' queries
                                            (tracked agents Q_A, map elements Q_M)

next to a deformable attention of each query into the BEV feature B around its predicted
goal point (Eq. 2). In the paper the three results Q_a, Q_m, Q_g are computed side by side,
concatenated and merged by an MLP; here the steps are stacked one after another with
residual connections instead. Here every task k has queries Q_k and one or more layers of

    Q_k <- Q_k + MHSA(Q_k)                       self-attention among the task's queries
    Q_k <- Q_k + MHCA(Q_k, [Q_1; ...; Q_{k-1}])  the query interface to earlier tasks
    Q_k <- Q_k + MHCA(Q_k, B)                    the shared BEV / image feature
    Q_k <- Q_k + FFN(Q_k)

each sublayer reading a layer-normed Q_k (pre-LN; the official interaction layers are
PyTorch's post-LN ``nn.TransformerDecoderLayer``, whose ReLU FFN of twice the width is
kept here), so task k's output depends on tasks 1..k-1 and on none after it (tested), and
the last task's loss trains every earlier decoder through the chain (tested). That is the
paper's planning-oriented joint optimisation in spirit; in the official end-to-end stage the
image backbone and the BEV encoder are frozen and the planner's loss does not reach the
occupancy module. The first task has no query interface (nothing precedes it). The official
self-attention runs over the modes of one agent, not over all of a task's queries, and the
merge MLP also reads the agent's own track query beside Q_a, Q_m and Q_g.

Outputs: a pooled task reads the mean of its queries with a linear head; a dense task turns
its queries into a per-pixel linear read-out of the BEV feature (each query proposes a mask
embedding and a value vector, as query-based segmentation heads do), upsampled to the input;
this is not OccFormer's read-out (per-instance masks from dense BEV queries).

Left out: the multi-camera image backbone and BEVFormer's view transformation (the "BEV"
here is a patch embedding of the input image, or a learned token set for vector inputs),
the concrete perception/prediction heads and their losses (boxes, tracks, trajectories,
occupancy, the planner's collision optimisation of Eqs. 9-11), deformable attention (plain
attention over all of B here), the motion queries' positional terms (Eq. 3), temporal query
propagation across frames, and the two-stage training (Sec. 2.5: perception first, then all
tasks end to end; a run trains all tasks from the start, and ``training_procedure`` says so), and
dropout (0.1 in the official layers).

Equation numbers checked in Markdown transcripts of the CVPR 2023 and arXiv:2212.10156 texts, found
in the public GitHub index. The wiring above was checked against the official code,
OpenDriveLab/UniAD at dd161b2 (uniad/detectors/uniad_e2e.py, dense_heads/motion_head_plugin/
modules.py, occ_head.py, planning_head.py, configs/stage2_e2e/base_e2e.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel, split_width
from .registry import Problem


class QueryModule(nn.Module):
    """One task's decoder layer: self-attention, attention to earlier queries, to the BEV, FFN."""

    def __init__(self, dim: int, num_heads: int, reads_earlier: bool):
        super().__init__()
        split_width(dim, num_heads)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.interface = nn.MultiheadAttention(dim, num_heads, batch_first=True) if reads_earlier else None
        self.bev_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        # Norms before self-attention, the interface (only if there is one), BEV attention, FFN.
        self.norms = nn.ModuleList(nn.LayerNorm(dim) if i != 1 or reads_earlier else nn.Identity() for i in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, q: Tensor, earlier: Tensor | None, bev: Tensor) -> Tensor:
        h = self.norms[0](q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        if self.interface is not None and earlier is not None:
            q = q + self.interface(self.norms[1](q), earlier, earlier, need_weights=False)[0]
        q = q + self.bev_attn(self.norms[2](q), bev, bev, need_weights=False)[0]
        return q + self.ffn(self.norms[3](q))


class QueryReadout(nn.Module):
    """Task output from its queries: pooled linear head, or a query-generated per-pixel map."""

    def __init__(self, dim: int, out_dim: int, dense: bool):
        super().__init__()
        self.dense = dense
        self.out_dim = out_dim
        self.mask_embed = nn.Linear(dim, dim) if dense else None
        self.value = nn.Linear(dim, out_dim)

    def forward(self, q: Tensor, bev: Tensor, grid: tuple[int, int] | None) -> Tensor:
        if not self.dense:
            return self.value(q.mean(dim=1))
        masks = torch.einsum("bqd,bpd->bqp", self.mask_embed(q), bev) / q.shape[-1] ** 0.5
        y = torch.einsum("bqo,bqp->bop", self.value(q), masks) / q.shape[1]
        return y.reshape(q.shape[0], self.out_dim, *grid)


class UniAD(MultiTaskModel):
    """Tasks in ``tasks`` order; each task's query decoder reads the BEV and all earlier queries."""

    name = "uniad"
    equations_checked_in = "Markdown transcripts of the CVPR 2023 and arXiv:2212.10156 texts"
    training_procedure = ("training has two stages (Sec. 2.5): the perception tasks (tracking, mapping) are trained "
                          "first, then every task end to end, with the image backbone and the BEV encoder frozen")

    def __init__(
        self,
        tasks: Sequence[str],
        input_shape: Sequence[int],
        out_dims: Mapping[str, int],
        dense: bool = False,
        dim: int = 16,
        num_queries: int = 4,
        num_layers: int = 1,
        num_heads: int = 2,
        patch_size: int = 4,
        num_bev_tokens: int = 8,
    ):
        super().__init__(tasks)
        require_positive(num_bev_tokens=num_bev_tokens, num_queries=num_queries, patch_size=patch_size)
        self.input_shape = tuple(input_shape)
        self.dense = dense and len(self.input_shape) == 3
        self.patch_size = patch_size
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            if h % patch_size or w % patch_size:
                raise ValueError(f"patch_size {patch_size} must divide the image size {(h, w)}")
            self.grid: tuple[int, int] | None = (h // patch_size, w // patch_size)
            self.embed: nn.Module = nn.Conv2d(c, dim, patch_size, stride=patch_size)
            num_bev_tokens = self.grid[0] * self.grid[1]
        elif len(self.input_shape) == 1:
            self.grid = None
            self.embed = nn.Linear(self.input_shape[0], num_bev_tokens * dim)
        else:
            raise ValueError(f"expected an input shape (d,) or (C, H, W), got {self.input_shape}")
        self.dim = dim
        self.bev_positions = nn.Parameter(torch.randn(num_bev_tokens, dim) * 0.02)
        self.queries = nn.ParameterDict({t: nn.Parameter(torch.randn(num_queries, dim)) for t in self.tasks})
        self.decoders = nn.ModuleDict({
            t: nn.ModuleList(QueryModule(dim, num_heads, reads_earlier=k > 0) for _ in range(num_layers))
            for k, t in enumerate(self.tasks)
        })
        self.readouts = nn.ModuleDict({t: QueryReadout(dim, out_dims[t], self.dense) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, **kwargs: object) -> UniAD:
        if problem.is_image and "patch_size" not in kwargs:
            h, w = problem.input_shape[1:]
            # Largest patch that divides the image and still leaves a grid of at least 4 x 4.
            fits = [p for p in (4, 2) if h % p == 0 and w % p == 0 and min(h, w) >= 4 * p]
            kwargs["patch_size"] = fits[0] if fits else 1
        return cls(problem.tasks, problem.input_shape, problem.task_out_dims, dense=problem.dense,
                   dim=width, **kwargs)

    def bev(self, x: Tensor) -> Tensor:
        """The shared scene feature B as tokens: (batch, tokens, dim)."""
        if self.grid is not None:
            tokens = self.embed(x).flatten(2).transpose(1, 2)
        else:
            tokens = self.embed(x).view(x.shape[0], -1, self.dim)
        return tokens + self.bev_positions

    def chain(self, bev: Tensor) -> dict[str, Tensor]:
        """Run the task decoders in order; each one sees the outputs of all before it."""
        outputs: dict[str, Tensor] = {}
        for t in self.tasks:
            q = self.queries[t].expand(bev.shape[0], -1, -1)
            earlier = torch.cat(list(outputs.values()), dim=1) if outputs else None
            for layer in self.decoders[t]:
                q = layer(q, earlier, bev)
            outputs[t] = q
        return outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        bev = self.bev(x)
        queries = self.chain(bev)
        out = {t: self.readouts[t](queries[t], bev, self.grid) for t in self.tasks}
        if self.dense:
            out = {t: F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
                   for t, y in out.items()}
        return out

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.readouts[task].parameters()
        if task == self.tasks[-1]:  # earlier decoders feed later tasks: only the last is private
            yield self.queries[task]
            yield from self.decoders[task].parameters()
