"""Prompt tuning: a frozen transformer with a few learned input tokens per task.

Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning",
EMNLP 2021, arXiv:2104.08691.

The whole pretrained model stays fixed. A task is taught only through a soft prompt:
P learned vectors P_e (P x d) that are concatenated in front of the embedded input X_e
(N x d) before the first layer, [P_e; X_e] (Sec. 2). Unlike prefix-tuning
(:mod:`.prefix_tuning`) nothing is added inside the network: deeper layers see the prompt
only through the activations the frozen layers compute from it. Per task that is P d
parameters plus the head (tested), and one batch can mix tasks because the model is
shared verbatim.

Equivalently, at the first layer the prompt acts like a prefix whose keys and values are
the frozen projections of the prompt tokens, W_k P_e and W_v P_e (tested); from the second
layer on it does not, since the prompt positions are then transformed by the frozen
layers themselves instead of being free parameters.

Inputs become tokens with :class:`.houlsby_adapters.Tokenizer` (which adds position
embeddings to the input tokens; the prompt carries none). Heads read only the N input
positions (the mean token, or p x p pixels per patch token for dense image tasks), so the
prompt positions are dropped at the output. The prompt is initialised from randomly drawn
input-token-scale vectors (std 0.5); the paper's best choice was to initialise it from
embeddings of real words or class labels.

Left out: the pretrained T5 (here a random frozen transformer from
:func:`.prefix_tuning.frozen_backbone`), the LM-adaptation of T5, vocabulary-based
initialisation, prompt ensembling, and dropout (the official code applies input dropout after
prepending the prompt). Its default prompt length is 100 (4 here, for the small stand-in).
The paper's formulas are not numbered: checked in a PDF-to-Markdown conversion of the paper
(ACL two-column layout, no version stamp) in the GitHub file index (index id 51785957536),
whose Sec. 2 defines [P_e; X_e] and Sec. 2.1 the initialisations and the P·E parameter cost
in running text.

Checked against the authors' code, google-research/prompt-tuning (under prompt_tuning/: prompts.py,
train/prompts.py, train/layers.py, masks.py, configs/models/t5_1_1_prompt.gin): the prompt is
also prepended to the embedded input before the first encoder layer and is the only trained
parameter. Differences: there the T5 decoder cross-attends to the encoder outputs at the
prompt positions as well (the mask marks them active), while our heads drop those positions;
their random initialiser is flax's uniform one with scale 0.5 (values in [0, 0.5)), ours is
Gaussian with std 0.5.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..checks import require_non_negative
from .base import MultiTaskModel
from .houlsby_adapters import Tokenizer, token_heads
from .prefix_tuning import frozen_backbone
from .registry import Problem


def run_with_prompt(tokenizer: Tokenizer, layers: nn.ModuleList, x: Tensor, prompt: Tensor) -> Tensor:
    """The transformer on [prompt; tokens(x)], returning the N input positions only.

    ``prompt`` (P x width) is shared by the batch; the prompt positions are dropped after
    the last layer, so the heads see exactly as many tokens as without a prompt.
    """
    tokens = tokenizer(x)
    h = torch.cat([prompt.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    for layer in layers:
        h = layer(h)
    return h[:, prompt.shape[0]:]


class PromptTuning(MultiTaskModel):
    """A frozen token transformer; each task owns P prompt vectors and a head."""

    name = "prompt_tuning"
    equations_checked_in = "a PDF-to-Markdown conversion of the paper"

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer: Tokenizer,
        layers: nn.ModuleList,
        heads: Mapping[str, nn.Module],
        prompt_length: int = 4,
        init_std: float = 0.5,
    ):
        super().__init__(tasks)
        require_non_negative(prompt_length=prompt_length)
        width = tokenizer.positions.shape[1]
        self.tokenizer, self.layers = tokenizer, layers
        self.prompts = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(prompt_length, width) * init_std) for t in self.tasks}
        )  # P_e
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 32, depth: int = 2, num_heads: int = 4,
                     num_tokens: int = 10, **kw: float) -> "PromptTuning":
        tokenizer, layers = frozen_backbone(problem.input_shape, width, depth, num_heads, num_tokens)
        return cls(problem.tasks, tokenizer, layers, token_heads(problem, width, tokenizer), **kw)

    def features(self, x: Tensor, task: str) -> Tensor:
        """The frozen transformer on [P_e; X_e]; returns the N input positions only."""
        return run_with_prompt(self.tokenizer, self.layers, x, self.prompts[task])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.heads[t](self.features(x, t)) for t in self.tasks}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield self.prompts[task]
        yield from self.heads[task].parameters()
