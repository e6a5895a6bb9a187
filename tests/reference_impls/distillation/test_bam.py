"""BAM! (Clark et al. 2019): the teacher-annealed target by hand, its two limits, the schedule."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.distillation.bam import BAM, annealing_lambda, classification_target, regression_target


def test_annealed_target_by_hand():
    teacher = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))  # softmax = [0.5, 0.25, 0.25]
    gold = torch.tensor([2])
    target = classification_target(gold, teacher, lam=0.4)
    # 0.4 · [0, 0, 1] + 0.6 · [0.5, 0.25, 0.25]
    torch.testing.assert_close(target, torch.tensor([[0.3, 0.15, 0.55]]))
    student = torch.zeros(1, 3)  # uniform: −Σ target · log(1/3) = log 3
    loss = BAM()({"a": student}, {"a": teacher}, {"a": gold}, progress=0.4)
    assert math.isclose(loss.item(), math.log(3), rel_tol=1e-6)


def test_limits_are_pure_distillation_and_pure_supervision():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    bam = BAM()
    start = bam({"a": s}, {"a": t}, {"a": y}, progress=0.0)
    kd = -(torch.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(start, kd)
    torch.testing.assert_close(bam({"a": s}, {"a": t}, {"a": y}, progress=1.0), F.cross_entropy(s, y))
    # beyond the schedule λ stays clipped to [0, 1]
    assert annealing_lambda(-0.5) == 0.0 and annealing_lambda(3.0) == 1.0


def test_loss_is_linear_in_progress_and_differs_from_both_ends():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    bam = BAM()
    at = [bam({"a": s}, {"a": t}, {"a": y}, progress=p) for p in (0.0, 0.25, 1.0)]
    torch.testing.assert_close(at[1], 0.75 * at[0] + 0.25 * at[2])
    assert not torch.isclose(at[0], at[2])


def test_regression_task_and_fixed_weight_variant():
    bam = BAM(regression_tasks=["sts"])
    student, teacher, gold = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0]), torch.tensor([0.0, 4.0])
    # λ = 0.5: targets [1.5, 3.0]; squared errors 0.25 and 9 -> mean 4.625
    loss = bam({"sts": student}, {"sts": teacher}, {"sts": gold}, progress=0.5)
    assert math.isclose(loss.item(), 4.625, rel_tol=1e-6)
    fixed = BAM(regression_tasks=["sts"], anneal=False, distill_weight=0.25)
    for p in (0.0, 0.9):  # target = 0.75 y + 0.25 f_T = [0.75, 3.5] whatever the progress
        out = fixed({"sts": student}, {"sts": teacher}, {"sts": gold}, progress=p)
        assert math.isclose(out.item(), (0.25**2 + 3.5**2) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError):
        BAM(distill_weight=1.5)


def test_gradients_reach_the_student_only_and_training_follows_the_schedule():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    teachers = {"a": nn.Linear(6, 3), "b": nn.Linear(6, 2)}
    gold = {"a": torch.randint(0, 3, (32,)), "b": torch.randint(0, 2, (32,))}
    trunk, heads = nn.Linear(6, 16), nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 2)})
    bam = BAM()
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=2e-2)
    steps, first = 150, None
    for step in range(steps):
        h = torch.relu(trunk(x))
        loss = bam({t: heads[t](h) for t in heads}, {t: m(x) for t, m in teachers.items()},
                   gold, progress=step / steps)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for m in teachers.values() for p in m.parameters())
    h = torch.relu(trunk(x))  # at the end of the schedule: fitted to the gold labels
    final = sum(F.cross_entropy(heads[t](h), gold[t]) for t in heads)
    assert final.item() < 0.5 * first


@pytest.mark.parametrize("weight", [-0.5, 1.5, float("nan")])
def test_distill_weight_outside_the_unit_interval_is_refused_with_its_value(weight):
    with pytest.raises(ValueError, match=rf"distill_weight must be in \[0, 1\], got {weight}"):
        BAM(anneal=False, distill_weight=weight)


def test_tasks_add_up_and_a_regression_teacher_gets_no_gradient():
    """Σ_t over tasks (not their mean); the teacher's prediction is a fixed target for regression too."""
    bam = BAM(regression_tasks=["sts"])
    teacher = torch.tensor([3.0, 2.0], requires_grad=True)
    student = {"sts": torch.tensor([1.0, 0.0], requires_grad=True), "a": torch.zeros(1, 3)}
    loss = bam(student, {"sts": teacher, "a": torch.zeros(1, 3)},
               {"sts": torch.tensor([0.0, 4.0]), "a": torch.tensor([1])}, progress=0.5)
    assert math.isclose(loss.item(), 4.625 + math.log(3), rel_tol=1e-6)  # regression by hand as above
    loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(student["sts"].grad, torch.tensor([-0.5, -3.0]))  # 2 (s − target) / 2


