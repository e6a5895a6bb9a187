import torch

from reference_impls.weighting import selective_group_updates
from reference_impls.toy.regression import make_problem
from reference_impls.weighting.selective_group_updates import SelectiveGroupUpdates, affinity_propagation


def test_affinity_of_a_single_task_group_matches_hand_computation():
    method = SelectiveGroupUpdates(num_tasks=3, decay=1.0)  # β = 1: the entry is the latest value
    method.record([0], before=torch.tensor([2.0, 4.0, 1.0]), after=torch.tensor([1.0, 3.0, 1.5]))
    # a_t = 1 - L_t' / L_t = (1 - 1/2, 1 - 3/4, 1 - 1.5/1); only row 0 (the stepped task) changes
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0] = torch.tensor([0.5, 0.25, -0.5])
    assert torch.allclose(method.affinity, expected)


def test_in_group_rules_and_moving_average():
    method = SelectiveGroupUpdates(num_tasks=3, decay=0.5)
    method.affinity.fill_(1.0)
    method.record([0, 1], before=torch.tensor([2.0, 2.0, 2.0]), after=torch.tensor([1.0, 3.0, 1.0]))
    # a = (1/2, -1/2, 1/2) / |G| = (0.25, -0.25, 0.25)
    # A[0,0]: 0.25; A[0,1], A[1,0]: opposite signs -> -max(0.25, -0.25) = -0.25; A[s,2]: 0.25
    # A[1,1]: a_1 < 0, not updated. Each update is 0.5 * old (1) + 0.5 * value.
    expected = torch.tensor([[0.625, 0.375, 0.625], [0.375, 1.0, 0.625], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(method.affinity, expected)


def test_normalised_affinity_and_grouping_by_hand():
    method = SelectiveGroupUpdates(num_tasks=2)
    method.affinity.copy_(torch.tensor([[2.0, 0.5], [1.0, 1.0]]))
    # columns divided by A[t,t] = (2, 1): [[1, 0.5], [0.5, 1]], already symmetric
    assert torch.allclose(method.normalized_affinity(), torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64))
    method = SelectiveGroupUpdates(num_tasks=4)
    method.affinity.copy_(torch.tensor([
        [1.0, 0.8, -0.5, -0.4],
        [0.9, 1.0, -0.3, -0.6],
        [-0.5, -0.2, 1.0, 0.7],
        [-0.4, -0.5, 0.8, 1.0],
    ]))
    assert sorted(method.regroup()) == [[0, 1], [2, 3]]  # helpful pairs together, harmful apart


def test_affinity_propagation_finds_obvious_clusters():
    points = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 9.0])
    similarity = -(points[:, None] - points[None, :]) ** 2
    # preference (self-similarity) = median similarity: 9.0 is closer to 5.x (-16) than that
    assert sorted(affinity_propagation(similarity)) == [[0, 1, 2], [3, 4, 5]]
    # a preference of -1 makes an own exemplar cheaper than joining 5.x
    assert sorted(affinity_propagation(similarity, preference=-1.0)) == [[0, 1, 2], [3, 4], [5]]
    assert affinity_propagation(torch.zeros(1, 1)) == [[0]]


def test_no_regrouping_before_every_task_has_a_positive_self_affinity():
    method = SelectiveGroupUpdates(num_tasks=3)
    assert method.regroup() == [[0], [1], [2]]  # all-zero affinity: keep one task per group
    method.affinity.copy_(torch.eye(3))
    method.affinity[2, 2] = 0.0
    assert method.regroup() == [[0], [1], [2]]
    # A finite negative self-affinity: clustering would pair 0 and 1 (the positive case below),
    # but dividing column 2 by A[2, 2] < 0 flips its signs, so the groups are kept.
    pairs = torch.tensor([[1.0, 0.8, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 0.5]])
    method.affinity.copy_(pairs)
    method.affinity[2, 2] = -0.5
    assert method.regroup() == [[0], [1], [2]]
    method.affinity.copy_(pairs)
    assert sorted(method.regroup()) == [[0, 1], [2]]


