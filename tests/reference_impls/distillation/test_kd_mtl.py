"""KD-MTL: adapted, L2-normalised feature distance to frozen single-task teachers."""

import math

import pytest
import torch
from torch import nn

from reference_impls.distillation.kd_mtl import KDMTL


def _identity(kd: KDMTL) -> KDMTL:
    with torch.no_grad():
        for a in kd.adaptors.values():
            a.copy_(torch.eye(*a.shape))
    return kd


def test_identity_adaptors_and_equal_features_give_zero_loss_for_vectors_and_maps():
    g = torch.Generator().manual_seed(0)
    kd = _identity(KDMTL(4, {"seg": 4, "depth": 4}))
    for shape in ((5, 4), (2, 4, 3, 3)):
        s = torch.randn(*shape, generator=g)
        assert kd(s, {"seg": s.clone(), "depth": s.clone()}).item() < 1e-10
        assert kd(s, {"seg": s.clone(), "depth": -s}).item() > 1.0


def test_distance_by_hand():
    kd = _identity(KDMTL(2, {"a": 2}))
    student = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [5.0, 5.0]])
    # row 1: ‖[1,0] − [0,1]‖² = 2; row 2: same direction, 0; mean over the batch = 1
    assert math.isclose(kd(student, {"a": teacher}).item(), 1.0, rel_tol=1e-6)
    weighted = _identity(KDMTL(2, {"a": 2}, weights={"a": 0.25}))
    assert math.isclose(weighted(student, {"a": teacher}).item(), 0.25, rel_tol=1e-6)



def test_feature_maps_are_normalised_over_channels_at_each_position():
    """On a 1 x 2 x 1 x 2 map each position is its own 2-channel vector, not each channel a row."""
    kd = _identity(KDMTL(2, {"a": 2}))
    student = torch.tensor([[[[3.0, 1.0]], [[0.0, 1.0]]]])  # positions: (3, 0) and (1, 1)
    teacher = torch.tensor([[[[0.0, 2.0]], [[2.0, 2.0]]]])  # positions: (0, 2) and (2, 2)
    # position 1: ‖(1,0) − (0,1)‖² = 2; position 2: same direction, 0; mean over positions = 1
    assert math.isclose(kd(student, {"a": teacher}).item(), 1.0, rel_tol=1e-6)

def test_loss_ignores_the_scale_of_each_teacher_and_of_the_student():
    torch.manual_seed(0)
    kd = KDMTL(6, {"a": 3, "b": 5})
    s = torch.randn(4, 6, 2, 2)
    t = {"a": torch.randn(4, 3, 2, 2), "b": torch.randn(4, 5, 2, 2)}
    base = kd(s, t)
    torch.testing.assert_close(kd(s, {"a": 1e3 * t["a"], "b": 1e-3 * t["b"]}), base)
    torch.testing.assert_close(kd(7.0 * s, t), base)
    assert not torch.allclose(kd(s, {"a": t["a"], "b": -t["b"]}), base)


def test_gradients_reach_student_and_adaptors_but_not_teachers():
    torch.manual_seed(0)
    student = nn.Conv2d(3, 8, 3, padding=1)
    teachers = {"seg": nn.Conv2d(3, 4, 3, padding=1), "depth": nn.Conv2d(3, 6, 3, padding=1)}
    kd = KDMTL(8, {"seg": 4, "depth": 6})
    x = torch.randn(2, 3, 5, 5)
    loss = kd(student(x), {t: m(x) for t, m in teachers.items()})  # teachers not even in no_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(a.grad.abs().sum() > 0 for a in kd.adaptors.values())
    assert all(p.grad is None for m in teachers.values() for p in m.parameters())


def test_zero_features_stay_finite():
    kd = KDMTL(3, {"a": 2})
    s = torch.zeros(2, 3, requires_grad=True)
    loss = kd(s, {"a": torch.zeros(2, 2)})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_short_training_aligns_a_shared_student_with_two_frozen_teachers():
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    teachers = {"a": nn.Linear(5, 4).requires_grad_(False), "b": nn.Linear(5, 3).requires_grad_(False)}
    targets = {t: m(x) for t, m in teachers.items()}  # stored teacher outputs
    student = nn.Linear(5, 8)
    kd = KDMTL(8, {"a": 4, "b": 3})
    opt = torch.optim.Adam([*student.parameters(), *kd.parameters()], lr=3e-2)
    first = kd(student(x), targets).item()
    for _ in range(100):
        opt.zero_grad()
        kd(student(x), targets).backward()
        opt.step()
    assert kd(student(x), targets).item() < 0.1 * first


@pytest.mark.parametrize("kwargs, message", [
    ({"student_channels": 0}, "student_channels must be at least 1, got 0"),
    ({"student_channels": -1}, "student_channels must be at least 1, got -1"),
    ({"teacher_channels": {"a": 0}}, r"teacher_channels\[a\] must be at least 1, got 0"),
    ({"weights": {"a": -1.0}}, r"weights\[a\] must be at least 0, got -1.0"),
    ({"weights": {"a": float("nan")}}, r"weights\[a\] must be at least 0, got nan"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDMTL(**{"student_channels": 4, "teacher_channels": {"a": 3}, **kwargs})


def test_distance_is_squared_and_tasks_add_up_by_hand():
    """Opposite unit vectors are 2 apart, so 4 (not 2) each; two tasks give the sum of their λ_t-weighted terms."""
    kd = _identity(KDMTL(2, {"a": 2, "b": 2}, weights={"a": 1.0, "b": 0.5}))
    student = torch.tensor([[3.0, 0.0]])
    loss = kd(student, {"a": torch.tensor([[-1.0, 0.0]]), "b": torch.tensor([[0.0, 2.0]])})
    assert math.isclose(loss.item(), 1.0 * 4.0 + 0.5 * 2.0, rel_tol=1e-6)


def test_adaptors_are_xavier_normal_initialised():
    """Gaussian with std sqrt(2 / (fan_in + fan_out)); a Xavier-uniform draw never exceeds sqrt(3) std."""
    torch.manual_seed(0)
    a = KDMTL(300, {"a": 100}).adaptors["a"].detach()
    std = math.sqrt(2.0 / 400)
    assert a.shape == (100, 300)
    assert math.isclose(a.std().item(), std, rel_tol=0.03)
    assert a.abs().max().item() > 1.2 * math.sqrt(3.0) * std


@pytest.mark.parametrize("teacher, message", [
    ({}, "no teacher features: give at least one task's"),
    ({"sge": torch.zeros(2, 4)}, r"teacher features for unknown task\(s\) \['sge'\]; the tasks are \['depth', 'seg'\]"),
])
def test_teacher_features_it_has_no_adaptor_for_are_refused_by_name(teacher, message):
    """These were 'stack expects a non-empty TensorList' and a bare KeyError."""
    with pytest.raises(ValueError, match=message):
        KDMTL(4, {"seg": 4, "depth": 4})(torch.zeros(2, 4), teacher)


@pytest.mark.parametrize("student, teacher", [
    (torch.zeros(5, 4), torch.ones(1, 4)),                # one teacher row would broadcast over the batch
    (torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 1, 1)),    # a pooled teacher would broadcast over positions
    (torch.zeros(2, 4), torch.ones(2, 3)),                # channels other than the adaptor's output
])
def test_teacher_features_of_another_shape_than_the_adapted_features_are_refused(student, teacher):
    with pytest.raises(ValueError):
        KDMTL(4, {"seg": 4})(student, {"seg": teacher})
