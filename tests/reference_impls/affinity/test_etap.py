"""ETAP (Ayman, Mukhopadhyay & Laszka, ICLR 2026): the score is first-order transference, group
scores average the other members, and the ensemble recovers planted non-linear gains."""

import itertools

import pytest
import torch
from torch import nn

from reference_impls.affinity.etap import (
    ETAP,
    affinity_scores,
    bspline_basis,
    group_scores,
    model_affinity_scores,
    ridge,
)
from reference_impls.affinity.transference import lookahead_transference, model_losses


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 4).double()
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1).double() for t in "abc"})

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return {t: head(h).squeeze(1) for t, head in self.heads.items()}

    def shared_parameters(self):
        return self.trunk.parameters()


def regression_data(rows: int, seed: int):
    """x and a target per task a, b, c, seeded: the losses are MSEs of TwoLayer's heads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    return x, {t: torch.randn(rows, generator=g, dtype=torch.float64) for t in "abc"}


def test_score_is_lookahead_transference_per_unit_learning_rate_to_first_order():
    model = TwoLayer()
    x, targets = regression_data(16, seed=1)
    loss_fn = model_losses(model, x, targets, {t: nn.functional.mse_loss for t in "abc"})
    score = model_affinity_scores(model, loss_fn)
    lr = 1e-6
    torch.testing.assert_close(lookahead_transference(model, loss_fn, lr) / lr, score, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(score, score.T)  # divided by the measured task's loss: not symmetric


def test_score_formula_and_group_scores_by_hand():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    a = affinity_scores(grads, losses)
    torch.testing.assert_close(a[0, 1], torch.tensor(0.5, dtype=torch.float64))   # ⟨g0, g1⟩ / L1
    torch.testing.assert_close(a[2, 1], torch.tensor(-1.0, dtype=torch.float64))  # ⟨g2, g1⟩ / L1
    masks = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    scores = group_scores(a, masks)
    torch.testing.assert_close(scores[0, 1], (a[0, 1] + a[2, 1]) / 2)  # others' effect on task 1
    torch.testing.assert_close(scores[1], torch.stack([a[2, 0], a.new_zeros(()), a[0, 2]]))
    assert (scores[2] == 0).all()  # alone in its group: no score


def test_cubic_bspline_basis_sums_to_one_and_is_constant_outside_the_range():
    x = torch.linspace(-1, 2, 31, dtype=torch.float64)
    basis = bspline_basis(x, -1.0, 2.0, n_knots=5, degree=3)
    assert basis.shape == (31, 7) and (basis > -1e-12).all()
    torch.testing.assert_close(basis.sum(1), torch.ones(31, dtype=torch.float64))
    at_knot = bspline_basis(torch.tensor([0.5], dtype=torch.float64), -1.0, 2.0, 5, 3)[0]
    torch.testing.assert_close(at_knot[at_knot > 0], torch.tensor([1, 4, 1], dtype=torch.float64) / 6)
    outside = bspline_basis(torch.tensor([-9.0, 9.0], dtype=torch.float64), -1.0, 2.0, 5, 3)
    torch.testing.assert_close(outside, basis[[0, -1]])


def planted(affinity, masks, offsets):
    """Gain: a saturating function of the group score plus an offset of each task's own."""
    members = masks.double()
    gains = torch.tanh(3 * group_scores(affinity, masks)) + offsets
    return gains * members


