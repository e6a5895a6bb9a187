import pytest
import torch

from reference_impls.weighting.forkmerge import ForkMerge


def quadratic_problem(seed=0, d=6):
    """Target loss |θ − t|², auxiliary loss |θ − a|² on training data; validation |θ − v|²."""
    g = torch.Generator().manual_seed(seed)
    t, a, v = (torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3))
    v = t + 0.3 * (a - t) + 0.2 * v  # validation optimum between target and auxiliary optima

    def grad(theta, w):
        return 2 * w[0] * (theta - t) + 2 * w[1] * (theta - a)

    def validation(theta):
        return float(((theta - v) ** 2).sum())

    return grad, validation, v


def test_merge_never_worse_than_the_best_candidate_branch():
    gen = torch.Generator().manual_seed(1)
    for case in range(30):
        branches = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2 + case % 3)]
        target = torch.randn(5, generator=gen, dtype=torch.float64)

        def validation(theta):
            return float(((theta - target) ** 2).sum())

        merged, mix = ForkMerge([[1.0]] * len(branches)).merge(branches, validation)
        assert validation(merged) <= min(validation(b) for b in branches) + 1e-12
        assert abs(float(mix.sum()) - 1) < 1e-12 and (mix >= 0).all()
        torch.testing.assert_close(merged, sum(m * b for m, b in zip(mix, branches)))


def test_merge_starts_from_the_best_branch_and_adds_at_most_an_equal_share():
    # b1 is better on validation alone, so the search starts from it; b0 then joins with
    # raw weight α·1 (α = 0.6 gives 1/1.6 = 0.625, the grid point nearest 0.62), as in the
    # authors' forkmerge.py, where a later branch can never take more than an equal share.
    b0, b1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    merged, mix = ForkMerge([[1.0], [1.0]]).merge([b0, b1], lambda th: float(((th - 0.62) ** 2).sum()))
    torch.testing.assert_close(mix, torch.tensor([0.375, 0.625], dtype=torch.float64))
    torch.testing.assert_close(merged, torch.full((3,), 0.625, dtype=torch.float64))


def test_merge_follows_the_ranked_greedy_rule_of_the_official_code():
    gen = torch.Generator().manual_seed(5)
    alphas = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    for _ in range(20):
        branches = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(4)]
        target = torch.randn(4, generator=gen, dtype=torch.float64)

        def validation(theta):
            return float(((theta - target) ** 2).sum())

        # hand-written rule: rank by validation, λ one-hot on the best, then each next branch
        # gets α times the mean of the raw λ so far; the merge is Σ λ θ / Σ λ
        order = sorted(range(4), key=lambda b: validation(branches[b]))
        raw = torch.zeros(4, dtype=torch.float64)
        raw[order[0]] = 1.0
        best = validation(branches[order[0]])
        for i, b in enumerate(order[1:]):
            bound, chosen = float(raw.sum()) / (i + 1), 0.0
            for alpha in alphas:
                trial = raw.clone()
                trial[b] = alpha * bound
                loss = validation(sum(w * th for w, th in zip(trial / trial.sum(), branches)))
                if loss < best:
                    best, chosen = loss, alpha * bound
            raw[b] = chosen
        expected = raw / raw.sum()
        merged, mix = ForkMerge([[1.0]] * 4, alphas=alphas).merge(branches, validation)
        torch.testing.assert_close(mix, expected)
        torch.testing.assert_close(merged, sum(m * th for m, th in zip(expected, branches)))
        assert float(mix[order[1]]) <= 0.5 + 1e-12 and float(mix[order[2]]) <= 1 / 3 + 1e-12


def test_one_branch_is_plain_gradient_descent():
    grad, validation, _ = quadratic_problem()
    theta0 = torch.zeros(6, dtype=torch.float64)
    fm = ForkMerge([[1.0, 0.3]], merge_every=4, lr=0.05)
    merged, history = fm.run(theta0, grad, validation, rounds=3)
    plain = theta0
    for _ in range(12):
        plain = plain - 0.05 * grad(plain, torch.tensor([1.0, 0.3], dtype=torch.float64))
    # the same float64 steps (0.3 is not a float32 number: the branch weights keep float64)
    assert torch.equal(merged, plain)
    assert all(torch.equal(m, torch.ones(1, dtype=torch.float64)) for m in history)
    # and a float32 θ stays float32: the weights are cast to θ's dtype, not θ to theirs
    branch = fm.train_branch(torch.ones(2), fm.branch_weights[0], lambda theta, w: w * theta)
    assert branch.dtype == torch.float32


def test_forkmerge_beats_each_fixed_weighting_on_validation():
    grad, validation, _ = quadratic_problem(seed=3)
    theta0 = torch.zeros(6, dtype=torch.float64)
    branches = [[1.0, 0.0], [1.0, 1.0]]  # target only; target + auxiliary
    merged, _ = ForkMerge(branches, merge_every=5, lr=0.05).run(theta0, grad, validation, rounds=20)
    for weights in branches:
        alone, _ = ForkMerge([weights], merge_every=5, lr=0.05).run(theta0, grad, validation, rounds=20)
        assert validation(merged) < validation(alone)


def two_point_merge(target, **kwargs):
    """Merge b0 = 0 and b1 = 1 (in R³) on validation |θ − target|²; returns Λ."""
    b0, b1 = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    return ForkMerge([[1.0], [1.0]], **kwargs).merge([b0, b1], lambda th: float(((th - target) ** 2).sum()))[1]


def test_default_grid_is_the_authors_steps_of_one_fifth():
    # b1 ranks first; b0 joins with raw weight α, so the merge is 1/(1 + α): a target there is hit exactly.
    for alpha in (0.2, 0.4, 0.6, 0.8, 1.0):
        mix = two_point_merge(1 / (1 + alpha))
        torch.testing.assert_close(mix[0], torch.tensor(alpha / (1 + alpha), dtype=torch.float64))


def test_the_grid_must_contain_zero():
    with pytest.raises(ValueError, match="0"):
        ForkMerge([[1.0], [1.0]], alphas=(0.5, 1.0))


def test_a_branch_joins_only_if_it_strictly_lowers_the_validation_loss():
    # A flat validation loss: every α ties with keeping the merge so far, so Λ stays on the best branch.
    branches = [torch.full((2,), float(b), dtype=torch.float64) for b in range(3)]
    merged, mix = ForkMerge([[1.0]] * 3).merge(branches, lambda th: 1.0)
    torch.testing.assert_close(mix, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(merged, branches[0])
