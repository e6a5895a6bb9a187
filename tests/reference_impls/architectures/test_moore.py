import torch

from reference_impls.architectures.moore import MOORE, gram_schmidt
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (7,), {"a": 1, "b": 2})
IMG = Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)


def test_basis_is_exactly_orthonormal_per_input(device):
    torch.manual_seed(0)
    model = build("moore", VEC, num_experts=4).to(device).double()
    u = model.basis(torch.randn(6, 7, device=device, dtype=torch.float64))
    gram = u @ u.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(4, dtype=gram.dtype, device=device).expand(6, 4, 4))


def test_gram_schmidt_spans_the_expert_outputs_in_order():
    h = torch.randn(3, 4, 10, dtype=torch.float64)
    u = gram_schmidt(h)
    torch.testing.assert_close(u[:, 0], h[:, 0] / h[:, 0].norm(dim=-1, keepdim=True))
    # h = R^T U with R upper triangular: each h_i lies in span(u_1..u_i)
    coeff = h @ u.transpose(1, 2)
    assert torch.allclose(coeff.triu(1).transpose(1, 2), torch.zeros_like(coeff), atol=1e-10)
    torch.testing.assert_close(coeff @ u, h)


def test_output_is_head_of_task_weighted_basis(device):
    torch.manual_seed(1)
    model = build("moore", VEC, num_experts=3).to(device)
    x = torch.randn(5, 7, device=device)
    h = [f(x) for f in model.experts]
    u1 = h[0] / h[0].norm(dim=1, keepdim=True)
    w2 = h[1] - (h[1] * u1).sum(1, keepdim=True) * u1
    u2 = w2 / w2.norm(dim=1, keepdim=True)
    w3 = h[2] - (h[2] * u1).sum(1, keepdim=True) * u1 - (h[2] * u2).sum(1, keepdim=True) * u2
    u3 = w3 / w3.norm(dim=1, keepdim=True)
    w = model.task_weights["b"]
    torch.testing.assert_close(model(x)["b"], model.heads["b"](w[0] * u1 + w[1] * u2 + w[2] * u3))


def test_activation_is_applied_after_the_task_mixing(device):
    torch.manual_seed(4)
    model = build("moore", VEC, num_experts=3, activation=torch.nn.ReLU()).to(device).double()
    x = torch.randn(5, 7, device=device, dtype=torch.float64)
    v = torch.einsum("k,bkd->bd", model.task_weights["a"], model.basis(x))  # v_t = U w_t, then the ReLU
    assert (v < 0).any()  # the ReLU changes v
    torch.testing.assert_close(model(x)["a"], model.heads["a"](torch.relu(v)))


def test_small_expert_outputs_are_still_normalised():
    # eps only guards outputs in the span of earlier ones: the basis does not depend on the experts' scale
    h = torch.randn(3, 4, 10, dtype=torch.float64)
    torch.testing.assert_close(gram_schmidt(1e-4 * h), gram_schmidt(h))


def test_dense_maps_are_orthonormal_after_flattening(device):
    torch.manual_seed(2)
    model = build("moore", IMG, width=4, num_experts=3).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    u = model.basis(x).flatten(2)
    torch.testing.assert_close(u @ u.transpose(1, 2), torch.eye(3, device=device).expand(2, 3, 3),
                               atol=1e-5, rtol=1e-5)
    out = model(x)
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)


def test_degenerate_experts_stay_finite(device):
    h = torch.zeros(2, 3, 5, device=device)
    h[:, 0, 0] = 1.0
    h[:, 1] = 2 * h[:, 0]  # linearly dependent
    assert torch.isfinite(gram_schmidt(h)).all()


def test_task_loss_reaches_shared_experts_and_only_its_own_weights(device, params_with_grad):
    torch.manual_seed(3)
    model = build("moore", VEC, num_experts=3).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 7, device=device))["a"].square().sum())
    assert "task_weights.a" in touched and all(any(n.startswith(f"experts.{i}.") for n in touched) for i in range(3))
    assert not any(n.startswith(("task_weights.b", "heads.b")) for n in touched)


def test_parameter_count(n_params):
    d, w, k = 7, 16, 4
    model = build("moore", VEC, width=w, num_experts=k)
    assert n_params(model) == k * (d * w + w) + 2 * k + (w + 1) + (2 * w + 2)


def test_short_training_lowers_the_loss(device, short_training):
    before, after = short_training("moore", True, device, 30)
    assert after < 0.7 * before


def test_registry_name_builds_the_catalogued_class():
    assert type(build("moore", VEC)) is MOORE


def test_task_weights_start_with_unit_expected_squared_norm():
    """w_t ~ N(0, I / k): sum_i w_t[i]^2 has mean 1 for any number of experts k (here k = 400)."""
    torch.manual_seed(0)
    model = build("moore", VEC, num_experts=400)
    for w in model.task_weights.values():
        assert 0.75 < w.square().sum().item() < 1.25
