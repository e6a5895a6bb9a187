"""TOM: invariant to permuting input variables with their VEs; outputs follow their VEs."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.tom import FiLMLinear, InverseFiLMLinear, TravelingObserverModel


def make(device, tasks=("a", "b"), out=None):
    torch.manual_seed(0)
    model = TravelingObserverModel(tasks, (5,), out or {"a": 3, "b": 2}, hidden=8, ve_dim=2).to(device)
    with torch.no_grad():  # open the residual blocks so every layer takes part in the checks
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.fill_(0.7)
    return model


def test_film_layers_by_hand(device):
    torch.manual_seed(0)
    film, inv = FiLMLinear(3, 4, 2).to(device), InverseFiLMLinear(4, 1, 2).to(device)
    v, z = torch.randn(2, 5, 3, device=device), torch.randn(5, 2, device=device)
    scale = z @ film.scale.weight.T + film.scale.bias
    shift = z @ film.shift.weight.T + film.shift.bias
    torch.testing.assert_close(film(v, z), scale * (v @ film.value.weight.T + film.value.bias) + shift)
    h = film(v, z)
    modulated = (z @ inv.scale.weight.T + inv.scale.bias) * h + (z @ inv.shift.weight.T + inv.shift.bias)
    torch.testing.assert_close(inv(h, z), modulated @ inv.value.weight.T + inv.value.bias)


def _lin(layer: torch.nn.Linear, v: torch.Tensor) -> torch.Tensor:
    return v @ layer.weight.T + layer.bias


def _film(f: FiLMLinear, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return _lin(f.scale, z) * _lin(f.value, v) + _lin(f.shift, z)


def _tom_by_hand(model, x):
    """FiLM encoder over (value, VE), sum over variables, core, FiLM decoder, inverse-FiLM output."""
    z_in = model.input_ves
    h = _film(model.encoder_in, x[..., None], z_in)
    for b in model.encoder:
        h = h + b.alpha * _film(b.layer, h.relu(), z_in)
    s = h.sum(dim=1)  # order-free: a sum over the input variables
    for b in model.core:
        s = s + b.alpha * _lin(b.layer, s.relu())
    out = {}
    for t, z in model.output_ves.items():
        g = s[:, None, :].expand(-1, z.shape[0], -1)
        for b in model.decoder:
            g = g + b.alpha * _film(b.layer, g.relu(), z)
        last = model.decoder_out  # modulate first, then the linear map
        out[t] = _lin(last.value, _lin(last.scale, z) * g + _lin(last.shift, z))[..., 0]
    return out


def test_whole_model_by_hand(device):
    model = make(device)
    x = torch.randn(3, 5, device=device)
    out, want = model(x), _tom_by_hand(model, x)
    for t in model.output_ves:
        torch.testing.assert_close(out[t], want[t])


def test_every_variable_embedding_learns_through_every_layer_it_enters(device):
    """VEs are learned: the gradient reaching the input and output VEs is the full one, through
    every FiLM layer they modulate (nothing detached)."""
    model = make(device)
    x = torch.randn(3, 5, device=device)
    ves = [model.input_ves, *model.output_ves.values()]
    got = torch.autograd.grad(sum(y.square().sum() for y in model(x).values()), ves)
    want = torch.autograd.grad(sum(y.square().sum() for y in _tom_by_hand(model, x).values()), ves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_residual_blocks_start_as_the_identity(device):
    """skipinit: at initialisation only the first encoder layer and the output layer act."""
    torch.manual_seed(0)
    model = TravelingObserverModel(("a",), (5,), {"a": 3}, hidden=8).to(device)
    x = torch.randn(3, 5, device=device)
    s = _film(model.encoder_in, x[..., None], model.input_ves).sum(dim=1)
    z = model.output_ves["a"]
    last = model.decoder_out
    y = _lin(last.value, _lin(last.scale, z) * s[:, None, :] + _lin(last.shift, z))[..., 0]
    torch.testing.assert_close(model(x)["a"], y)


def test_permuting_inputs_with_their_ves_changes_nothing(device):
    model = make(device)
    x = torch.randn(4, 5, device=device)
    before = model(x)
    perm = torch.tensor([3, 0, 4, 1, 2], device=device)
    with torch.no_grad():
        model.input_ves.copy_(model.input_ves[perm])
    after = model(x[:, perm])
    for t in before:
        torch.testing.assert_close(after[t], before[t])
    assert not torch.allclose(model(x)["a"], before["a"])  # moving values without their VEs does matter


def test_outputs_follow_their_ves(device):
    model = make(device)
    x = torch.randn(4, 5, device=device)
    before = model(x)["a"]
    perm = torch.tensor([2, 0, 1], device=device)
    with torch.no_grad():
        model.output_ves["a"].copy_(model.output_ves["a"][perm])
    torch.testing.assert_close(model(x)["a"], before[:, perm])
    with torch.no_grad():  # give b the VEs of a's first two outputs: b now predicts exactly those
        model.output_ves["b"].copy_(model.output_ves["a"][:2])
    out = model(x)
    torch.testing.assert_close(out["b"], out["a"][:, :2])


def test_only_output_ves_are_task_specific(device, params_with_grad):
    model = make(device)
    assert [p is model.output_ves["a"] for p in model.task_specific_parameters("a")] == [True]
    names = params_with_grad(model, model(torch.randn(4, 5, device=device))["a"].square().sum())
    assert "output_ves.a" in names and "output_ves.b" not in names
    assert {"input_ves", "encoder_in.value.weight", "core.0.layer.weight", "decoder_out.value.weight"} <= names


def test_images_are_read_pixel_by_pixel(device):
    torch.manual_seed(0)
    model = TravelingObserverModel(("seg", "depth"), (3, 4, 4), {"seg": 5, "depth": 1}, dense=True, hidden=8).to(device)
    assert model.input_ves.shape == (48, 2) and model.output_ves["seg"].shape == (80, 2)
    out = model(torch.randn(2, 3, 4, 4, device=device))
    assert out["seg"].shape == (2, 5, 4, 4) and out["depth"].shape == (2, 1, 4, 4)
    vec = registry.build("tom", registry.Problem(("a", "b"), (10,), {"a": 1, "b": 3}), width=8).to(device)
    out = vec(torch.randn(2, 10, device=device))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 3)


@pytest.mark.parametrize("dense", (True, False))
def test_short_training_lowers_loss(device, dense, short_training):
    first, last = short_training("tom", dense, device, steps=20)
    assert last < 0.7 * first


def test_variable_embeddings_start_as_standard_normal_by_default():
    """VEs start at N(0, ve_std^2) with ve_std = 1 (the official code's 0.001 is not the default here)."""
    torch.manual_seed(0)
    model = TravelingObserverModel(("a", "b"), (3, 16, 16), {"a": 2, "b": 1}, dense=True, hidden=4)
    for ves in (model.input_ves, model.output_ves["a"], model.output_ves["b"]):
        assert ves.shape[1] == 2 and ves.numel() >= 512
        assert abs(ves.mean().item()) < 0.1 and 0.9 < ves.std().item() < 1.1
    torch.manual_seed(0)
    narrow = TravelingObserverModel(("a",), (3, 16, 16), {"a": 1}, hidden=4, ve_std=0.01)
    assert 0.009 < narrow.input_ves.std().item() < 0.011


def test_layer_counts_include_the_first_encoder_and_last_decoder_layers():
    """encoder_layers counts the FiLM input layer, decoder_layers the inverse-FiLM output layer."""
    model = TravelingObserverModel(("a",), (5,), {"a": 1}, hidden=4, encoder_layers=3, core_layers=4,
                                   decoder_layers=2)
    assert (len(model.encoder), len(model.core), len(model.decoder)) == (2, 4, 1)


def test_options_pass_through_from_problem_and_decode_at_gives_one_value_per_ve():
    """Keywords of ``from_problem`` reach the model (here the VE space's size), and ``decode_at``
    returns (B, number of VEs): one scalar per queried VE."""
    torch.manual_seed(0)
    model = TravelingObserverModel.from_problem(registry.Problem(("a", "b"), (5,), {"a": 3}), width=8, ve_dim=3)
    assert model.input_ves.shape == (5, 3) and model.output_ves["a"].shape == (3, 3)
    s = model.encode(torch.randn(2, 5))
    assert model.decode_at(s, torch.randn(4, 3)).shape == (2, 4)
