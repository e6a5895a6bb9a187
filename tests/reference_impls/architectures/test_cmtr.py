import io

import pytest
import torch

from reference_impls.architectures.cmtr import (
    CHALLENGER,
    CHAMPION,
    CMTR,
    Routing,
    insert_node,
    insert_node_at,
    meta_iteration,
    module_from_gene,
    mutate_module_genes,
    next_module_population,
    single_module_routing,
)
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_a_routing_averages_inputs_and_outputs_vertex_by_vertex(device):
    torch.manual_seed(0)
    model = build("cmtr", VEC, width=8, num_modules=3).to(device)
    # 0 -> F2 (v1); mean(0, v1) -> F0 (v2); v1 -> F1 (v3); decoder reads mean(v2, v3)
    routing = Routing(nodes=((2, (0,)), (0, (0, 1)), (1, (1,))), outputs=(2, 3))
    model.routings["a"][CHAMPION] = routing
    x = torch.randn(5, 6, device=device)
    F, E, D = model.shared, model.encoders["a"][0], model.decoders["a"][0]
    h0 = E(x)
    h1 = F[2](h0)
    h2, h3 = F[0]((h0 + h1) / 2), F[1](h1)
    torch.testing.assert_close(model(x)["a"], D((h2 + h3) / 2))
    assert routing.modules_used() == {0, 1, 2}


def test_each_task_runs_its_own_route_over_shared_modules(device, params_with_grad):
    torch.manual_seed(1)
    model = build("cmtr", VEC, width=8, num_modules=4).to(device)
    model.routings["a"][CHAMPION] = Routing(((0, (0,)), (1, (1,))), (2,))
    model.routings["b"][CHAMPION] = Routing(((1, (0,)), (3, (0,))), (1, 2))
    x = torch.randn(4, 6, device=device)
    shared_of = {t: {n.split(".")[1] for n in params_with_grad(model, model(x)[t].square().sum())
                     if n.startswith("shared.")} for t in model.tasks}
    assert shared_of == {"a": {"0", "1"}, "b": {"1", "3"}}  # module 1: one set of weights, two tasks
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in touched if not n.startswith("shared.")} == {
        "encoders.a", "decoders.a"}
    assert not any(".1." in n for n in touched if not n.startswith("shared."))  # the challenger is not forward()
    before = model(x)["a"]
    with torch.no_grad():  # modules off a's route do not change its output
        for k in (2, 3):
            for p in model.shared[k].parameters():
                p.add_(1.0)
    torch.testing.assert_close(model(x)["a"], before, rtol=0, atol=0)


def test_inserting_a_node_by_hand():
    r = Routing(nodes=((2, (0,)), (0, (0, 1)), (1, (1,))), outputs=(2, 3))
    # new vertex 2 (module 3) fed by vertex 1, feeding old vertex 3 (now 4)
    assert insert_node_at(r, 1, 3, 3) == Routing(((2, (0,)), (3, (1,)), (0, (0, 1)), (1, (1, 2))), (3, 4))
    # fed by the encoder output, feeding the decoder
    assert insert_node_at(r, 0, None, 1) == Routing(((1, (0,)), (2, (0,)), (0, (0, 2)), (1, (2,))), (3, 4, 1))
    with pytest.raises(ValueError, match="destination"):
        insert_node_at(r, 2, 1, 0)  # an edge backwards would make a cycle


def test_the_mutation_adds_one_vertex_and_two_edges_and_keeps_everything_else():
    generator = torch.Generator().manual_seed(3)
    routing = single_module_routing(0)
    seen_destinations = set()
    for _ in range(60):
        child = insert_node(routing, 4, generator)
        n = len(routing.nodes)
        assert len(child.nodes) == n + 1
        # some vertex has one input, and removing it gives back the parent exactly
        new = next(v for v in range(1, n + 2) if len(child.nodes[v - 1][1]) == 1 and _drop(child, v) == routing)
        edges = lambda g: sum(len(i) for _, i in g.nodes) + len(g.outputs)  # noqa: E731
        assert edges(child) == edges(routing) + 2
        assert all(u < v for v, (_, inputs) in enumerate(child.nodes, 1) for u in inputs)  # acyclic
        seen_destinations.add("decoder" if new in child.outputs else "vertex")
        routing = child
    assert seen_destinations == {"decoder", "vertex"}


