import torch
from torch.nn import functional as F

from reference_impls.weighting.great import GREAT
from reference_impls.weighting.registry import methods


def test_first_call_and_zero_learning_rate_give_equal_weighting(grad_checks):
    grads = grad_checks.gradient_matrix(3, 7, seed=4)
    method = GREAT()
    torch.testing.assert_close(method(grads).update, grads.sum(0))  # alignment starts at 1
    frozen = GREAT(lr=0.0)
    for _ in range(5):
        torch.testing.assert_close(frozen(grads).update, grads.sum(0))


def test_update_applies_the_current_alignment_elementwise(grad_checks):
    grads = grad_checks.gradient_matrix(2, 5, seed=1)
    method = GREAT()
    method(grads)
    a = method.alignment.clone()
    assert not torch.equal(a, torch.ones_like(a))  # one round of the game moved it
    torch.testing.assert_close(method(grads).update, (a * grads).sum(0))


def test_one_round_is_descent_for_the_classifier_and_ascent_for_the_alignment(grad_checks):
    grads = grad_checks.gradient_matrix(3, 4, seed=2)
    method = GREAT(lr=0.1, reversal=0.5)
    method(grads)  # initialise the state
    a, (w, c) = method.alignment.clone(), [t.clone() for t in method.classifier]
    # independent computation of the cross-entropy of the unit-norm aligned rows
    a_, w_, c_ = (t.clone().requires_grad_(True) for t in (a, w, c))
    rows = a_ * grads
    rows = rows / rows.norm(dim=1, keepdim=True)
    loss = F.cross_entropy(rows @ w_.T + c_, torch.arange(3))
    da, dw, dc = torch.autograd.grad(loss, (a_, w_, c_))
    method(grads)
    torch.testing.assert_close(method.classifier[0], w - 0.1 * dw)
    torch.testing.assert_close(method.classifier[1], c - 0.1 * dc)
    torch.testing.assert_close(method.alignment, (a + 0.1 * 0.5 * da).clamp_min(0))


def test_reversal_keeps_the_classifier_from_naming_the_task():
    """Two tasks whose gradients share a sign pattern, so an element-wise rescaling can make
    them point the same way. Same game with the alignment cooperating (reversal -1) or
    fighting (+1): the classifier wins only in the first case."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.1
    noise = [0.02 * torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(200)]
    final = {}
    for reversal in (1.0, -1.0):
        method = GREAT(lr=0.5, reversal=reversal)
        for n in noise:
            method(base + n)
        final[reversal] = method.auxiliary_loss(base, method.alignment, *method.classifier).item()
    assert final[-1.0] < 0.05
    assert final[1.0] > 0.3  # log 2 = 0.69 is a classifier that cannot tell


def test_state_restarts_when_the_problem_changes_shape(grad_checks):
    """A new K or d starts a new game: alignment 1 (the plain sum), a classifier of the new size.
    K and d change together, then each alone."""
    for new_k, new_d in ((2, 5), (2, 4), (3, 5)):
        method = GREAT()
        for _ in range(3):
            method(grad_checks.gradient_matrix(3, 4, seed=0))
        grads = grad_checks.gradient_matrix(new_k, new_d, seed=1)
        torch.testing.assert_close(method(grads).update, grads.sum(0))
        assert method.alignment.shape == (new_k, new_d) and method.classifier[0].shape == (new_k, new_d)


def test_default_alignment_step_raises_the_classifier_loss(grad_checks):
    """By default the alignment plays the adversary (reversal +1): its step makes the task of
    each aligned gradient harder to name, so the classifier's loss at its own weights rises."""
    grads = grad_checks.gradient_matrix(3, 6, seed=5)
    method = GREAT()
    method(grads)
    w, c = (t.clone() for t in method.classifier)
    before = method.auxiliary_loss(grads, method.alignment, w, c)
    method(grads)
    assert method.auxiliary_loss(grads, method.alignment, w, c) > before


