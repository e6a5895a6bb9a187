import pytest
import torch

from reference_impls.architectures.pathnet import PathNet, path_of
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_a_pathway_sums_its_modules_layer_by_layer(device):
    torch.manual_seed(0)
    model = build("pathnet", VEC, num_layers=2, num_modules=4, active=2).to(device)
    x = torch.randn(5, 6, device=device)
    path = ((0, 3), (2,))
    h = model.layers[0][0](x) + model.layers[0][3](x)
    torch.testing.assert_close(model.run_path(x, path), model.layers[1][2](h))
    model.paths["b"] = path
    torch.testing.assert_close(model(x)["b"], model.heads["b"](model.layers[1][2](h)))
    assert path_of(torch.tensor([[3, 0], [2, 2]])) == path  # a repeated index is one module


def test_output_depends_only_on_modules_on_the_active_path(device, params_with_grad):
    torch.manual_seed(1)
    model = build("pathnet", VEC, num_layers=2, num_modules=4, active=2).to(device)
    model.paths["a"] = ((1, 2), (0, 3))
    x = torch.randn(4, 6, device=device)
    before = model(x)["a"]
    with torch.no_grad():  # scramble every module off the path: no change
        for d, on in enumerate(model.paths["a"]):
            for j in set(range(4)) - set(on):
                for p in model.layers[d][j].parameters():
                    p.add_(torch.randn_like(p))
    torch.testing.assert_close(model(x)["a"], before, rtol=0, atol=0)
    with torch.no_grad():  # scramble one module on it: the output moves
        model.layers[1][3][0].weight.add_(1.0)
    assert not torch.allclose(model(x)["a"], before)
    touched = params_with_grad(model, model(x)["a"].square().sum())
    modules = {n.rsplit(".", 2)[0] for n in touched if n.startswith("layers.")}
    assert modules == {"layers.0.1", "layers.0.2", "layers.1.0", "layers.1.3"}
    assert not any(n.startswith("heads.b") for n in touched)


def test_fixed_path_is_frozen_and_other_modules_are_reinitialised(device, params_with_grad):
    torch.manual_seed(2)
    model = build("pathnet", VEC, num_layers=2, num_modules=3, active=2).to(device)
    best = ((0, 1), (2,))
    kept = model.layers[0][0][0].weight.detach().clone()
    other = model.layers[0][2][0].weight.detach().clone()
    model.fix_path("a", best)
    torch.testing.assert_close(model.layers[0][0][0].weight, kept, rtol=0, atol=0)
    assert not torch.equal(model.layers[0][2][0].weight, other)
    assert model.frozen.tolist() == [[True, True, False], [False, False, True]]
    model.paths["b"] = ((1, 2), (2,))  # task b re-uses frozen modules 0.1 and 1.2
    x = torch.randn(8, 6, device=device)
    touched = params_with_grad(model, model(x)["b"].square().sum())
    modules = {n.rsplit(".", 2)[0] for n in touched if n.startswith("layers.")}
    assert modules == {"layers.0.2"}  # the only unfrozen module on b's path
    assert {n for n in touched if n.startswith("heads.")} == {"heads.b.0.weight", "heads.b.0.bias"}


def test_one_tournament_step_by_hand():
    model = build("pathnet", VEC, num_layers=3, num_modules=5, active=2, population=4, seed=5)  # a seed that mutates
    model.population = [torch.full((3, 2), k) for k in range(4)]
    state = model.generator.get_state()
    winner, loser = model.tournament(lambda path: float(path[0][0]))  # fitness: the first index
    # replay the same random draws by hand
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    i, j = (int(k) for k in torch.randperm(4, generator=g)[:2])
    assert (winner, loser) == ((i, j) if i > j else (j, i))
    hit = torch.rand(3, 2, generator=g) < 1 / 6
    shift = torch.randint(-2, 3, (3, 2), generator=g)
    assert (hit * shift).any()  # the copy really moves, so an unmutated copy would fail below
    expected = (torch.full((3, 2), winner) + hit * shift) % 5
    assert torch.equal(model.population[loser], expected)
    assert torch.equal(model.population[winner], torch.full((3, 2), winner))
    untouched = set(range(4)) - {winner, loser}
    assert all(torch.equal(model.population[k], torch.full((3, 2), k)) for k in untouched)


def test_mutation_rate_and_step_size():
    model = build("pathnet", VEC, num_layers=4, num_modules=10, active=3, seed=4)
    parent = torch.full((4, 3), 5)
    children = torch.stack([model.mutate(parent) for _ in range(4000)])
    moved = children != parent
    assert moved.float().mean().item() == pytest.approx(1 / 12 * 4 / 5, abs=0.01)  # shift 0 is no move
    assert set((children - parent).unique().tolist()) == {-2, -1, 0, 1, 2}
    edge = torch.stack([model.mutate(torch.zeros(4, 3, dtype=torch.long)) for _ in range(500)])
    assert set(edge.unique().tolist()) == {8, 9, 0, 1, 2}  # pushed below 0: wraps round to M - 1, M - 2


def test_evolution_finds_the_fitter_pathway():
    model = build("pathnet", VEC, num_layers=2, num_modules=4, active=1, population=6, seed=5)
    target = ((3,), (1,))
    fitness = lambda path: -sum(abs(a[0] - b[0]) for a, b in zip(path, target))  # noqa: E731
    for _ in range(300):
        model.tournament(fitness)
    assert max(fitness(path_of(g)) for g in model.population) == 0


