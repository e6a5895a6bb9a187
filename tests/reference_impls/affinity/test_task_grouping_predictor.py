"""TGP (Ayman, Mukhopadhyay & Laszka, 2023): group features are the released scripts' member and
pair statistics, the network learns a planted gain, and the predictor-filtered search only
trains what the predictor promises (plus exploration) and accepts by the Metropolis rule."""

import itertools

import pytest
import torch

from reference_impls.affinity import task_grouping_predictor as tgp
from reference_impls.affinity.task_grouping_predictor import (
    FEATURES,
    GuidedPredictor,
    TaskDescription,
    TaskGroupingPredictor,
    group_features,
    group_gains,
    grouping_search,
    head_weight_affinity,
    pairwise_gains,
    propose_move,
    random_partition,
    task_distances,
    task_statistics,
)

D = torch.float64


def symmetric(k, g):
    a = torch.randn(k, k, generator=g, dtype=D)
    return a + a.T


def description(k, g):
    labels = [torch.randn(n, generator=g, dtype=D) * (t + 1) for t, n in enumerate(range(5, 5 + k))]
    sizes, variance, std = task_statistics(labels)
    stl = torch.rand(k, generator=g, dtype=D) + 1
    pair = (stl[:, None] + stl[None, :]) * (1 - 0.3 * torch.rand(k, k, generator=g, dtype=D))
    pair = (pair + pair.T) / 2
    return TaskDescription(sizes, variance, std, symmetric(k, g), pairwise_gains(stl, pair),
                           head_weight_affinity(torch.randn(k, 3, generator=g, dtype=D))), stl, pair


def test_task_statistics_distances_and_pair_tables_by_hand():
    g = torch.Generator().manual_seed(0)
    sizes, variance, std = task_statistics([torch.tensor([1.0, 2.0, 4.0], dtype=D), torch.tensor([0.0, 2.0], dtype=D)])
    torch.testing.assert_close(sizes, torch.tensor([3.0, 2.0], dtype=D))
    torch.testing.assert_close(variance, torch.tensor([7 / 3, 2.0], dtype=D))  # sample variance (ddof 1)
    torch.testing.assert_close(std, variance.sqrt())
    rows = [torch.randn(4, 3, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D)]
    brute = torch.stack([(a - b).norm() for a in rows[0] for b in rows[1]]).mean()
    torch.testing.assert_close(task_distances(rows)[0, 1], brute)
    gains = pairwise_gains(torch.tensor([1.0, 3.0], dtype=D), torch.tensor([[0.0, 3.0], [3.0, 0.0]], dtype=D))
    torch.testing.assert_close(gains, torch.tensor([[0.0, 0.25], [0.25, 0.0]], dtype=D))  # (1 + 3 − 3) / 4
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=D)
    assert head_weight_affinity(w)[0, 1] == 1.0  # 1·3 + 2·(−1)


def test_group_features_are_member_means_and_statistics_over_member_pairs():
    k = 6
    g = torch.Generator().manual_seed(1)
    task, stl, pair = description(k, g)
    groups = [(0, 2, 3), (1, 4), (0, 1, 2, 3, 5)]
    masks = torch.zeros(len(groups), k, dtype=torch.bool)
    for row, members in enumerate(groups):
        masks[row, list(members)] = True
    feats = group_features(task, masks)
    for row, members in enumerate(groups):
        m = list(members)
        pairs = list(itertools.combinations(m, 2))
        gain = torch.stack([task.pair_gain[a, b] for a, b in pairs])
        expected = {
            "group_variance": task.variance[m].mean(), "group_stddev": task.stddev[m].mean(),
            "group_distance": torch.stack([task.distance[a, b] for a, b in pairs]).mean(),
            "number_of_tasks": torch.tensor(float(len(m)), dtype=D),
            "group_dataset_size": task.sizes[m].mean(),
            "pairwise_improvement_average": gain.mean(),
            "pairwise_improvement_variance": gain.var(unbiased=False),  # numpy's np.var
            "pairwise_improvement_stddev": gain.std(unbiased=False),
            "pairwise_weight_average": torch.stack([task.weight_affinity[a, b] for a, b in pairs]).mean(),
        }
        for name, value in expected.items():
            torch.testing.assert_close(feats[row, FEATURES.index(name)], value, msg=name)
    # the target: relative drop of the summed loss when the group trains together
    loss = torch.tensor([2.0, 1.0, 3.0], dtype=D)
    alone = torch.stack([stl[list(m)].sum() for m in groups])
    torch.testing.assert_close(group_gains(masks, stl, loss), (alone - loss) / alone)


