"""UniAD: a task's output depends on the queries of earlier tasks only; gradients run back."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.uniad import UniAD

CHAIN = Problem(("track", "map", "motion", "plan"), (12,), {"track": 2, "map": 1, "motion": 3, "plan": 2})
IMAGE = Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)


def model_for(problem: Problem, device: torch.device) -> UniAD:
    torch.manual_seed(0)
    return build("uniad", problem, width=8).to(device)


def test_outputs_depend_on_earlier_queries_only(device):
    model = model_for(CHAIN, device)
    x = torch.randn(3, 12, device=device)
    for k, task in enumerate(CHAIN.tasks):
        model.zero_grad(set_to_none=True)
        model(x)[task].square().sum().backward()
        for j, other in enumerate(CHAIN.tasks):
            grad = model.queries[other].grad
            if j <= k:  # its own and every earlier task's queries shape the output
                assert grad is not None and grad.abs().sum() > 0, (task, other)
            else:  # later tasks are never read
                assert grad is None, (task, other)


def test_changing_a_later_task_leaves_earlier_outputs_unchanged(device):
    model = model_for(CHAIN, device)
    x = torch.randn(3, 12, device=device)
    before = model(x)
    with torch.no_grad():
        model.queries["motion"].add_(1.0)
    after = model(x)
    for t in ("track", "map"):
        torch.testing.assert_close(after[t], before[t])
    for t in ("motion", "plan"):  # motion itself and the planner that reads it
        assert not torch.allclose(after[t], before[t])


def test_chain_by_hand(device):
    """Task k's decoder reads exactly [Q_1; ...; Q_{k-1}] and the BEV tokens."""
    model = model_for(CHAIN, device)
    x = torch.randn(2, 12, device=device)
    bev = model.bev(x)
    got = model.chain(bev)
    done = []
    for t in CHAIN.tasks:
        q = model.queries[t].expand(2, -1, -1)
        earlier = torch.cat(done, dim=1) if done else None
        q = model.decoders[t][0](q, earlier, bev)
        torch.testing.assert_close(got[t], q)
        done.append(q)
    assert model.decoders["track"][0].interface is None  # nothing precedes the first task
    assert all(model.decoders[t][0].interface is not None for t in CHAIN.tasks[1:])


def test_planning_loss_trains_the_whole_chain(device, params_with_grad):
    model = model_for(CHAIN, device)
    touched = params_with_grad(model, model(torch.randn(4, 12, device=device))["plan"].square().sum())
    for t in CHAIN.tasks:
        assert f"queries.{t}" in touched
        assert any(n.startswith(f"decoders.{t}.") for n in touched)
    assert any(n.startswith("embed.") for n in touched)
    assert not any(n.startswith(("readouts.track", "readouts.map", "readouts.motion")) for n in touched)


def test_only_the_last_task_decoder_is_task_specific():
    model = build("uniad", CHAIN, width=8)
    specific = {id(p) for p in model.task_specific_parameters("plan")}
    assert all(id(p) in specific for p in model.decoders["plan"].parameters())
    assert id(model.queries["plan"]) in specific
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.decoders["track"].parameters())
    assert id(model.queries["motion"]) in shared


def test_dense_outputs_and_gradient_flow_on_images(device):
    model = model_for(IMAGE, device)
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)
    out["depth"].sum().backward()
    assert model.queries["seg"].grad.abs().sum() > 0  # depth reads seg's queries


def test_trains(device, short_training):
    first, last = short_training("uniad", True, device, 40)
    assert last < 0.5 * first


def test_uniad_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("uniad", device)


def test_every_parameter_but_earlier_read_outs_learns_from_the_last_task(device):
    """The chain ends at the last task, so its loss must reach every parameter except the other
    tasks' read-outs: none is dead weight (the first task once carried a norm for an interface
    it does not have)."""
    model = model_for(CHAIN, device)
    model(torch.randn(2, 12, device=device))["plan"].square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert dead == [n for n, _ in model.named_parameters() if n.startswith(("readouts.track", "readouts.map",
                                                                              "readouts.motion"))]


