"""AdapterFusion: per-task adapters trained first, then an attention that fuses them per task.

Pfeiffer, Kamath, Rücklé, Cho & Gurevych, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning", EACL 2021, arXiv:2005.00247.

Learning is split in two stages so that no task can overwrite another's knowledge:

1. Knowledge extraction: with the pretrained transformer frozen, each task n trains its
   own bottleneck adapter Φ_n in every layer (and its head), independently of the others.
2. Knowledge composition: the adapters and the backbone are frozen, and each target task
   m trains a fusion layer Ψ_m per transformer layer that decides, per token, how much of
   each adapter's output to use.

Fusion is dot-product attention with the layer's own output as the query and the N
adapters' outputs as keys and values (Sec. 3.2). At layer l, with h_l the output of the
feed-forward sublayer and z_{l,n} the output of adapter n on it:

    s_{l,n} = softmax_n( (h_l^T Q_l) · (z_{l,n}^T K_l) )
    z'_{l,n} = z_{l,n}^T V_l
    o_l = Σ_n s_{l,n} z'_{l,n}

Q and K start random; V starts at the identity plus tiny noise, so at the start of stage 2
the fusion returns a convex mix of the adapters' outputs (with identical adapters: exactly
that adapter's output, tested). Q and K carry a bias, V none (as in the official
``BertFusion``), so per target task and layer there are 3 d^2 + 2 d fusion parameters
(tested). The adapter is a bottleneck with a skip connection on the feed-forward output,
Φ(h) = h + U ReLU(D h), placed before the layer's last residual sum and layer norm, with U
zero at the start so untrained adapters are the identity (tested). The bottleneck width
defaults to d / 4 (ours; tested). The official library (adapter-hub/adapters at 88f18eb)
defaults to d / 16, draws Q, K and both adapter matrices from N(0, 0.02²) (so its fusion
starts near uniform attention and its adapters near, not at, the identity), where Q and K
here take nn.Linear's default initialisation.

Here each task of the problem is both a source task (it owns an adapter) and a target task
(it owns a fusion layer over *all* tasks' adapters). :meth:`AdapterFusion.start_fusion`
switches from stage 1 to stage 2; which parameters are task-specific depends on the stage
(stage 2: fusion and head; the frozen adapters become shared inputs).

The frozen backbone is :func:`.prefix_tuning.frozen_backbone` (post-LN).

Left out: the pretrained BERT/RoBERTa, the ST-A / MT-A variants of stage 1 (here ST-A:
one adapter per task, trained alone), the paper's 16 GLUE/SuperGLUE-style source tasks,
and dropout. Also left out, differences of the official ``adapters`` library (default
"dynamic" fusion config): its adapter and fusion query read the feed-forward output after
that sublayer's own residual sum and layer norm; its keys and values are the adapters'
bottleneck outputs without their skip, the skip being added once after the fusion, outside
V (the attention weights are the same either way, the value path is not); V starts at an
exact 1 / 1e-6 pattern rather than noise; and its trainer adds 0.01 ||I - V||^2 per fusion
layer as a regulariser. The formulas are named by section, not numbered: the paper prints the
fusion as one unnumbered block of four lines in Sec. 3.2 (and the Sec. 2 objectives unnumbered
too), as seen in a 2021 copy of its text whose version header was not preserved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import frozen_backbone
from .registry import Problem


class BottleneckAdapter(nn.Module):
    """Φ(h) = h + U ReLU(D h); U = 0 at the start, so the adapter begins as the identity."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(torch.relu(self.down(h)))


class Fusion(nn.Module):
    """Attention over N adapter outputs with the layer output as query: Q, K random, V ≈ I."""

    def __init__(self, width: int, value_noise: float = 1e-6):
        super().__init__()
        self.query, self.key = nn.Linear(width, width), nn.Linear(width, width)
        self.value = nn.Linear(width, width, bias=False)  # z^T V: a matrix only
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(width) + value_noise * torch.randn(width, width))

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        """h: (B, T, d) layer output; z: (B, T, N, d) adapter outputs -> (B, T, d)."""
        scores = torch.einsum("btd,btnd->btn", self.query(h), self.key(z))
        weights = torch.softmax(scores, dim=-1)  # s_{l,n}
        return torch.einsum("btn,btnd->btd", weights, self.value(z))  # Σ_n s_{l,n} z_{l,n}^T V


class AdapterFusion(MultiTaskModel):
    """A frozen token transformer, one adapter per task per layer, one fusion per task per layer."""

    name = "adapterfusion"
    equations_checked_in = "a 2021 copy of its text whose version header was not preserved"
    training_procedure = ("each task first trains its own adapter alone (the stage this run trains), then "
                          "start_fusion() freezes the adapters and each task trains its fusion over all of them")

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        bottleneck: int | None = None,
    ):
        super().__init__(tasks)
        width = tokenizer.positions.shape[1]
        bottleneck = max(1, width // 4) if bottleneck is None else bottleneck
        require_positive(bottleneck=bottleneck)
        self.tokenizer, self.layers = tokenizer, layers
        self.adapters = nn.ModuleList(
            nn.ModuleDict({t: BottleneckAdapter(width, bottleneck) for t in self.tasks}) for _ in layers
        )
        self.fusions = nn.ModuleList(nn.ModuleDict({t: Fusion(width) for t in self.tasks}) for _ in layers)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.fusing = False
        for p in self.fusions.parameters():  # unused, hence frozen, until stage 2
            p.requires_grad_(False)

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: int) -> "AdapterFusion":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def start_fusion(self) -> None:
        """Stage 2: freeze every adapter; from now on each task trains its fusion layers and head."""
        self.fusing = True
        for p in self.adapters.parameters():
            p.requires_grad_(False)
        for p in self.fusions.parameters():
            p.requires_grad_(True)

    def sublayer_output(self, layer_index: int, h: Tensor, task: str) -> Tensor:
        """Stage 1: the task's own adapter. Stage 2: the task's fusion over all adapters."""
        adapters = self.adapters[layer_index]
        if not self.fusing:
            return adapters[task](h)
        z = torch.stack([adapters[n](h) for n in self.tasks], dim=2)  # (B, T, N, d)
        return self.fusions[layer_index][task](h, z)

    def features(self, x: Tensor, task: str) -> Tensor:
        h = self.tokenizer(x)
        for i, layer in enumerate(self.layers):
            a = layer.norm1(h + layer.attention(h))
            h = layer.norm2(a + self.sublayer_output(i, layer.feed_forward(a), task))
        return h

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        stage_modules = self.fusions if self.fusing else self.adapters
        for per_layer in stage_modules:
            yield from per_layer[task].parameters()
        yield from self.heads[task].parameters()