def test_parameter_count(n_params):
    d, w, n_layers, m = 6, 16, 3, 4
    model = build("pathnet", VEC, width=w, num_layers=n_layers, num_modules=m)
    grid = m * (d * w + w) + (n_layers - 1) * m * (w * w + w)
    assert n_params(model) == grid + (w + 1) + (2 * w + 2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("pathnet", device)
    first, last = short_training("pathnet", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("pathnet", VEC)
    assert type(model) is PathNet and model.name == "pathnet"


def weights_of(model):
    """Every grid module's weight, by (layer, module)."""
    return {(d, j): module[0].weight.detach().clone()
            for d, layer in enumerate(model.layers) for j, module in enumerate(layer)}


def test_a_later_fixed_path_keeps_every_earlier_one_frozen(device, params_with_grad):
    """Only modules that no fixed pathway uses start afresh; each task keeps the pathway it was given."""
    torch.manual_seed(3)
    model = build("pathnet", VEC, num_layers=2, num_modules=3, active=2).to(device)
    first, second = ((0, 1), (2,)), ((1, 2), (0,))
    model.fix_path("a", first)
    before = weights_of(model)
    model.fix_path("b", second)
    after = weights_of(model)
    assert model.frozen.tolist() == [[True, True, True], [True, False, True]]
    assert model.paths == {"a": first, "b": second}
    for d, j in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2)]:  # on a fixed pathway: unchanged
        torch.testing.assert_close(after[d, j], before[d, j], rtol=0, atol=0)
    assert not torch.equal(after[1, 1], before[1, 1])  # on none: re-initialised
    out = model(torch.randn(4, 6, device=device))
    touched = params_with_grad(model, sum(o.square().sum() for o in out.values()))
    assert not any(n.startswith("layers.") for n in touched)


def test_fix_path_starts_a_new_population_from_fresh_genotypes():
    model = build("pathnet", VEC, num_layers=3, num_modules=5, active=2, population=4, seed=7)
    state = model.generator.get_state()
    model.fix_path("a", ((0,), (1,), (2,)))
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    expected = [torch.randint(5, (3, 2), generator=g) for _ in range(4)]
    assert len(model.population) == 4
    assert all(torch.equal(new, old) for new, old in zip(model.population, expected))


def test_random_genotypes_draw_every_module_index_uniformly():
    model = build("pathnet", VEC, num_layers=3, num_modules=5, active=2, seed=1)
    draws = torch.stack([model.random_genotype() for _ in range(2000)])
    assert draws.shape == (2000, 3, 2)
    counts = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    assert counts.shape == (5,)
    torch.testing.assert_close(counts, torch.full((5,), 0.2), rtol=0, atol=0.02)


def test_a_checkpoint_carries_the_pathways_population_and_frozen_modules(device, params_with_grad):
    """A model built with another seed that loads the state_dict runs the same pathways, holds
    the same population, draws the same next genotype, and freezes the same modules."""
    trained = build("pathnet", VEC, num_layers=2, num_modules=3, active=2, seed=3).to(device)
    trained.fix_path("a", ((0, 1), (2,)))
    trained.paths["b"] = ((2,), (0, 1))
    fresh = build("pathnet", VEC, num_layers=2, num_modules=3, active=2, seed=4).to(device)
    assert fresh.paths != trained.paths
    fresh.load_state_dict(trained.state_dict())
    assert fresh.paths == trained.paths
    assert all(torch.equal(a, b) for a, b in zip(fresh.population, trained.population, strict=True))
    x = torch.randn(4, 6, device=device)
    for task, output in trained(x).items():
        torch.testing.assert_close(fresh(x)[task], output, rtol=0, atol=0)
    assert torch.equal(fresh.random_genotype(), trained.random_genotype())
    out = fresh(x)
    touched = params_with_grad(fresh, sum(o.square().sum() for o in out.values()))
    frozen = {f"layers.{d}.{j}." for d, j in [(0, 0), (0, 1), (1, 2)]}
    assert not any(n.startswith(tuple(frozen)) for n in touched)
    assert any(n.startswith("layers.1.0.") for n in touched)  # on b's pathway, not frozen


def test_the_fitter_genotype_wins_whichever_was_drawn_first():
    """Over many draws and both orders of fitness, the loser's slot always holds the fitter one's copy."""
    for sign in (1.0, -1.0):
        model = build("pathnet", VEC, num_layers=3, num_modules=5, active=2, population=4, seed=1)
        for _ in range(10):
            model.population = [torch.full((3, 2), k) for k in range(4)]
            winner, loser = model.tournament(lambda path: sign * path[0][0])  # noqa: B023
            assert sign * winner > sign * loser


def test_all_modules_of_a_layer_may_be_active():
    """N = M is allowed (at most M modules per layer); N = M + 1 is not."""
    model = build("pathnet", VEC, num_layers=2, num_modules=3, active=3)
    assert all(g.shape == (2, 3) for g in model.population)
    with pytest.raises(ValueError):
        build("pathnet", VEC, num_layers=2, num_modules=3, active=4)


def test_a_pathway_must_name_every_layer():
    """A pathway with too few layers is refused when run or fixed, rather than silently cut short."""
    model = build("pathnet", VEC, num_layers=3, num_modules=4, active=2)
    short = ((0,), (1,))
    with pytest.raises(ValueError):
        model.run_path(torch.randn(2, 6), short)
    with pytest.raises(ValueError):
        model.fix_path("a", short)
