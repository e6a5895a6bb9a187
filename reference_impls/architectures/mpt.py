"""Multitask prompt tuning (MPT): one shared soft prompt, a rank-one multiplicative twist per task.

Wang, Panda, Karlinsky, Feris, Sun & Kim, "Multitask Prompt Tuning Enables
Parameter-Efficient Transfer Learning", ICLR 2023, arXiv:2303.02861.

Prompt tuning (:mod:`.prompt_tuning`) gives every task its own l x d prompt, learned from
scratch. MPT instead assumes the task prompts have much in common and factors each one
into a part all tasks share and a tiny part of their own (Sec. 3.1, "prompt
decomposition"): a shared prompt P* (l x d) is modulated element-wise by a rank-one
matrix built from two task vectors u_k (length l) and v_k (length d),

    W_k = u_k v_k^T,        P_k = P* ∘ W_k                (∘: Hadamard product; Eq. 2)

so a task costs l + d numbers instead of l d (tested), and the ratio P_k / P* has rank one
(tested). Because the update multiplies rather than adds, each entry of P* is rescaled by
a row factor (the prompt position) times a column factor (the feature), which keeps what
the tasks share in P*. The task prompt is then used exactly as in prompt tuning: placed
in front of the embedded input of the frozen transformer, [P_k; X_e], and trained on the
task's negative log-likelihood with the transformer frozen (Eq. 1).

The paper learns P* and the (u_k, v_k) of all source tasks jointly (multitask training),
then adapts P* and a new (u, v) to each target task; here the tasks of the problem play
the source tasks, so P* is the shared parameter and (u_k, v_k, head_k) are task-specific.
``rank`` > 1 generalises W_k to U_k V_k^T (``num_ranks`` of the Hugging Face PEFT port, which
comes from the authors' lab; no official repository was found; the paper uses rank one). u and
v start at 1 plus small noise (our choice; PEFT starts both near zero, so its task prompts
start near zero; the paper initialises its prompts from embeddings of tokens drawn from T5's
vocabulary (App. A), gives no initialisation for u_k, v_k on the source tasks, and starts a
target task's vectors at the mean of the source tasks' ones), so every task starts from P*
itself; with u_k = v_k = 1 all tasks use P* and the model is prompt tuning with one prompt
shared by every task (tested).

Left out: the pretrained T5 (here the random frozen transformer of
:func:`.prefix_tuning.frozen_backbone`), the knowledge distillation from separately
trained single-task teacher prompts used to learn P* (the logit KL term, Eq. 3, and the
hidden-state MSE term, Eq. 4, added with weight lambda = 0.9 to the summed task losses in
Eq. 5), the two-stage source/target schedule (``training_procedure`` names both; the training
harness trains P* and the task vectors jointly on the task losses alone, i.e. Eq. 5 with
lambda = 0), and dropout.

Equation numbers are those of arXiv:2303.02861v1 (6 Mar 2023, headed as the ICLR 2023
conference paper), a copy kept as 2303.02861.pdf of krondor/missouridatasciencesymposium2023
(snapshot commit 6639920).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_positive
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import frozen_backbone
from .prompt_tuning import run_with_prompt
from .registry import Problem


class MPT(MultiTaskModel):
    """A frozen token transformer; a shared prompt P*, and per task u_k, v_k and a head."""

    name = "mpt"
    equations_checked_in = "2303.02861.pdf of krondor/missouridatasciencesymposium2023"
    training_procedure = ("the shared prompt is distilled from separately trained single-task teacher "
                          "prompts, then adapted to each target task (neither stage implemented here)")

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        prompt_length: int = 4,
        rank: int = 1,
        init_std: float = 0.5,
    ):
        super().__init__(tasks)
        require_positive(prompt_length=prompt_length, rank=rank)
        width = tokenizer.positions.shape[1]
        self.tokenizer, self.layers = tokenizer, layers
        self.shared_prompt = nn.Parameter(torch.randn(prompt_length, width) * init_std)  # P*
        self.u = nn.ParameterDict({t: nn.Parameter(self._near_one(prompt_length, rank)) for t in self.tasks})
        self.v = nn.ParameterDict({t: nn.Parameter(self._near_one(width, rank)) for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @staticmethod
    def _near_one(rows: int, rank: int) -> Tensor:
        """Entries near rank^(-1/2), so that U V^T starts near the all-ones matrix."""
        return rank**-0.5 * (1 + 0.02 * torch.randn(rows, rank))

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: float) -> "MPT":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def task_prompt(self, task: str) -> Tensor:
        """P_k = P* ∘ (u_k v_k^T)."""
        return self.shared_prompt * (self.u[task] @ self.v[task].T)

    def features(self, x: Tensor, task: str) -> Tensor:
        """The frozen transformer on [P_k; X_e]; returns the N input positions only."""
        return run_with_prompt(self.tokenizer, self.layers, x, self.task_prompt(task))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.u[task]
        yield self.v[task]
        yield from self.heads[task].parameters()
