"""HyperGrid: the generated weight is W ⊙ (row gate ⊗ column gate) expanded to blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.hypergrid import HyperGrid, HyperGridLinear


@pytest.mark.parametrize("mode", ["LG", "GL", "LL", "LG+GL"])
def test_generated_weight_by_hand(device, mode):
    torch.manual_seed(0)
    layer = HyperGridLinear(in_dim=6, out_dim=4, state_dim=5, grid_rows=2, grid_cols=3, mode=mode).to(device)
    state = torch.randn(2, 5, device=device)
    local = lambda linear, s: None if linear is None else linear.weight @ s + linear.bias  # noqa: E731
    for b in range(2):
        lr, lc = local(layer.local_rows, state[b]), local(layer.local_cols, state[b])
        gr, gc = layer.global_rows, layer.global_cols
        outer = {"LG": lambda: torch.outer(lr, gc), "GL": lambda: torch.outer(gr, lc),
                 "LL": lambda: torch.outer(lr, lc),
                 "LG+GL": lambda: torch.outer(lr, gc) + torch.outer(gr, lc)}[mode]()
        # Each grid cell gates a 2 x 2 block of the 4 x 6 weight.
        gate = torch.kron(torch.sigmoid(outer), torch.ones(2, 2, device=device))
        torch.testing.assert_close(layer.weight(state)[b], layer.base.weight * gate)
    a = torch.randn(2, 3, 6, device=device)
    expected = torch.stack([a[b] @ layer.weight(state)[b].T for b in range(2)]) + layer.base.bias
    torch.testing.assert_close(layer(a, state), expected)
    gate = layer.grid(state)
    assert gate.shape == (2, 2, 3) and ((gate > 0) & (gate < 1)).all()


@pytest.mark.parametrize("mode, generators", [
    ("LG", {"local_rows", "global_cols"}), ("GL", {"global_rows", "local_cols"}),
    ("LL", {"local_rows", "local_cols"}), ("LG+GL", {"local_rows", "local_cols", "global_rows", "global_cols"})])
def test_each_mode_has_exactly_the_generators_it_uses_and_all_of_them_learn(device, mode, generators):
    """A generator the mode does not multiply would be dead weight (it was, before: all four
    existed in every mode, so LG carried d_r + (d + 1) d_c parameters it never trained)."""
    torch.manual_seed(0)
    layer = HyperGridLinear(in_dim=6, out_dim=4, state_dim=5, grid_rows=2, grid_cols=3, mode=mode).to(device)
    names = {n.split(".")[0] for n, _ in layer.named_parameters()} - {"base"}
    assert names == generators
    layer(torch.randn(2, 3, 6, device=device), torch.randn(2, 5, device=device)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_lg_gate_has_rank_one_structure_and_depends_on_state(device):
    torch.manual_seed(0)
    layer = HyperGridLinear(8, 4, 3, grid_rows=4, grid_cols=4, mode="LG").to(device)
    s1, s2 = torch.randn(1, 3, device=device), torch.randn(1, 3, device=device)
    logits = torch.logit(layer.grid(s1)[0])
    singular = torch.linalg.svdvals(logits.detach())  # r ⊗ c before the sigmoid: rank one
    assert singular[1] < 1e-4 * singular[0]
    assert not torch.allclose(layer.weight(s1), layer.weight(s2))


def test_tasks_share_everything_but_prefix_and_head(device):
    torch.manual_seed(0)
    model = HyperGrid(("cola", "rte"), {"cola": 2, "rte": 2}, vocab_size=11, d_model=16, d_ff=32,
                      num_heads=2, grid_rows=4, grid_cols=4).to(device)
    ids = torch.randint(0, 11, (3, 5), device=device)
    out = model(ids)
    assert out["cola"].shape == (3, 2)
    out["cola"].sum().backward()
    assert model.prefixes["rte"].grad is None
    assert all(p.grad is None for p in model.heads["rte"].parameters())
    ff = model.layers[0].ff_out
    for p in (ff.base.weight, ff.local_rows.weight, ff.global_cols, model.prefixes["cola"]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # The LG variant has no global rows or local columns, which it would never use.
    assert ff.global_rows is None and ff.local_cols is None
    # Same prefix and head => same output: the prefix is the whole task identity.
    with torch.no_grad():
        model.prefixes["rte"].copy_(model.prefixes["cola"])
        model.heads["rte"].load_state_dict(model.heads["cola"].state_dict())
        out = model(ids)
    torch.testing.assert_close(out["cola"], out["rte"])


def test_trains(device, fit):
    torch.manual_seed(0)
    model = HyperGrid(("a", "b"), {"a": 2, "b": 2}, in_features=1, d_model=16, d_ff=32, num_heads=2,
                      grid_rows=4, grid_cols=4, mode="LG+GL").to(device)
    x = torch.randn(32, 4, device=device)
    y = {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()}
    losses = fit(model, x, lambda out: sum(F.cross_entropy(out[t], y[t]) for t in y), steps=40, lr=1e-2)
    assert losses[-1] < 0.6 * losses[0]


def test_rejects_grid_that_does_not_tile():
    with pytest.raises(ValueError):  # a valid mode, so only the tiling can be at fault
        HyperGridLinear(in_dim=6, out_dim=4, state_dim=3, grid_rows=3, grid_cols=2, mode="LG")


def test_the_layer_defaults_to_the_models_default_mode_lg():
    """HyperGridLinear and HyperGrid share one default, LG (local rows x global columns)."""
    layer = HyperGridLinear(in_dim=6, out_dim=4, state_dim=5, grid_rows=2, grid_cols=3)
    assert layer.local_rows is not None and layer.global_cols is not None
    assert layer.global_rows is None and layer.local_cols is None


@pytest.mark.parametrize("mode, generators", [
    ("LG", {"local_rows", "global_cols"}), ("GL", {"global_rows", "local_cols"}),
    ("LL", {"local_rows", "local_cols"}), ("LG+GL", {"local_rows", "local_cols", "global_rows", "global_cols"})])
def test_every_layer_gates_its_ffn_with_the_models_mode(mode, generators):
    """The model's ``mode`` reaches the gated projection of every layer (not the layer's default)."""
    torch.manual_seed(0)
    model = HyperGrid(("a",), {"a": 2}, vocab_size=11, d_model=16, d_ff=32, num_heads=2, num_layers=3,
                      grid_rows=4, grid_cols=4, mode=mode)
    for layer in model.layers:
        names = {n.split(".")[0] for n, _ in layer.ff_out.named_parameters()} - {"base"}
        assert names == generators


def test_the_default_configuration_builds_and_runs():
    """The defaults fit together: the heads divide d_model, the grid tiles the d_ff -> d_model weight."""
    torch.manual_seed(0)
    model = HyperGrid(("a", "b"), {"a": 2, "b": 3}, vocab_size=7)
    out = model(torch.randint(0, 7, (2, 5)))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 3)


@pytest.mark.parametrize("size", ["d_ff", "d_model", "max_len"])
def test_non_positive_sizes_are_refused_when_the_model_is_built(size):
    """d_ff = 0 would build an FFN that adds only its bias, max_len = 0 a position table that fails
    on the first forward pass: both must be refused up front, like the other sizes."""
    with pytest.raises(ValueError):
        HyperGrid(("a",), {"a": 2}, vocab_size=7, **{size: 0})


def test_from_problem_sizes_the_model_by_width_and_positions_by_the_input_length():
    """``width`` is the model width, the FFN scales with it, and the position table has exactly one
    row per position of [prefix; x]: every row is used, none is dead weight."""
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (5,), {"a": 1, "b": 3})
    torch.manual_seed(0)
    small, large = (registry.build("hypergrid", problem, width=w) for w in (8, 16))
    assert small.tokens.out_features == 8 and large.tokens.out_features == 16
    assert 2 * small.layers[0].ff_in.out_features == large.layers[0].ff_in.out_features
    out = small(torch.randn(3, 5))
    sum(o.sum() for o in out.values()).backward()
    rows = small.positions.weight
    assert rows.shape[0] == 1 + 5 and (rows.grad.abs().sum(-1) > 0).all()


def test_hypergrid_builds_from_registry_problem(device):
    from reference_impls.architectures import registry

    problem = registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3})
    model = registry.build("hypergrid", problem).to(device)
    out = model(torch.randn(3, 4, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 3)


def test_task_state_is_prefix_token_after_attention(device):
    torch.manual_seed(0)
    model = HyperGrid(("a",), {"a": 2}, vocab_size=11, d_model=16, d_ff=32, num_heads=2,
                      grid_rows=4, grid_cols=4).to(device)
    layer = model.layers[0]
    h = torch.randn(3, 5, 16, device=device)
    a = layer.norm1(h + layer.attention(h, h, h, need_weights=False)[0])
    expected = layer.norm2(a + layer.ff_out(torch.relu(layer.ff_in(a)), a[:, 0]))
    torch.testing.assert_close(layer(h), expected)


def test_each_task_encodes_its_own_prefix_and_reads_the_prefix_position(device):
    """encode_task(x, t) = last layer's output at position 0 of [prefix_t; tokens(x)] + positions.

    Before this test, every task could use the first task's prefix, or the heads could read the
    mean over positions, and no test failed."""
    torch.manual_seed(0)
    model = HyperGrid(("a", "b"), {"a": 2, "b": 2}, vocab_size=11, d_model=16, d_ff=32, num_heads=2,
                      grid_rows=4, grid_cols=4).to(device)
    ids = torch.randint(0, 11, (3, 5), device=device)
    for t in ("a", "b"):
        h = torch.cat([model.prefixes[t].expand(3, 1, 16), model.tokens(ids)], dim=1) + model.positions.weight[:6]
        for layer in model.layers:
            h = layer(h)
        torch.testing.assert_close(model.encode_task(ids, t), h[:, 0])
    assert not torch.allclose(model.encode_task(ids, "a"), model.encode_task(ids, "b"))


def test_a_task_claims_exactly_its_prefix_and_head(split_by_task):
    """Everything but the prefix token and the head is shared, and each task's output reaches all of it."""
    torch.manual_seed(0)
    model = HyperGrid(("a", "b"), {"a": 2, "b": 2}, vocab_size=11, d_model=16, d_ff=32, num_heads=2,
                      grid_rows=4, grid_cols=4)
    shared = {n for n, _ in model.named_parameters() if not n.startswith(("prefixes.", "heads."))}
    for t, (own, reached) in split_by_task(model, torch.randint(0, 11, (3, 5))).items():
        assert own == {f"prefixes.{t}", f"heads.{t}.weight", f"heads.{t}.bias"}
        assert reached == own | shared
