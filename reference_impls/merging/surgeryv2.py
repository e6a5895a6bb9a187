"""SurgeryV2: representation surgery after every layer of the merged model, not only the last.

Yang, Shen, Wang, Guo, Wang, Cao, Zhang, Tao, "SurgeryV2: Bridging the Gap Between Model
Merging and Multi-Task Learning with Deep Representation Surgery", arXiv 2024,
arXiv:2410.14389. The rule below follows the authors' code (github.com/EnnengYang/SurgeryV2,
``src/merging_model.py``: ``ModelWrapper_Surgery_V2``, ``AlphaWrapper_Surgery_V2``,
``l1losses``; ``src/main_tv_surgery_v2.py``: the training loop); the paper's text and its
equation numbers were not read here.

The first Surgery (:mod:`.representation_surgery`) corrects only the merged encoder's final
feature. By then the drift from each individual model has built up through every layer.
SurgeryV2 inserts the same kind of per-task module after *each* layer l of the frozen merged
model, so the corrected feature is what the next layer reads:

    h_0 = x
    h_l = S_{t,l}(f_l(h_{l-1}; θ_merged))      S_{t,l}(z) = z − Up_{t,l}(ReLU(Down_{t,l}(z)))

and trains all of a task's modules at once, on unlabelled inputs of that task, to make every
layer's corrected output match the task's individual fine-tuned model at the same depth:

    min  Σ_l  mean | pool(h_l) − pool(f_l(g_{l-1}; θ_t)) |        g_l: the individual model's own layers

where ``pool`` averages over tokens when the layer outputs a (B, N, D) token sequence (the
code compares the token means of each transformer block) and is the identity for a (B, D)
feature (the final pooled, projected image embedding, the code's last of 12 + 1 modules).
The loss is the code's sum over layers of PyTorch's mean-reduced L1 loss; the individual
model's features are constants (detached). As in Surgery, Down starts from PyTorch's default
initialisation and Up at zero, so training starts from the merged model unchanged; only the
surgery modules are trained (Adam, lr 1e-3, 500 iterations and rank 16 for ViT-B in the code;
defaults here). Each layer's modules are a :class:`RepresentationSurgery` of that layer's width.

Left out: the CLIP ViT encoders, the eight vision datasets and their frozen classification
heads; where a real model's layers are cut (here the caller passes the layers as a list, and
the code's last "layer" is ViT's final norm + class-token pooling + projection); the code's
schedule of two batches of 16 per task per iteration (``fit`` takes one batch per task, one
Adam step each, as :meth:`RepresentationSurgery.fit` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from reference_impls.merging.representation_surgery import RepresentationSurgery, fit_per_task

Layer = Callable[[Tensor], Tensor]


def pooled(h: Tensor) -> Tensor:
    """The feature a layer is compared on: the token mean of (B, N, D), a (B, D) feature as is."""
    return h.mean(dim=1) if h.ndim == 3 else h


class SurgeryV2(nn.Module):
    """One :class:`RepresentationSurgery` per layer, each holding a Down/Up pair per task."""

    name = "surgeryv2"

    def __init__(self, num_tasks: int, layer_dims: Sequence[int], rank: int = 16) -> None:
        super().__init__()
        if not layer_dims:
            raise ValueError("layer_dims must name at least one layer")
        self.layers = nn.ModuleList(RepresentationSurgery(num_tasks, d, rank) for d in layer_dims)

    def features(self, merged: Sequence[Layer], x: Tensor, task: int) -> list[Tensor]:
        """Every layer's corrected output; each correction feeds the next merged layer."""
        if len(merged) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layers, got {len(merged)}")
        h, outputs = x, []
        for layer, surgery in zip(merged, self.layers):
            h = surgery(layer(h), task)
            outputs.append(h)
        return outputs

    def forward(self, merged: Sequence[Layer], x: Tensor, task: int) -> Tensor:
        """The merged model's final feature for ``task`` after surgery at every layer."""
        return self.features(merged, x, task)[-1]

    @staticmethod
    def targets(individual: Sequence[Layer], x: Tensor) -> list[Tensor]:
        """The individual model's pooled feature after each of its layers (constants)."""
        h, outputs = x, []
        with torch.no_grad():
            for layer in individual:
                h = layer(h)
                outputs.append(pooled(h))
        return outputs

    def objective(self, merged: Sequence[Layer], individual: Sequence[Layer], x: Tensor, task: int) -> Tensor:
        """Σ over layers of the mean |pooled corrected merged feature − pooled individual feature|."""
        targets = self.targets(individual, x)
        return sum((pooled(h) - target).abs().mean()
                   for h, target in zip(self.features(merged, x, task), targets, strict=True))

    def fit(self, merged: Sequence[Layer], individuals: Sequence[Sequence[Layer]], inputs: Sequence[Tensor],
            steps: int = 500, lr: float = 1e-3) -> list[float]:
        """Adam on the surgery modules only, one step per task per iteration; returns summed losses.

        The merged layers are never updated, but the loss of a deep layer reaches the modules
        of earlier ones *through* them: freeze their parameters (``requires_grad_(False)``)
        to skip computing gradients for them.
        """
        return fit_per_task(self, merged, individuals, inputs, steps, lr)