def _drop(g: Routing, v: int) -> Routing:
    """``g`` without vertex v and its edges, later vertices renumbered back."""
    back = lambda u: u - 1 if u > v else u  # noqa: E731
    nodes = tuple((m, tuple(back(u) for u in i if u != v)) for j, (m, i) in enumerate(g.nodes, 1) if j != v)
    return Routing(nodes, tuple(back(u) for u in g.outputs if u != v))


def test_a_challenger_is_a_mutated_copy_and_the_fitter_one_is_kept():
    torch.manual_seed(4)
    model = build("cmtr", VEC, width=8, num_modules=3)
    x = torch.randn(16, 6)
    champion = {t: model.routings[t][CHAMPION] for t in model.tasks}
    with torch.no_grad():  # what a losing challenger of an earlier meta-iteration left behind
        for p in [*model.encoders["a"][CHALLENGER].parameters(), *model.decoders["b"][CHALLENGER].parameters()]:
            p.add_(1.0)

    def train(m):  # joint training: every individual's loss, modules shared
        assert all(len(m.routings[t][CHALLENGER].nodes) == len(champion[t].nodes) + 1 for t in m.tasks)
        for t in m.tasks:  # before training the challenger has the champion's weights
            for slot_part in (m.encoders[t], m.decoders[t]):
                for p0, p1 in zip(slot_part[0].parameters(), slot_part[1].parameters()):
                    assert torch.equal(p0, p1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = sum(o.square().mean() for pair in m.individual_outputs(x).values() for o in pair)
        opt.zero_grad()
        loss.backward()
        opt.step()

    scores = {("a", CHAMPION): 0.0, ("a", CHALLENGER): 1.0, ("b", CHAMPION): 1.0, ("b", CHALLENGER): 1.0}
    won = meta_iteration(model, train, lambda m, t, slot: scores[(t, slot)])
    assert won == {"a": True, "b": False}  # a tie keeps the champion
    assert model.routings["a"][CHAMPION] == model.routings["a"][CHALLENGER] != champion["a"]
    assert model.routings["b"][CHAMPION] == champion["b"]
    with torch.no_grad():  # the winner's trained encoder and decoder came along
        torch.testing.assert_close(model(x)["a"], model.individual(x, "a", CHALLENGER), rtol=0, atol=0)
        assert not torch.equal(model(x)["b"], model.individual(x, "b", CHALLENGER))


def test_champion_fitness_never_drops_and_evolution_finds_the_target():
    model = build("cmtr", VEC, width=4, num_modules=3, seed=5)

    def fitness(m, t, slot):  # want exactly three vertices using module 2 (a on its own, b too)
        r = m.routings[t][slot]
        return -abs(sum(mod == 2 for mod, _ in r.nodes) - 3) - 0.01 * len(r.nodes)

    history = []
    for _ in range(40):
        meta_iteration(model, lambda m: None, fitness)
        history.append([fitness(model, t, CHAMPION) for t in model.tasks])
    for before, after in zip(history, history[1:]):
        assert all(b <= a for b, a in zip(before, after))
    assert all(sum(m == 2 for m, _ in model.routings[t][CHAMPION].nodes) == 3 for t in model.tasks)
    assert model.routings["a"][CHAMPION] != model.routings["b"][CHAMPION]  # each task evolved its own


def test_a_checkpoint_carries_the_evolved_routings():
    saved = build("cmtr", VEC, width=8, num_modules=3, seed=6)
    for _ in range(3):
        meta_iteration(saved, lambda m: None, lambda m, t, slot: float(slot))  # challengers always win
    fresh = build("cmtr", VEC, width=8, num_modules=3, seed=7)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.routings == saved.routings and len(fresh.routings["a"][CHAMPION].nodes) == 4
    x = torch.randn(3, 6)
    torch.testing.assert_close(fresh(x)["b"], saved(x)["b"])


def test_module_mutation_changes_exactly_one_hyperparameter():
    generator = torch.Generator().manual_seed(8)
    genes = tuple({"layers": 1, "hidden": 16} for _ in range(4))
    for _ in range(30):
        child = mutate_module_genes(genes, generator)
        diffs = [(k, key) for k in range(4) for key in ("layers", "hidden") if child[k][key] != genes[k][key]]
        assert len(diffs) == 1
        assert genes[0] == {"layers": 1, "hidden": 16}  # the parent is untouched
    image = module_from_gene((3, 8, 8), 6, {"layers": 3, "hidden": 5})
    assert [m.out_channels for m in image.modules() if isinstance(m, torch.nn.Conv2d)] == [5, 5, 6]


def test_module_selection_keeps_the_elite_and_refills_with_their_mutants():
    generator = torch.Generator().manual_seed(9)
    population = [tuple({"layers": i % 3 + 1, "hidden": 8} for _ in range(2)) for i in range(6)]
    fitnesses = [0.1, 0.9, 0.3, 0.8, 0.2, 0.0]
    nxt = next_module_population(population, fitnesses, 2, generator)
    assert len(nxt) == 6 and nxt[:2] == [population[1], population[3]]  # fittest first, unchanged
    for child in nxt[2:]:
        assert min(sum(a[k] != b[k] for a, b in zip(child, elite) for k in a) for elite in nxt[:2]) == 1
    with pytest.raises(ValueError, match="num_elite"):
        next_module_population(population, fitnesses, 0, generator)
    with pytest.raises(ValueError, match="num_elite"):
        next_module_population(population, fitnesses, 7, generator)


def test_evolved_module_genes_build_the_shared_modules_and_bad_sizes_are_refused():
    genes = [{"layers": 2, "hidden": 5}, {"layers": 1, "hidden": 8}]
    model = build("cmtr", VEC, width=4, num_modules=2, module_genes=genes)
    assert [[m.out_features for m in f.modules() if isinstance(m, torch.nn.Linear)] for f in model.shared] == [
        [5, 4], [4]]
    assert model(torch.randn(2, 6))["b"].shape == (2, 2)
    with pytest.raises(ValueError, match="num_modules"):
        build("cmtr", VEC, num_modules=0)
    with pytest.raises(ValueError, match="module_genes"):
        build("cmtr", VEC, num_modules=3, module_genes=genes)
    with pytest.raises(ValueError, match="hidden"):
        build("cmtr", VEC, num_modules=1, module_genes=[{"layers": 2, "hidden": 0}])
    assert isinstance(model, CMTR)


def test_each_challenger_is_spawned_from_the_champion_and_trained_before_it_is_scored():
    model = build("cmtr", VEC, width=4, num_modules=3, seed=2)
    calls = []

    def train(m):
        calls.append("train")
        for t in m.tasks:  # one vertex more than the champion, even after challengers have lost
            champion, challenger = m.routings[t]
            assert len(challenger.nodes) == len(champion.nodes) + 1
            assert any(_drop(challenger, v) == champion for v in range(1, len(challenger.nodes) + 1))

    def fitness(m, t, slot):
        calls.append("fitness")
        return float(slot == CHAMPION)  # every challenger loses

    for _ in range(4):
        calls.clear()
        meta_iteration(model, train, fitness)
        assert calls == ["train"] + ["fitness"] * 4
    assert all(len(model.routings[t][CHAMPION].nodes) == 1 for t in model.tasks)


def test_the_mutation_draws_every_source_every_later_destination_and_every_module(monkeypatch):
    from reference_impls.architectures import cmtr

    drawn = []
    monkeypatch.setattr(cmtr, "insert_node_at", lambda r, s, d, m: drawn.append((s, d, m)) or r)
    parent = Routing(((0, (0,)), (1, (1,)), (2, (2,))), (3,))  # vertices 0 (encoder output) .. 3
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        insert_node(parent, 4, generator)
    assert {s for s, _, _ in drawn} == {0, 1, 2, 3}
    for source in range(4):
        assert {d for s, d, _ in drawn if s == source} == {*range(source + 1, 4), None}, source
    assert {m for _, _, m in drawn} == {0, 1, 2, 3}


def test_task_parameters_are_both_individuals_encoders_and_decoders():
    model = build("cmtr", VEC, width=4, num_modules=3)
    for t in model.tasks:
        mine = {id(p) for p in model.task_specific_parameters(t)}
        assert mine == {id(p) for p in [*model.encoders[t].parameters(), *model.decoders[t].parameters()]}
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in model.shared.parameters()}


