import pytest
import torch

from reference_impls.architectures.mtil import MTIL, fit_proximal, group_lasso, prox_group_lasso
from reference_impls.architectures.registry import Problem, build

from .procedure_names import unresolved_names

VEC = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 2, "c": 1})


def test_each_task_is_linear_plus_pairwise_interactions(device):
    torch.manual_seed(0)
    model = build("mtil", VEC).to(device)
    x = torch.randn(6, 5, device=device)
    out = model(x)
    for t in VEC.tasks:
        w, q = model.weights[t], model.interactions[t]
        for o in range(VEC.out_dims[t]):
            expected = x @ w[:, o] + sum(x[:, j] * x[:, k] * q[o, j, k] for j in range(5) for k in range(5))
            torch.testing.assert_close(out[t][:, o], expected)


def test_embedded_interactions_share_one_rank_r_subspace():
    torch.manual_seed(0)
    model = build("mtil", VEC, approach="embedded", rank=2).double()
    with torch.no_grad():
        for p in model.cores.values():
            p.normal_()
    q = model.interaction_tensor()  # d x d x 4 (four outputs in all)
    assert torch.linalg.matrix_rank(q.flatten(1)) == 2  # mode-1 unfolding: every Q_t's columns in span(B)
    basis = torch.linalg.qr(model.basis).Q
    for t in VEC.tasks:
        qt = model.interaction(t)
        torch.testing.assert_close(basis @ basis.T @ qt, qt)  # column space inside span(B)
        x = torch.randn(3, 5, dtype=torch.float64)
        expected = torch.einsum("nj,ojk,nk->no", x, qt, x) + x @ model.weights[t]
        torch.testing.assert_close(model(x)[t], expected)


def test_embedded_basis_is_shared_and_cores_are_private(params_with_grad):
    torch.manual_seed(0)
    model = build("mtil", VEC, approach="embedded", rank=3)
    touched = params_with_grad(model, model(torch.randn(4, 5))["b"].sum())
    assert touched == {"basis", "cores.b", "weights.b"}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in model.task_specific_parameters("b")} == {"cores.b", "weights.b"}
    assert [names[id(p)] for p in model.shared_parameters()] == ["basis"]


def test_embedded_penalty_is_on_w_only():
    """The embedded approach's structure is its rank r: no group lasso on Q, only W's penalty."""
    torch.manual_seed(0)
    model = build("mtil", VEC, approach="embedded", lambda_w=0.3, lambda_q=0.7)
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * torch.linalg.svdvals(model.weight_matrix()).sum())


def test_group_lasso_prox_zeroes_an_interaction_for_every_task_at_once():
    torch.manual_seed(0)
    q = torch.randn(4, 4, 3)
    q[1, 2] = torch.tensor([0.1, -0.2, 0.05])  # a weak fibre: its norm is below the threshold
    out = prox_group_lasso(q, 0.5)
    assert (out[1, 2] == 0).all()
    support = out != 0
    assert (support == support[..., :1]).all()  # every task keeps the same interactions
    fibre = q[0, 3]
    torch.testing.assert_close(out[0, 3], fibre * (1 - 0.5 / fibre.norm()))  # shrunk towards 0
    torch.testing.assert_close(group_lasso(q), sum(q[j, k].norm() for j in range(4) for k in range(4)))


def test_proximal_step_shrinks_each_task_s_own_q_and_w():
    """proximal_step writes back prox(Q)[:, :, t] as Q_t (not its transpose) and prox(W)'s columns."""
    torch.manual_seed(0)
    model = build("mtil", VEC, lambda_w=0.0, lambda_q=0.01)
    q = model.interaction_tensor().detach().clone()
    w = model.weight_matrix().detach().clone()
    model.proximal_step(step=1.0)
    expected = prox_group_lasso(q, 0.01).permute(2, 0, 1)
    torch.testing.assert_close(torch.cat([model.interactions[t] for t in VEC.tasks]).detach(), expected)
    torch.testing.assert_close(model.weight_matrix().detach(), w)  # lambda_w 0: W untouched