def all_groups(k, sizes):
    groups = [c for r in sizes for c in itertools.combinations(range(k), r)]
    masks = torch.zeros(len(groups), k, dtype=torch.bool)
    for row, members in enumerate(groups):
        masks[row, list(members)] = True
    return masks


def test_predictor_learns_a_planted_gain_and_generalises_to_unseen_groups():
    k = 8
    g = torch.Generator().manual_seed(2)
    task, _, _ = description(k, g)
    masks = all_groups(k, (3, 4, 5))
    feats = group_features(task, masks)
    pair_mean = feats[:, FEATURES.index("pairwise_improvement_average")]
    size = feats[:, FEATURES.index("number_of_tasks")]
    gains = torch.tanh(8 * (pair_mean - pair_mean.mean())) - 0.05 * size  # non-linear in the features
    order = torch.randperm(len(masks), generator=g)
    train, test = order[:130], order[130:]
    model = TaskGroupingPredictor(hidden=(16, 16), lr=0.01, epochs=60).fit(feats[train], gains[train], g)
    residual = (model.predict(feats[test]) - gains[test]).square().mean()
    assert residual < 0.05 * gains[test].var()  # R² above 0.95 on groups never seen
    assert model.predict(feats).dtype == D


def planted(k):
    """Group loss: gain +0.3 per task pair inside the hidden blocks {0,1,2} {3,4,5}, −0.4 across."""
    stl = torch.ones(k, dtype=D)
    block = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.long)

    def gain(members):
        pairs = list(itertools.combinations(members, 2))
        if not pairs:
            return 0.0
        return sum(0.3 if block[a] == block[b] else -0.4 for a, b in pairs) / len(pairs)

    def loss(members):
        return float(stl[list(members)].sum() * (1 - gain(members)))

    pair = torch.tensor([[loss((a, b)) if a != b else 0.0 for b in range(k)] for a in range(k)], dtype=D)
    exact = lambda masks: torch.tensor([gain(row.nonzero().squeeze(1).tolist()) for row in masks], dtype=D)
    return stl, pair, loss, exact


def test_with_an_exact_predictor_and_no_exploration_only_improving_moves_are_trained(monkeypatch):
    monkeypatch.setattr(tgp, "explore_probability", lambda evaluations: 0.0)
    stl, pair, loss, exact = planted(6)
    trained = []

    def train_group(members):
        trained.append(members)
        return loss(members)

    initial = ((0, 3), (1, 4), (2, 5))
    result = grouping_search(stl, pair, train_group, exact, initial, max_proposals=300, trust=1.0,
                             generator=torch.Generator().manual_seed(3))
    assert result.loss == result.best_loss  # every trained move improved, so was accepted
    assert result.best_partition == ((0, 1, 2), (3, 4, 5)) and result.best_loss == pytest.approx(6 * 0.7)
    assert result.evaluations < 0.2 * result.proposals  # the predictor rejected most proposals untrained
    assert result.trainings == len(trained) == len(set(trained))  # a group trains once


def test_metropolis_acceptance_keeps_only_improvements_when_cold_and_wanders_when_hot():
    stl, pair, loss, _ = planted(6)
    promise_everything = lambda masks: torch.ones(len(masks), dtype=D)  # every proposal predicted better
    initial = ((0, 3), (1, 4), (2, 5))
    cold = grouping_search(stl, pair, loss, promise_everything, initial, max_proposals=200, trust=1.0,
                           inverse_temperature=1e6, generator=torch.Generator().manual_seed(4))
    assert cold.evaluations == cold.proposals == 200  # the predictor let everything through
    assert cold.loss == cold.best_loss  # a worse partition is never accepted at β → ∞
    hot = grouping_search(stl, pair, loss, promise_everything, initial, max_proposals=200, trust=1.0,
                          inverse_temperature=1e-6, generator=torch.Generator().manual_seed(4))
    assert hot.loss > hot.best_loss + 0.5  # at β → 0 every move is taken, good or bad


