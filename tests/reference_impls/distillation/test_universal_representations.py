"""Universal representations (Li, Liu & Bilen): adapter alignment by hand (L2, CKA), logit KD, gradients."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.distillation.universal_representations import (UniversalRepresentations, cka, rbf_gram,
                                                                    softened_kl)


def _identity(url: UniversalRepresentations) -> UniversalRepresentations:
    with torch.no_grad():
        for a in url.adaptors.values():
            a.copy_(torch.eye(*a.shape))
    return url


def test_l2_alignment_by_hand_is_kd_mtl_distance():
    url = _identity(UniversalRepresentations(2, {"a": 2}))
    student = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [5.0, 5.0]])
    # normalised rows: ‖[1,0] − [0,1]‖² = 2 and 0 -> mean 1
    assert math.isclose(url(student, {"a": teacher}).item(), 1.0, rel_tol=1e-6)


def test_linear_cka_alignment_by_hand():
    url = _identity(UniversalRepresentations(2, {"a": 2}, feature="cka", kernel="linear"))
    student = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # rows normalise to e1, e2, −e1
    teacher = torch.tensor([[1.0, 0.0], [4.0, 0.0], [0.0, 0.5]])   # e1, e1, e2
    # centred Grams worked out by hand: ⟨K̃, L̃⟩ = 20/9, ‖K̃‖² = 40/9, ‖L̃‖² = 16/9 -> CKA = √10 / 4
    assert math.isclose(url(student, {"a": teacher}).item(), 1 - math.sqrt(10) / 4, rel_tol=1e-5)


def test_rbf_cka_ignores_rotations_and_scale_but_not_structure():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    assert math.isclose(cka(x, 5.0 * x @ q).item(), 1.0, rel_tol=1e-9)
    assert cka(x, torch.randn(10, 4, generator=g, dtype=torch.float64)).item() < 0.9
    url = _identity(UniversalRepresentations(4, {"a": 4}, feature="cka").double())
    assert url(x, {"a": x @ q}).item() < 1e-9  # an adapter equal to identity already aligns



def test_rbf_bandwidth_is_the_median_squared_distance_and_default_temperature_is_eight():
    """Points 0, 1, 3 on a line: squared distances 1, 4, 9, so σ² = 4 (their mean, 14/3, is not)."""
    k = rbf_gram(torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64))
    d2 = torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 4.0], [9.0, 4.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(k, torch.exp(-d2 / 8.0))
    assert UniversalRepresentations(2, {"a": 2}).temperature == 8.0  # the authors' T

def test_logit_term_by_hand_with_temperature():
    url = UniversalRepresentations(2, {"a": 2}, weights={"a": 0.0}, beta=0.5, temperature=2.0)
    teacher_logits = 2.0 * torch.log(torch.tensor([[0.75, 0.25]]))  # softened by T = 2: [0.75, 0.25]
    student_logits = torch.zeros(1, 2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([.75, .25] ‖ [.5, .5])
    loss = url(torch.zeros(1, 2), {"a": torch.ones(1, 2)}, {"a": student_logits}, {"a": teacher_logits})
    assert math.isclose(loss.item(), 0.5 * 4 * kl, rel_tol=1e-5)  # β · T² · KL


def test_gradients_reach_student_and_adapters_only_and_zero_features_stay_finite():
    torch.manual_seed(0)
    student, heads = nn.Linear(5, 6), nn.ModuleDict({"a": nn.Linear(6, 3), "b": nn.Linear(6, 2)})
    teachers = {"a": nn.Linear(5, 4), "b": nn.Linear(5, 3)}
    url = UniversalRepresentations(6, {"a": 4, "b": 3}, feature="cka")
    xs = {"a": torch.randn(8, 5), "b": torch.randn(8, 5)}  # two domains, their own images
    feats = {t: student(x) for t, x in xs.items()}
    loss = url(feats, {t: teachers[t](xs[t]) for t in xs},
               {t: heads[t](feats[t]) for t in xs}, {t: torch.randn(8, heads[t].out_features) for t in xs})
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in [*student.parameters(), *heads.parameters()])
    assert all(a.grad.abs().sum() > 0 for a in url.adaptors.values())
    assert all(p.grad is None for m in teachers.values() for p in m.parameters())
    for feature in ("l2", "cka"):
        z = torch.zeros(4, 6, requires_grad=True)
        out = UniversalRepresentations(6, {"a": 4}, feature=feature)(z, {"a": torch.zeros(4, 4)})
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(z.grad).all()


def test_short_training_aligns_one_student_with_two_teachers():
    torch.manual_seed(0)
    x = torch.randn(32, 5)
    teachers = {"a": nn.Sequential(nn.Linear(5, 4), nn.Tanh()), "b": nn.Linear(5, 3)}
    targets = {t: m(x).detach() for t, m in teachers.items()}
    student = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    url = UniversalRepresentations(8, {"a": 4, "b": 3}, feature="cka")
    opt = torch.optim.Adam([*student.parameters(), *url.parameters()], lr=5e-2)
    first = url(student(x), targets).item()
    for _ in range(40):
        opt.zero_grad()
        url(student(x), targets).backward()
        opt.step()
    assert url(student(x), targets).item() < 0.3 * first


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature must be above 0, got 0.0"),
    ({"temperature": -1.0}, "temperature must be above 0, got -1.0"),
    ({"temperature": float("nan")}, "temperature must be above 0, got nan"),
    ({"beta": -1.0}, "beta must be at least 0, got -1.0"),
    ({"student_channels": 0}, "student_channels must be at least 1, got 0"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UniversalRepresentations(**{"student_channels": 4, "teacher_channels": {"a": 3}, **kwargs})
    if "temperature" in kwargs:
        with pytest.raises(ValueError, match=message):
            softened_kl(torch.zeros(1, 2), torch.zeros(1, 2), kwargs["temperature"])


def test_logit_term_softens_both_sides_and_freezes_the_teacher_and_cka_defaults_to_rbf():
    """Student [.25, .75] and teacher [.75, .25] after dividing by T = 2: T² KL = 4 · ½ log 3."""
    url = UniversalRepresentations(2, {"a": 2}, weights={"a": 0.0}, temperature=2.0)
    student = 2.0 * torch.log(torch.tensor([[0.25, 0.75]]))
    teacher = (2.0 * torch.log(torch.tensor([[0.75, 0.25]]))).requires_grad_(True)
    loss = url(torch.zeros(1, 2), {"a": torch.ones(1, 2)}, {"a": student.requires_grad_(True)}, {"a": teacher})
    assert math.isclose(loss.item(), 4 * 0.5 * math.log(3.0), rel_tol=1e-5)
    loss.backward()
    assert teacher.grad is None
    assert UniversalRepresentations(2, {"a": 2}, feature="cka").kernel == "rbf"  # the authors' CKA kernel


@pytest.mark.parametrize("kwargs, message", [
    (dict(student_features={"b": torch.zeros(2, 2)}, teacher_features={"a": torch.zeros(2, 2)}),
     r"teacher features for unknown task\(s\) \['a'\]; the tasks are \['b'\]"),
    (dict(student_features=torch.zeros(2, 2), teacher_features={"a": torch.zeros(2, 2)},
          student_logits={}, teacher_logits={"a": torch.zeros(2, 3)}),
     r"teacher logits for unknown task\(s\) \['a'\]; the tasks are \[\]"),
])
def test_teacher_outputs_without_a_student_counterpart_are_refused_by_name(kwargs, message):
    """Per-domain student features or logits missing a teacher's task were bare KeyErrors."""
    with pytest.raises(ValueError, match=message):
        UniversalRepresentations(2, {"a": 2})(**kwargs)