def test_fixed_weight_default_is_the_official_half_and_half_mixture():
    """Without annealing the default w = 0.5 (``distill_weight`` in the authors' ``configure.py``).

    Gold class 0, uniform teacher: target = 0.5 · [1, 0] + 0.5 · [1/2, 1/2] = [3/4, 1/4];
    student logits [0, ln 3] give p = [1/4, 3/4]; loss = −(3/4 ln 1/4 + 1/4 ln 3/4) at any progress.
    """
    bam = BAM(anneal=False)
    assert bam.distill_weight == 0.5
    assert [bam.gold_weight(p) for p in (0.0, 0.3, 1.0)] == [0.5, 0.5, 0.5]
    student, teacher, gold = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2), torch.tensor([0])
    expected = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    for p in (0.0, 0.7):
        loss = bam({"a": student}, {"a": teacher}, {"a": gold}, progress=p)
        assert math.isclose(loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("teacher, gold, message", [
    ({}, {"a": torch.zeros(3)}, r"teacher outputs lack task\(s\) \['a'\]"),
    ({"a": torch.zeros(3)}, {"b": torch.zeros(3)}, r"gold labels lack task\(s\) \['a'\]"),
])
def test_a_task_the_teacher_or_the_labels_lack_is_named(teacher, gold, message):
    """A missing task was a bare KeyError from inside the loss."""
    with pytest.raises(ValueError, match=message):
        BAM(regression_tasks=["a"])({"a": torch.zeros(3)}, teacher, gold, progress=0.5)


def test_dense_outputs_are_distilled_per_pixel_over_the_class_dimension_leaving_unlabelled_pixels_out():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    gold = torch.randint(0, 4, (2, 3, 5), generator=g)
    gold[0, 1, 2] = gold[1, 0, :] = -1
    lam = 0.3
    total, count = 0.0, 0
    for b, i, j in itertools.product(range(2), range(3), range(5)):  # one pixel at a time, as a vector task
        if gold[b, i, j] < 0:
            continue
        target = lam * torch.nn.functional.one_hot(gold[b, i, j], 4) + (1 - lam) * teacher[b, :, i, j].softmax(0)
        total = total - (target * student[b, :, i, j].log_softmax(0)).sum()
        count += 1
    loss = BAM()({"seg": student}, {"seg": teacher}, {"seg": gold}, progress=lam)
    torch.testing.assert_close(loss, total / count)
    assert count == 30 - 6
    nothing = BAM()({"seg": student}, {"seg": teacher}, {"seg": torch.full_like(gold, -1)}, progress=lam)
    assert nothing.item() == 0.0


def test_sequence_outputs_are_distilled_per_position_over_the_class_dimension():
    """Classes on dim 1 with one trailing axis (batch, classes, tokens), e.g. tagging: one target per token."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    gold = torch.randint(0, 4, (2, 5), generator=g)
    gold[1, 3] = -1
    lam = 0.6
    total, count = 0.0, 0
    for b, i in itertools.product(range(2), range(5)):  # one token at a time, as a vector task
        if gold[b, i] < 0:
            continue
        target = lam * F.one_hot(gold[b, i], 4) + (1 - lam) * teacher[b, :, i].softmax(0)
        total = total - (target * student[b, :, i].log_softmax(0)).sum()
        count += 1
    loss = BAM()({"tag": student}, {"tag": teacher}, {"tag": gold}, progress=lam)
    torch.testing.assert_close(loss, total / count)


def test_fixed_weight_ends_of_the_unit_interval_are_pure_supervision_and_pure_distillation():
    """w = 0 trains on the gold labels alone, w = 1 on the teacher alone; both ends of [0, 1] are allowed."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    gold_only = BAM(anneal=False, distill_weight=0.0)({"a": s}, {"a": t}, {"a": y}, progress=0.3)
    torch.testing.assert_close(gold_only, F.cross_entropy(s, y))
    teacher_only = BAM(anneal=False, distill_weight=1.0)({"a": s}, {"a": t}, {"a": y}, progress=0.3)
    torch.testing.assert_close(teacher_only, -(torch.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_targets_keep_the_teachers_dtype(dtype):
    """Integer labels and float64 gold values must not promote a bfloat16 / float32 model's targets."""
    teacher = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], dtype=dtype)
    target = classification_target(torch.tensor([2, 0]), teacher, lam=0.3)
    assert target.dtype == dtype
    torch.testing.assert_close(target.sum(1), torch.ones(2, dtype=dtype))
    gold = torch.tensor([1.0, 4.0], dtype=torch.float64)  # e.g. scores loaded with numpy
    assert regression_target(gold, torch.tensor([3.0, 2.0], dtype=dtype), lam=0.5).dtype == dtype
    assert regression_target(gold, torch.tensor([3.0, 2.0]), lam=0.5).dtype == torch.float32
