import pytest
import torch
from torch import nn

from reference_impls.weighting.connection_strength import (
    ConnectionStrength,
    connection_strength,
    coordinate_owners,
    sequential_task_steps,
    top_priority,
)


def literal_phase_two(grads, owners):
    """Algorithm 1's Phase 2 loop on the vectors themselves."""
    k = len(grads)
    projected = [g.clone() for g in grads]
    for i in range(k):
        group = owners == i
        if not group.any():
            continue
        reference = grads[i][group]
        for j in range(k):
            if j == i:
                continue
            g = projected[j][group]
            dot = g @ reference
            if dot < 0:
                projected[j][group] = g - dot / (reference @ reference) * reference
    return torch.stack(projected).sum(0)


def test_connection_strength_matches_equations_4_6_7():
    weight = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]], [[[3.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # 2 x 1 x 2 x 2
    gammas = torch.tensor([[1.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    variances = torch.tensor([[1.0, 1.0], [2.0, 0.5]], dtype=torch.float64)
    got = connection_strength(weight, gammas, variances, eps=0.0 + 1e-12)
    s = torch.tensor([(1 + 4 + 0 + 1) / 4, (9 + 0 + 0 + 1) / 4], dtype=torch.float64)  # Eq. (4), N_I = 1
    raw = gammas**2 / (variances + 1e-12) * s  # Eq. (6)
    expected = raw / raw.sum(1, keepdim=True)  # Eq. (7)
    assert torch.allclose(got, expected)
    # by hand: task 0 gets (1.5, 10) -> (0.13, 0.87); task 1 gets (6.75, 5) -> (0.57, 0.43)
    assert top_priority(got).tolist() == [1, 0]


def test_connection_strength_sums_over_input_channels_and_adds_eps():
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)[:, :, None, None]  # 2 x 2 x 1 x 1
    gammas = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    variances = torch.tensor([[0.5, 1.5], [1.5, 0.5]], dtype=torch.float64)
    got = connection_strength(weight, gammas, variances, eps=0.5)
    # sum_q s_pq = (1 + 4, 9 + 0); gamma^2 / (var + eps): task 0 (1, 1/2), task 1 (1/2, 4)
    raw = torch.tensor([[5.0, 4.5], [2.5, 36.0]], dtype=torch.float64)
    torch.testing.assert_close(got, raw / raw.sum(1, keepdim=True))


def test_normalisation_stops_one_task_owning_the_layer_by_scale():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=generator)
    gammas, variances = torch.rand(2, 6, generator=generator) + 0.1, torch.rand(2, 6, generator=generator) + 0.1
    base = connection_strength(weight, gammas, variances)
    assert torch.allclose(base.sum(1), torch.ones(2))
    louder = gammas.clone()
    louder[0] *= 100.0  # task 0's batch norm 100x larger everywhere
    assert torch.allclose(connection_strength(weight, louder, variances), base, atol=1e-6)
    assert torch.equal(top_priority(connection_strength(weight, louder, variances)), top_priority(base))


def test_phase_two_equals_algorithm_1(grad_checks):
    for k, d, _, _, seed in grad_checks.random_cases(40, max_tasks=5, max_dim=12):
        grads = grad_checks.gradient_matrix(k, d, seed)
        owners = torch.randint(-1, k, (d,), generator=torch.Generator().manual_seed(seed))
        got = ConnectionStrength()(grads, owners).update
        assert torch.allclose(got, literal_phase_two(grads, owners), atol=1e-10 * float(grads.abs().max()) * k)


def test_each_group_keeps_its_top_task_and_loses_every_conflict():
    grads = torch.tensor([[1.0, 0.0, 2.0, 1.0], [-1.0, 1.0, -1.0, 0.5], [0.5, -2.0, 1.0, -3.0]], dtype=torch.float64)
    owners = torch.tensor([0, 0, 1, 1])
    update = ConnectionStrength()(grads, owners).update
    for group in (0, 1):
        coords = owners == group
        reference = grads[group][coords]
        # the projected rows are the update minus the reference row: none conflicts with the reference
        others = update[coords] - reference
        assert others @ reference >= -1e-12
    # hand check on group 0 = coords {0, 1}, reference g_0 = (1, 0):
    # g_1 = (-1, 1) conflicts -> (0, 1); g_2 = (0.5, -2) does not -> kept; sum = (1.5, -1)
    assert torch.allclose(update[:2], torch.tensor([1.5, -1.0], dtype=torch.float64))


def test_without_a_priority_the_update_is_the_plain_sum(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=4)
    assert torch.allclose(ConnectionStrength()(grads).update, grads.sum(0))
    method = ConnectionStrength()
    method.observe_priority(torch.zeros(7, dtype=torch.long))
    assert not torch.allclose(method(grads).update, grads.sum(0))  # seed 4 has a conflict with task 0


def test_each_prioritised_layer_is_projected_on_its_own(grad_checks):
    """Two layers: task i's group in one layer is projected against task i's gradient on
    that layer only, as the authors' code calls its projection once per conv weight. So
    the update is the per-layer updates side by side; pooling the layers' groups differs."""
    for k, d, _, _, seed in grad_checks.random_cases(20, max_tasks=4, max_dim=10):
        grads = grad_checks.gradient_matrix(k, 2 * d, seed)
        owners = torch.randint(-1, k, (2 * d,), generator=torch.Generator().manual_seed(seed))
        layers = torch.arange(2 * d) // d
        method = ConnectionStrength()
        method.observe_priority(owners, layers)
        per_layer = torch.cat([literal_phase_two(grads[:, part], owners[part]) for part in (slice(0, d), slice(d, None))])
        assert torch.allclose(method(grads).update, per_layer, atol=1e-10 * float(grads.abs().max()) * k)
        assert torch.allclose(ConnectionStrength()(grads, owners, layers).update, per_layer,
                              atol=1e-10 * float(grads.abs().max()) * k)
    # a case where pooling the two layers' groups gives another update
    grads = torch.tensor([[1.0, 1.0], [-1.0, -3.0]], dtype=torch.float64)
    owners, layers = torch.tensor([0, 0]), torch.tensor([0, 1])
    separate = ConnectionStrength()(grads, owners, layers).update
    pooled = ConnectionStrength()(grads, owners).update
    assert torch.allclose(separate, torch.tensor([1.0, 1.0], dtype=torch.float64))  # both coordinates conflict: removed
    assert torch.allclose(pooled, literal_phase_two(grads, owners)) and not torch.allclose(pooled, separate)
    with pytest.raises(ValueError, match="layers"):
        ConnectionStrength()(grads, owners, torch.tensor([0]))


def test_coordinate_owners_follow_output_channels():
    owners = coordinate_owners(torch.tensor([2, 0]), (2, 3, 2, 2))
    assert owners.tolist() == [2] * 12 + [0] * 12
    weight = torch.arange(24.0).reshape(2, 3, 2, 2)
    assert (weight.flatten()[owners == 0] >= 12).all()  # the second output channel's kernels


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(ConnectionStrength)


def test_phase_two_becomes_more_likely_over_the_epochs():
    method = ConnectionStrength(num_epochs=1000, generator=torch.Generator().manual_seed(3))
    phases = torch.tensor([method.phase(e) for e in range(1000)])
    assert phases[0] == 1 and method.phase(10) == method.phase(10)
    early, late = (phases[:200] == 2).float().mean(), (phases[800:] == 2).float().mean()
    assert early < 0.2 < 0.8 < late  # P(Phase 2) = e / E: about 0.1 and 0.9


def test_each_epoch_draws_its_phase_once_and_compares_it_with_e_over_E():
    for seed in range(20):
        method = ConnectionStrength(num_epochs=4, generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed)
        draws = [torch.rand((), generator=generator).item() for _ in range(4)]
        phases = [method.phase(e) for e in range(4)]
        assert phases == [1 if draws[e] >= e / 4 else 2 for e in range(4)]  # Phase 1 iff P >= e / E
        assert [method.phase(e) for e in reversed(range(4))] == phases[::-1]  # asked again: no new draw


def test_phase_one_steps_tasks_in_turn_as_equation_9():
    # shared scalar w, heads a_k: L_k = (a_k w - y_k)²; w moves for task 0, then task 1 sees the new w
    w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    heads = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    y = torch.tensor([3.0, -1.0], dtype=torch.float64)
    lr = 0.1
    optimizer = torch.optim.SGD([w, heads], lr=lr)
    sequential_task_steps(lambda: (heads * w - y) ** 2, optimizer, num_tasks=2)
    w0, a = 1.0, [1.0, 2.0]
    g0 = 2 * (a[0] * w0 - 3.0)
    w1 = w0 - lr * g0 * a[0]
    a0 = a[0] - lr * g0 * w0
    g1 = 2 * (a[1] * w1 + 1.0)  # task 1's gradient at the shared value task 0 left
    w2, a1 = w1 - lr * g1 * a[1], a[1] - lr * g1 * w1
    assert torch.allclose(w.detach(), torch.tensor(w2, dtype=torch.float64))
    assert torch.allclose(heads.detach(), torch.tensor([a0, a1], dtype=torch.float64))
    # the simultaneous step (Eq. (8)) would give another shared value here
    simultaneous = w0 - lr * (g0 * a[0] + 2 * (a[1] * w0 + 1.0) * a[1])
    assert abs(w2 - simultaneous) > 1e-3


def test_training_a_conv_net_with_task_specific_batch_norm_lowers_both_losses():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 6, 3, padding=1)
    norms = nn.ModuleList([nn.BatchNorm2d(6) for _ in range(2)])
    heads = nn.ModuleList([nn.Conv2d(6, 1, 1) for _ in range(2)])
    x = torch.randn(16, 2, 5, 5)
    targets = [x[:, :1] * 2.0, -x[:, 1:]]

    def losses():
        features = conv(x)
        return torch.stack([(heads[k](norms[k](features).relu()) - targets[k]).square().mean() for k in range(2)])

    method = ConnectionStrength(num_epochs=10)
    optimizer = torch.optim.SGD([*conv.parameters(), *norms.parameters(), *heads.parameters()], lr=0.05)
    initial = losses().detach()
    used = set()
    for epoch in range(10):
        phase = method.phase(epoch)
        used.add(phase)
        if phase == 1:
            sequential_task_steps(losses, optimizer, 2)
            continue
        strength = connection_strength(conv.weight, torch.stack([n.weight for n in norms]),
                                       torch.stack([n.running_var for n in norms]))
        method.observe_priority(coordinate_owners(top_priority(strength), conv.weight.shape))
        current = losses()
        rows = [torch.autograd.grad(current[k], conv.weight, retain_graph=True)[0].flatten() for k in range(2)]
        optimizer.zero_grad()
        current.sum().backward()  # heads, norms and the conv bias: their own plain gradients
        conv.weight.grad = method(torch.stack(rows)).update.reshape(conv.weight.shape)
        optimizer.step()
    assert used == {1, 2}
    assert (losses().detach() < initial).all()


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError, match="num_epochs"):
        ConnectionStrength(num_epochs=bad)
    with pytest.raises(ValueError, match="eps"):
        connection_strength(torch.ones(2, 1, 1, 1), torch.ones(1, 2), torch.ones(1, 2), eps=float(bad))


def test_default_eps_is_the_batch_norm_one_of_1e_5():
    """The default ε added to the running variances is 1e-5 (PyTorch's BatchNorm default)."""
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)[:, :, None, None]
    gammas = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    variances = torch.tensor([[1e-5, 3e-5], [2e-5, 1e-6]], dtype=torch.float64)
    raw = gammas**2 / (variances + 1e-5) * torch.tensor([5.0, 9.0], dtype=torch.float64)
    torch.testing.assert_close(connection_strength(weight, gammas, variances), raw / raw.sum(1, keepdim=True),
                               rtol=1e-12, atol=0.0)


def test_strengths_normalise_at_any_scale_and_a_silent_task_gets_zeros():
    # Eq. (7) divides by the layer total however small it is; a task whose γ are all zero has
    # no strength anywhere (0, not 0/0). A linear layer's N_O x N_I weight counts as k = 1.
    weight = torch.tensor([[0.01, 0.02], [0.03, 0.0]], dtype=torch.float64)
    gammas = torch.tensor([[0.1, 0.2], [0.0, 0.0]], dtype=torch.float64)
    variances = torch.ones(2, 2, dtype=torch.float64)
    got = connection_strength(weight, gammas, variances)
    raw = gammas[0] ** 2 / (1.0 + 1e-5) * torch.tensor([0.01**2 + 0.02**2, 0.03**2], dtype=torch.float64)
    torch.testing.assert_close(got[0], raw / raw.sum(), rtol=1e-12, atol=0.0)
    assert torch.equal(got[1], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(got, connection_strength(weight[:, :, None, None], gammas, variances))


def test_phase_one_leaves_other_tasks_heads_alone_even_with_weight_decay():
    # "heads of other tasks get no gradient: no step": with weight decay a zero gradient would
    # still move a head, so head 0 must move once (task 0's step) and head 1 once (task 1's).
    # The losses come as separate tensors (one graph each, as with one forward pass per task):
    # indexing a stacked tensor would back-propagate explicit zeros into every head.
    w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    a0 = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    a1 = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    lr, decay = 0.1, 0.5
    optimizer = torch.optim.SGD([w, a0, a1], lr=lr, weight_decay=decay)
    sequential_task_steps(lambda: ((a0 * w - 3.0) ** 2, (a1 * w + 1.0) ** 2), optimizer, 2)
    g0 = 2 * (1.0 * 1.0 - 3.0)
    w1, head0 = 1.0 - lr * (g0 * 1.0 + decay * 1.0), 1.0 - lr * (g0 * 1.0 + decay * 1.0)
    g1 = 2 * (2.0 * w1 + 1.0)
    head1 = 2.0 - lr * (g1 * w1 + decay * 2.0)
    assert torch.allclose(a0.detach(), torch.tensor(head0, dtype=torch.float64))
    assert torch.allclose(a1.detach(), torch.tensor(head1, dtype=torch.float64))


def test_default_horizon_is_100_epochs():
    """The documented default E = 100: Phase 1 iff P >= e / 100, one draw per epoch."""
    for seed in range(20):
        method = ConnectionStrength(generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed)
        draws = [torch.rand((), generator=generator).item() for _ in range(100)]
        assert [method.phase(e) for e in range(100)] == [1 if draws[e] >= e / 100 else 2 for e in range(100)]


def test_empty_gradients_with_layers_and_bad_priority_shapes():
    update = ConnectionStrength()(torch.zeros(3, 0), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, dtype=torch.long)).update
    assert update.shape == (0,)
    method = ConnectionStrength()
    with pytest.raises(ValueError):
        method.observe_priority(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        method.observe_priority(torch.zeros(6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        ConnectionStrength()(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, -1]))


@pytest.mark.parametrize("optimizer_kw", [{"weight_decay": 0.5}, {"momentum": 0.9}])
def test_with_its_task_parameters_named_a_stacked_loss_leaves_other_heads_alone(optimizer_kw):
    """One forward pass for all tasks (a stacked loss) sends zeros into every head; naming each
    task's parameters keeps task k's step off the other heads, as with separate graphs."""
    def run(stacked: bool, named: bool) -> list[float]:
        w, a0, a1 = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (1.0, 1.0, 2.0))
        optimizer = torch.optim.SGD([w, a0, a1], lr=0.1, **optimizer_kw)

        def losses():
            pair = ((a0 * w - 3.0) ** 2, (a1 * w + 1.0) ** 2)
            return torch.stack(pair) if stacked else pair
        for _ in range(2):  # a second round lets momentum carry a first-round zero gradient
            sequential_task_steps(losses, optimizer, 2, task_parameters=[[a0], [a1]] if named else None)
        return [p.item() for p in (w, a0, a1)]

    separate = run(stacked=False, named=False)
    assert run(stacked=True, named=True) == pytest.approx(separate, rel=1e-15)
    assert run(stacked=True, named=False) != pytest.approx(separate, rel=1e-6)  # what the argument prevents


def test_task_parameters_need_one_group_per_task():
    w = nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match="one group per task: 2 tasks, 1 groups"):
        sequential_task_steps(lambda: torch.stack([w, w]), torch.optim.SGD([w], lr=0.1), 2, task_parameters=[[w]])