def test_budget_counts_trainings_of_three_tasks_or_more_and_the_predictor_is_retrained():
    stl, pair, loss, _ = planted(6)
    g = torch.Generator().manual_seed(5)
    task = TaskDescription(torch.full((6,), 10.0, dtype=D), torch.ones(6, dtype=D), torch.ones(6, dtype=D),
                           torch.zeros(6, 6, dtype=D), pairwise_gains(stl, pair), torch.zeros(6, 6, dtype=D))
    start = all_groups(6, (3,))[:6]
    guide = GuidedPredictor(TaskGroupingPredictor(hidden=(4,), epochs=5), task, stl, start,
                            torch.tensor([loss(tuple(r.nonzero().squeeze(1).tolist())) for r in start], dtype=D), g)
    seen = []

    def observe(masks, losses):
        assert (masks.sum(1) >= 3).all()
        seen.append(len(masks))
        guide.observe(masks, losses)

    result = grouping_search(stl, pair, loss, guide, ((0, 1, 2, 3, 4, 5),), budget=6, observe=observe,
                             generator=g)
    assert result.trainings >= 6 and result.trainings <= 7  # stops once the budget is spent
    assert seen and len(guide.masks) == 6 + sum(seen)


def test_random_partition_and_moves_keep_a_partition():
    g = torch.Generator().manual_seed(6)
    part = random_partition(10, 3, g)
    assert sorted(len(p) for p in part) == [3, 3, 4] and sorted(sum(part, ())) == list(range(10))
    for _ in range(50):
        new, changed = propose_move(part, 10, g)
        assert sorted(sum(new, ())) == list(range(10)) and all(new)
        assert set(changed) == set(new) - set(part)
        part = new
    for seed in range(20):  # a task alone never makes a new group: its group disappears instead
        new, changed = propose_move(((0,), (1,), (2,)), 3, torch.Generator().manual_seed(seed))
        assert len(new) == 2 and len(changed) == 1 and len(changed[0]) == 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="features"):
        TaskGroupingPredictor(features=("not_a_feature",))
    with pytest.raises(ValueError, match="hidden"):
        TaskGroupingPredictor(hidden=(4, 0))
    with pytest.raises(ValueError, match="validation_fraction"):
        TaskGroupingPredictor(validation_fraction=1.0)
    for name in ("epochs", "batch_size"):
        with pytest.raises(ValueError, match=name):
            TaskGroupingPredictor(**{name: 0})
    with pytest.raises(ValueError, match="lr"):
        TaskGroupingPredictor(lr=0.0)
    with pytest.raises(ValueError, match="num_groups"):
        random_partition(3, 0)
    with pytest.raises(RuntimeError, match="fit the predictor first"):
        TaskGroupingPredictor().predict(torch.zeros(1, 9))
    with pytest.raises(ValueError, match="num_groups"):
        random_partition(3, 4)
    stl, pair, loss, exact = planted(6)
    with pytest.raises(ValueError, match="partition"):
        grouping_search(stl, pair, loss, exact, ((0, 1), (2, 3)))
    with pytest.raises(ValueError, match="inverse_temperature"):
        grouping_search(stl, pair, loss, exact, ((0, 1, 2, 3, 4, 5),), inverse_temperature=0.0)
    for name in ("budget", "max_proposals"):
        with pytest.raises(ValueError, match=name):
            grouping_search(stl, pair, loss, exact, ((0, 1, 2, 3, 4, 5),), **{name: -1})
    with pytest.raises(ValueError, match="num_tasks"):  # one task has nothing to group
        grouping_search(stl[:1], pair[:1, :1], loss, exact, ((0,),))


