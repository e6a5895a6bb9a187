"""MuST (Ghiasi et al. 2021): pseudo labels by hand, the student loss by hand, a self-training run."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.distillation.must import IGNORE, MuST, pseudo_label

KINDS = {"cls": "classification", "seg": "segmentation", "depth": "regression"}


class Fixed(nn.Module):
    """A 'teacher' that returns a stored output whatever the input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.w * self.out


def test_pseudo_labels_by_hand():
    cls = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    # one image, 2 classes, 1 x 3 pixels: confidences 0.9, 0.5 (tie), 0.8 for class 1
    seg = torch.log(torch.tensor([[[[0.9, 0.5, 0.2]], [[0.1, 0.5, 0.8]]]]))
    depth = torch.tensor([[[[1.5, 2.0, 0.5]]]])
    teachers = {"cls": Fixed(cls), "seg": Fixed(seg), "depth": Fixed(depth)}
    labels = pseudo_label(KINDS, teachers, torch.zeros(1, 3), threshold=0.6)
    torch.testing.assert_close(labels["cls"], torch.tensor([[0.7, 0.2, 0.1]]))
    assert labels["seg"].tolist() == [[[0, IGNORE, 1]]]  # the 50/50 pixel is dropped
    torch.testing.assert_close(labels["depth"], depth)
    assert all(not v.requires_grad for v in labels.values())  # computed under no_grad



def test_regression_pseudo_labels_are_copies_not_the_teachers_tensor():
    """A teacher may return its input or a stored tensor: the labels must not change with it."""
    x = torch.tensor([[1.0, 2.0]])
    labels = pseudo_label({"depth": "regression"}, {"depth": nn.Identity()}, x)
    x.mul_(0)
    torch.testing.assert_close(labels["depth"], torch.tensor([[1.0, 2.0]]))


def test_default_threshold_keeps_pixels_at_one_half_and_drops_those_below():
    """Confidence exactly 0.5 is kept (ignore only below), 0.4 is dropped at the default 0.5."""
    inf = float("inf")
    # 3 classes, 1 x 2 pixels: pixel 1 is [1/2, 1/2, 0] exactly, pixel 2 is [0.4, 0.35, 0.25]
    seg = torch.tensor([[[[0.0, math.log(0.4)]], [[0.0, math.log(0.35)]], [[-inf, math.log(0.25)]]]])
    labels = pseudo_label({"seg": "segmentation"}, {"seg": Fixed(seg)}, torch.zeros(1))["seg"]
    assert labels[0, 0, 0] != IGNORE and labels[0, 0, 1] == IGNORE
    # classification pseudo labels are distributions over dim 1, also for outputs with more dims
    soft = pseudo_label({"c": "classification"}, {"c": Fixed(seg[:, :, 0])}, torch.zeros(1))["c"]
    torch.testing.assert_close(soft.sum(1), torch.ones(1, 2))

def test_student_loss_by_hand():
    must = MuST(KINDS, weights={"cls": 1.0, "seg": 2.0, "depth": 0.5})
    student = {
        "cls": torch.zeros(1, 2),                          # uniform: soft CE = log 2
        "seg": torch.zeros(1, 2, 1, 3),                    # log 2 on each kept pixel
        "depth": torch.tensor([[[[1.0, 1.0, 1.0]]]]),      # |1 − [3, 0, 1]| mean = 1 (squared: 5/3)
    }
    pseudo = {"cls": torch.tensor([[0.3, 0.7]]), "seg": torch.tensor([[[1, IGNORE, 0]]]),
              "depth": torch.tensor([[[[3.0, 0.0, 1.0]]]])}
    expected = math.log(2) + 2 * math.log(2) + 0.5 * 1.0
    assert math.isclose(must(student, pseudo).item(), expected, rel_tol=1e-6)


def test_soft_label_loss_is_smallest_when_the_student_copies_the_teacher():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 5, generator=g)
    must = MuST({"cls": "classification"})
    target = {"cls": torch.softmax(teacher, 1)}
    at_teacher = must({"cls": teacher}, target)
    entropy = -(target["cls"] * torch.log_softmax(teacher, 1)).sum(1).mean()
    torch.testing.assert_close(at_teacher, entropy)  # cross-entropy = entropy at the optimum
    for _ in range(5):
        assert must({"cls": teacher + torch.randn(8, 5, generator=g)}, target) > at_teacher


def test_all_pixels_ignored_gives_a_finite_zero_loss_and_bad_kinds_raise():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = MuST({"seg": "segmentation"})({"seg": logits}, {"seg": torch.full((2, 4, 4), IGNORE)})
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        MuST({"a": "detection"})


