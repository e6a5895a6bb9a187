"""Knowledge factorisation: y_t = head_t(CKN + TSN_t), standalone factor networks, the IMB loss terms."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from reference_impls.architectures.knowledge_factorization import (
    KnowledgeFactorization,
    gaussian_kl,
    infomax_loss,
)
from reference_impls.architectures.registry import Problem, build

from .harness_probe import moved_by_auxiliary_step

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 4, 4), {"a": 3, "b": 1}, dense=True)


def test_output_is_head_of_common_plus_task_feature(device):
    torch.manual_seed(0)
    model = build("knowledge_factorization", VEC, width=8, seed=3).to(device)
    x = torch.randn(5, 6, device=device)
    c = model.ckn(x)
    mu, logvar = model.tsn["b"](x).chunk(2, dim=1)
    torch.testing.assert_close(model.eval()(x)["b"], model.heads["b"](c + mu))  # evaluation: z = mu
    model.train()
    model.generator.manual_seed(3)
    sampled = model(x)["a"]
    eps = torch.randn(5, 8, generator=torch.Generator().manual_seed(3)).to(device)  # drawn for task a first
    mu_a, logvar_a = model.tsn["a"](x).chunk(2, dim=1)
    torch.testing.assert_close(sampled, model.heads["a"](c + mu_a + (0.5 * logvar_a).exp() * eps))


def test_task_output_depends_on_ckn_and_its_own_tsn_only(device, params_with_grad):
    torch.manual_seed(0)
    for problem in (VEC, IMG):
        model = build("knowledge_factorization", problem, width=6).to(device)
        touched = params_with_grad(model, model(torch.randn(3, *problem.input_shape, device=device))["a"].square().sum())
        assert any(n.startswith("ckn.") for n in touched) and any(n.startswith("tsn.a.") for n in touched)
        assert not any(n.startswith(("tsn.b.", "heads.b.", "project.")) for n in touched)


def test_factor_network_alone_reproduces_its_task(device, n_params):
    torch.manual_seed(0)
    model = build("knowledge_factorization", IMG, width=6).to(device).eval()
    x = torch.randn(2, 2, 4, 4, device=device)
    for t in IMG.tasks:
        factor = model.factor_network(t)
        torch.testing.assert_close(factor(x), model(x)[t], rtol=0, atol=0)
        assert n_params(factor) == n_params(model.ckn) + n_params(model.tsn[t]) + n_params(model.heads[t])


def test_infomin_is_the_gaussian_kl_and_zero_at_the_prior():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0


def test_infomax_by_hand_and_lowest_for_matching_examples():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = F.normalize(a, dim=1) @ F.normalize(a, dim=1).T
    off = s[~torch.eye(3, dtype=torch.bool)]
    torch.testing.assert_close(infomax_loss(a, a), -(s.diagonal().mean() - off.exp().mean().log()))
    g = torch.Generator().manual_seed(1)
    b = torch.randn(16, 5, generator=g)
    assert infomax_loss(b, b) < infomax_loss(b, b.roll(1, dims=0)) - 0.5


def test_infomax_refuses_a_batch_without_negatives():
    """One example has no other example to contrast with: an error, not a NaN loss."""
    with pytest.raises(ValueError, match="at least 2"):
        infomax_loss(torch.randn(1, 4), torch.randn(1, 4))


def test_each_loss_term_trains_the_part_it_names(device, params_with_grad):
    torch.manual_seed(0)
    model = build("knowledge_factorization", VEC, width=8).to(device)
    x = torch.randn(6, 6, device=device)
    teacher = {"a": torch.randn(6, 1, device=device), "b": torch.randn(6, 2, device=device)}
    feature = torch.randn(6, 8, device=device)
    infomax = params_with_grad(model, model.factorization_loss(x, teacher, feature)["infomax"])
    assert any(n.startswith("ckn.") for n in infomax) and any(n.startswith("project.") for n in infomax)
    assert not any(n.startswith(("tsn.", "heads.")) for n in infomax)
    infomin = params_with_grad(model, model.factorization_loss(x, teacher, feature)["infomin"])
    assert infomin and all(n.startswith("tsn.") for n in infomin)


def test_distillation_from_a_multitask_teacher(device):
    """Only the KF loss (no labels): the factor networks come to reproduce the teacher."""
    torch.manual_seed(0)
    teacher = build("shared_bottom", VEC, width=8).to(device).eval()
    model = build("knowledge_factorization", VEC, width=8).to(device)
    x = torch.randn(32, 6, device=device)
    with torch.no_grad():
        target, feature = teacher(x), teacher.encode(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.factorization_loss(x, target, feature)
    for _ in range(60):
        terms = model.factorization_loss(x, target, feature)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    last = model.factorization_loss(x, target, feature)
    assert set(last) == {"kd", "infomax", "infomin", "total"}
    assert last["kd"] < 0.3 * first["kd"] and last["infomax"] < first["infomax"]
    w = model.weights
    torch.testing.assert_close(last["total"], w[0] * last["kd"] + w[1] * last["infomax"] + w[2] * last["infomin"])


def test_soft_target_distillation_is_zero_for_equal_logits():
    model = build("knowledge_factorization", VEC, width=4, temperature=4.0)
    logits = torch.randn(3, 5)
    assert model.distillation(logits, logits).abs().item() < 1e-6
    assert model.distillation(logits, logits.flip(1)).item() > 0


def test_parameter_count(n_params):
    d, w = 6, 8
    model = build("knowledge_factorization", VEC, width=w, depth=1)
    trunk = d * w + w
    tsn = trunk + (w * 2 * w + 2 * w)  # trunk, then mean and log-variance
    heads = (w + 1) + (2 * w + 2)
    project = 2 * (w * w + w)
    assert n_params(model) == trunk + 2 * tsn + heads + project
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == tsn + w + 1


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("knowledge_factorization", device)
    first, last = short_training("knowledge_factorization", dense, device, steps=40)
    assert last < 0.8 * first
    assert type(build("knowledge_factorization", VEC)) is KnowledgeFactorization


def test_auxiliary_loss_is_the_weighted_infomin_of_the_last_forward_and_trains_the_task_networks():
    torch.manual_seed(0)
    model = build("knowledge_factorization", VEC, width=8, infomin_weight=0.5).eval()  # z = mu: deterministic
    x = torch.randn(4, 6)
    model(x)
    _, per_task = model.factors(x)
    expected = 0.5 * sum(gaussian_kl(mu, logvar) for _, mu, logvar in per_task.values())
    torch.testing.assert_close(model.auxiliary_loss(), expected)
    zero = build("knowledge_factorization", VEC, width=8, infomin_weight=0.0)
    zero(x)
    assert zero.auxiliary_loss().item() == 0.0
    with pytest.raises(ValueError, match="infomin_weight"):
        build("knowledge_factorization", VEC, infomin_weight=-1.0)
    moved, auxiliary = moved_by_auxiliary_step(model, x)
    assert auxiliary > 0 and moved and all(n.startswith("tsn.") for n in moved)  # the KL reads only the TSNs


def _kl_by_hand(mu, logvar):
    return (0.5 * (mu.square() + logvar.exp() - 1 - logvar)).sum(1).mean()


def test_kd_and_infomin_terms_sum_over_tasks_and_kd_reads_the_sampled_feature():
    # In training, y_t = head_t(c + mu_t + exp(logvar_t / 2) eps_t) (eps drawn for a, then b) is what
    # KD compares with the teacher (mean squared error per task, summed over tasks); InfoMin sums each
    # task's Gaussian KL.
    torch.manual_seed(0)
    model = build("knowledge_factorization", VEC, width=8).double().train()
    x = torch.randn(5, 6, dtype=torch.float64)
    teacher = {"a": torch.randn(5, 1, dtype=torch.float64), "b": torch.randn(5, 2, dtype=torch.float64)}
    model.generator.manual_seed(7)
    terms = model.factorization_loss(x, teacher, torch.randn(5, 8, dtype=torch.float64))
    g = torch.Generator().manual_seed(7)
    kd = infomin = 0
    for t in ("a", "b"):
        mu, logvar = model.tsn[t](x).chunk(2, dim=1)
        eps = torch.randn(5, 8, generator=g).double()
        out = model.heads[t](model.ckn(x) + mu + (0.5 * logvar).exp() * eps)
        kd = kd + (out - teacher[t]).square().mean()
        infomin = infomin + _kl_by_hand(mu, logvar)
    torch.testing.assert_close(terms["kd"], kd)
    torch.testing.assert_close(terms["infomin"], infomin)


@pytest.mark.parametrize("tau", [2.0, 3.0])  # 3: tau^2 = 9 differs from 2 tau = 6
def test_soft_target_distillation_by_hand(tau):
    # tau^2 x mean over examples of KL(softmax(teacher / tau) || softmax(student / tau)), classes on dim 1
    model = build("knowledge_factorization", VEC, width=4, temperature=tau)
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 3.0]], dtype=torch.float64)

    def soft(z):
        e = (z / tau).exp()
        return e / e.sum(1, keepdim=True)

    p, q = soft(teacher), soft(student)
    expected = tau * tau * (p * (p / q).log()).sum(1).mean()
    torch.testing.assert_close(model.distillation(student, teacher), expected)


def test_the_teacher_is_not_trained_by_the_factorization_loss():
    torch.manual_seed(0)
    model = build("knowledge_factorization", VEC, width=8)
    teacher = {"a": torch.randn(4, 1, requires_grad=True), "b": torch.randn(4, 2, requires_grad=True)}
    feature = torch.randn(4, 8, requires_grad=True)
    model.factorization_loss(torch.randn(4, 6), teacher, feature)["total"].backward()
    assert teacher["a"].grad is None and teacher["b"].grad is None and feature.grad is None


def test_infomax_of_feature_maps_reads_their_spatial_means():
    torch.manual_seed(0)
    model = build("knowledge_factorization", IMG, width=6).eval()
    x, feature = torch.randn(3, 2, 4, 4), torch.randn(3, 6, 4, 4)
    terms = model.factorization_loss(x, {"a": torch.randn(3, 3, 4, 4), "b": torch.randn(3, 1, 4, 4)}, feature)
    expected = infomax_loss(model.project(feature.mean((2, 3))), model.ckn(x).mean((2, 3)))
    torch.testing.assert_close(terms["infomax"], expected)


def test_log_variance_bias_starts_at_minus_four():
    model = build("knowledge_factorization", VEC, width=4)
    for t in VEC.tasks:
        bias = model.tsn[t][-1].bias
        assert torch.equal(bias[4:], torch.full((4,), -4.0)) and torch.equal(bias[:4], torch.zeros(4))


def test_refusals_infomax_with_two_examples_and_a_teacher_of_another_width():
    """Every loss weight must be non-negative; two examples suffice for InfoMax (each has one
    negative); ``auxiliary_loss`` before any forward pass is refused; a teacher feature of
    width ``teacher_dim`` is projected to the common feature's width."""
    for weight in ("kd_weight", "infomax_weight", "infomin_weight"):
        with pytest.raises(ValueError, match=weight):
            build("knowledge_factorization", VEC, **{weight: -0.5})
    a, b = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4)
    s = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    torch.testing.assert_close(infomax_loss(a, b), -(s.diagonal().mean() - ((s[0, 1].exp() + s[1, 0].exp()) / 2).log()))
    torch.manual_seed(0)
    model = build("knowledge_factorization", VEC, width=8, teacher_dim=5)
    with pytest.raises(RuntimeError, match="forward"):
        model.auxiliary_loss()
    x = torch.randn(3, 6)
    terms = model.factorization_loss(x, {"a": torch.randn(3, 1), "b": torch.randn(3, 2)}, torch.randn(3, 5))
    assert model.project[0].in_features == 5 and torch.isfinite(terms["infomax"])
