import pytest
import torch

from reference_impls.architectures.gumbel_matrix_routing import GumbelMatrixRouting, gumbel_sigmoid, mean_of_allocated
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_allocation_probabilities_are_sigmoids_of_the_logits(device):
    model = build("gumbel_matrix_routing", VEC, num_layers=2, num_components=3).to(device)
    with torch.no_grad():
        model.allocation_logits["a"].copy_(torch.tensor([[0.0, 2.0, -1.0], [3.0, -3.0, 0.5]]))
    p = model.allocation_probabilities()["a"]
    assert p.shape == (2, 3) and ((p > 0) & (p < 1)).all()
    torch.testing.assert_close(p[0], torch.tensor([0.5, 1 / (1 + torch.e**-2), 1 / (1 + torch.e)], device=device))
    torch.testing.assert_close(p[1], torch.tensor([1 / (1 + torch.e**-3), 1 / (1 + torch.e**3), 1 / (1 + torch.e**-0.5)], device=device))
    torch.testing.assert_close(model.allocation_probabilities()["b"], torch.full((2, 3), torch.sigmoid(torch.tensor(2.5)).item(), device=device))


def test_gumbel_sigmoid_is_a_relaxed_bernoulli_with_those_probabilities():
    logits = torch.tensor([-1.5, 0.0, 0.7, 2.0])
    g = torch.Generator().manual_seed(0)
    samples = gumbel_sigmoid(logits.expand(40000, -1), tau=0.5, generator=g)
    assert ((samples >= 0) & (samples <= 1)).all() and samples.std(0).min() > 0.1  # relaxed, not binary
    torch.testing.assert_close((samples > 0.5).float().mean(0), torch.sigmoid(logits), atol=0.01, rtol=0)
    hard = gumbel_sigmoid(logits.expand(5, -1).requires_grad_(), 0.5, g, hard=True)
    torch.testing.assert_close(hard, hard.round(), rtol=0, atol=1e-6)  # 0/1 up to the straight-through term


def test_a_relaxed_sample_is_the_tempered_logistic_formula():
    """m = sigmoid((logit + log u - log(1 - u)) / tau) for the generator's u, at tau != 1."""
    logits = torch.tensor([[-1.0, 0.3], [2.0, 0.0]])
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(5)).clamp(1e-6, 1 - 1e-6)
    for tau in (0.3, 2.0):
        m = gumbel_sigmoid(logits, tau, torch.Generator().manual_seed(5))
        torch.testing.assert_close(m, torch.sigmoid((logits + torch.log(u / (1 - u))) / tau))


def test_straight_through_keeps_the_relaxed_gradient():
    logits = torch.zeros(6, requires_grad=True)
    soft = gumbel_sigmoid(logits, 1.0, torch.Generator().manual_seed(1))
    (g_soft,) = torch.autograd.grad(soft.sum(), logits)
    hard = gumbel_sigmoid(logits, 1.0, torch.Generator().manual_seed(1), hard=True)
    (g_hard,) = torch.autograd.grad(hard.sum(), logits)
    torch.testing.assert_close(g_hard, g_soft)


def test_eval_allocation_is_deterministic_threshold_at_one_half(device):
    torch.manual_seed(0)
    model = build("gumbel_matrix_routing", VEC, num_components=3).to(device).eval()
    with torch.no_grad():
        model.allocation_logits["b"].copy_(torch.tensor([[0.2, -0.1, 0.0], [-2.0, 1.0, -0.3]]))
    torch.testing.assert_close(model.allocation("b"), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=device))
    x = torch.randn(4, 6, device=device)
    first, second = model(x), model(x)
    assert all(torch.equal(first[t], second[t]) for t in VEC.tasks)
    model.train()
    assert not torch.equal(model(x)["a"], model(x)["a"])  # training samples differ


def test_all_ones_allocation_averages_every_component(device):
    torch.manual_seed(1)
    model = build("gumbel_matrix_routing", VEC, num_layers=2, num_components=3).to(device).eval()
    x = torch.randn(5, 6, device=device)
    h = x
    for components in model.layers:
        h = sum(f(h) for f in components) / 3
    torch.testing.assert_close(model(x)["a"], model.heads["a"](h))  # default logits 2.5 > 0: all ones


