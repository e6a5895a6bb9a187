"""Policy distillation: the paper's NLL, MSE and tempered-KL losses, by hand and in the limit τ → 0."""

import math

import pytest
import torch

from reference_impls.distillation.policy_distillation import PolicyDistillation, kl_loss, nll_loss


def test_nll_is_cross_entropy_on_the_teachers_best_action_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.5, 3.0]])  # best action: 2
    expected = math.log(math.e + math.e**2 + 1.0)  # −log(e^0 / (e^1 + e^2 + e^0))
    got = PolicyDistillation("nll")({"a": student}, {"a": teacher})
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_mse_sums_over_actions_and_averages_over_states_by_hand():
    student = torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0, 2.0], [1.0, 4.0]])
    got = PolicyDistillation("mse")({"a": student}, {"a": teacher})
    assert math.isclose(got.item(), (1.0 + 4.0 + 9.0) / 2, rel_tol=1e-6)


def test_kl_tempers_only_the_teacher_by_hand():
    teacher = torch.tensor([[0.0, 0.5 * math.log(3.0)]])  # at τ = 0.5: softmax = [1/4, 3/4]
    student = torch.tensor([[0.0, 0.0]])  # untempered softmax = [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = PolicyDistillation("kl", tau=0.5)({"a": student}, {"a": teacher})
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_kl_tends_to_the_nll_loss_as_tau_goes_to_zero():
    g = torch.Generator().manual_seed(0)
    teacher = torch.tensor([[0.0, 0.3, 0.1, -0.2], [1.0, 0.2, 0.9, 0.0]])
    student = torch.randn(2, 4, generator=g)
    nll = nll_loss(student, teacher)
    gaps = [(kl_loss(student, teacher, tau) - nll).abs().item() for tau in (1.0, 0.1, 0.01, 1e-3)]
    assert gaps[0] > 0.05
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-6


def test_kl_is_zero_exactly_when_the_distributions_match():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 5, generator=g)
    tau = 0.2
    # softmax is shift invariant: q^S = q^T / τ + c gives the same distribution.
    matching = (teacher / tau + 7.0).requires_grad_(True)
    loss = kl_loss(matching, teacher, tau)
    loss.backward()
    assert abs(loss.item()) < 1e-5 and matching.grad.abs().max().item() < 1e-5
    off = teacher / tau + 0.1 * torch.randn(3, 5, generator=g)
    assert kl_loss(off, teacher, tau).item() > 1e-4


def test_tasks_are_summed_and_must_match():
    g = torch.Generator().manual_seed(2)
    s = {t: torch.randn(4, 3, generator=g) for t in ("a", "b")}
    q = {t: torch.randn(4, 3, generator=g) for t in ("a", "b")}
    pd = PolicyDistillation("kl", tau=0.1)
    total = pd(s, q)
    torch.testing.assert_close(total, pd({"a": s["a"]}, {"a": q["a"]}) + pd({"b": s["b"]}, {"b": q["b"]}))
    with pytest.raises(ValueError, match=r"tasks differ: \['a'\] vs \['a', 'b'\]"):
        pd({"a": s["a"]}, q)
    with pytest.raises(ValueError, match=r"loss must be one of \('nll', 'mse', 'kl'\), got 'hinge'"):
        PolicyDistillation("hinge")


def test_sharp_teacher_is_finite_and_gives_it_no_gradient():
    teacher = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    student = torch.zeros(1, 3, requires_grad=True)
    for kind in ("nll", "mse", "kl"):
        loss = PolicyDistillation(kind, tau=1e-3)({"a": student}, {"a": teacher})
        assert torch.isfinite(loss)
        loss.backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all()


def test_one_student_distilled_from_two_teachers_learns_both_policies():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g)
    teachers = {t: torch.nn.Linear(6, 4).requires_grad_(False) for t in ("a", "b")}
    memory = {t: m(x) for t, m in teachers.items()}  # stored teacher outputs
    trunk, heads = torch.nn.Linear(6, 16), torch.nn.ModuleDict({t: torch.nn.Linear(16, 4) for t in teachers})
    pd = PolicyDistillation("kl", tau=0.1)
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=3e-2)

    def loss_fn():
        z = torch.relu(trunk(x))
        return pd({t: heads[t](z) for t in teachers}, memory)

    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.2 * first
    z = torch.relu(trunk(x))
    for t in teachers:
        agree = (heads[t](z).argmax(-1) == memory[t].argmax(-1)).float().mean().item()
        assert agree > 0.9


def test_defaults_are_the_sharpened_kl_loss():
    """The paper's best setting: the KL loss with a teacher sharpened at τ = 0.01."""
    pd = PolicyDistillation()
    assert pd.loss == "kl" and pd.tau == 0.01


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_tau_must_be_above_zero(tau):
    with pytest.raises(ValueError, match=f"tau must be above 0, got {tau}"):
        PolicyDistillation("kl", tau=tau)
    with pytest.raises(ValueError, match=f"tau must be above 0, got {tau}"):
        kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), tau)


def test_nll_uses_only_the_teachers_best_action_whatever_tau():
    """Eq. (1) has no temperature: with τ = 1 the loss is still −log softmax(q^S)[argmax q^T]."""
    student = torch.tensor([[1.0, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.5, 0.6]])  # best action 2, but a soft teacher at τ = 1
    expected = math.log(math.e + math.e**2 + 1.0)
    for tau in (1.0, 5.0):
        got = PolicyDistillation("nll", tau=tau)({"a": student}, {"a": teacher})
        assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_mse_sums_over_actions_not_states_when_their_counts_differ():
    """3 states x 2 actions: (Σ of all squared errors) / 3 states, not / 2 actions."""
    student = torch.zeros(3, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    got = PolicyDistillation("mse")({"a": student}, {"a": teacher})
    assert math.isclose(got.item(), (1.0 + 4.0 + 1.0 + 1.0) / 3, rel_tol=1e-6)


@pytest.mark.parametrize("loss", ["nll", "mse", "kl"])
def test_student_and_teacher_of_different_shapes_are_refused(loss):
    """One teacher row for a batch of students would broadcast silently in the MSE: a ValueError instead."""
    with pytest.raises(ValueError, match=r"shapes differ: \(4, 3\) vs \(1, 3\)"):
        PolicyDistillation(loss)({"a": torch.zeros(4, 3)}, {"a": torch.zeros(1, 3)})


@pytest.mark.parametrize("loss", ["nll", "mse", "kl"])
def test_leading_time_and_batch_axes_are_states_like_a_flat_batch(loss):
    """A rollout's (T, B, A) Q-values give the loss of its T*B states as one batch (actions last)."""
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    method = PolicyDistillation(loss=loss, tau=0.5)
    flat = method.task_loss(student.reshape(15, 4), teacher.reshape(15, 4))
    torch.testing.assert_close(method.task_loss(student, teacher), flat)
    torch.testing.assert_close(method.task_loss(student[0, 0], teacher[0, 0]),  # one state, no batch axis
                               method.task_loss(student[0, :1], teacher[0, :1]))