def _run_evolution_steps(seed, global_seed):
    """Build a model with ``seed``, spoil the global RNG with ``global_seed``, and mutate a few times."""
    torch.manual_seed(global_seed)
    model = build("cmtr", Problem(("a", "b", "c", "d"), (6,), {t: 1 for t in "abcd"}), width=4, num_modules=5,
                  seed=seed)
    history = [{t: model.routings[t][CHAMPION] for t in model.tasks}]
    for round_ in range(4):
        torch.manual_seed(global_seed + 100 + round_)
        model.spawn_challengers()
        history.append({t: model.routings[t][CHALLENGER] for t in model.tasks})
        for t in model.tasks:
            model.promote(t)
    return history


def test_evolution_is_reproducible_from_the_models_seed_alone():
    """Every draw of the routing evolution (first routings and mutations) comes from the model's own generator,
    so the global RNG has no say."""
    assert _run_evolution_steps(seed=3, global_seed=0) == _run_evolution_steps(seed=3, global_seed=1)
    generator = torch.Generator().manual_seed(4)
    parent = Routing(((0, (0,)), (1, (1,)), (2, (2,))), (3,))
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        generator.manual_seed(4)
        runs.append([insert_node(parent, 5, generator) for _ in range(10)])
    assert runs[0] == runs[1]