def test_game_is_scale_free(grad_checks):
    """The classifier reads unit-norm rows, so the rounds played on s·G are those on G, for
    tiny and huge s alike (the update scales with s)."""
    grads = grad_checks.gradient_matrix(3, 5, seed=7)
    states = []
    for scale in (1.0, 1e-14, 1e14):
        method = GREAT(lr=0.5)
        for _ in range(3):
            update = method(scale * grads).update
        states.append((update / scale, method.alignment, *method.classifier))
    for state in states[1:]:
        for got, expected in zip(state, states[0]):
            torch.testing.assert_close(got, expected)


def test_alignment_stays_non_negative(grad_checks):
    method = GREAT(lr=5.0)
    for step in range(30):
        method(grad_checks.gradient_matrix(3, 4, seed=step))
    assert (method.alignment >= 0).all()


def test_degenerate_inputs_stay_finite(grad_checks):
    grad_checks.check_degenerate_inputs(GREAT)
    method = GREAT()
    for _ in range(3):  # repeated rounds on an extreme input
        grad_checks.assert_finite(method(1e10 * grad_checks.gradient_matrix(3, 5, seed=0)))
    assert torch.isfinite(method.alignment).all()


def test_permuting_tasks_leaves_the_first_update_unchanged(grad_checks):
    grad_checks.check_permutation_equivariance(GREAT)


def test_training_reduces_the_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(GREAT(lr=0.05))
    assert final < 0.5 * initial


def test_registered():
    assert methods()["great"] is GREAT


def test_game_ignores_the_scale_of_each_row(grad_checks):
    """Each task's row is read as a direction on its own: rescaling one row by a power of two,
    however small or large, plays exactly the same rounds (alignment and classifier)."""
    grads = grad_checks.gradient_matrix(3, 5, seed=7)
    states = []
    for scale in (1.0, 2.0**-60, 2.0**60):
        scaled = grads.clone()
        scaled[1] *= scale
        method = GREAT(lr=0.5)
        for _ in range(3):
            method(scaled)
        states.append((method.alignment, *method.classifier))
    for state in states[1:]:
        for got, expected in zip(state, states[0]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_default_round_uses_lr_0_05_and_reversal_1(grad_checks):
    # As the round above, with the constructor's defaults written out: lr 0.05, reversal 1.
    grads = grad_checks.gradient_matrix(3, 4, seed=5)
    method = GREAT()
    method(grads)
    a, (w, c) = method.alignment.clone(), [t.clone() for t in method.classifier]
    a_, w_, c_ = (t.clone().requires_grad_(True) for t in (a, w, c))
    rows = a_ * grads
    loss = F.cross_entropy((rows / rows.norm(dim=1, keepdim=True)) @ w_.T + c_, torch.arange(3))
    da, dw, _ = torch.autograd.grad(loss, (a_, w_, c_))
    method(grads)
    torch.testing.assert_close(method.classifier[0], w - 0.05 * dw)
    torch.testing.assert_close(method.alignment, (a + 0.05 * da).clamp_min(0))


def test_the_given_generator_draws_the_classifier(grad_checks):
    # Randomised methods take their generator: equal seeds replay, different seeds differ.
    grads = grad_checks.gradient_matrix(3, 6, seed=6)
    runs = []
    for seed in (7, 7, 8):
        method = GREAT(generator=torch.Generator().manual_seed(seed))
        method(grads)
        runs.append(method(grads).update)
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])


def test_a_zero_task_row_keeps_the_game_finite_over_rounds(grad_checks):
    grads = grad_checks.gradient_matrix(3, 5, seed=3)
    grads[1] = 0.0
    method = GREAT()
    for _ in range(3):
        grad_checks.assert_finite(method(grads))
    assert torch.isfinite(method.alignment).all() and torch.isfinite(method.classifier[0]).all()