def test_proximal_step_by_hand_shrinks_each_interaction_across_all_outputs():
    """Q_t[o, j, k] <- Q_t[o, j, k] max(0, 1 - s lambda_q / ||Q[:, j, k]||), the norm over every task's outputs."""
    torch.manual_seed(0)
    model = build("mtil", VEC, lambda_w=0.0, lambda_q=0.02).double()
    q = torch.cat([model.interactions[t] for t in VEC.tasks]).detach().clone()  # (outputs, d, d)
    shrink = (1 - 0.02 / q.norm(dim=0)).clamp_min(0)
    assert (shrink == 0).any() and (shrink > 0).any()  # some interactions dropped, some kept
    model.proximal_step(step=1.0)
    after = torch.cat([model.interactions[t] for t in VEC.tasks]).detach()
    torch.testing.assert_close(after, q * shrink, rtol=1e-12, atol=1e-12)


def test_l21_prox_drops_or_shrinks_whole_feature_rows():
    w = torch.tensor([[3.0, 4.0, 0.0], [0.1, -0.2, 0.2], [0.0, 0.0, 2.0]])
    out = prox_group_lasso(w, 1.0)
    torch.testing.assert_close(out[0], w[0] * (1 - 1 / 5))  # ||row|| = 5, shrunk for every task
    assert (out[1] == 0).all()  # ||row|| = 0.3 < 1: the feature is dropped for every task
    torch.testing.assert_close(out[2], w[2] / 2)
    torch.manual_seed(0)
    model = build("mtil", VEC, w_penalty="l21", lambda_w=1.0)
    weights = torch.randn(5, 4)
    weights[2] *= 0.01  # a weak feature
    with torch.no_grad():
        for t, block in zip(VEC.tasks, weights.split([1, 2, 1], dim=1)):
            model.weights[t].copy_(block)
    model.proximal_step(step=0.5)
    torch.testing.assert_close(model.weight_matrix().detach(), prox_group_lasso(weights, 0.5))
    assert (model.weight_matrix()[2] == 0).all()


def test_penalty_is_trace_norm_of_w_plus_group_lasso_of_q():
    torch.manual_seed(0)
    model = build("mtil", VEC, lambda_w=0.3, lambda_q=0.7)
    w = torch.cat([model.weights[t] for t in VEC.tasks], 1)
    q = torch.cat([model.interactions[t] for t in VEC.tasks])  # (4, d, d)
    fibres = sum(q[:, j, k].norm() for j in range(5) for k in range(5))
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * torch.linalg.svdvals(w).sum() + 0.7 * fibres)
    rows = build("mtil", VEC, w_penalty="l21", lambda_w=0.3, lambda_q=0.0)
    w = torch.cat([rows.weights[t] for t in VEC.tasks], 1)
    torch.testing.assert_close(rows.auxiliary_loss(), 0.3 * w.norm(dim=1).sum())


def test_proximal_fit_recovers_the_shared_interactions():
    """Three tasks use interactions (0, 1) and (2, 3) with different strengths; proximal gradient
    with the group lasso keeps exactly those fibres, for every task."""
    g = torch.Generator().manual_seed(0)
    d, tasks = 5, ("a", "b", "c")
    truth = torch.zeros(3, d, d)
    truth[:, 0, 1] = torch.tensor([1.0, -0.8, 1.2])
    truth[:, 2, 3] = torch.tensor([-1.0, 0.9, 0.7])
    xs = {t: torch.randn(200, d, generator=g) for t in tasks}
    ys = {t: torch.einsum("nj,jk,nk->n", xs[t], truth[i], xs[t])[:, None] + 0.05 * torch.randn(200, 1, generator=g)
          for i, t in enumerate(tasks)}
    torch.manual_seed(0)
    model = MTIL(tasks, d, {t: 1 for t in tasks}, lambda_w=0.0, lambda_q=0.1)
    losses = fit_proximal(model, xs, ys, step=0.05, iterations=300)
    assert losses[-1] < 0.1 * losses[0]
    fibres = model.interaction_tensor().norm(dim=2)
    kept = {frozenset((j, k)) for j in range(d) for k in range(d) if fibres[j, k] > 0}
    assert kept == {frozenset((0, 1)), frozenset((2, 3))}  # x^T Q x sees Q_jk and Q_kj alike
    assert (model.interaction_tensor()[0, 1] != 0).all() and (model.interaction_tensor()[2, 3] != 0).all()