def test_module_evolution_is_reproducible_from_its_generator_alone():
    genes = tuple({"layers": 2, "hidden": 16} for _ in range(5))
    population = [genes] * 3 + [tuple({"layers": 1, "hidden": 8} for _ in range(5))] * 3
    fitnesses = [0.1, 0.9, 0.3, 0.8, 0.2, 0.0]
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(4)
        runs.append(([mutate_module_genes(genes, generator) for _ in range(10)],
                     next_module_population(population, fitnesses, 3, generator)))
    assert runs[0] == runs[1]


def test_module_mutation_picks_another_allowed_value_from_the_given_choices():
    generator = torch.Generator().manual_seed(8)
    choices = {"layers": (1, 4), "hidden": (16, 64, 128)}
    genes = tuple({"layers": 1, "hidden": 16} for _ in range(3))
    for _ in range(30):
        child = mutate_module_genes(genes, generator, choices)
        for gene in child:
            assert gene["layers"] in choices["layers"] and gene["hidden"] in choices["hidden"]
    population = [genes] * 4
    for child in next_module_population(population, [0.0, 1.0, 2.0, 3.0], 1, generator, choices)[1:]:
        changed = [g for g in child if g != {"layers": 1, "hidden": 16}]
        assert len(changed) == 1 and (changed[0]["layers"] == 4 or changed[0]["hidden"] in (64, 128))


def test_module_selection_accepts_a_single_elite_and_an_all_elite_population():
    """1 <= num_elite <= population size: the bounds themselves are valid choices."""
    generator = torch.Generator().manual_seed(9)
    population = [tuple({"layers": i + 1, "hidden": 8} for _ in range(2)) for i in range(3)]
    fitnesses = [0.5, 0.9, 0.1]
    everyone = next_module_population(population, fitnesses, 3, generator)
    assert everyone == [population[1], population[0], population[2]]  # just sorted, no children
    one = next_module_population(population, fitnesses, 1, generator)
    assert one[0] == population[1] and len(one) == 3


def test_a_node_cannot_feed_its_own_source_or_an_earlier_vertex_and_zero_layers_are_refused():
    routing = Routing(((0, (0,)), (1, (1,))), (2,))
    for destination in (0, 1):
        with pytest.raises(ValueError, match="destination"):
            insert_node_at(routing, 1, destination, 0)
    with pytest.raises(ValueError, match="layers"):
        module_from_gene((6,), 4, {"layers": 0, "hidden": 8})
