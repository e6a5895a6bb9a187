"""SurgeryV2: surgery after every layer feeds the next layer; summed per-layer L1 on token means."""

import inspect

import pytest
import torch
from torch import nn

from reference_impls.merging.base import task_vector
from reference_impls.merging.surgeryv2 import SurgeryV2
from reference_impls.merging.task_arithmetic import TaskArithmetic

TOKENS, D_IN, D, E = 5, 4, 6, 3  # a (B, 5, 4) input, two token layers of width 6, a pooled output of 3


class Pool(nn.Module):
    """The last 'layer': first token, projected (as ViT's class token through its projection)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, E)

    def forward(self, h):
        return self.proj(h[:, 0])


def network():
    return nn.ModuleList([nn.Sequential(nn.Linear(D_IN, D), nn.Tanh()), nn.Sequential(nn.Linear(D, D), nn.Tanh()),
                          Pool()])


def encoders(seed=0, k=2):
    """A pre-trained network, k perturbed fine-tuned copies and their task-arithmetic merge, all frozen."""
    torch.manual_seed(seed)
    pre = network()
    state = {n: v.detach().clone() for n, v in pre.state_dict().items()}
    tuned = []
    for _ in range(k):
        model = network()
        model.load_state_dict({n: v + 0.7 * torch.randn_like(v) for n, v in state.items()})
        tuned.append(model.requires_grad_(False))
    merged = network()
    merged.load_state_dict(TaskArithmetic(scale=0.5)({n: v.clone() for n, v in state.items()},
                                                     [task_vector(m.state_dict(), state) for m in tuned]))
    return merged.requires_grad_(False), tuned


def run(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def test_starts_as_the_merged_model_and_each_correction_feeds_the_next_layer():
    merged, _ = encoders()
    surgery = SurgeryV2(num_tasks=2, layer_dims=[D, D, E], rank=2)
    x = torch.randn(3, TOKENS, D_IN)
    torch.testing.assert_close(surgery(merged, x, 0), run(merged, x))  # Up starts at zero
    with torch.no_grad():
        surgery.layers[0].up[1].weight.normal_()
    first = surgery.layers[0]
    h1 = merged[0](x)
    corrected = h1 - torch.relu(h1 @ first.down[1].weight.T) @ first.up[1].weight.T
    expected = merged[2](merged[1](corrected))  # later layers read the corrected tokens
    torch.testing.assert_close(surgery(merged, x, 1), expected)
    torch.testing.assert_close(surgery(merged, x, 0), run(merged, x))  # task 0's modules are its own


def test_objective_sums_the_l1_gaps_of_every_layers_token_means():
    merged, tuned = encoders()
    surgery = SurgeryV2(num_tasks=2, layer_dims=[D, D, E], rank=2)
    with torch.no_grad():
        for layer in surgery.layers:
            layer.up[0].weight.normal_()
    x = torch.randn(4, TOKENS, D_IN)
    outputs = surgery.features(merged, x, 0)
    h, expected = x, 0.0
    for layer, out in zip(tuned[0], outputs):
        h = layer(h)
        mine, target = (out.mean(1), h.mean(1)) if h.ndim == 3 else (out, h)
        expected = expected + nn.L1Loss()(mine, target)
    torch.testing.assert_close(surgery.objective(merged, tuned[0], x, 0), expected)
    # the token means are compared, not the tokens: the mean of |differences| is larger here
    unpooled = sum((o - t).abs().mean() for o, t in zip(outputs[:2], [tuned[0][0](x), tuned[0][1](tuned[0][0](x))]))
    assert not torch.isclose(unpooled + (outputs[2] - h).abs().mean(), expected)


def test_every_layers_modules_get_a_gradient_through_the_frozen_later_layers():
    merged, tuned = encoders()
    surgery = SurgeryV2(num_tasks=2, layer_dims=[D, D, E], rank=2)
    x = torch.randn(4, TOKENS, D_IN)
    tuned[1].requires_grad_(True)  # its features are targets: constants even when it is trainable
    surgery.objective(merged, tuned[1], x, 1).backward()
    assert all(layer.up[1].weight.grad.abs().sum() > 0 for layer in surgery.layers)
    assert all(layer.up[0].weight.grad is None for layer in surgery.layers)
    assert all(p.grad is None for p in merged.parameters()) and all(p.grad is None for p in tuned[1].parameters())


def test_fit_closes_the_gap_at_every_layer_and_leaves_the_merged_model_alone():
    merged, tuned = encoders()
    before = {n: v.clone() for n, v in merged.state_dict().items()}
    surgery = SurgeryV2(num_tasks=2, layer_dims=[D, D, E], rank=D)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(32, TOKENS, D_IN, generator=g) for _ in tuned]
    start = [surgery.objective(merged, m, x, t).item() for t, (m, x) in enumerate(zip(tuned, inputs))]
    history = surgery.fit(merged, tuned, inputs, steps=60, lr=2e-2)
    assert history[-1] < 0.5 * history[0]
    assert all(torch.equal(v, before[n]) for n, v in merged.state_dict().items())
    for t, (model, x) in enumerate(zip(tuned, inputs)):
        assert surgery.objective(merged, model, x, t).item() < 0.5 * start[t]


def test_a_layer_count_that_does_not_match_is_refused():
    merged, _ = encoders()
    with pytest.raises(ValueError, match="expected 2 layers, got 3"):
        SurgeryV2(num_tasks=1, layer_dims=[D, D]).features(merged, torch.randn(1, TOKENS, D_IN), 0)
    with pytest.raises(ValueError, match="layer_dims must name at least one layer"):
        SurgeryV2(num_tasks=1, layer_dims=[])
    with pytest.raises(ValueError, match="rank must be at least 1, got 0"):
        SurgeryV2(num_tasks=1, layer_dims=[D], rank=0)


def test_defaults_are_the_codes_vit_b_settings():
    """Rank 16 at every layer, 500 Adam iterations at lr 1e-3."""
    surgery = SurgeryV2(num_tasks=2, layer_dims=[D, E])
    assert [s.down[1].weight.shape for s in surgery.layers] == [(16, D), (16, E)]
    defaults = inspect.signature(SurgeryV2.fit).parameters
    assert (defaults["steps"].default, defaults["lr"].default) == (500, 1e-3)