def _attend(attn: torch.nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    return attn(q, kv, kv, need_weights=False)[0]


def test_query_layer_by_hand(device):
    """Pre-LN residual sublayers in the order self-attention, interface to earlier queries, BEV
    attention, then a ReLU FFN of twice the width; each sublayer reads its own norm of Q_k."""
    model = model_for(CHAIN, device)
    layer, dim = model.decoders["map"][0], 8
    g = torch.Generator().manual_seed(0)
    q, earlier, bev = (torch.randn(2, n, dim, generator=g).to(device) for n in (4, 4, 6))
    with torch.no_grad():
        for norm in layer.norms:  # distinct affine maps, so that mixing up norms shows
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        n0, n1, n2, n3 = layer.norms
        h = n0(q)
        want = q + _attend(layer.self_attn, h, h)
        want = want + _attend(layer.interface, n1(want), earlier)
        want = want + _attend(layer.bev_attn, n2(want), bev)
        first, second = layer.ffn[0], layer.ffn[2]
        assert first.weight.shape == (2 * dim, dim) and second.weight.shape == (dim, 2 * dim)
        hidden = torch.relu(n3(want) @ first.weight.T + first.bias)
        want = want + hidden @ second.weight.T + second.bias
        torch.testing.assert_close(layer(q, earlier, bev), want)


def test_read_outs_by_hand(device):
    """Pooled: a linear head on the mean query. Dense: each query's value vector times its mask
    <mask_embed(q), B_p> / sqrt(d), averaged over the queries, on the token grid, then bilinearly
    upsampled to the input; B is the BEV with its positions."""
    model = model_for(IMAGE, device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        bev = model.bev(x)
        torch.testing.assert_close(bev, model.embed(x).flatten(2).transpose(1, 2) + model.bev_positions)
        queries, out = model.chain(bev), model(x)
        for t, readout in model.readouts.items():
            q = queries[t]
            masks = readout.mask_embed(q) @ bev.transpose(1, 2) / 8**0.5  # (B, Q, P)
            grid = (readout.value(q).transpose(1, 2) @ masks / q.shape[1]).reshape(2, -1, 4, 4)
            torch.testing.assert_close(out[t], torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear"))
            torch.testing.assert_close(readout(q, bev, (4, 4)), grid)
    pooled = model_for(CHAIN, device)
    x = torch.randn(2, 12, device=device)
    with torch.no_grad():
        queries, out = pooled.chain(pooled.bev(x)), pooled(x)
        for t, readout in pooled.readouts.items():
            torch.testing.assert_close(out[t], readout.value(queries[t].mean(dim=1)))


def test_each_sample_is_processed_on_its_own(device):
    """Attention runs over a sample's own queries and tokens, never across the batch: a sample's
    outputs are the same alone or next to others. Two layers, so that the second layer's queries
    already differ between samples."""
    torch.manual_seed(0)
    model = build("uniad", CHAIN, width=8, num_layers=2).to(device)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(4)).to(device)
    together = model(x)
    for b in range(3):
        for t, y in model(x[b:b + 1]).items():
            torch.testing.assert_close(y, together[t][b:b + 1], atol=1e-5, rtol=1e-5)


def test_direct_construction_defaults_work_and_give_vector_outputs():
    """The constructor's defaults build a working model (its patch divides a 16 x 16 image), and without
    ``dense=True`` an image input still gives one vector per sample and task."""
    torch.manual_seed(0)
    model = UniAD(("a", "b"), (3, 16, 16), {"a": 2, "b": 1})
    out = model(torch.randn(2, 3, 16, 16))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 1)


def test_a_patch_size_must_divide_both_image_sides():
    with pytest.raises(ValueError):
        UniAD(("a",), (3, 16, 12), {"a": 1}, patch_size=8)  # divides the height only


def test_every_bev_token_has_its_own_position():
    """Image: one learned position per patch of the grid; vector input: one per learned BEV token."""
    model = UniAD(("a",), (3, 16, 8), {"a": 1}, patch_size=4)
    assert model.bev_positions.shape == (4 * 2, 16)
    assert UniAD(("a",), (12,), {"a": 1}, num_bev_tokens=5).bev_positions.shape == (5, 16)


def test_from_problem_picks_the_largest_patch_leaving_a_4x4_grid_and_honours_a_given_one():
    """From (4, 2, 1): the largest that divides the image and leaves at least 4 x 4 patches."""
    def patch(h, w, **kw):
        return build("uniad", Problem(("a",), (3, h, w), {"a": 1}, dense=True), **kw).patch_size
    assert patch(16, 16) == 4 and patch(16, 12) == 2 and patch(8, 8) == 2 and patch(6, 6) == 1
    assert patch(16, 16, patch_size=2) == 2
