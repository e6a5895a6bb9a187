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