def test_a_one_hot_allocation_uses_one_component_and_trains_only_it(device, params_with_grad):
    """Each task follows its own allocation matrix: a uses (1, 0), b uses (2, 1)."""
    torch.manual_seed(2)
    model = build("gumbel_matrix_routing", VEC, num_layers=2, num_components=3).to(device).eval()
    with torch.no_grad():
        model.allocation_logits["a"].copy_(torch.tensor([[-5.0, 5.0, -5.0], [5.0, -5.0, -5.0]]))
        model.allocation_logits["b"].copy_(torch.tensor([[-5.0, -5.0, 5.0], [-5.0, 5.0, -5.0]]))
    x = torch.randn(5, 6, device=device)
    for t, (first, second) in (("a", (1, 0)), ("b", (2, 1))):
        out = model(x)[t]
        torch.testing.assert_close(out, model.heads[t](model.layers[1][second](model.layers[0][first](x))))
        touched = params_with_grad(model, out.square().sum())
        components = {n.rsplit(".", 2)[0] for n in touched if n.startswith("layers.")}
        assert components == {f"layers.0.{first}", f"layers.1.{second}"}


def test_soft_mixture_is_the_normalised_allocation_weighted_mean(device):
    torch.manual_seed(3)
    model = build("gumbel_matrix_routing", VEC, num_layers=1, num_components=2, seed=4).to(device)
    x = torch.randn(3, 6, device=device)
    m = gumbel_sigmoid(model.allocation_logits["a"], 1.0, torch.Generator().manual_seed(4))
    expected = (m[0, 0] * model.layers[0][0](x) + m[0, 1] * model.layers[0][1](x)) / m[0].sum()
    torch.testing.assert_close(model(x)["a"], model.heads["a"](expected))


def test_allocation_logits_get_gradient_only_from_their_task(device, params_with_grad):
    torch.manual_seed(4)
    model = build("gumbel_matrix_routing", VEC).to(device)
    touched = params_with_grad(model, model(torch.randn(8, 6, device=device))["a"].square().sum())
    assert "allocation_logits.a" in touched
    assert not any(n.startswith(("allocation_logits.b", "heads.b")) for n in touched)


def test_parameter_count(n_params):
    d, w, L, C = 6, 16, 2, 3
    model = build("gumbel_matrix_routing", VEC, width=w, num_layers=L, num_components=C)
    components = C * (d * w + w) + C * (w * w + w)
    assert n_params(model) == components + 2 * L * C + (w + 1) + (2 * w + 2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("gumbel_matrix_routing", device)
    first, last = short_training("gumbel_matrix_routing", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("gumbel_matrix_routing", VEC)
    assert type(model) is GumbelMatrixRouting and model.name == "gumbel_matrix_routing"


def test_a_hard_sample_rounds_the_relaxed_one_at_one_half():
    logits = torch.linspace(-2.0, 2.0, 400)
    soft = gumbel_sigmoid(logits, 0.7, torch.Generator().manual_seed(6))
    hard = gumbel_sigmoid(logits, 0.7, torch.Generator().manual_seed(6), hard=True)
    assert ((soft > 0.5) & (soft < 0.6)).any() and ((soft > 0.4) & (soft < 0.5)).any()
    torch.testing.assert_close(hard, (soft >= 0.5).float())


def test_allocation_sums_below_one_still_give_a_mean_and_an_empty_row_gives_zeros():
    """Divided by max(sum m, eps), not by max(sum m, 1): m = (0.2, 0.1) weighs the components 2:1 at full scale."""
    a, b = torch.tensor([[3.0, -1.0]]), torch.tensor([[0.0, 6.0]])
    torch.testing.assert_close(mean_of_allocated(torch.tensor([0.2, 0.1]), [a, b]), torch.tensor([[2.0, 4 / 3]]))
    torch.testing.assert_close(mean_of_allocated(torch.zeros(2), [a, b]), torch.zeros(1, 2))


def sample_model(**kw):
    torch.manual_seed(0)
    return build("gumbel_matrix_routing", VEC, num_layers=2, num_components=3, seed=7, **kw).train()


@pytest.mark.parametrize("hard", (False, True))
def test_training_allocation_is_the_model_s_own_tau_and_hard_sample(hard):
    model = sample_model(tau=0.4, hard=hard)
    with torch.no_grad():
        model.allocation_logits["a"].normal_()
    expected = gumbel_sigmoid(model.allocation_logits["a"].detach(), 0.4, torch.Generator().manual_seed(7), hard)
    torch.testing.assert_close(model.allocation("a"), expected)


def test_the_default_training_sample_is_relaxed():
    m = sample_model().allocation("a")
    assert not sample_model().hard and not torch.equal(m, m.round())


def test_a_task_claims_its_allocation_logits_and_head_alone(split_by_task):
    """In training every task's relaxed allocation reaches every component, which are shared."""
    model = sample_model()
    split = split_by_task(model, torch.randn(4, 6))
    assert_each_task_owns_exactly(split, lambda t: {f"allocation_logits.{t}"} | names_under(model, f"heads.{t}."))
