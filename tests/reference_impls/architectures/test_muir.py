"""MUiR: every weight block is H_psi(l) z_l from a shared hypermodule pool, checked by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.architectures import registry
from reference_impls.architectures.muir import MUiR, HyperLayer, HypermodulePool


def pool_and_layer(device, kernel_size=None, pool_size=3):
    torch.manual_seed(0)
    pool = HypermodulePool(pool_size, 2, 3, context_dim=4)
    layer = HyperLayer(6, 4, pool, kernel_size, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.contexts.normal_()  # distinct contexts so every block differs
        layer.bias.normal_()  # a non-zero bias, so leaving it out shows
    return pool.to(device), layer.to(device)


@pytest.mark.parametrize("kernel_size", (None, 3))
def test_every_block_is_its_hypermodule_times_its_context(device, kernel_size):
    pool, layer = pool_and_layer(device, kernel_size)
    w = layer.weight(pool)
    positions, rows, cols = layer.grid
    assert w.shape == ((4, 6) if kernel_size is None else (4, 6, 3, 3))
    w = w.reshape(4, 6, positions)
    for p in range(positions):
        for r in range(rows):
            for c in range(cols):
                l = (p * rows + r) * cols + c
                h = pool.weight[layer.assignment[l]].view(2, 3, 4)  # H_k: m_out x m_in x c
                torch.testing.assert_close(w[2 * r:2 * r + 2, 3 * c:3 * c + 3, p], h @ layer.contexts[l])
    x = torch.randn(5, 6, device=device) if kernel_size is None else torch.randn(2, 6, 5, 5, device=device)
    ref = nn.functional.linear(x, layer.weight(pool), layer.bias) if kernel_size is None else \
        nn.functional.conv2d(x, layer.weight(pool), layer.bias, padding=1)
    torch.testing.assert_close(layer(x, pool), ref)


@pytest.mark.parametrize("kernel_size", (None, 3))
def test_initialisation_follows_the_official_code(kernel_size):
    """Hypermodules ~ N(0, 1/c); every context the constant sqrt(2 / fan_in)."""
    torch.manual_seed(0)
    c = 4
    pool = HypermodulePool(64, 8, 8, context_dim=c)
    layer = HyperLayer(16, 8, pool, kernel_size, torch.Generator().manual_seed(0))
    fan_in = 16 * (1 if kernel_size is None else kernel_size**2)
    torch.testing.assert_close(layer.contexts, torch.full_like(layer.contexts, (2 / fan_in) ** 0.5))
    assert pool.weight.mean().abs() < 0.02 and abs(pool.weight.std().item() - c**-0.5) < 0.02


def test_task_network_by_hand(device):
    """ReLU after the stem and after every generated layer, then the task's head."""
    torch.manual_seed(1)
    problem = registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2})
    model = MUiR.from_problem(problem, width=8, block_size=4, hidden_layers=2).to(device)
    with torch.no_grad():
        for layer in model.hidden["b"]:
            layer.contexts.normal_()
            layer.bias.normal_()
    x = torch.randn(5, 6, device=device)
    h = torch.relu(model.stems["b"](x))
    for layer in model.hidden["b"]:
        h = torch.relu(h @ layer.weight(model.pool).T + layer.bias)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](h))


def test_one_hypermodule_confines_blocks_to_a_context_sized_subspace(device):
    pool, layer = pool_and_layer(device, kernel_size=3, pool_size=1)
    flat = layer.weight(pool).reshape(2, 2, 2, 3, 9).permute(0, 2, 4, 1, 3).reshape(-1, 6)  # one row per block
    assert flat.shape[0] == 36 and torch.linalg.matrix_rank(flat.detach().cpu()) == 4  # rank <= c


def test_reassigning_a_block_changes_only_that_block(device):
    pool, layer = pool_and_layer(device)
    before = layer.weight(pool).detach().clone()
    with torch.no_grad():
        layer.assignment[0] = (layer.assignment[0] + 1) % 3
    diff = (layer.weight(pool) - before).abs() > 0
    assert diff[:2, :3].all() and not diff[2:].any() and not diff[:, 3:].any()