def _rbf_cka_written_out(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA with RBF kernels, σ² = median pairwise squared distance, from the definitions, one entry at a time.

    Use an n with n(n − 1)/2 odd, so that the median of the pairs is one of them (no lower/upper choice).
    """
    n = x.shape[0]

    def centred_gram(z):
        d2 = [[float((z[i] - z[j]).square().sum()) for j in range(n)] for i in range(n)]
        sigma2 = statistics.median(d2[i][j] for i in range(n) for j in range(i + 1, n))
        k = torch.tensor([[math.exp(-d2[i][j] / (2 * sigma2)) for j in range(n)] for i in range(n)],
                         dtype=torch.float64)
        h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
        return h @ k @ h

    kx, ky = centred_gram(x), centred_gram(y)
    return float((kx * ky).sum() / (kx.norm() * ky.norm()))


def test_cka_defaults_to_the_rbf_kernel_with_median_bandwidth_written_out():
    """The authors' CKA: RBF Grams, not the linear ones (which give another value here)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tanh(2 * x[:, :2]) + 0.3 * torch.randn(6, 2, generator=g, dtype=torch.float64)
    expected = _rbf_cka_written_out(x, y)
    assert math.isclose(cka(x, y).item(), expected, rel_tol=1e-9)
    assert math.isclose(cka(x, y, "rbf").item(), expected, rel_tol=1e-9)
    assert abs(cka(x, y, "linear").item() - expected) > 1e-3


def test_cka_alignment_uses_the_kernel_the_module_was_built_with():
    """feature="cka" with the default kernel: 1 − RBF CKA of the channel-normalised (adapted) features."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tanh(2 * x) + 0.3 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    url = _identity(UniversalRepresentations(3, {"a": 3}, feature="cka").double())
    expected = 1 - _rbf_cka_written_out(F.normalize(x, dim=1), F.normalize(y, dim=1))
    assert math.isclose(url(x, {"a": y}).item(), expected, rel_tol=1e-9)


def test_rbf_gram_and_cka_do_not_depend_on_the_scale_of_a_batch_however_small():
    """σ² is the median squared distance, so scaling a batch by c scales σ² by c²: the RBF Gram is unchanged.
    CKA is a normalised inner product, so scaling either batch leaves it unchanged too (linear kernel here)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 2, generator=g, dtype=torch.float64)
    for c in (1e-2, 10.0):
        torch.testing.assert_close(rbf_gram(c * x), rbf_gram(x))
        torch.testing.assert_close(cka(c * x, y, "linear"), cka(x, y, "linear"))
        torch.testing.assert_close(cka(x, c * y, "linear"), cka(x, y, "linear"))


def test_logit_term_carries_t_squared_at_the_default_temperature():
    """T = 8: teacher logits 8 log [.75, .25] soften to [.75, .25]; the term is T² KL = 64 KL, not 2T KL."""
    teacher = 8.0 * torch.log(torch.tensor([[0.75, 0.25]]))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([.75, .25] ‖ [.5, .5])
    assert math.isclose(softened_kl(torch.zeros(1, 2), teacher, 8.0).item(), 64 * kl, rel_tol=1e-5)
    url = UniversalRepresentations(2, {"a": 2}, weights={"a": 0.0})
    loss = url(torch.zeros(1, 2), {"a": torch.ones(1, 2)}, {"a": torch.zeros(1, 2)}, {"a": teacher})
    assert math.isclose(loss.item(), 64 * kl, rel_tol=1e-5)


@pytest.mark.parametrize("kwargs", [{"feature": "cosine"}, {"kernel": "poly"}, {"feature": "cka", "kernel": "RBF"}])
def test_an_unknown_feature_distance_or_kernel_is_refused(kwargs):
    """Either name alone being wrong is enough: an unknown kernel would otherwise fall back to linear."""
    with pytest.raises(ValueError):
        UniversalRepresentations(2, {"a": 2}, **kwargs)