def test_warm_up_keeps_one_task_per_group():
    method = SelectiveGroupUpdates(num_tasks=3, warmup_steps=5, generator=torch.Generator().manual_seed(0))
    method.affinity.copy_(torch.tensor([[1.0, 0.8, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 0.5]]))
    assert method.groups_per_step(4) == 3  # affinity would already pair tasks 0 and 1
    assert method.groups_per_step(5) == 2 and sorted(method.groups) == [[0, 1], [2]]


def test_each_batch_steps_once_per_group_in_random_order():
    method = SelectiveGroupUpdates(num_tasks=3, warmup_steps=10**6, generator=torch.Generator().manual_seed(0))
    orders = []
    for step in range(6):
        masks = [method.weights(torch.ones(3), step=step) for _ in range(method.groups_per_step(step))]
        assert len(masks) == 3 and all(m.sum() == 1 for m in masks)
        assert torch.equal(torch.stack(masks).sum(dim=0), torch.ones(3))  # every task once
        orders.append(tuple(int(m.argmax()) for m in masks))
    assert len(set(orders)) > 1  # the order is reshuffled
    single = SelectiveGroupUpdates(num_tasks=1)
    assert single.groups_per_step(0) == 2  # one group is stepped twice so it can be measured


def test_affinity_is_only_recorded_within_a_batch():
    method = SelectiveGroupUpdates(num_tasks=2, decay=1.0, warmup_steps=10**6, generator=torch.Generator().manual_seed(1))
    method.weights(torch.tensor([1.0, 1.0]), step=0)
    first = method._last_group
    method.weights(torch.tensor([0.5, 0.75]), step=0)  # after the first group's step, same batch
    assert torch.allclose(method.affinity[first[0]], torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert method.affinity[1 - first[0]].eq(0).all()  # not stepped on yet
    snapshot = method.affinity.clone()
    method.weights(torch.tensor([9.0, 9.0]), step=1)  # a new batch: its losses are not compared
    assert torch.equal(method.affinity, snapshot)


def run_groups(method: SelectiveGroupUpdates, losses_fn, params, steps: int, lr: float) -> None:
    """Training loop of the docstring, with plain gradient descent."""
    for step in range(steps):
        for _ in range(method.groups_per_step(step)):
            losses = losses_fn()
            mask = method.weights(losses, step=step)
            grads = torch.autograd.grad((mask * losses).sum(), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= lr * g


def test_tracking_during_training_groups_cooperating_tasks():
    target = torch.tensor([1.0, -2.0, 0.5])
    w = torch.zeros(3, requires_grad=True)

    def losses() -> torch.Tensor:  # tasks 0 and 1 want w near +target, task 2 near -target
        return torch.stack([(w - target).square().sum(), (w - 1.2 * target).square().sum(), (w + target).square().sum()])

    method = SelectiveGroupUpdates(num_tasks=3, decay=0.1, warmup_steps=15, generator=torch.Generator().manual_seed(0))
    run_groups(method, losses, [w], steps=25, lr=0.05)
    a = method.affinity
    assert a[0, 1] > 0 and a[1, 0] > 0  # stepping on one of the pair lowers the other's loss
    assert a[0, 2] < 0 and a[2, 0] < 0 and a[1, 2] < 0 and a[2, 1] < 0
    assert sorted(method.regroup()) == [[0, 1], [2]]


def test_training_reduces_total_loss():
    problem = make_problem(0)
    params = list(problem.model.parameters())
    method = SelectiveGroupUpdates(num_tasks=2, warmup_steps=20, generator=torch.Generator().manual_seed(0))
    initial = problem.losses().sum().item()
    run_groups(method, problem.losses, params, steps=50, lr=0.02)
    final = problem.losses().sum().item()
    assert final < 0.2 * initial
    assert torch.isfinite(method.affinity).all()


def test_zero_losses_stay_finite():
    method = SelectiveGroupUpdates(num_tasks=3, decay=0.5)
    method.record([0, 1], before=torch.tensor([0.0, 1.0, 0.0]), after=torch.tensor([0.0, 0.0, 0.0]))
    assert torch.isfinite(method.affinity).all()
    # a_1 = (1 - 0/1) / 2 = 0.5, times β = 0.5; tasks 0 and 2 had loss 0: no ratio, no entry
    assert method.affinity[1, 1] == 0.25 and method.affinity[:, [0, 2]].eq(0).all()
    assert torch.isfinite(method.weights(torch.zeros(3), step=0)).all()


def test_own_entry_is_updated_at_zero_drop_and_the_default_decay_is_1e_3():
    method = SelectiveGroupUpdates(num_tasks=2, decay=0.5)
    method.affinity.fill_(1.0)
    method.record([0], before=torch.tensor([2.0, 2.0]), after=torch.tensor([2.0, 1.0]))
    # a = (0, 1/2): a_0 = 0 >= 0 still counts for A[0, 0]; A[0, 1] = ½ · 1 + ½ · ½
    assert torch.equal(method.affinity[0], torch.tensor([0.5, 0.75], dtype=torch.float64))
    default = SelectiveGroupUpdates(num_tasks=2)
    default.record([0], before=torch.tensor([2.0, 4.0]), after=torch.tensor([1.0, 3.0]))
    assert torch.allclose(default.affinity[0], 1e-3 * torch.tensor([0.5, 0.25], dtype=torch.float64))


def test_normalised_affinity_is_symmetrised():
    method = SelectiveGroupUpdates(num_tasks=2)
    method.affinity.copy_(torch.tensor([[2.0, 1.0], [0.5, 1.0]]))
    # columns over (2, 1): [[1, 1], [0.25, 1]]; its mean with the transpose has 0.625 off the diagonal
    assert torch.equal(method.normalized_affinity(), torch.tensor([[1.0, 0.625], [0.625, 1.0]], dtype=torch.float64))


def test_an_exemplar_stays_in_its_own_cluster():
    points = torch.tensor([0.0, 1.0, 3.0, 4.0])
    similarity = -(points[:, None] - points[None, :]) ** 2
    # exemplars 1 and 3: the point 1 is closer to the exemplar 3 (-4) than its preference (-4.5)
    assert sorted(affinity_propagation(similarity, preference=-4.5)) == [[0, 1], [2, 3]]


def test_groups_are_kept_when_the_clustering_does_not_converge(monkeypatch):
    points = torch.tensor([0.0, 0.1, 5.0, 5.1])
    similarity = -(points[:, None] - points[None, :]) ** 2
    assert sorted(affinity_propagation(similarity)) == [[0, 1], [2, 3]]
    assert affinity_propagation(similarity, max_iter=49) == []  # 50 stable iterations are needed
    method = SelectiveGroupUpdates(num_tasks=3)
    method.affinity.copy_(torch.tensor([[1.0, 0.8, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 0.5]]))
    monkeypatch.setattr(selective_group_updates, "affinity_propagation", lambda similarity: [])
    assert method.regroup() == [[0], [1], [2]]


def plain_affinity_propagation(similarity, damping=0.5, max_iter=200, convergence_iter=50):
    """Frey & Dueck's message passing written element by element (median preference, no jitter)."""
    n = len(similarity)
    s = similarity.double().tolist()
    median = float(similarity.double().flatten().quantile(0.5))
    for i in range(n):
        s[i][i] = median
    r = [[0.0] * n for _ in range(n)]
    a = [[0.0] * n for _ in range(n)]
    history = []
    for _ in range(max_iter):
        new_r = [[s[i][k] - max(a[i][j] + s[i][j] for j in range(n) if j != k) for k in range(n)] for i in range(n)]
        r = [[damping * r[i][k] + (1 - damping) * new_r[i][k] for k in range(n)] for i in range(n)]
        new_a = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for k in range(n):
                others = sum(max(0.0, r[j][k]) for j in range(n) if j not in (i, k))
                new_a[i][k] = others if i == k else min(0.0, r[k][k] + others)
        a = [[damping * a[i][k] + (1 - damping) * new_a[i][k] for k in range(n)] for i in range(n)]
        history.append(tuple(a[k][k] + r[k][k] > 0 for k in range(n)))
        if len(history) >= convergence_iter and len(set(history[-convergence_iter:])) == 1:
            break
    else:
        return []
    exemplars = [k for k in range(n) if history[-1][k]]
    if not exemplars:
        return []
    nearest = [i if i in exemplars else max(exemplars, key=lambda e: s[i][e]) for i in range(n)]
    return [[i for i in range(n) if nearest[i] == e] for e in exemplars]


def test_affinity_propagation_matches_damped_message_passing_written_out():
    """Clusters equal those of the damped (0.5) Frey–Dueck updates written element by element."""
    for seed in (107, 113, 256, 1, 2, 3, 88):  # 88 never settles: both give []
        generator = torch.Generator().manual_seed(seed)
        n = int(torch.randint(3, 8, (1,), generator=generator))
        points = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        # a 1e-6 perturbation breaks the exact ties of a symmetric similarity (the method jitters those)
        similarity = -torch.cdist(points, points) ** 2 + 1e-6 * torch.randn(n, n, generator=generator, dtype=torch.float64)
        assert affinity_propagation(similarity) == plain_affinity_propagation(similarity), seed


def test_one_tight_cluster_is_returned_as_a_single_group():
    """A very low preference makes one exemplar enough: all points form one cluster, not a failure."""
    points = torch.tensor([0.0, 0.1, 0.2])
    similarity = -(points[:, None] - points[None, :]) ** 2
    assert affinity_propagation(similarity, preference=-100.0) == [[0, 1, 2]]


def test_exact_zero_similarities_are_clustered_like_other_values():
    """Zero entries (pairs of tasks with no measured affinity) must not break the tie-breaking jitter."""
    similarity = torch.tensor([
        [1.0, 0.9, -0.5, 0.0],
        [0.9, 1.0, 0.0, -0.5],
        [-0.5, 0.0, 1.0, 0.8],
        [0.0, -0.5, 0.8, 1.0],
    ])
    assert sorted(affinity_propagation(similarity)) == [[0, 1], [2, 3]]


def test_tasks_with_zero_loss_leave_their_entries_untouched():
    """Entries are only updated where a ratio L'/L exists, and in-group pairs need the row task's ratio too."""
    method = SelectiveGroupUpdates(num_tasks=4, decay=0.5)
    method.affinity.fill_(1.0)
    method.record([0, 1], before=torch.tensor([0.0, 2.0, 0.0, 4.0]), after=torch.tensor([0.0, 1.0, 0.0, 2.0]))
    # a = (-, 1/2, -, 1/2) / |G| = (-, 0.25, -, 0.25). Row 0 (no ratio of its own) only gets the task
    # outside the group (3); row 1 gets itself and task 3; columns 0 and 2 (no ratio) are never touched.
    expected = torch.ones(4, 4, dtype=torch.float64)
    expected[0, 3] = expected[1, 1] = expected[1, 3] = 0.5 * 1 + 0.5 * 0.25
    assert torch.equal(method.affinity, expected)


def test_a_zero_drop_is_not_an_opposite_sign():
    """Inside a group the -max rule needs strictly opposite signs; a task whose loss did not move has none."""
    method = SelectiveGroupUpdates(num_tasks=2, decay=1.0)
    method.affinity.fill_(1.0)
    method.record([0, 1], before=torch.tensor([2.0, 2.0]), after=torch.tensor([2.0, 3.0]))
    # a = (0, -1/2) / 2 = (0, -0.25): A[0,0] = 0, A[0,1] = a_1 = -0.25, A[1,0] = a_0 = 0, A[1,1] kept (a_1 < 0)
    assert torch.equal(method.affinity, torch.tensor([[0.0, -0.25], [0.0, 1.0]], dtype=torch.float64))


def test_extra_calls_on_a_batch_start_another_round_of_the_groups():
    """More weights() calls than groups on one batch cycle through the groups again."""
    method = SelectiveGroupUpdates(num_tasks=2, warmup_steps=10**6, generator=torch.Generator().manual_seed(0))
    masks = [method.weights(torch.ones(2), step=0) for _ in range(4)]
    assert torch.equal(torch.stack(masks[:2]).sum(dim=0), torch.ones(2))
    assert torch.equal(torch.stack(masks[2:]).sum(dim=0), torch.ones(2))


def test_weights_without_a_step_is_step_zero():
    """The default step is 0, as in the LossWeighting interface: with a one-step warm-up, no regrouping yet."""
    method = SelectiveGroupUpdates(num_tasks=3, warmup_steps=1, generator=torch.Generator().manual_seed(0))
    method.affinity.copy_(torch.tensor([[1.0, 0.8, 0.1], [0.9, 1.0, 0.1], [0.1, 0.1, 0.5]]))
    method.weights(torch.ones(3))
    assert method.groups == [[0], [1], [2]] and method.groups_per_step(0) == 2  # two groups left this batch
