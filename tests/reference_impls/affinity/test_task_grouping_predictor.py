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
    with pytest.raises(RuntimeError, match="fit the predictor first"):
        TaskGroupingPredictor().predict(torch.zeros(1, 9))
    with pytest.raises(ValueError, match="num_groups"):
        random_partition(3, 4)
    stl, pair, loss, exact = planted(6)
    with pytest.raises(ValueError, match="partition"):
        grouping_search(stl, pair, loss, exact, ((0, 1), (2, 3)))
    with pytest.raises(ValueError, match="inverse_temperature"):
        grouping_search(stl, pair, loss, exact, ((0, 1, 2, 3, 4, 5),), inverse_temperature=0.0)


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
