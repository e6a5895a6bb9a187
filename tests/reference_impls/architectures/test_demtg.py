"""DeMTG: the gate by hand, FFN at init, closed gate = DeMT, one gating layer shared by all tasks."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.demt import DeMT
from reference_impls.architectures.demtg import DeMTG, GatingLayer

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, dense=True):
    torch.manual_seed(0)
    return DeMTG(TASKS, 3, OUT, channels=8, dense=dense).to(device)


def randomise_gate(layer):
    with torch.no_grad():
        layer.gate_proj.weight.normal_()
        layer.gate_proj.bias.normal_()


def test_gating_layer_matches_a_hand_computation(device):
    torch.manual_seed(0)
    layer = GatingLayer(4, hidden=6).to(device)
    randomise_gate(layer)
    x = torch.randn(2, 5, 4, device=device)
    u = F.gelu(F.linear(F.layer_norm(x, (4,), layer.norm.weight, layer.norm.bias), layer.fc1.weight, layer.fc1.bias))
    r, g = u[..., :3], u[..., 3:]
    gate = F.layer_norm(g, (3,), layer.gate_norm.weight, layer.gate_norm.bias) @ layer.gate_proj.weight.T + layer.gate_proj.bias
    expected = x + (r * gate) @ layer.fc2.weight.T + layer.fc2.bias
    torch.testing.assert_close(layer(x), expected)


def test_gate_starts_open_so_the_layer_is_a_plain_ffn(device):
    torch.manual_seed(0)
    layer = GatingLayer(4).to(device)
    x = torch.randn(3, 7, 4, device=device)
    r, gate = layer.gate(x)
    torch.testing.assert_close(gate, torch.ones_like(gate))
    torch.testing.assert_close(layer(x), x + layer.fc2(r))
    with torch.no_grad():
        layer.gate_proj.bias.zero_()  # gate closed: only W_2's bias is left of the branch
    torch.testing.assert_close(layer(x), x + layer.fc2.bias)


def test_gate_is_computed_per_token(device):
    torch.manual_seed(0)
    layer = GatingLayer(4).to(device)
    randomise_gate(layer)
    x = torch.randn(2, 6, 4, device=device)
    perm = torch.randperm(6)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm])  # no mixing between tokens


@pytest.mark.parametrize("dense", (True, False))
def test_closed_gate_reduces_to_demt(device, dense):
    """For dense maps and for vector outputs (DeMT's read-out) alike."""
    model = make(device, dense)
    with torch.no_grad():
        model.gating.gate_proj.bias.zero_()
        model.gating.fc2.bias.zero_()
    demt = DeMT(TASKS, 3, OUT, channels=8, dense=dense).to(device)
    missing, unexpected = demt.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gating.") for k in unexpected)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        for t, out in model(x).items():
            torch.testing.assert_close(out, demt(x)[t])
        model.gating.gate_proj.bias.fill_(1.0)
        assert not torch.allclose(model(x)["seg"], demt(x)["seg"])  # open gate: the layer acts


def test_one_gating_layer_serves_every_task(device, params_with_grad):
    model = make(device)
    randomise_gate(model.gating)
    x = torch.randn(2, 3, 8, 8, device=device)
    gating = {f"gating.{n}" for n, _ in model.gating.named_parameters()}
    for t in TASKS:
        names = params_with_grad(model, model(x)[t].square().mean())
        assert gating <= names, t  # every task's loss trains the shared gate
        other = next(o for o in TASKS if o != t)
        assert not any(n.startswith((f"task_query.{other}.", f"heads.{other}.")) for n in names)
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.gating.parameters())
    extra = sum(p.numel() for p in model.gating.parameters())
    c, f = 8, 16  # LN(c), fc1 c->f, LN(f/2), gate f/2->f/2, fc2 f/2->c
    assert extra == 2 * c + (c * f + f) + 2 * (f // 2) + ((f // 2) ** 2 + f // 2) + (f // 2 * c + c)


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("demtg", device)
    for dense in (True, False):
        first, last = short_training("demtg", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("demtg", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_decoding_by_hand_the_gate_refines_each_tasks_query_output(device):
    """head_t(gating(task_query_t(tokens_t, interaction(all tokens)))): the gate comes after the query."""
    model = make(device)
    randomise_gate(model.gating)
    with torch.no_grad():
        deformed = model.deformed_features(torch.randn(2, 3, 8, 8, device=device))
        out = model.decode_tasks(deformed, (8, 8))
        tokens = {t: f.flatten(2).transpose(1, 2) for t, f in deformed.items()}
        joint = torch.cat([tokens[t] for t in TASKS], dim=1)
        interacted = model.interaction(joint, joint)
        for t in TASKS:
            refined = model.gating(model.task_query[t](tokens[t], interacted)).transpose(1, 2).reshape(2, 8, 4, 4)
            expected = F.interpolate(model.heads[t](refined), size=(8, 8), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out[t], expected)


def test_gating_hidden_width_must_be_even_and_two_is_enough():
    """The hidden width splits in two halves, value and gate: 2 is the smallest that works, odd widths
    and 0 are refused."""
    layer = GatingLayer(4, hidden=2)
    assert layer(torch.randn(3, 4)).shape == (3, 4)
    for hidden in (3, 0):
        with pytest.raises(ValueError, match="even"):
            GatingLayer(4, hidden=hidden)


def test_defaults_and_options_reach_the_model():
    """Dense maps unless asked otherwise; a 2 x 2 image is big enough for an encoder that halves it
    once; options given to the registry reach the model."""
    torch.manual_seed(0)
    out = DeMTG(TASKS, 3, OUT)(torch.randn(1, 3, 8, 8))
    assert out["seg"].shape == (1, 3, 8, 8)
    tiny = registry.build("demtg", registry.Problem(TASKS, (3, 2, 2), OUT, dense=True), width=8)
    assert tiny(torch.randn(1, 3, 2, 2))["depth"].shape == (1, 1, 2, 2)
    built = registry.build("demtg", registry.Problem(TASKS, (3, 8, 8), OUT, dense=True), width=8, num_heads=2)
    assert built.interaction.num_heads == 2