def test_tasks_share_only_the_hypermodules(device, params_with_grad):
    torch.manual_seed(0)
    problem = registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2})
    model = MUiR.from_problem(problem, width=8, block_size=4, pool_size=2).to(device)
    names = params_with_grad(model, model(torch.randn(3, 6, device=device))["a"].square().sum())
    assert "pool.weight" in names and "hidden.a.0.contexts" in names
    assert not any(n.startswith(("hidden.b", "stems.b", "heads.b")) for n in names)
    assert [id(p) for p in model.shared_parameters()] == [id(model.pool.weight)]
    # Both tasks' blocks are drawn from the same two hypermodules.
    used = {int(k) for t in "ab" for layer in model.hidden[t] for k in layer.assignment}
    assert used == {0, 1}


def test_parameter_count(device):
    m, c, width, layers = 4, 4, 8, 2
    model = MUiR.from_problem(registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2}), width=width,
                              block_size=m, context_dim=c, hidden_layers=layers)
    blocks = (width // m) ** 2
    pool = blocks * layers * m * m * c  # default pool: one task's worth of hypermodules
    per_task = (6 * width + width) + layers * (blocks * c + width)
    heads = (width + 1) + (2 * width + 2)
    assert sum(p.numel() for p in model.parameters()) == pool + 2 * per_task + heads


def test_rejects_blocks_that_do_not_tile():
    with pytest.raises(ValueError):
        HyperLayer(6, 5, HypermodulePool(1, 2, 3, 4), None, torch.Generator())


def test_registry_builds_vector_and_dense_problems(device):
    vec = registry.build("muir", registry.Problem(("a", "b"), (10,), {"a": 1, "b": 3}), width=8).to(device)
    out = vec(torch.randn(2, 10, device=device))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 3)
    img = registry.Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)
    out = registry.build("muir", img, width=8).to(device)(torch.randn(2, 3, 8, 8, device=device))
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("dense", (True, False))
def test_short_training_lowers_loss(device, dense, short_training):
    first, last = short_training("muir", dense, device, steps=15)
    assert last < 0.7 * first


def _assignments(seed: int) -> list[torch.Tensor]:
    problem = registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2})
    model = MUiR.from_problem(problem, width=8, block_size=2, hidden_layers=2, pool_size=5, seed=seed)
    return [layer.assignment for t in "ab" for layer in model.hidden[t]]


def test_assignment_is_a_random_draw_from_the_pool_fixed_by_the_seed():
    first, again, other = _assignments(0), _assignments(0), _assignments(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible for one seed
    assert not all(torch.equal(a, b) for a, b in zip(first, other))  # a different seed draws differently
    # every layer of every task gets its own draw (16 blocks each, 5 hypermodules)
    assert len({tuple(a.tolist()) for a in first}) == len(first) == 4
    assert all(0 <= int(a.min()) and int(a.max()) < 5 for a in first)


def test_non_square_grids_and_5x5_kernels_tile_and_keep_the_map_size(device):
    """A 6 -> 4 layer of 2 x 2 blocks has 2 x 3 blocks per kernel position; a 5 x 5 hyper-convolution is
    'same'-padded like an ordinary one; pool.blocks returns one (m_out, m_in) block per assignment."""
    torch.manual_seed(0)
    pool = HypermodulePool(3, 2, 2, context_dim=4).to(device)
    layer = HyperLayer(6, 4, pool, 5, torch.Generator().manual_seed(0)).to(device)
    assert layer.grid == (25, 2, 3) and layer.contexts.shape[0] == 25 * 6
    assert pool.blocks(layer.assignment, layer.contexts).shape == (150, 2, 2)
    x = torch.randn(1, 6, 7, 7, device=device)
    torch.testing.assert_close(layer(x, pool), F.conv2d(x, layer.weight(pool), layer.bias, padding=2))


def test_the_default_pool_holds_one_tasks_worth_of_hypermodules():
    """Without pool_size, the pool has as many hypermodules as one task has blocks (all its hidden layers)."""
    vector = registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2})
    image = registry.Problem(("a", "b"), (3, 6, 6), {"a": 1, "b": 2}, dense=True)
    for problem in (vector, image):
        model = MUiR.from_problem(problem, width=8, block_size=2, hidden_layers=2)
        one_task = sum(layer.assignment.numel() for layer in model.hidden["a"])
        assert model.pool.weight.shape[0] == one_task == (16 if problem is vector else 16 * 9) * 2
