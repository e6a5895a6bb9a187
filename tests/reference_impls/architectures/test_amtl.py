import pytest
import torch

from reference_impls.architectures.amtl import AMTL
from reference_impls.architectures.registry import Problem, build

from .procedure_names import unresolved_names

VEC = Problem(("a", "b"), (3,), {"a": 1, "b": 2})  # columns: a -> 0, b -> 1, 2


def _set(model, weights, graph):
    with torch.no_grad():
        for t, w in weights.items():
            model.weights[t].copy_(w)
        model.graph.copy_(graph)


def test_objective_by_hand():
    model = build("amtl", VEC, mu=0.5, lam=2.0)
    wa = torch.tensor([[1.0], [0.0], [2.0], [0.5]])  # three features, then the bias
    wb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    graph = torch.tensor([[9.0, 0.5, -1.0], [1.0, 9.0, 0.0], [0.25, 2.0, 9.0]])
    _set(model, {"a": wa, "b": wb}, graph)
    model.project()
    b = torch.tensor([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 2.0, 0.0]])  # clipped at 0, diagonal removed
    torch.testing.assert_close(model.transfer(), b)
    w = torch.cat([wa, wb], dim=1)
    losses = {"a": torch.tensor(0.2), "b": torch.tensor(3.0)}
    expected = (1 + 0.5 * 0.5) * 0.2 + (1 + 0.5 * (1.0 + 2.25)) * 3.0 + 2.0 * ((w - w @ b) ** 2).sum()
    torch.testing.assert_close(model.objective(losses), expected)
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x)["b"], x @ wb[:3] + wb[3])


def test_outgoing_edges_are_priced_by_the_senders_loss():
    """Without the reconstruction term, dObjective/dB[s, t] = mu L_sender(s) off the diagonal."""
    torch.manual_seed(0)
    model = build("amtl", VEC, mu=0.5, lam=0.0)
    losses = {"a": torch.tensor(0.1), "b": torch.tensor(2.0)}  # a reliable, b not
    (grad,) = torch.autograd.grad(model.objective(losses), model.graph)
    sender_loss = torch.tensor([0.1, 2.0, 2.0])[:, None]  # rows: a's column, then b's two
    torch.testing.assert_close(grad, 0.5 * sender_loss * (1 - torch.eye(3)))


def test_transfer_flows_from_the_well_fit_task_to_the_noisy_one():
    """Two tasks with the same weights; b's labels are noisy, so its loss stays high and its
    outgoing edge is cut before a's."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(5, 1, generator=g)
    x = torch.randn(64, 5, generator=g)
    y = {"a": x @ w_true, "b": x @ w_true + 1.5 * torch.randn(64, 1, generator=g)}
    torch.manual_seed(0)
    model = build("amtl", Problem(("a", "b"), (5,)), mu=1.0, lam=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(120):
        out = model(x)
        loss = model.objective({t: ((out[t] - y[t]) ** 2).mean() for t in "ab"})
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.project()
    b = model.transfer().detach()
    assert b[0, 1] > 0.3 and b[1, 0] < 0.5 * b[0, 1]  # a -> b kept, b -> a mostly cut


def test_harness_terms_give_the_graph_the_papers_gradient():
    """auxiliary_loss after observe_step_losses: the same gradient for B as the whole objective."""
    torch.manual_seed(0)
    model = build("amtl", VEC, mu=0.7, lam=0.3)
    x = torch.randn(5, 3)
    out = model(x)
    losses = {"a": out["a"].square().mean(), "b": out["b"].square().mean()}
    (want,) = torch.autograd.grad(model.objective(losses), model.graph)
    (alone,) = torch.autograd.grad(model.auxiliary_loss(), model.graph)  # before any losses: the rebuild only
    assert not torch.allclose(alone, want)
    model.observe_step_losses(torch.stack([losses["a"], losses["b"]]))
    (got,) = torch.autograd.grad(model.auxiliary_loss(), model.graph)
    torch.testing.assert_close(got, want)


def test_refusals_and_registry():
    with pytest.raises(ValueError, match="vector"):
        build("amtl", Problem(("a", "b"), (2, 4, 4)))
    for bad in ({"mu": -1.0}, {"lam": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build("amtl", VEC, **bad)
    model = build("amtl", VEC)
    assert type(model) is AMTL and model.name == "amtl"
    assert unresolved_names(AMTL) == []


def test_task_specific_parameters_are_the_tasks_own_weights(split_by_task):
    torch.manual_seed(0)
    model = build("amtl", VEC)
    for t, (own, reached) in split_by_task(model, torch.randn(5, 3)).items():
        assert own == reached == {f"weights.{t}"}


def test_outgoing_is_the_l1_norm_of_the_rows_even_before_projection():
    model = build("amtl", VEC)
    _set(model, {}, torch.tensor([[5.0, -0.5, 1.0], [-2.0, 5.0, 0.25], [0.0, -1.0, 5.0]]))
    out = model.outgoing()  # a: row 0 -> 0.5 + 1; b: rows 1 and 2 -> 2 + 0.25 + 1
    torch.testing.assert_close(out["a"], torch.tensor(1.5))
    torch.testing.assert_close(out["b"], torch.tensor(3.25))


def test_observing_a_step_projects_the_graph_and_keeps_the_losses_off_w():
    """observe_step_losses clips B at 0; the kept losses are detached, so auxiliary_loss's
    gradient for W is the reconstruction's alone (W misses the loss weights)."""
    torch.manual_seed(1)
    model = build("amtl", VEC, mu=0.7, lam=0.3)
    with torch.no_grad():
        model.graph[0, 1] = -1.0
        model.graph[2, 0] = -0.5
    out = model(torch.randn(5, 3))
    model.observe_step_losses(torch.stack([out["a"].square().mean(), out["b"].square().mean()]))
    assert model.graph[0, 1] == 0 and model.graph[2, 0] == 0 and (model.graph >= 0).all()
    w = list(model.weights.values())
    got = torch.autograd.grad(model.auxiliary_loss(), w)
    want = torch.autograd.grad(0.3 * model.reconstruction(), w)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h)


def test_defaults_are_the_authors_and_the_graph_starts_uniform():
    """mu = 1 and lam = 0.05 as in run_amtl_class.m; B starts at 1/(number of columns) off the diagonal."""
    model = build("amtl", VEC)
    assert (model.mu, model.lam) == (1.0, 0.05)
    torch.testing.assert_close(model.transfer(), (1 - torch.eye(3)) / 3)


def test_forward_is_linear_with_the_bias_as_the_last_row_by_hand():
    torch.manual_seed(0)
    model = AMTL(("a", "b"), 3, {"a": 1, "b": 2})
    x = torch.randn(4, 3)
    for t, out in model(x).items():
        w = model.weights[t]
        assert w[-1].abs().sum() > 0  # a non-zero bias row, so its sign shows
        torch.testing.assert_close(out, torch.cat([x, torch.ones(4, 1)], dim=1) @ w)
