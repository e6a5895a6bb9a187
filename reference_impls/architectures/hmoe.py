"""HMoE: MMoE per scenario, then each scenario re-weights every scenario's prediction.

Li, Li, Da, Zeng, Zhang, "Improving Multi-Scenario Learning to Rank in E-commerce by
Exploiting Task Relationships in the Label Space", CIKM 2020 (doi:10.1145/3340531.3412713;
no arXiv version). The paper's text could not be retrieved here, so equations are named,
not numbered; the rule below follows its abstract and the re-implementation in Alipay's
MMLRec benchmark (``model/hmoe.py``), not code by the authors.

Multi-scenario learning to rank: the same kind of label (click, purchase) is predicted in
several scenarios (e.g. the countries of AliExpress), one task per scenario, all in one
label space. HMoE ("hybrid of implicit and explicit mixture-of-experts") relates the
scenarios twice:

1. **Implicitly, in feature space**: an MMoE (shared experts, a softmax gate and a tower
   per scenario, :mod:`mmoe`) gives every scenario j its own prediction ŷ_j(x).
2. **Explicitly, in label space**: because all scenarios predict the same quantity, their
   predictions can be stacked. Scenario k's final output is a mixture of all of them,

       p_k(x) = Σ_j w_kj(x) ŷ_j(x),      w_k(x) = softmax(V_k x),

   a per-scenario, per-example weighting of the K predictions, which says how much
   scenario k trusts scenario j's opinion on this item.
3. **Task-constrained back-propagation**: the stacked model is trained end to end (not in
   two stages), but scenario k's loss may only change scenario k: in p_k, the other
   scenarios' predictions ŷ_j (j ≠ k) are constants (stop-gradient). Their values flow
   forward; their gradients do not flow back into the experts, gates and towers through j.

So a scenario's own tower and gates receive gradient only from its own loss; the experts
from every scenario's loss. That is why ``task_specific_parameters`` lists the MMoE gate,
the tower and the label-space gate of each scenario.

Stacking needs one label space: every scenario must have the same output width (a ValueError
otherwise, e.g. segmentation and depth). The scores mixed here are the raw tower outputs.

Left out: the sparse feature embeddings of the ranking data, the listwise/pointwise ranking
loss (any per-scenario loss can be used), and whether the paper mixes probabilities or logits
(unverified; raw outputs here). MMLRec's port mixes the towers' hidden features instead of
their predictions, and its mixing gate has a 64-unit ReLU hidden layer (a single linear map
here); the label-space mixing follows the paper's abstract.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from .mmoe import MMoE, mix_experts, softmax_gate
from .registry import Problem


def stack_in_label_space(weights: Tensor, predictions: Sequence[Tensor], own: int) -> Tensor:
    """Σ_j weights[:, j] ŷ_j, with gradient through scenario ``own``'s prediction only."""
    constrained = [p if j == own else p.detach() for j, p in enumerate(predictions)]
    return mix_experts(weights, constrained)


class HMoE(MMoE):
    """An :class:`MMoE` whose outputs are re-mixed per scenario by a softmax over scenarios."""

    name = "hmoe"

    def __init__(self, tasks: Sequence[str], make_expert, num_experts: int,  # noqa: ANN001
                 gate_in_features: int, towers: dict[str, nn.Module]):
        super().__init__(tasks, make_expert, num_experts, gate_in_features, towers)
        k = len(self.tasks)
        self.label_gates = nn.ModuleDict({t: softmax_gate(gate_in_features, k) for t in self.tasks})

    @classmethod
    def from_problem(cls, problem: Problem, width: int = 16, depth: int = 1, num_experts: int = 4) -> HMoE:
        widths = set(problem.task_out_dims.values())
        if len(widths) != 1:
            raise ValueError("HMoE stacks the scenarios' predictions in one label space; "
                             f"it needs equal output widths, got {problem.task_out_dims}")
        return super().from_problem(problem, width=width, depth=depth, num_experts=num_experts)

    def scenario_predictions(self, x: Tensor) -> dict[str, Tensor]:
        """ŷ_j(x): the implicit, feature-space part (plain MMoE)."""
        return super().forward(x)

    def label_space_weights(self, x: Tensor) -> dict[str, Tensor]:
        """w_k(x) = softmax(V_k x), each ``(B, K)``: how much scenario k trusts each scenario."""
        return {t: self.label_gates[t](x) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        predictions = list(self.scenario_predictions(x).values())
        weights = self.label_space_weights(x)
        return {t: stack_in_label_space(weights[t], predictions, own=i) for i, t in enumerate(self.tasks)}

    def task_specific_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """MMoE gate, tower and label-space gate: only ``task``'s loss reaches them."""
        yield from super().task_specific_parameters(task)
        yield from self.label_gates[task].parameters()
