"""PAD-Net: final outputs depend on every task's intermediate features; deep supervision."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.padnet import AttentionDistillation, PADNet

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}
AUX = {"normals": 3, "edges": 1}


def make(**kw):
    torch.manual_seed(0)
    return PADNet(TASKS, 3, OUT, channels=6, auxiliary_out_dims=AUX, **kw)


def grad_norm(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("target", TASKS)
def test_final_prediction_depends_on_every_tasks_intermediate_features(device, target):
    model = make().to(device)
    final, _ = model.forward_with_intermediate(torch.randn(2, 3, 6, 6, device=device))
    final[target].square().sum().backward()
    for t in (*TASKS, *AUX):
        assert grad_norm(model.intermediate_features[t]) > 0, t
    other = next(t for t in TASKS if t != target)
    assert grad_norm(model.decoders[other]) == 0 and grad_norm(model.distillation[other]) == 0


def test_without_messages_only_own_features_matter(device):
    model = make().to(device)
    with torch.no_grad():
        for d in model.distillation.values():
            for m in d.messages.values():
                m.weight.zero_()
                m.bias.zero_()
    final, _ = model.forward_with_intermediate(torch.randn(2, 3, 6, 6, device=device))
    final["seg"].square().sum().backward()
    assert grad_norm(model.intermediate_features["seg"]) > 0
    for t in ("depth", *AUX):
        assert grad_norm(model.intermediate_features[t]) == 0


def test_intermediate_predictions_returned_for_deep_supervision(device):
    model = make().to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    final, intermediate = model.forward_with_intermediate(x)
    assert set(intermediate) == {*TASKS, *AUX}
    for t, d in {**OUT, **AUX}.items():
        assert intermediate[t].shape == (2, d, 6, 6)
    assert {t: o.shape for t, o in final.items()} == {t: o.shape for t, o in model(x).items()}
    # An intermediate loss trains that task's predictor and the shared encoder,
    # not the distillation or decoders.
    intermediate["normals"].square().sum().backward()
    assert grad_norm(model.intermediate_predictors["normals"]) > 0
    assert grad_norm(model.encoder) > 0
    assert all(grad_norm(model.decoders[t]) == 0 for t in TASKS)


def test_attention_map_in_unit_interval_and_gates_messages(device):
    torch.manual_seed(0)
    d = AttentionDistillation("a", ("a", "b", "c"), 4).to(device)
    feats = {t: torch.randn(2, 4, 5, 5, device=device) for t in "abc"}
    g = d.attention_map(feats["a"])
    assert torch.all((g > 0) & (g < 1))
    expected = feats["a"] + g * (d.messages["b"](feats["b"]) + d.messages["c"](feats["c"]))
    torch.testing.assert_close(d(feats), expected)
    plain = AttentionDistillation("a", ("a", "b"), 4, attention=False).to(device)
    torch.testing.assert_close(plain(feats), feats["a"] + plain.messages["b"](feats["b"]))


def test_parameter_count():
    c, conv3 = 6, lambda i, o: i * o * 9 + o
    model = make()
    inter = list({**OUT, **AUX}.items())
    shared = conv3(3, c) + conv3(c, c) + len(inter) * conv3(c, c)
    shared += sum(c * d + d for t, d in AUX.items())  # auxiliary predictors
    per_task = {t: (len(inter) - 1 + 1) * conv3(c, c)  # messages from 3 others + gate
                + conv3(c, c) + (c * o + o)  # decoder: 3x3 hidden + 1x1 out
                + (c * o + o)  # intermediate predictor
                for t, o in OUT.items()}
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    assert sum(p.numel() for p in model.parameters()) == shared + sum(per_task.values())


def test_auxiliary_names_must_not_clash():
    with pytest.raises(ValueError):
        PADNet(TASKS, 3, OUT, auxiliary_out_dims={"seg": 2})


@pytest.mark.parametrize("dense", (True,))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("padnet", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("padnet", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_gate_is_sigmoid_of_target_features(device):
    """G_k = sigmoid(W_g^k * F_k): a gate conv with zero weights and bias b gives G_k = sigmoid(b) everywhere."""
    torch.manual_seed(0)
    d = AttentionDistillation("a", ("a", "b"), 3).to(device)
    bias = torch.tensor([-2.0, 0.0, 1.5], device=device)
    with torch.no_grad():
        d.gate.weight.zero_()
        d.gate.bias.copy_(bias)
    feats = {t: torch.randn(2, 3, 4, 4, device=device) for t in "ab"}
    expected = feats["a"] + torch.sigmoid(bias)[None, :, None, None] * d.messages["b"](feats["b"])
    torch.testing.assert_close(d(feats), expected)


def test_intermediate_prediction_reads_its_own_task_features(device):
    """Each intermediate prediction is a 1x1 layer on that task's own features F_l = block_l(encoder(x))."""
    model = make().to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    _, intermediate = model.forward_with_intermediate(x)
    shared = model.encoder(x)
    for t in (*TASKS, *AUX):
        expected = model.intermediate_predictors[t](model.intermediate_features[t](shared))
        torch.testing.assert_close(intermediate[t], expected)


def test_the_final_prediction_decodes_the_distilled_features_alone():
    """final_t = decoder_t(distillation_t({intermediate features})), with no skip from the encoder."""
    from reference_impls.architectures.registry import Problem, build

    torch.manual_seed(0)
    model = build("padnet", Problem(("a", "b"), (3, 16, 16), {"a": 1, "b": 2}, dense=True))
    x = torch.randn(2, 3, 16, 16)
    shared = model.encoder(x)
    features = {t: block(shared) for t, block in model.intermediate_features.items()}
    final = model(x)
    for t in model.tasks:
        torch.testing.assert_close(final[t], model.decoders[t](model.distillation[t](features)))


def test_attention_false_gives_plain_message_passing_also_through_the_registry(device):
    """``attention=False`` drops the gate G_k: F_k^o = F_k + sum_{l != k} W_{l->k} * F_l, whether the model is
    built directly or by the registry (which must pass the option and the width on)."""
    problem = registry.Problem(TASKS, (3, 6, 6), OUT, dense=True)
    torch.manual_seed(0)
    for model in (make(attention=False), registry.build("padnet", problem, width=5, attention=False)):
        model = model.to(device)
        assert all(d.gate is None for d in model.distillation.values())
        x = torch.randn(2, 3, 6, 6, device=device)
        shared = model.encoder(x)
        features = {t: block(shared) for t, block in model.intermediate_features.items()}
        for t in TASKS:
            messages = sum(model.distillation[t].messages[s](features[s]) for s in features if s != t)
            torch.testing.assert_close(model(x)[t], model.decoders[t](features[t] + messages))
    assert model.encoder(x).shape[1] == 5


def test_an_image_problem_that_is_not_dense_is_refused():
    """PAD-Net predicts maps: a per-image (pooled) problem has no maps to predict."""
    with pytest.raises(ValueError, match="dense"):
        registry.build("padnet", registry.Problem(TASKS, (3, 6, 6), OUT, dense=False))
