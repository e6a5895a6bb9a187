import torch

from reference_impls.weighting.graddrop import GradDrop


def test_each_coordinate_keeps_one_sign(grad_checks):
    grads = grad_checks.gradient_matrix(5, 400, seed=0)
    update = GradDrop(generator=torch.Generator().manual_seed(0))(grads).update
    positive = grads.clamp_min(0).sum(0)
    negative = grads.clamp_max(0).sum(0)
    assert torch.all((update == positive) | (update == negative))
    assert ((update == positive) & (positive != 0)).any() and ((update == negative) & (negative != 0)).any()


def test_sign_choice_frequency_matches_the_purity():
    # Every column is (3, -1): P = ½(1 + 2/4) = 0.75, so 75% of columns keep the positive entry.
    grads = torch.tensor([[3.0], [-1.0]]).repeat(1, 20_000)
    update = GradDrop(generator=torch.Generator().manual_seed(1))(grads).update
    assert abs(float((update == 3.0).float().mean()) - 0.75) < 0.015
    assert torch.all((update == 3.0) | (update == -1.0))
    # The purity transform f acts before the draw: f(P) = P² = 0.5625.
    squared = GradDrop(purity_transform=lambda p: p**2, generator=torch.Generator().manual_seed(1))
    assert abs(float((squared(grads).update == 3.0).float().mean()) - 0.5625) < 0.015


def test_agreeing_signs_pass_through_and_full_leak_is_the_sum(grad_checks):
    grads = grad_checks.gradient_matrix(3, 50, seed=2).abs() * torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)
    assert torch.allclose(GradDrop()(grads).update, grads.sum(0))
    assert torch.allclose(GradDrop()(-grads).update, -grads.sum(0))
    mixed = grad_checks.gradient_matrix(3, 50, seed=3)
    leaky = GradDrop(leak=torch.ones(3))(mixed).update
    assert torch.allclose(leaky, mixed.sum(0))


def test_partial_leak_formula():
    grads = torch.tensor([[2.0], [-1.0]]).repeat(1, 2000)  # P = ½(1 + 1/3) = 2/3 in every column
    leak = torch.tensor([0.5, 0.25])
    update = GradDrop(leak=leak, generator=torch.Generator().manual_seed(0))(grads).update
    # Either the positive entry is kept (2 + 0.25·(−1)) or the negative one (0.5·2 − 1);
    # both draws must occur, each with the formula's value.
    kept_positive, kept_negative = torch.isclose(update, torch.tensor(1.75)), torch.isclose(update, torch.tensor(0.0))
    assert torch.all(kept_positive | kept_negative)
    assert abs(float(kept_positive.float().mean()) - 2 / 3) < 0.04


def test_reproducible_under_a_seed(grad_checks):
    grads = grad_checks.gradient_matrix(4, 100, seed=4)
    a = GradDrop(generator=torch.Generator().manual_seed(5))(grads).update
    b = GradDrop(generator=torch.Generator().manual_seed(5))(grads).update
    c = GradDrop(generator=torch.Generator().manual_seed(6))(grads).update
    assert torch.equal(a, b) and not torch.equal(a, c)
    method = GradDrop(generator=torch.Generator().manual_seed(5))
    assert torch.equal(method(grads).update, a) and not torch.equal(method(grads).update, a)  # fresh U per call


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(GradDrop)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(GradDrop(), lr=0.01)
    assert final < 0.5 * initial


def draws(seed, d):
    """The U that GradDrop(generator=Generator().manual_seed(seed)) draws for a d-column call."""
    return torch.rand(d, generator=torch.Generator().manual_seed(seed)).double()


def literal_graddrop(grads, uniform, leak, f=lambda p: p):
    """Algorithm 1 written out entry by entry, with P = ½ on all-zero columns."""
    total, size = grads.sum(0), grads.abs().sum(0)
    purity = f(torch.where(size > 0, 0.5 * (1 + total / torch.where(size > 0, size, 1)), 0.5))
    mask = (purity > uniform) * (grads > 0) + (purity < uniform) * (grads < 0)
    return ((leak[:, None] + (1 - leak[:, None]) * mask) * grads).sum(0)


def recording(seen):
    def f(p):
        seen.append(p.clone())
        return p
    return f


def test_matches_algorithm_1_with_the_same_draws(grad_checks):
    grads = grad_checks.gradient_matrix(4, 300, seed=7)
    grads[:, :5] = 0  # all-zero columns
    grads[1:, 5:10] = 0  # one task alone
    uniform = draws(8, 300)
    for leak in (None, torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)):
        got = GradDrop(leak=leak, generator=torch.Generator().manual_seed(8))(grads).update
        expected = literal_graddrop(grads, uniform, torch.zeros(4, dtype=torch.float64) if leak is None else leak)
        assert torch.allclose(got, expected, atol=1e-12)


def test_purity_is_exact_at_any_scale_and_one_half_on_zero_columns():
    # Column (3, −1)·s: P = ½(1 + 2/4) = 0.75 for every s (no epsilon in Σ|g_k|); a zero column gets ½.
    for scale in (1e-12, 1e-8, 1.0, 1e8):
        seen = []
        grads = torch.tensor([[3.0, 0.0], [-1.0, 0.0]], dtype=torch.float64) * scale
        GradDrop(purity_transform=recording(seen))(grads)
        assert torch.allclose(seen[0], torch.tensor([0.75, 0.5], dtype=torch.float64), rtol=1e-12, atol=0)


def test_a_tie_between_f_of_p_and_u_keeps_neither_sign():
    # M_k uses strict inequalities: f(P) = U drops both signs, so the update is 0 (no leak).
    grads = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.25]], dtype=torch.float64)
    uniform = draws(3, 3)
    update = GradDrop(purity_transform=lambda p: uniform.clone(), generator=torch.Generator().manual_seed(3))(grads).update
    assert torch.equal(update, torch.zeros(3, dtype=torch.float64))
