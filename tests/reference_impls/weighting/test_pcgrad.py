import torch

from reference_impls.weighting.pcgrad import PCGrad, visiting_order


def literal_projections(grads, orders):
    """Algorithm 1 of the paper on the vectors themselves; ``orders[i]`` lists j for task i.

    Row i of the result is g_i^PC, task i's gradient after all its projections."""
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected)


def literal_pcgrad(grads, orders):
    return literal_projections(grads, orders).sum(0)


def test_fixed_order_equals_the_paper_procedure(grad_checks):
    for k, d, rank, _, seed in grad_checks.random_cases(60, max_tasks=7, max_dim=10):
        grads = grad_checks.gradient_matrix(k, d, seed, rank=rank)
        orders = [[j for j in range(k) if j != i] for i in range(k)]
        expected = literal_pcgrad(grads, orders)
        got = PCGrad(random_order=False)(grads).update
        assert torch.allclose(got, expected, atol=1e-10 * float(grads.norm(dim=1).max()) * k)


def test_random_order_uses_the_generator_like_the_paper(grad_checks):
    grads = grad_checks.gradient_matrix(5, 3, seed=1)  # K > d: many conflicts, order matters
    replay = torch.Generator().manual_seed(42)
    method = PCGrad(generator=torch.Generator().manual_seed(42))
    for _ in range(3):  # each call draws new orders, continuing the generator's stream
        orders = [visiting_order(i, 5, replay) for i in range(5)]
        got = method(grads).update
        assert torch.allclose(got, literal_pcgrad(grads, orders), atol=1e-12)
    first = PCGrad(generator=torch.Generator().manual_seed(42))(grads).update
    assert not torch.allclose(got, first)  # the third call's orders give another answer here
    fixed = PCGrad(random_order=False)(grads).update
    assert not torch.allclose(first, fixed)  # the order really changes the answer here


def test_two_tasks_never_conflict_with_the_result(grad_checks):
    conflicts = 0
    for seed in range(200):
        grads = grad_checks.gradient_matrix(2, 5, seed, scale=10.0 ** (seed % 7 - 3))
        conflicts += int(grads[0] @ grads[1] < 0)
        update = PCGrad(random_order=False)(grads).update
        tol = 1e-12 * float(grads.norm(dim=1).max()) ** 2
        assert (grads @ update >= -tol).all()
    assert conflicts > 50


def test_two_task_closed_form():
    g1 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    g2 = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    dot = g1 @ g2
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    result = PCGrad()(torch.stack([g1, g2]))
    assert torch.allclose(result.update, expected, atol=1e-14)
    assert torch.allclose(result.weights, torch.tensor([1 - dot / (g1 @ g1), 1 - dot / (g2 @ g2)]))


def test_no_conflict_gives_the_sum(grad_checks):
    grads = grad_checks.gradient_matrix(4, 6, seed=3).abs()
    result = PCGrad()(grads)
    assert torch.equal(result.weights, torch.ones(4, dtype=torch.float64))


def test_antiparallel_pair_cancels():
    g = torch.tensor([3.0, -1.0, 2.0])
    assert PCGrad()(torch.stack([g, -g])).update.abs().max() < 1e-6


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(PCGrad)
    grad_checks.check_degenerate_inputs(lambda: PCGrad(random_order=False))


def test_two_task_permutation(grad_checks):
    for seed in range(10):
        grads = grad_checks.gradient_matrix(2, 4, seed)
        a, b = PCGrad(random_order=False)(grads), PCGrad(random_order=False)(grads.flip(0))
        assert torch.allclose(a.update, b.update, atol=1e-12) and torch.allclose(a.weights, b.weights.flip(0))


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(PCGrad(), lr=0.01)
    assert final < 0.5 * initial


def test_many_tasks_random_order_equals_the_paper_procedure(grad_checks):
    # The K visits run side by side (vectorised); they must still be the paper's K sequences.
    for k, d, seed in ((15, 6, 0), (12, 40, 1)):
        grads = grad_checks.gradient_matrix(k, d, seed)
        replay = torch.Generator().manual_seed(seed)
        orders = [visiting_order(i, k, replay) for i in range(k)]
        expected = literal_pcgrad(grads, orders)
        got = PCGrad(generator=torch.Generator().manual_seed(seed))(grads).update
        assert torch.allclose(got, expected, atol=1e-10 * float(grads.norm(dim=1).max()) * k)


def test_coefficient_rows_are_each_tasks_projected_gradient(grad_checks):
    # coefficients() is documented row-wise: A @ G stacks g_i^PC. Column sums (the weights) alone
    # cannot tell A from its transpose-like mix-ups, so check every row, K = 2 (closed form) and K = 3.
    for k, seed in ((2, 4), (2, 5), (3, 6), (3, 7)):
        grads = grad_checks.gradient_matrix(k, 2, seed)  # d = 2: conflicts are common
        orders = [[j for j in range(k) if j != i] for i in range(k)]
        rows = PCGrad(random_order=False).coefficients(grads @ grads.T) @ grads
        assert torch.allclose(rows, literal_projections(grads, orders), atol=1e-12)
    g1, g2 = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # g1·g2 = -1
    rows = PCGrad().coefficients(torch.stack([g1, g2]) @ torch.stack([g1, g2]).T)
    # g1^PC = g1 + g2 / 2, g2^PC = g2 + g1 (by hand: ||g2||² = 2, ||g1||² = 1)
    assert torch.allclose(rows, torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=torch.float64))


def test_the_default_draws_a_new_order_each_call_and_a_fixed_order_ignores_the_generator(grad_checks):
    """Algorithm 1 visits the other tasks in random order; ``random_order=False`` is index order,
    whatever generator is passed along."""
    grads = grad_checks.gradient_matrix(5, 3, seed=1)  # K > d: many conflicts, order matters
    default = PCGrad()
    updates = [default(grads).update for _ in range(6)]
    assert any(not torch.allclose(updates[0], u) for u in updates[1:])
    index_order = literal_pcgrad(grads, [[j for j in range(5) if j != i] for i in range(5)])
    fixed = PCGrad(random_order=False, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        assert torch.allclose(fixed(grads).update, index_order, atol=1e-12)


def test_half_precision_gramians_are_solved_in_float64(grad_checks):
    """The K x K work runs in the solver's float64 (``solver_dtype``); only the result is rounded back."""
    grad_checks.check_half_precision_gramians(lambda: PCGrad(random_order=False))