def test_self_training_a_student_on_two_teachers_pseudo_labels():
    torch.manual_seed(0)
    unlabeled = torch.randn(24, 3, 5, 5)
    teachers = {"seg": nn.Conv2d(3, 4, 3, padding=1), "depth": nn.Conv2d(3, 1, 3, padding=1)}
    pseudo = pseudo_label({"seg": "segmentation", "depth": "regression"}, teachers, unlabeled, 0.3)
    trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    heads = nn.ModuleDict({"seg": nn.Conv2d(16, 4, 1), "depth": nn.Conv2d(16, 1, 1)})
    must = MuST({"seg": "segmentation", "depth": "regression"})
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=3e-2)

    def loss():
        h = trunk(unlabeled)
        return must({t: heads[t](h) for t in heads}, pseudo)

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.5 * first
    assert all(p.grad is None for m in teachers.values() for p in m.parameters())
    h = trunk(unlabeled)  # the student now agrees with the segmentation teacher on kept pixels
    kept = pseudo["seg"] != IGNORE
    agree = (heads["seg"](h).argmax(1) == pseudo["seg"])[kept].float().mean()
    assert agree > 0.8 and F.l1_loss(heads["depth"](h), pseudo["depth"]) < 0.3


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_threshold_outside_the_unit_interval_is_refused(threshold):
    teachers = {"seg": Fixed(torch.zeros(1, 2, 1, 3))}
    with pytest.raises(ValueError, match=f"threshold must be in \\[0, 1\\], got {threshold}"):
        pseudo_label(KINDS, teachers, torch.zeros(1, 3), threshold=threshold)


@pytest.mark.parametrize("weight", [-1.0, float("nan")])
def test_negative_or_nan_task_weights_are_refused(weight):
    with pytest.raises(ValueError, match=rf"weights\[depth\] must be at least 0, got {weight}"):
        MuST(KINDS, weights={"cls": 1.0, "seg": 1.0, "depth": weight})


def test_ignored_pixels_add_nothing_and_labels_get_no_gradient():
    """Only kept pixels enter the mean; a label carrying a graph (a live teacher output) is still frozen."""
    # 2 classes, 1 x 2 pixels; pixel 1 kept with label 1, pixel 2 ignored (as class 0 its CE would be log(1 + e^-3))
    logits = torch.tensor([[[[0.0, 3.0]], [[math.log(3.0), 0.0]]]])  # pixel 1: p(class 1) = 3/4
    seg = MuST({"seg": "segmentation"})({"seg": logits}, {"seg": torch.tensor([[[1, IGNORE]]])})
    assert math.isclose(seg.item(), -math.log(0.75), rel_tol=1e-6)
    depth_teacher = torch.tensor([2.0, -1.0], requires_grad=True)
    student = torch.zeros(2, requires_grad=True)
    must_loss = MuST({"depth": "regression"})({"depth": student}, {"depth": 3.0 * depth_teacher})
    must_loss.backward()
    assert depth_teacher.grad is None
    torch.testing.assert_close(student.grad, torch.tensor([-0.5, 0.5]))  # sign(s − y) / 2


@pytest.mark.parametrize("student, pseudo, message", [
    ({"cls": torch.zeros(2, 3)}, {}, "no pseudo labels: give at least one task's"),
    ({"cls": torch.zeros(2, 3)}, {"clz": torch.zeros(2, 3)},
     r"pseudo labels for unknown task\(s\) \['clz'\]; the tasks are \['cls'\]"),
    ({}, {"cls": torch.zeros(2, 3)}, r"student outputs lack task\(s\) \['cls'\]"),
])
def test_pseudo_labels_it_cannot_use_are_refused_by_name(student, pseudo, message):
    """These were 'stack expects a non-empty TensorList' and bare KeyErrors."""
    with pytest.raises(ValueError, match=message):
        MuST({"cls": "classification"})(student, pseudo)


def test_thresholds_zero_and_one_are_allowed_and_keep_every_pixel_or_only_certain_ones():
    """Both ends of [0, 1]: 0 keeps the arg-max everywhere; 1 keeps only pixels the teacher is sure of."""
    inf = float("inf")
    # 2 classes, 1 x 3 pixels: probabilities of class 0 are 1 (exactly), 0.5 and 0.25
    seg = torch.tensor([[[[0.0, 0.0, 0.0]], [[-inf, 0.0, math.log(3.0)]]]])
    everything = pseudo_label({"seg": "segmentation"}, {"seg": Fixed(seg)}, torch.zeros(1), threshold=0.0)["seg"]
    assert everything.tolist() == [[[0, 0, 1]]]
    certain = pseudo_label({"seg": "segmentation"}, {"seg": Fixed(seg)}, torch.zeros(1), threshold=1.0)["seg"]
    assert certain.tolist() == [[[0, IGNORE, IGNORE]]]


def test_soft_label_loss_on_sequence_outputs_is_per_position_over_the_class_dimension():
    """Classes on dim 1 and a trailing axis (batch, classes, positions): the mean of per-position soft CEs."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 4, generator=g)
    target = torch.softmax(torch.randn(2, 3, 4, generator=g), dim=1)
    per_position = [-(target[b, :, i] * student[b, :, i].log_softmax(0)).sum() for b in range(2) for i in range(4)]
    loss = MuST({"cls": "classification"})({"cls": student}, {"cls": target})
    torch.testing.assert_close(loss, torch.stack(per_position).mean())