def test_trace_norm_prox_lowers_the_rank_of_w():
    torch.manual_seed(0)
    model = build("mtil", VEC, lambda_w=1.0)
    with torch.no_grad():
        for w in model.weights.values():
            w.normal_()
    s = torch.linalg.svdvals(model.weight_matrix()).detach()
    model.proximal_step(step=(s[1] + s[2]).item() / 2)  # threshold between the 2nd and 3rd singular value
    assert torch.linalg.matrix_rank(model.weight_matrix()) == 2
    torch.testing.assert_close(torch.linalg.svdvals(model.weight_matrix())[:2], s[:2] - (s[1] + s[2]) / 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be at least 1"), ({"lambda_q": -1.0}, "lambda_q must be at least 0"),
    ({"lambda_w": float("nan")}, "lambda_w"), ({"approach": "tensor"}, "approach must be one of"),
    ({"w_penalty": "l1"}, "w_penalty must be one of"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("mtil", VEC, **kwargs)


def test_images_are_refused():
    with pytest.raises(ValueError, match="vector features"):
        build("mtil", Problem(("a", "b"), (3, 4, 4), dense=True))


def test_registry_name_builds_the_catalogued_class():
    model = build("mtil", VEC)
    assert type(model) is MTIL and model.name == "mtil"


def test_the_procedure_line_names_methods_of_the_class_and_functions_of_the_module():
    """A bare name() in the printed line is a method of the class, a module-level function is
    written module.name() (the line used to name fit_proximal() as if it were a method of MTIL)."""
    assert unresolved_names(MTIL) == []
    assert "mtil.fit_proximal()" in MTIL.training_procedure


def test_parameters_start_at_the_documented_scales():
    """Docstring: small random values with std 0.01, the basis B with std 1/sqrt(d)."""
    torch.manual_seed(0)
    d, rank, out = 40, 8, {"a": 3, "b": 4}
    shared = MTIL(("a", "b"), d, out)
    embedded = MTIL(("a", "b"), d, out, approach="embedded", rank=rank)

    def close(values, std):
        return abs(torch.cat([v.detach().flatten() for v in values]).std().item() / std - 1) < 0.25

    assert close(shared.weights.values(), 0.01) and close(shared.interactions.values(), 0.01)
    assert close(embedded.weights.values(), 0.01) and close(embedded.cores.values(), 0.01)
    assert close([embedded.basis], d**-0.5)


def test_one_proximal_gradient_iteration_by_hand():
    """Without penalties one iteration is p <- p - step * grad of sum_t mean_j ||f_t(x_tj) - y_tj||^2 / 2,
    with grad_w = X^T r / n and grad_Q[o] = sum_j r_jo x_j x_j^T / n; the returned loss is that objective."""
    g = torch.Generator().manual_seed(1)
    d, out = 3, {"a": 1, "b": 2}
    torch.manual_seed(0)
    model = MTIL(("a", "b"), d, out, lambda_w=0.0, lambda_q=0.0).double()
    xs = {t: torch.randn(6, d, generator=g, dtype=torch.float64) for t in out}
    ys = {t: torch.randn(6, o, generator=g, dtype=torch.float64) for t, o in out.items()}
    w0 = {t: model.weights[t].detach().clone() for t in out}
    q0 = {t: model.interactions[t].detach().clone() for t in out}
    expected_loss = 0.0
    for t in out:
        x = xs[t]
        r = x @ w0[t] + torch.einsum("nj,ojk,nk->no", x, q0[t], x) - ys[t]
        expected_loss += (r**2).sum(1).mean().item() / 2
        w0[t] -= 0.1 * x.T @ r / 6
        q0[t] -= 0.1 * torch.einsum("no,nj,nk->ojk", r, x, x) / 6
    (loss,) = fit_proximal(model, xs, ys, step=0.1, iterations=1)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    for t in out:
        torch.testing.assert_close(model.weights[t].detach(), w0[t])
        torch.testing.assert_close(model.interactions[t].detach(), q0[t])


def test_a_zero_step_or_empty_input_is_refused():
    model = MTIL(("a",), 2, {"a": 1})
    with pytest.raises(ValueError, match="step"):
        fit_proximal(model, {"a": torch.randn(3, 2)}, {"a": torch.randn(3, 1)}, step=0.0, iterations=1)
    with pytest.raises(ValueError, match="in_dim"):
        MTIL(("a",), 0, {"a": 1})
