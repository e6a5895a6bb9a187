import copy

import torch

from reference_impls.architectures.dmtg import DMTG, gumbel_softmax
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def test_assignment_rows_are_distributions_and_samples_follow_them():
    torch.manual_seed(0)
    model = build("dmtg", VEC, num_groups=3, hard=True)
    with torch.no_grad():
        model.group_logits.copy_(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.5]]))
    p = model.assignment_probabilities()
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    samples = torch.stack([model.assignment().detach() for _ in range(4000)])
    assert torch.allclose(samples, samples.round(), atol=1e-6)  # straight-through one-hot values
    torch.testing.assert_close(samples.sum(-1), torch.ones(4000, 3))
    torch.testing.assert_close(samples.mean(0), p, atol=0.03, rtol=0)  # Gumbel-max: P(argmax = k) = p_k


def test_evaluation_keeps_the_argmax_branch_per_task():
    model = build("dmtg", VEC, num_groups=2).eval()
    with torch.no_grad():
        model.group_logits.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [5.0, 4.0]]))
    torch.testing.assert_close(model.assignment(), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    x = torch.randn(4, 6)
    out = model(x)
    torch.testing.assert_close(out["b"], model.heads[1]["b"](model.branches[1](model.stem(x))))


def test_hard_assignment_trains_each_branch_only_from_its_tasks(device, params_with_grad):
    torch.manual_seed(1)
    model = build("dmtg", VEC, num_groups=2).to(device).eval()
    with torch.no_grad():
        model.group_logits.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]))  # {a, c} | {b}
    out = model(torch.randn(8, 6, device=device))
    touched_b = params_with_grad(model, out["b"].square().sum())
    assert any(n.startswith("branches.1.") for n in touched_b)
    assert not any(n.startswith(("branches.0.", "heads.0.")) for n in touched_b)
    out = model(torch.randn(8, 6, device=device))
    touched_ac = params_with_grad(model, out["a"].square().sum() + out["c"].square().sum())
    assert any(n.startswith("branches.0.") for n in touched_ac)
    assert not any(n.startswith(("branches.1.", "heads.1.", "heads.0.b")) for n in touched_ac)


def test_weighted_loss_matches_the_per_head_sum():
    torch.manual_seed(2)
    model = build("dmtg", VEC, num_groups=2, seed=7)
    with torch.no_grad():  # the branches start as copies (as in the official code): make them differ
        model.branches[1][0].weight.add_(torch.randn_like(model.branches[1][0].weight))
    x = torch.randn(5, 6)
    scale = {"a": 1.0, "b": 3.0, "c": 0.5}  # each head is scored by its own task's loss
    loss = model.weighted_loss(x, lambda t, o: scale[t] * o.square().mean())
    model.generator.manual_seed(7)
    g, outs = model.assignment(), model.head_outputs(x)
    manual = sum(g[i, k] * scale[t] * outs[k][t].square().mean() for i, t in enumerate(VEC.tasks) for k in range(2))
    torch.testing.assert_close(loss, manual)
    (got,) = torch.autograd.grad(loss, model.group_logits)  # the grouping is learned from the loss
    (expected,) = torch.autograd.grad(manual, model.group_logits)
    torch.testing.assert_close(got, expected)
    assert (got.abs().sum(-1) > 0).all()


def test_forward_is_the_assignment_weighted_mixture_and_trains_the_grouping():
    """forward = sum_k g[t, k] head_{k,t}: its value and its gradient with respect to the logits."""
    torch.manual_seed(4)
    model = build("dmtg", VEC, num_groups=2, seed=5)
    with torch.no_grad():
        model.branches[1][0].weight.add_(torch.randn_like(model.branches[1][0].weight))
    x = torch.randn(5, 6)
    out = model(x)
    model.generator.manual_seed(5)
    g, outs = model.assignment(), model.head_outputs(x)
    for i, t in enumerate(VEC.tasks):
        manual = g[i, 0] * outs[0][t] + g[i, 1] * outs[1][t]
        torch.testing.assert_close(out[t], manual)
        (got,) = torch.autograd.grad(out[t].square().sum(), model.group_logits, retain_graph=True)
        (expected,) = torch.autograd.grad(manual.square().sum(), model.group_logits, retain_graph=True)
        torch.testing.assert_close(got, expected)
        assert got[i].abs().sum() > 0 and got[torch.arange(3) != i].abs().sum() == 0  # only t's row


