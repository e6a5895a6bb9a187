"""Rotation prediction (Deng et al. 2021): the authors' quarter turn, the per-image angles,
the auxiliary loss by hand, all-four-rotations accuracy, and the least-squares accuracy line."""

import copy

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.rotation_prediction import (
    RotationPrediction,
    all_rotations,
    fit_accuracy_estimator,
    rotate,
    rotate_each,
    rotation_accuracy,
)

from .conftest import names_under

IMG = Problem(("a", "b"), (2, 6, 6), {"a": 3, "b": 1})


def test_a_quarter_turn_is_the_authors_flip_then_transpose():
    x = torch.arange(2 * 3 * 3.0).reshape(1, 2, 3, 3)
    torch.testing.assert_close(rotate(x, 1), x.flip(-1).transpose(-2, -1))  # utils/rotation.py, tensor_rot_90
    torch.testing.assert_close(rotate(x, 2), x.flip(-1).flip(-2))  # tensor_rot_180
    torch.testing.assert_close(rotate(x, 3), x.transpose(-2, -1).flip(-1))  # tensor_rot_270


def test_each_image_is_turned_by_its_own_label():
    x = torch.randn(4, 1, 3, 3)
    labels = torch.tensor([2, 0, 3, 1])
    turned = rotate_each(x, labels)
    for i, k in enumerate(labels.tolist()):
        torch.testing.assert_close(turned[i], torch.rot90(x[i], k, dims=(-2, -1)))
    images, expand_labels = all_rotations(x)
    assert expand_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    torch.testing.assert_close(images[4 * 3 + 1], torch.rot90(x[1], 3, dims=(-2, -1)))


@pytest.mark.parametrize("weight_kwargs, weight", [({"rotation_weight": 0.5}, 0.5), ({}, 1.0)])
def test_the_auxiliary_loss_is_the_rotation_cross_entropy_of_the_drawn_angles(weight_kwargs, weight):
    """Weighted by rotation_weight, 1 by default as in the authors' plain sum of the two losses."""
    torch.manual_seed(0)
    model = RotationPrediction.from_problem(IMG, width=4, seed=3, **weight_kwargs)
    x = torch.randn(5, 2, 6, 6)
    labels = torch.randint(4, (5,), generator=torch.Generator().manual_seed(3))  # the model's first draw
    model.train()
    model(x)
    turned = torch.stack([torch.rot90(x[i], int(k), dims=(-2, -1)) for i, k in enumerate(labels)])
    expected = weight * F.cross_entropy(model.rotation_head(model.encoder(turned)), labels)
    torch.testing.assert_close(model.auxiliary_loss(), expected)
    # the task outputs are those of the unrotated batch through the same encoder
    torch.testing.assert_close(model(x)["a"], model.heads["a"](model.encoder(x)))


def test_the_rotation_head_learns_only_through_the_auxiliary_loss():
    torch.manual_seed(1)
    model = build("rotation_prediction", IMG, width=4)
    out = model(torch.randn(3, 2, 6, 6))
    sum(o.sum() for o in out.values()).backward()
    assert all(p.grad is None for p in model.rotation_head.parameters())
    model.auxiliary_loss().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.rotation_head.parameters())


def test_both_losses_train_the_shared_backbone(params_with_grad):
    """The authors minimise the sum of both losses through one backbone: the rotation loss
    reaches the encoder and the rotation head, and every task's output reaches the encoder."""
    torch.manual_seed(1)
    model = build("rotation_prediction", IMG, width=4)
    x = torch.randn(3, 2, 6, 6)
    encoder = names_under(model, "encoder.")
    for t in IMG.tasks:
        assert encoder | names_under(model, f"heads.{t}.") == params_with_grad(model, model(x)[t].sum()), t
    model(x)
    assert params_with_grad(model, model.auxiliary_loss()) == encoder | names_under(model, "rotation_head.")


def test_a_copy_made_after_a_training_pass_keeps_no_loss():
    """The cached rotation loss belongs to one pass and its graph: a deep copy starts without it."""
    model = build("rotation_prediction", IMG, width=4).train()
    model(torch.randn(2, 2, 6, 6))
    with pytest.raises(RuntimeError, match="training mode"):
        copy.deepcopy(model).auxiliary_loss()


def test_eval_mode_draws_nothing_and_keeps_no_loss():
    model = build("rotation_prediction", IMG, width=4).eval()
    state = model.generator.get_state()
    model(torch.randn(2, 2, 6, 6))
    assert torch.equal(model.generator.get_state(), state)
    with pytest.raises(RuntimeError, match="training mode"):
        model.auxiliary_loss()


def test_rotation_accuracy_counts_all_four_rotations_of_every_image():
    model = build("rotation_prediction", IMG, width=4)
    x = torch.randn(3, 2, 6, 6)
    images, labels = all_rotations(x)
    bias = model.rotation_head[-1].bias
    with torch.no_grad():  # a head that always says "90 degrees" is right on 1 in 4
        model.rotation_head[-1].weight.zero_()
        bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert rotation_accuracy(model, x) == pytest.approx(0.25)
    scores = model.rotation_logits(images)
    assert (scores.argmax(1) == labels).float().mean().item() == pytest.approx(0.25)