def test_ensemble_recovers_planted_gains_and_the_residual_stage_helps():
    k = 7  # 21 + 35 + 35 groups of two to four tasks
    g = torch.Generator().manual_seed(0)
    affinity = torch.randn(k, k, generator=g, dtype=torch.float64) * 0.5
    groups = [c for r in (2, 3, 4) for c in itertools.combinations(range(k), r)]
    masks = torch.zeros(len(groups), k, dtype=torch.bool)
    for row, members in enumerate(groups):
        masks[row, list(members)] = True
    order = torch.randperm(len(groups), generator=g)
    train, test = masks[order[:60]], masks[order[60:]]
    offsets = torch.tensor([0.0, 0.4, -0.3, 0.2, -0.5, 0.3, -0.1], dtype=torch.float64)
    model = ETAP(n_knots=6, spline_l2=1e-4, residual_l2=1e-3).fit(affinity, train, planted(affinity, train, offsets))
    truth = planted(affinity, test, offsets)
    first_error = (model.first_prediction(test) - truth)[test].abs().mean()
    final_error = (model.predict(test) - truth)[test].abs().mean()
    assert final_error < 0.5 * first_error and final_error < 0.1
    assert (model.predict(test)[~test] == 0).all()  # non-members get no prediction
    # without offsets the first stage alone fits the saturating curve, which the line cannot
    plain = planted(affinity, train, torch.zeros(k, dtype=torch.float64))
    spline = ETAP(n_knots=8, spline_l2=1e-6, residual=False).fit(affinity, train, plain)
    truth = planted(affinity, test, torch.zeros(k, dtype=torch.float64))
    line = spline.slope * group_scores(affinity, test) + spline.offset
    line_error = (line - truth)[test].abs().mean()
    spline_error = (spline.predict(test) - truth)[test].abs().mean()
    assert spline_error < 0.3 * line_error and spline_error < 0.03


def ridge_by_normal_equations(features, targets, l2):
    """[features, 1] w = targets in least squares, with l2 on every weight but the constant's."""
    design = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
    penalty = torch.diag(torch.tensor([l2] * features.shape[1] + [0.0], dtype=features.dtype))
    return torch.linalg.solve(design.T @ design + penalty, design.T @ targets)


def random_groups(k, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    affinity = torch.randn(k, k, generator=g, dtype=torch.float64)
    groups = [c for r in sizes for c in itertools.combinations(range(k), r)]
    masks = torch.zeros(len(groups), k, dtype=torch.bool)
    for row, members in enumerate(groups):
        masks[row, list(members)] = True
    gains = torch.randn(len(groups), k, generator=g, dtype=torch.float64) * masks
    return affinity, masks, gains


def test_ridge_by_hand_leaves_the_intercept_unpenalised():
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)  # the line 1 + 2x
    coef, intercept = ridge(x, y, 1.0)
    # centred: Σ xc² = 2, Σ xc yc = 4, so coef = 4 / (2 + 1); the intercept passes through the means
    torch.testing.assert_close(coef, torch.tensor([4 / 3], dtype=torch.float64))
    torch.testing.assert_close(intercept, torch.tensor(3 - 4 / 3, dtype=torch.float64))


def test_the_first_line_is_the_least_squares_fit_of_gain_on_group_score():
    affinity, masks, gains = random_groups(5, (2, 3), seed=3)
    model = ETAP().fit(affinity, masks, gains)
    x, y = group_scores(affinity, masks)[masks], gains[masks]
    slope, offset = ridge_by_normal_equations(x[:, None], y, 0.0)
    torch.testing.assert_close(model.slope, slope)
    torch.testing.assert_close(model.offset, offset)


def test_both_stages_by_hand_with_the_default_five_knots_degree_three_and_penalties_one():
    affinity, masks, gains = random_groups(5, (2, 3), seed=4)
    model = ETAP().fit(affinity, masks, gains)
    scores = group_scores(affinity, masks)
    x, y = scores[masks], gains[masks]
    slope, offset = ridge_by_normal_equations(x[:, None], y, 0.0)
    line = slope * x + offset

    def basis(values):  # uniform knots over the range of the line on the trained pairs
        return bspline_basis(values, line.min().item(), line.max().item(), n_knots=5, degree=3)
    spline = ridge_by_normal_equations(basis(line), y, 1.0)
    first = torch.zeros_like(gains)
    first[masks] = basis(line) @ spline[:-1] + spline[-1]
    torch.testing.assert_close(model.first_prediction(masks), first)
    members = masks.double()
    residual = ridge_by_normal_equations(members, gains - first, 1.0)
    torch.testing.assert_close(model.predict(masks), first + (members @ residual[:-1] + residual[-1]) * members)