def test_proposals_the_predictor_rejects_are_still_trained_at_the_exploration_rate():
    assert [tgp.explore_probability(n) for n in (1, 49, 50, 99, 100, 10_000)] == [0.1, 0.1, 0.05, 0.05, 0.005, 0.005]
    stl, pair, loss, _ = planted(6)
    reject_everything = lambda masks: torch.full((len(masks),), -10.0, dtype=D)  # every proposal predicted worse
    result = grouping_search(stl, pair, loss, reject_everything, ((0, 3), (1, 4), (2, 5)), max_proposals=300,
                             generator=torch.Generator().manual_seed(7))
    assert 15 <= result.evaluations <= 45  # about 10 % of 300


@pytest.mark.parametrize("n, held", [(7, 2), (3, 1), (10, 2), (11, 3)])
def test_held_out_tail_has_the_size_of_keras_validation_split(monkeypatch, n, held):
    # Keras trains on the first floor(n (1 - fraction)) rows and validates on the rest
    seen = []
    randperm = torch.randperm

    def spy(size, *args, **kwargs):
        seen.append(size)
        return randperm(size, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", spy)
    g = torch.Generator().manual_seed(0)
    feats, gains = torch.randn(n, len(FEATURES), generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    TaskGroupingPredictor(hidden=(4,), epochs=1).fit(feats, gains, g)
    assert seen == [n - held]


def test_guided_predictor_trains_only_on_groups_of_three_or_more():
    # the released data preparation drops groups of one or two tasks before the predictor sees them
    k = 6
    g = torch.Generator().manual_seed(7)
    task, stl, pair = description(k, g)
    masks = all_groups(k, (1, 2, 3))
    losses = stl.sum() * torch.rand(len(masks), generator=g, dtype=D)
    guide = GuidedPredictor(TaskGroupingPredictor(hidden=(4,), epochs=2), task, stl, masks, losses, g)
    assert len(guide.masks) == 20 and (guide.masks.sum(1) >= 3).all()
    guide.observe(all_groups(k, (2, 4)), torch.ones(15 + 15, dtype=D))
    assert len(guide.masks) == 20 + 15 and len(guide.gains) == 35


def test_the_school_run_defaults_and_a_sigmoid_network():
    """Trust 0.99, β = 5, retraining every 5 evaluations; sigmoid 57-23-18-53 at learning rate 0.00166."""
    import inspect

    defaults = inspect.signature(grouping_search).parameters
    assert defaults["trust"].default == 0.99 and defaults["inverse_temperature"].default == 5.0
    assert defaults["observe_every"].default == 5
    model = TaskGroupingPredictor(epochs=1).fit(torch.randn(10, 9, dtype=D), torch.randn(10, dtype=D),
                                                torch.Generator().manual_seed(0))
    assert model.lr == 0.00166
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [57, 23, 18, 53, 1]
    assert [type(m) for m in model.net if not isinstance(m, torch.nn.Linear)] == [torch.nn.Sigmoid] * 4


def test_glorot_uniform_weights_zero_biases_and_population_standardisation():
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(12, 9, generator=g, dtype=D)
    model = TaskGroupingPredictor(hidden=(300,), epochs=1)
    net = model._build(feats, g)
    bound = (6 / (5 + 300)) ** 0.5
    assert net[0].weight.abs().max() <= bound and net[0].weight.abs().max() > 0.95 * bound
    assert all((m.bias == 0).all() for m in net if isinstance(m, torch.nn.Linear))
    model.fit(feats, torch.randn(12, generator=g, dtype=D), g)
    x = feats[:, model.columns]
    torch.testing.assert_close(model.scale, x.std(0, unbiased=False))  # divides by n, not n − 1


def test_the_weights_with_the_lowest_held_out_loss_are_kept():
    """Runs of 1..E epochs with one seed share their first epochs: the E-epoch fit must hold the
    held-out loss of the best epoch, the minimum over the shorter runs, even with a jumpy step."""
    data = torch.Generator().manual_seed(9)
    feats, gains = torch.randn(20, 9, generator=data, dtype=D), torch.randn(20, generator=data, dtype=D)

    def held_out_loss(epochs):
        model = TaskGroupingPredictor(hidden=(4,), lr=0.5, epochs=epochs)
        model.fit(feats, gains, torch.Generator().manual_seed(1))
        return (model.predict(feats[16:]) - gains[16:]).square().mean().item()

    losses = [held_out_loss(e) for e in range(1, 9)]
    assert losses[-1] == pytest.approx(min(losses)) and losses == sorted(losses, reverse=True)


def test_a_proposal_predicted_only_as_good_as_the_current_partition_is_not_promising(monkeypatch):
    """Quick reject trains a proposal predicted strictly better; an equal prediction needs exploration."""
    monkeypatch.setattr(tgp, "explore_probability", lambda evaluations: 0.0)
    stl = torch.ones(6, dtype=D)
    pair = torch.full((6, 6), 2.0, dtype=D)  # no pair gains: every partition costs 6
    no_gain = lambda masks: torch.zeros(len(masks), dtype=D)  # noqa: E731  predicts 6 for every proposal too
    result = grouping_search(stl, pair, lambda members: float(len(members)), no_gain, ((0, 1, 2, 3, 4, 5),),
                             max_proposals=50, trust=1.0, generator=torch.Generator().manual_seed(0))
    assert result.proposals == 50 and result.evaluations == 0 and result.loss == 6.0


def test_the_exploration_rate_is_looked_up_with_the_evaluation_about_to_be_made(monkeypatch):
    """As the released script's count (its log holds one row more than the evaluations made), the n-th
    evaluation reads explore_probability(n): the first reads 1, so the 0.05 rate starts at the 50th."""
    asked = []

    def always_explore(evaluations):
        asked.append(evaluations)
        return 1.0

    monkeypatch.setattr(tgp, "explore_probability", always_explore)
    stl, pair, loss, exact = planted(6)
    # trust 0: no proposal counts as promising, so every one is trained by exploration alone
    result = grouping_search(stl, pair, loss, exact, ((0, 3), (1, 4), (2, 5)), max_proposals=10, trust=0.0,
                             generator=torch.Generator().manual_seed(1))
    assert result.evaluations == 10 and asked == list(range(1, 11))


def test_pairs_with_equal_gains_have_zero_variance_and_a_zero_not_nan_stddev():
    """Σ g² / n − (Σ g / n)² can round below 0 (here for g = 0.1); the variance is held at 0."""
    k = 4
    gains = torch.full((k, k), 0.1, dtype=D).fill_diagonal_(0)
    ones, zeros = torch.ones(k, dtype=D), torch.zeros(k, k, dtype=D)
    task = TaskDescription(ones, ones, ones, zeros, gains, zeros)
    masks = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    feats = group_features(task, masks)
    for name in ("pairwise_improvement_variance", "pairwise_improvement_stddev"):
        assert feats[:, FEATURES.index(name)].tolist() == [0.0, 0.0], name
    torch.testing.assert_close(feats[:, FEATURES.index("pairwise_improvement_average")],
                               torch.full((2,), 0.1, dtype=D))


def test_the_best_partition_changes_only_for_a_strictly_lower_loss():
    """Every partition costs 6 here: however many are trained, the starting one stays the best found."""
    stl = torch.ones(6, dtype=D)
    pair = torch.full((6, 6), 2.0, dtype=D)
    promise_everything = lambda masks: torch.ones(len(masks), dtype=D)  # noqa: E731
    start = ((0, 1, 2, 3, 4, 5),)
    result = grouping_search(stl, pair, lambda members: float(len(members)), promise_everything, start,
                             max_proposals=30, trust=1.0, generator=torch.Generator().manual_seed(2))
    assert result.evaluations == 30 and result.partition != start  # it did move (every move is accepted)
    assert result.best_partition == start and result.best_loss == 6.0


def test_one_group_singletons_and_two_tasks_are_the_smallest_allowed_cases():
    assert random_partition(5, 1, torch.Generator().manual_seed(0)) == ((0, 1, 2, 3, 4),)
    assert random_partition(4, 4, torch.Generator().manual_seed(0)) == ((0,), (1,), (2,), (3,))
    # two tasks that gain from sharing: the search finds the pair from the singletons
    stl, pair = torch.ones(2, dtype=D), torch.tensor([[0.0, 1.5], [1.5, 0.0]], dtype=D)
    result = grouping_search(stl, pair, lambda members: 0.0, lambda masks: torch.ones(len(masks), dtype=D),
                             ((0,), (1,)), max_proposals=10, trust=1.0, generator=torch.Generator().manual_seed(1))
    assert result.best_partition == ((0, 1),) and result.best_loss == 1.5


def test_without_standardisation_or_held_out_rows_the_network_trains_on_the_raw_features_of_every_row():
    """standardise=False feeds the features as they are; validation_fraction=0 (allowed) holds nothing out,
    so even a single group trains the network, and the last weights are kept."""
    g = torch.Generator().manual_seed(10)
    feats, gain = torch.randn(1, 9, generator=g, dtype=D), torch.tensor([2.0], dtype=D)
    model = TaskGroupingPredictor(hidden=(4,), lr=0.05, epochs=20, validation_fraction=0.0, standardise=False)
    untrained = model._build(feats, torch.Generator().manual_seed(11))(feats[:, model.columns]).squeeze(1)
    model.fit(feats, gain, torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(model.predict(feats), model.net(feats[:, model.columns]).squeeze(1))
    assert (model.predict(feats) - gain).abs() < 0.5 * (untrained - gain).abs()


def test_the_guided_predictor_trains_with_the_generator_it_is_given():
    """Its fits draw from its own generator: the same as fitting the predictor directly with a twin of it."""
    k = 6
    task, stl, _ = description(k, torch.Generator().manual_seed(12))
    masks, more = all_groups(k, (3,)), all_groups(k, (4,))
    losses = stl.sum() * torch.linspace(0.5, 0.9, len(masks), dtype=D)
    new_losses = stl.sum() * torch.linspace(0.6, 0.8, len(more), dtype=D)
    make = lambda: TaskGroupingPredictor(hidden=(4,), epochs=3)  # noqa: E731
    guide = GuidedPredictor(make(), task, stl, masks, losses, torch.Generator().manual_seed(13))
    twin_generator = torch.Generator().manual_seed(13)
    direct = make().fit(group_features(task, masks), group_gains(masks, stl, losses), twin_generator)
    every = all_groups(k, (3, 4, 5))
    torch.testing.assert_close(guide(every), direct.predict(group_features(task, every)))
    guide.observe(more, new_losses)
    both = torch.cat([masks, more])
    direct.fit(group_features(task, both), group_gains(both, stl, torch.cat([losses, new_losses])), twin_generator)
    torch.testing.assert_close(guide(every), direct.predict(group_features(task, every)))


def test_a_seeded_search_is_reproducible_and_reports_where_it_stopped():
    """Every draw (moves, exploration, acceptance, the initial partition) comes from the given generator."""
    for seed in range(5):
        assert random_partition(10, 3, torch.Generator().manual_seed(seed)) == \
            random_partition(10, 3, torch.Generator().manual_seed(seed))
    stl, pair, loss, _ = planted(6)
    reject_everything = lambda masks: torch.full((len(masks),), -10.0, dtype=D)  # noqa: E731  exploration only
    runs = [grouping_search(stl, pair, loss, reject_everything, ((0, 3), (1, 4), (2, 5)), max_proposals=200,
                            generator=torch.Generator().manual_seed(14)) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].evaluations > 0
    stop = runs[0].partition
    assert sorted(sum(stop, ())) == list(range(6))
    assert runs[0].loss == pytest.approx(sum(loss(g) if len(g) > 2 else
                                             float(stl[g[0]]) if len(g) == 1 else float(pair[g]) for g in stop))


def cheap_alone(k):
    """Single tasks cost 0.001, any shared group 1 or more: a predictor promising every group a gain of 1
    predicts every move better than where the search stands."""
    loss = lambda members: 1.0 + sum(members) / 30  # noqa: E731  not a float32 number
    pair = torch.tensor([[loss((a, b)) for b in range(k)] for a in range(k)], dtype=D)
    return torch.full((k,), 0.001, dtype=D), pair, loss


def test_every_fifth_evaluation_hands_the_new_groups_of_three_or_more_and_their_losses_to_observe(monkeypatch):
    """The schedule written out: after evaluations 5, 10, 15, ... ``observe`` gets the changed groups of three
    tasks or more gathered since its last call, as boolean masks, with their losses in the losses' dtype."""
    stl, pair, loss = cheap_alone(6)
    promise_everything = lambda masks: torch.ones(len(masks), dtype=D)  # noqa: E731  every proposal trained
    changed_groups, calls = [], []
    original_move = tgp.propose_move

    def move(partition, num_tasks, generator=None):
        new, changed = original_move(partition, num_tasks, generator)
        changed_groups.append(changed)
        return new, changed

    def observe(masks, losses):
        assert masks.dtype == torch.bool and losses.dtype == D
        groups = [tuple(row.nonzero().squeeze(1).tolist()) for row in masks]
        assert losses.tolist() == [loss(g) for g in groups]
        calls.append((len(changed_groups), groups))

    monkeypatch.setattr(tgp, "propose_move", move)
    result = grouping_search(stl, pair, loss, promise_everything, ((0, 3), (1, 4), (2, 5)), max_proposals=40,
                             trust=1.0, observe=observe, generator=torch.Generator().manual_seed(15))
    assert result.evaluations == 40
    expected, pending = [], []
    for n, changed in enumerate(changed_groups, start=1):
        pending += [g for g in changed if len(g) >= 3]
        if n % 5 == 0 and pending:
            expected.append((n, pending))
            pending = []
    assert len(expected) >= 4 and calls == expected


def test_by_default_a_promising_proposal_is_trained_with_probability_0_99_and_accepted_with_beta_5(monkeypatch):
    """The School run's trust 0.99 and Metropolis acceptance min(1, exp(β (L − L'))) with β = 5."""
    monkeypatch.setattr(tgp, "explore_probability", lambda evaluations: 0.0)
    stl, pair, loss = cheap_alone(6)
    promise_everything = lambda masks: torch.ones(len(masks), dtype=D)  # noqa: E731
    result = grouping_search(stl, pair, loss, promise_everything, ((0, 3), (1, 4), (2, 5)), max_proposals=1000,
                             generator=torch.Generator().manual_seed(16))
    assert 1 <= result.proposals - result.evaluations <= 30  # about 1 % of promising proposals go untrained
    trusting = grouping_search(stl, pair, loss, promise_everything, ((0, 3), (1, 4), (2, 5)), max_proposals=1000,
                               trust=1.0, generator=torch.Generator().manual_seed(16))
    assert trusting.evaluations == 1000  # every proposal here is promising
    # two tasks whose pair costs 0.2 more than the singletons: moving to the pair has exp(−5 · 0.2) = e^−1
    exponents = []
    exp = tgp.math.exp
    monkeypatch.setattr(tgp, "math", type("MathSpy", (), {"exp": staticmethod(lambda a: exponents.append(a) or exp(a)),
                                                           "floor": staticmethod(tgp.math.floor)}))
    stl2, pair2 = torch.ones(2, dtype=D), torch.tensor([[0.0, 2.2], [2.2, 0.0]], dtype=D)
    grouping_search(stl2, pair2, lambda members: 0.0, promise_everything, ((0,), (1,)), max_proposals=20, trust=1.0,
                    generator=torch.Generator().manual_seed(17))
    worse = [a for a in exponents if a < 0]
    assert worse and all(a == pytest.approx(-1.0) for a in worse)


def test_by_default_the_search_stops_once_1000_group_trainings_are_spent(monkeypatch):
    """The paper's budget: no proposal is drawn after the 1000th multi-task training."""
    k = 12  # 4017 groups of three tasks or more: the budget, not the groups, runs out
    stl, pair, loss = cheap_alone(k)
    trained_before_proposal, trained = [], []
    original_move = tgp.propose_move

    def move(partition, num_tasks, generator=None):
        trained_before_proposal.append(len(trained))
        return original_move(partition, num_tasks, generator)

    monkeypatch.setattr(tgp, "propose_move", move)
    result = grouping_search(stl, pair, lambda members: trained.append(members) or loss(members),
                             lambda masks: torch.ones(len(masks), dtype=D), tuple((t,) for t in range(k)), trust=1.0,
                             inverse_temperature=1e-6, generator=torch.Generator().manual_seed(18))
    assert result.trainings == len(trained) >= 1000 and max(trained_before_proposal) < 1000
