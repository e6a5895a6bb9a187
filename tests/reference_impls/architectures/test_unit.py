"""UniT: every decoder weight is shared; tasks differ only by their query embeddings and heads."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.unit import UniT

from .conftest import names_under

VEC = Problem(("a", "b"), (6,), {"a": 2, "b": 2})
IMG = Problem(("a", "b"), (2, 8, 8), {"a": 3, "b": 1}, dense=True)


def test_task_specific_parameters_are_only_queries_and_heads():
    model = build("unit", VEC, width=8)
    names = {id(p): n for n, p in model.named_parameters()}
    specific = {names[id(p)] for p in model.task_specific_parameters("a")}
    assert specific == {"queries.a"} | {f"heads.a.{n}" for n, _ in model.heads["a"].named_parameters()}
    shared = {names[id(p)] for p in model.shared_parameters()}
    assert {n for n in names.values() if n.startswith(("decoder.", "encoder.", "trunk."))} <= shared


def test_every_decoder_weight_serves_every_task(device, params_with_grad):
    torch.manual_seed(0)
    for problem in (VEC, IMG):
        model = build("unit", problem, width=8).to(device)
        decoder = {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
        x = torch.randn(3, *problem.input_shape, device=device)
        for task, other in (("a", "b"), ("b", "a")):
            touched = params_with_grad(model, model(x)[task].square().sum())
            assert decoder <= touched and f"queries.{task}" in touched
            assert not any(n.startswith((f"queries.{other}", f"heads.{other}")) for n in touched)


def test_same_queries_and_head_give_same_task(device):
    torch.manual_seed(0)
    model = build("unit", VEC, width=8).to(device)
    x = torch.randn(4, 6, device=device)
    before = model(x)
    assert not torch.allclose(before["a"], before["b"])
    with torch.no_grad():
        model.queries["b"].copy_(model.queries["a"])
        model.heads["b"].load_state_dict(model.heads["a"].state_dict())
    after = model(x)
    torch.testing.assert_close(after["b"], after["a"], rtol=0, atol=0)


def classifier_by_hand(head, v):
    """Dense, GELU, layer norm, linear, with functional ops (the head's own weights, not its layers)."""
    dense, _, norm, out = head
    h = F.gelu(v @ dense.weight.T + dense.bias)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return (h * norm.weight + norm.bias) @ out.weight.T + out.bias


def gradients(model, out, names):
    """Gradients of a fixed random projection of ``out`` with respect to the parameters ``names``."""
    params = dict(model.named_parameters())
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
    return torch.autograd.grad((out * r).sum(), [params[n] for n in names])


def test_decoder_reads_queries_over_encoder_states_by_hand(device):
    torch.manual_seed(0)
    model = build("unit", VEC, width=8, num_queries={"a": 3, "b": 1}).to(device)
    x = torch.randn(4, 6, device=device)
    tokens = model.to_tokens(model.trunk(x)).view(4, 4, 8) + model.position
    memory = model.encoder(tokens)
    h = model.decoder(model.queries["a"].expand(4, 3, 8), memory)
    torch.testing.assert_close(model(x)["a"], classifier_by_hand(model.heads["a"], h[:, 0]))


def test_dense_channels_are_query_kernels_dotted_with_encoder_cells(device):
    torch.manual_seed(0)
    model = build("unit", IMG, width=8).to(device, torch.float64)
    head = model.heads["a"]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))  # b_c (zeros at init) must show in the maps
    x = torch.randn(2, 2, 8, 8, device=device, dtype=torch.float64)
    memory = model.encode(x)  # 8 x 8 image, patch 2: a 4 x 4 grid of cells
    assert memory.shape == (2, 16, 8) and model.queries["a"].shape == (3, 8)
    h = model.decoder(model.queries["a"].expand(2, 3, 8), memory)  # one query per output channel
    maps = torch.stack([(head.kernel(h[:, c])[:, None] * memory).sum(-1) + head.bias[c] for c in range(3)], 1)
    expected = F.interpolate(maps.view(2, 3, 4, 4), scale_factor=2, mode="bilinear", align_corners=False)
    out = model(x)["a"]
    torch.testing.assert_close(out, expected)
    # the encoder is trained through both routes: the decoder's cross-attention and the read-out
    shared = sorted(names_under(model, "trunk.", "encoder.", "position"))
    for got, want in zip(gradients(model, out, shared), gradients(model, expected, shared)):
        torch.testing.assert_close(got, want)