def test_the_fitted_line_is_least_squares_and_predicts_from_rotation_accuracy():
    r = torch.tensor([0.4, 0.5, 0.7, 0.9])
    acc = 1.5 * r - 0.2
    fit = fit_accuracy_estimator(r, acc)
    assert fit.slope == pytest.approx(1.5) and fit.intercept == pytest.approx(-0.2)
    assert fit.pearson == pytest.approx(1.0)
    assert fit.predict(0.6) == pytest.approx(0.7)
    noisy = acc + torch.tensor([0.05, -0.05, -0.05, 0.05])
    fit = fit_accuracy_estimator(r, noisy)
    design = torch.stack([r, torch.ones(4)], dim=1).double()
    slope, intercept = torch.linalg.lstsq(design, noisy.double().unsqueeze(1)).solution.flatten().tolist()
    assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept))
    assert fit.pearson == pytest.approx(torch.corrcoef(torch.stack([r, noisy]))[0, 1].item(), abs=1e-6)
    assert fit_accuracy_estimator(r, -acc).pearson == pytest.approx(-1.0)


def test_non_square_and_vector_inputs_are_refused_when_built():
    for shape in [(3, 4, 5), (3, 1, 1), (6,)]:
        with pytest.raises(ValueError):
            build("rotation_prediction", Problem(("a",), shape, {"a": 2}))
    with pytest.raises(ValueError, match="rotation_weight"):
        build("rotation_prediction", IMG, rotation_weight=-1.0)


def test_non_square_or_unbatched_images_are_refused_by_the_rotation_helpers():
    """A quarter turn of a non-square image changes its shape, and the helpers need (B, C, S, S)."""
    for bad in [torch.randn(2, 1, 3, 4), torch.randn(1, 3, 3)]:
        with pytest.raises(ValueError, match="square"):
            rotate_each(bad, torch.zeros(len(bad), dtype=torch.long))
        with pytest.raises(ValueError, match="square"):
            all_rotations(bad)


def test_build_checks_heads_width_and_depth_and_accepts_the_smallest_square_image():
    """Side 2 is the smallest image a quarter turn changes, so it is accepted; width and
    depth reach the trunk (one conv block per unit of depth) and must be positive."""
    model = build("rotation_prediction", Problem(("a",), (1, 2, 2), {"a": 2}), width=3)
    assert model(torch.randn(2, 1, 2, 2))["a"].shape == (2, 2)
    for depth in (1, 3):
        assert len(build("rotation_prediction", IMG, width=4, depth=depth).encoder.blocks) == depth
    with pytest.raises(ValueError, match="width"):
        build("rotation_prediction", IMG, width=0)
    enc = torch.nn.Conv2d(2, 4, 1)
    with pytest.raises(ValueError, match="head"):
        RotationPrediction(("a", "b"), enc, {"a": torch.nn.Identity()}, torch.nn.Identity())


def test_auxiliary_loss_before_any_training_pass_is_refused():
    model = build("rotation_prediction", IMG, width=4)
    with pytest.raises(RuntimeError, match="training mode"):
        model.auxiliary_loss()


def test_the_fit_takes_two_or_more_sets_of_any_spread_and_refuses_the_rest():
    """Least squares needs two sets with different rotation accuracies; it must not care
    about the sign of their skew, and plain int accuracies (0 or 1) are numbers too."""
    r, a = [0.1, 0.8, 0.9], [0.2, 0.6, 0.7]  # mean 0.6: deviations -0.5, 0.2, 0.3 (negative skew)
    design = torch.tensor([[x, 1.0] for x in r], dtype=torch.float64)
    expected = torch.linalg.lstsq(design, torch.tensor(a, dtype=torch.float64).unsqueeze(1)).solution.flatten()
    fit = fit_accuracy_estimator(r, a)
    assert (fit.slope, fit.intercept) == pytest.approx(tuple(expected.tolist()))
    two = fit_accuracy_estimator([0.2, 0.6], [0.3, 0.5])  # two points: the line through them
    assert (two.slope, two.intercept, two.pearson) == pytest.approx((0.5, 0.2, 1.0))
    ints = fit_accuracy_estimator([0, 1, 1], [0, 1, 1])
    assert (ints.slope, ints.intercept) == pytest.approx((1.0, 0.0))
    flat = fit_accuracy_estimator([0.2, 0.4, 0.6], [0.5, 0.5, 0.5])  # accuracy does not move: no correlation
    assert (flat.slope, flat.intercept) == pytest.approx((0.0, 0.5)) and flat.pearson != flat.pearson  # NaN
    for bad_r, bad_a in [([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]), ([0.1, 0.2, 0.3], [0.1, 0.2]), ([0.5], [0.5])]:
        with pytest.raises(ValueError):
            fit_accuracy_estimator(bad_r, bad_a)
