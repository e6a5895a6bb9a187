"""TaskExpert: per-pixel gate distributions, gated assembly, additive memory, task-specific gates."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.taskexpert import MemorialMoE, TaskExpert

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, dense=True):
    torch.manual_seed(0)
    return TaskExpert(TASKS, 3, OUT, channels=8, num_experts=3, dense=dense).to(device)


def test_gates_are_per_pixel_distributions_that_depend_on_the_input(device):
    torch.manual_seed(0)
    mmoe = MemorialMoE(TASKS, 6, num_experts=3).to(device)
    x = torch.randn(2, 6, 5, 5, device=device)
    g = mmoe.gate("seg", x)
    assert g.shape == (2, 4, 5, 5) and (g >= 0).all()
    torch.testing.assert_close(g.sum(1), torch.ones(2, 5, 5, device=device))
    assert not torch.allclose(g[0], g[1])  # different samples, different mixtures
    assert not torch.allclose(g[0, :, 0, 0], g[0, :, 4, 4])  # and different pixels
    assert not torch.allclose(g, mmoe.gate("depth", x))  # each task has its own gate


def test_task_feature_is_the_gated_sum_and_memory_adds_it(device):
    torch.manual_seed(0)
    mmoe = MemorialMoE(TASKS, 6, num_experts=3).to(device)
    x = torch.randn(2, 6, 4, 4, device=device)
    memory = {t: torch.randn(2, 6, 4, 4, device=device) for t in TASKS}
    features, updated = mmoe(x, memory)
    for t in TASKS:
        g = mmoe.gate(t, x)
        by_hand = sum(g[:, i:i + 1] * torch.relu(mmoe.experts[i](x)) for i in range(3)) + g[:, 3:4] * memory[t]
        torch.testing.assert_close(features[t], by_hand)
        torch.testing.assert_close(updated[t], memory[t] + features[t])


def test_memory_accumulates_the_features_of_both_layers(device):
    model = make(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    layers = model.layer_features(x)
    zero = {t: torch.zeros_like(layers[0]) for t in TASKS}
    f1, m1 = model.mmoe[0](layers[0], zero)
    f2, m2 = model.mmoe[1](layers[1], m1)
    history = model.memories(x)
    for t in TASKS:
        torch.testing.assert_close(history[0][t], f1[t])  # memory starts at zero
        torch.testing.assert_close(history[1][t], f1[t] + f2[t])


def test_gates_and_heads_are_task_specific_experts_shared(device, params_with_grad):
    model = make(device)
    out = model(torch.randn(2, 3, 8, 8, device=device))
    names = params_with_grad(model, out["depth"].square().mean())
    assert any(n.startswith("mmoe.0.experts.") for n in names)
    assert {"mmoe.0.gates.depth.weight", "mmoe.1.gates.depth.weight", "heads.depth.weight"} <= names
    assert not any(".seg." in n for n in names)
    c, n = 8, 3
    per_task = {t: 2 * (c * (n + 1) + n + 1) + c * o + o for t, o in OUT.items()}
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    shared = (9 * 3 * c + c) + 2 * (9 * c * c + c) + 2 * n * (c * c + c)
    assert sum(p.numel() for p in model.shared_parameters()) == shared


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("taskexpert", device)
    for dense in (True, False):
        first, last = short_training("taskexpert", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("taskexpert", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_mmoe_layers_read_the_last_two_of_three_backbone_layers(device):
    model = make(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    second = model.backbone[1](model.backbone[0](x))
    layers = model.layer_features(x)
    assert len(layers) == 2
    torch.testing.assert_close(layers[0], second)
    torch.testing.assert_close(layers[1], model.backbone[2](second))


@pytest.mark.parametrize("dense", [True, False])
def test_heads_decode_the_memory_after_the_last_layer(device, dense):
    """Dense: the head's map upsampled bilinearly to the input; pooled: the head's map averaged."""
    model = make(device, dense)
    x = torch.randn(2, 3, 8, 8, device=device)
    out, final = model(x), model.memories(x)[-1]
    for t in TASKS:
        head = model.heads[t](final[t])  # (2, o, 4, 4)
        expected = (F.interpolate(head, size=(8, 8), mode="bilinear", align_corners=False) if dense
                    else head.sum(dim=(2, 3)) / 16)
        torch.testing.assert_close(out[t], expected)


def test_gate_is_a_softmax_of_a_1x1_convolution_by_hand(device):
    """g_t(x) at every pixel: softmax over the N + 1 outputs of the task's 1x1 gate convolution."""
    torch.manual_seed(0)
    mmoe = MemorialMoE(TASKS, 6, num_experts=3).double().to(device)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, device=device)
    for t in TASKS:
        conv = mmoe.gates[t]
        logits = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias.view(1, -1, 1, 1)
        e = (logits - logits.amax(1, keepdim=True)).exp()
        torch.testing.assert_close(mmoe.gate(t, x), e / e.sum(1, keepdim=True), rtol=0, atol=1e-12)


def test_the_smallest_image_is_two_pixels_a_side_and_keyword_arguments_reach_the_model():
    """The encoder halves the map once, so 2 x 2 images work; num_experts from the registry is honoured."""
    problem = registry.Problem(("a", "b"), (3, 2, 2), {"a": 2, "b": 1}, dense=True)
    model = registry.build("taskexpert", problem, width=4, num_experts=2)
    assert all(len(m.experts) == 2 for m in model.mmoe)
    assert model(torch.randn(1, 3, 2, 2))["a"].shape == (1, 2, 2, 2)