def test_gain_entries_of_non_members_are_ignored():
    affinity, masks, gains = random_groups(5, (2, 3), seed=5)
    noise = torch.randn(gains.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    clean = ETAP().fit(affinity, masks, gains).predict(masks)
    torch.testing.assert_close(ETAP().fit(affinity, masks, gains + noise * ~masks).predict(masks), clean)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_knots"):
        ETAP(n_knots=1)
    with pytest.raises(ValueError, match="spline_l2"):
        ETAP(spline_l2=0.0)
    with pytest.raises(ValueError, match="residual_l2"):
        ETAP(residual_l2=0.0)
    with pytest.raises(RuntimeError, match="fit the predictor first"):
        ETAP().predict(torch.ones(1, 3, dtype=torch.bool))


def test_bspline_basis_is_the_uniform_cubic_bspline_written_out_in_double_precision():
    """On a knot interval, with t the position inside it, the four non-zero uniform cubic B-splines are
    (1 − t)³/6, (3t³ − 6t² + 4)/6, (−3t³ + 3t² + 3t + 1)/6 and t³/6; knots at non-binary steps must
    not lose float64 precision."""
    low, high, n_knots = 0.1, 0.7, 4
    step = (high - low) / (n_knots - 1)
    x = torch.linspace(low, high, 13, dtype=torch.float64)[1:-1]
    basis = bspline_basis(x, low, high, n_knots, 3)
    assert basis.dtype == torch.float64
    span = ((x - low) / step).floor().long()
    t = (x - low) / step - span
    pieces = torch.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4,
                          -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3], 1) / 6
    expected = torch.zeros_like(basis)
    for row, i in enumerate(span.tolist()):
        expected[row, i:i + 4] = pieces[row]
    torch.testing.assert_close(basis, expected, rtol=0, atol=1e-13)


def test_two_knots_a_single_cubic_piece_is_allowed():
    # n_knots = 2 is the smallest grid: one interval, the spline stage is a ridge on one cubic piece
    affinity, masks, gains = random_groups(5, (2, 3), seed=7)
    pred = ETAP(n_knots=2).fit(affinity, masks, gains).predict(masks)
    assert torch.isfinite(pred).all() and (pred[~masks] == 0).all()


def test_equal_group_scores_give_the_mean_gain_not_nan():
    """A constant affinity makes every group score equal: the spline's range is one point, and the
    least-squares answer of both stages is the members' mean gain."""
    _, masks, gains = random_groups(5, (2, 3), seed=8)
    affinity = torch.full((5, 5), 0.5, dtype=torch.float64)  # binary fraction: scores equal exactly
    first = ETAP(residual=False).fit(affinity, masks, gains).predict(masks)
    torch.testing.assert_close(first, gains[masks].mean() * masks)


def test_float32_gains_and_integer_masks_fit_as_double_gains_and_boolean_masks():
    """The gains are read in the affinity's dtype and 0/1 masks of any dtype mean membership."""
    affinity, masks, gains = random_groups(5, (2, 3), seed=9)
    gains = gains.float().double()  # representable in float32
    reference = ETAP().fit(affinity, masks, gains).predict(masks)
    torch.testing.assert_close(ETAP().fit(affinity, masks, gains.float()).predict(masks), reference)
    torch.testing.assert_close(ETAP().fit(affinity, masks.long(), gains).predict(masks.long()), reference)


def test_shared_names_restrict_the_score_to_those_parameters():
    model = TwoLayer()
    x, targets = regression_data(8, seed=2)
    loss_fn = model_losses(model, x, targets, {t: nn.functional.mse_loss for t in "abc"})
    # only the trunk's bias: the gradients are the 4-vectors ∂L_t/∂b, computed here by autograd
    losses = torch.stack([nn.functional.mse_loss(model(x)[t], targets[t]) for t in "abc"])
    grads = torch.stack([torch.autograd.grad(loss, model.trunk.bias, retain_graph=True)[0] for loss in losses])
    expected = (grads @ grads.T) / losses.detach()[None, :]
    torch.testing.assert_close(model_affinity_scores(model, loss_fn, shared=["trunk.bias"]), expected)