def test_default_samples_are_relaxed():
    """hard=False unless asked: a training-mode assignment is a soft sample, not a one-hot."""
    g = build("dmtg", VEC, num_groups=3).assignment()
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(3))


def test_a_relaxed_sample_is_the_tempered_gumbel_softmax():
    """softmax((logits + g) / tau) with g = -log(-log u) for the generator's u, at tau != 1."""
    logits = torch.tensor([[1.0, -0.5, 0.2], [0.0, 2.0, -1.0]])
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(6)).clamp(1e-9, 1 - 1e-9)
    for tau in (0.4, 3.0):
        soft = gumbel_softmax(logits, tau, torch.Generator().manual_seed(6))
        torch.testing.assert_close(soft, torch.softmax((logits - (-u.log()).log()) / tau, -1))


def test_hard_samples_keep_the_relaxed_gradient():
    """Straight-through: the one-hot forward value, the soft sample's gradient."""
    logits = torch.tensor([[0.5, -0.2, 0.1]], requires_grad=True)
    weights = torch.tensor([[1.0, -2.0, 3.0]])
    soft = gumbel_softmax(logits, 0.7, torch.Generator().manual_seed(8))
    hard = gumbel_softmax(logits, 0.7, torch.Generator().manual_seed(8), hard=True)
    (g_soft,) = torch.autograd.grad((soft * weights).sum(), logits)
    (g_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)
    assert g_soft.abs().sum() > 0


def test_gumbel_softmax_is_finite_on_extreme_logits():
    g = gumbel_softmax(torch.tensor([[1e4, -1e4], [0.0, 0.0]]), 0.1, torch.Generator().manual_seed(0), hard=True)
    assert torch.isfinite(g).all()


def test_gumbel_softmax_survives_a_uniform_draw_of_zero(monkeypatch):
    """torch.rand can return exactly 0, where -log(-log u) is infinite: u is clamped first."""
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None: torch.zeros(shape))
    for hard in (False, True):
        g = gumbel_softmax(torch.tensor([[1.0, -1.0, 0.0]]), 0.5, torch.Generator(), hard=hard)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(1))


def test_each_task_owns_its_heads_behind_every_branch(split_by_task):
    """The stem, the branches and the assignment logits are shared; task t owns its K heads."""
    torch.manual_seed(5)
    model = build("dmtg", VEC, num_groups=3)
    split = split_by_task(model, torch.randn(4, 6))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, *(f"heads.{k}.{t}." for k in range(3))))


def test_one_group_is_shared_bottom(device):
    torch.manual_seed(3)
    model = build("dmtg", VEC, num_groups=1).to(device)
    trunk = torch.nn.Sequential(copy.deepcopy(model.stem), copy.deepcopy(model.branches[0]))
    hard = SharedBottom(VEC.tasks, trunk, copy.deepcopy(model.heads[0]))
    x = torch.randn(4, 6, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], hard(x)[t])


def test_parameter_count(n_params):
    d, w, k = 6, 16, 2
    model = build("dmtg", VEC, width=w, num_groups=k)
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == (d * w + w) + k * (w * w + w) + k * heads + 3 * k


def test_short_training_lowers_the_loss(device, short_training):
    before, after = short_training("dmtg", True, device, 30)
    assert after < 0.7 * before


def test_registry_name_builds_the_catalogued_class():
    assert type(build("dmtg", VEC)) is DMTG


def test_default_temperature_is_one():
    """``tau`` = 1 here (docstring): a training sample is softmax(logits + Gumbel noise), untempered."""
    model = build("dmtg", VEC, num_groups=3, seed=4)
    with torch.no_grad():
        model.group_logits.copy_(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    u = torch.rand(3, 3, generator=torch.Generator().manual_seed(4)).clamp(1e-9, 1 - 1e-9)
    torch.testing.assert_close(model.assignment(), torch.softmax(model.group_logits - (-u.log()).log(), -1))