def test_image_tokens_are_average_pooled_cells_plus_positions(device):
    torch.manual_seed(0)
    model = build("unit", IMG, width=8).to(device, torch.float64)
    x = torch.randn(2, 2, 8, 8, device=device, dtype=torch.float64)
    f = model.trunk(x)  # (2, 8, 8, 8): patch 2 gives a 4 x 4 grid, cells in raster order
    cells = f.view(2, 8, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.encode(x), model.encoder(cells + model.position))


def test_post_norm_layers_end_encoder_and_decoder(device):
    """Post-norm transformer layers: at initialisation (unit LayerNorm affine) every encoder state and
    every decoded query has zero mean and unit variance over its features."""
    torch.manual_seed(0)
    for problem in (VEC, IMG):
        model = build("unit", problem, width=8).to(device, torch.float64)
        memory = model.encode(torch.randn(3, *problem.input_shape, device=device, dtype=torch.float64))
        for states in (memory, model.decoded(memory, "a")):
            torch.testing.assert_close(states.mean(-1), torch.zeros(states.shape[:-1], device=device, dtype=torch.float64))
            torch.testing.assert_close(states.var(-1, unbiased=False), torch.ones(states.shape[:-1], device=device, dtype=torch.float64), atol=1e-4, rtol=0)


def test_every_task_trains_the_shared_encoder(device, params_with_grad):
    torch.manual_seed(0)
    model = build("unit", VEC, width=8).to(device)
    x = torch.randn(3, 6, device=device)
    shared = names_under(model, "trunk.", "to_tokens.", "encoder.", "position")
    for task in VEC.tasks:
        assert shared <= params_with_grad(model, model(x)[task].square().sum()), task


def test_adding_a_task_adds_only_its_queries_and_head(n_params):
    w = 8
    two = build("unit", VEC, width=w)
    three = build("unit", Problem(("a", "b", "c"), (6,), {"a": 2, "b": 2, "c": 5}), width=w)
    head_c = (w * w + w) + 2 * w + (w * 5 + 5)  # dense, layer norm, output layer
    assert n_params(three) - n_params(two) == 1 * w + head_c  # one query, one head
    assert n_params(three.decoder) == n_params(two.decoder)


def test_encode_decode_matches_forward(device):
    torch.manual_seed(0)
    model = build("unit", IMG, width=8).to(device)
    x = torch.randn(2, 2, 8, 8, device=device)
    out, via = model(x), model.decode(model.encode(x))
    for t in IMG.tasks:
        torch.testing.assert_close(out[t], via[t])


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("unit", device)
    first, last = short_training("unit", dense, device, steps=40)
    assert last < 0.8 * first
    assert type(build("unit", VEC)) is UniT


def test_dense_head_kernel_is_a_plain_linear_map_and_the_bias_is_per_channel():
    """<W q_c, h[p]> + b_c: W has no bias of its own (it would add <b_W, h[p]> to every channel)."""
    from reference_impls.architectures.unit import DenseQueryHead
    torch.manual_seed(0)
    head = DenseQueryHead(4, 2)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.5, -1.0]))
    decoded, memory = torch.randn(3, 2, 4), torch.randn(3, 5, 4)
    expected = (decoded @ head.kernel.weight.T) @ memory.transpose(1, 2) + head.bias[:, None]
    torch.testing.assert_close(head(decoded, memory), expected)
    assert sum(p.numel() for p in head.parameters()) == 4 * 4 + 2


def test_feed_forward_width_is_twice_the_model_width_and_options_reach_the_model():
    """FFNs of 2x the width (documented); from_problem passes its options on (depth, queries); every
    token has its own learned position."""
    model = UniT.from_problem(VEC, width=8, depth=3, num_tokens=5, num_queries={"a": 3, "b": 1})
    for layer in (*model.encoder.layers, *model.decoder.layers):
        assert (layer.linear1.out_features, layer.linear2.in_features) == (16, 16)
    assert model.queries["a"].shape == (3, 8) and model.queries["b"].shape == (1, 8)
    assert len([m for m in model.trunk.modules() if isinstance(m, torch.nn.Linear)]) == 3  # depth 3
    assert model.position.shape == (5, 8)
