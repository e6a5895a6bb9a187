"""Learning to Prompt (L2P): a frozen transformer that picks its prompts from a keyed pool.

Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister, "Learning to Prompt for
Continual Learning", CVPR 2022, arXiv:2112.08654.

Instead of one prompt per task (:mod:`.prompt_tuning`), L2P keeps one pool of M prompts
P_1..P_M (each L_p x d), every prompt paired with a learnable key k_i in R^d, and lets
each *example* choose which prompts it gets, so that no task identity is needed (Sec. 4.2,
instance-wise prompt query). The query q(x) is a feature of x computed by the frozen
pretrained model without any prompt, so it never changes during training. With the
cosine distance γ(q, k) = 1 - cos(q, k), the example takes the N keys closest to it,

    K_x = the N indices i with the smallest γ(q(x), k_i)                 (Eq. 3)

and the frozen model runs on the selected prompts prepended to the embedded input,
x_p = [P_s1; ...; P_sN; x_e] (Eq. 2). The choice is a hard top-N, so the task loss
cannot move the keys; a surrogate loss pulls the selected keys towards the queries that
chose them (Sec. 4.3, optimization objective):

    L = L_task(g(f_avg(x_p)), y) + λ Σ_{s_i ∈ K_x} γ(q(x), k_si)      (Eq. 5)

where f_avg averages the outputs at the N L_p prompt positions and g is the classifier.
Both the selection and the surrogate are tested against a hand computation; a pool of
one prompt is prompt tuning with one prompt for every task (tested).

Multi-task reading: the pool and keys are shared by all tasks (the paper's point is that
the selection, not a task id, routes knowledge), and each task only adds its head. Heads
read the mean of the prompt positions, as in the paper; dense image tasks, which the
paper does not have, read the patch positions with p x p pixels per patch token. The
query is the mean output token of the frozen transformer (the small tokenizer has no
[CLS] token). ``forward`` returns the task outputs only; :meth:`L2P.auxiliary_loss` gives
λ times the surrogate of the last forward pass, which the training harness adds to the
objective (λ = ``key_weight``, 0.5 by default: the paper's value for all datasets, Sec. 5.2;
the official JAX configurations use 1.0, and 0.5 for 5-datasets). ``key_matching_loss(x)``
computes the surrogate for any batch.

Left out: the pretrained ViT-B/16 (here a random frozen transformer from
:func:`.prefix_tuning.frozen_backbone`), the optional penalty on frequently chosen
prompts that diversifies the selection when task boundaries are known, the official
code's batch-wise majority vote over selected prompts, continual-learning protocols,
rehearsal buffers and the masking of logits of unseen classes. Prompts and keys start
uniform in [0, 1) here; the official code draws both uniform in [0, 0.01) (Flax's default
uniform initialiser), and its 5-datasets run keeps each task on its own block of prompts in
training (``use_prompt_mask``; checked at google-research/l2p dd8836e). The equation numbers
are the paper's (the diversified selection left out is its Eq. 4); the objective's display
lost its number in the transcript we read, but the paper's Sec. 5.2 calls it equation 5.

Equation numbers checked in a Markdown transcript of arXiv:2112.08654, found in the public GitHub
index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import TokenHead, Tokenizer
from .prefix_tuning import frozen_backbone
from .registry import Problem


class PromptPool(nn.Module):
    """M prompts (L_p x d each) with one learnable key per prompt; top-N cosine selection."""

    def __init__(self, size: int, length: int, width: int, top_n: int):
        super().__init__()
        if not 1 <= top_n <= size:
            raise ValueError(f"top_n must be in [1, pool size {size}], got {top_n}")
        self.prompts = nn.Parameter(torch.rand(size, length, width))  # uniform in [0, 1)
        self.keys = nn.Parameter(torch.rand(size, width))
        self.top_n = top_n

    def distances(self, query: Tensor) -> Tensor:
        """γ(q, k_i) = 1 - cos(q, k_i) for every example and key: (B, M)."""
        return 1 - F.normalize(query, dim=-1) @ F.normalize(self.keys, dim=-1).T

    def closest(self, distances: Tensor) -> tuple[Tensor, Tensor]:
        """The N smallest distances per example and their key indices, each (B, N), closest first."""
        return distances.topk(self.top_n, dim=1, largest=False)

    def select(self, query: Tensor) -> Tensor:
        """K_x: the indices of the N closest keys per example, (B, N), closest first."""
        return self.closest(self.distances(query))[1]

    def prompts_for(self, indices: Tensor) -> Tensor:
        """[P_s1; ...; P_sN] per example: (B, N L_p, d)."""
        return self.prompts[indices].flatten(1, 2)


class L2P(MultiTaskModel):
    """A frozen token transformer, one shared keyed prompt pool, and a head per task."""

    name = "l2p"
    equations_checked_in = "a Markdown transcript of arXiv:2112.08654"
    per_pass_attributes = ("_key_loss",)

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, TokenHead],
        pool_size: int = 6,
        prompt_length: int = 2,
        top_n: int = 2,
        key_weight: float = 0.5,
    ):
        super().__init__(tasks)
        require_positive(prompt_length=prompt_length)
        width = tokenizer.positions.shape[1]
        self.tokenizer, self.layers = tokenizer, layers
        self.pool = PromptPool(pool_size, prompt_length, width, top_n)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.key_weight = key_weight
        self._key_loss: Tensor | None = None  # the surrogate of the last forward pass

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: int) -> "L2P":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        heads = {t: TokenHead(width, d, tokenizer, problem.dense) for t, d in problem.task_out_dims.items()}
        return cls(problem.tasks, tokenizer, layers, heads, **kw)

    def run(self, tokens: Tensor) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens

    @torch.no_grad()
    def query(self, x: Tensor) -> Tensor:
        """q(x): the frozen model's mean output token on the un-prompted input (no gradient)."""
        return self.run(self.tokenizer(x)).mean(dim=1)

    def key_matching_loss(self, x: Tensor) -> Tensor:
        """The surrogate Σ_{s_i ∈ K_x} γ(q(x), k_si), averaged over the batch; moves keys only."""
        return self.pool.closest(self.pool.distances(self.query(x)))[0].sum(dim=1).mean()

    def auxiliary_loss(self) -> Tensor:
        """``key_weight`` x the surrogate of the last forward pass: what trains the keys, which
        the task loss cannot reach through the hard top-N. The training harness adds it."""
        if self._key_loss is None:
            raise RuntimeError("auxiliary_loss() reads the last forward pass; call the model first")
        return self.key_weight * self._key_loss

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Outputs at the prompt positions (B, N L_p, d) and at the input positions (B, n, d)."""
        nearest, chosen = self.pool.closest(self.pool.distances(self.query(x)))
        self._key_loss = nearest.sum(dim=1).mean()  # the surrogate, for auxiliary_loss
        prompts = self.pool.prompts_for(chosen)
        h = self.run(torch.cat([prompts, self.tokenizer(x)], dim=1))  # x_p = [P_s1; ...; P_sN; x_e]
        return h[:, : prompts.shape[1]], h[:, prompts.shape[1]:]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        prompt_out, input_out = self.features(x)
        return {t: self.heads[t](input_out if self.heads[t].dense else prompt_out) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[task].parameters()
