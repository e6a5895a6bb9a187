import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.srdml import SRDML, saliency

VEC = Problem(("a", "b", "c"), (4,), {"a": 1, "b": 2, "c": 1})


def _linear_heads(model):
    """Each default vector head is one nn.Linear: its saliency is its weight summed over outputs."""
    return {t: model.heads[t][0].weight.sum(dim=0) for t in model.tasks}


def test_penalty_by_hand_with_linear_heads():
    torch.manual_seed(0)
    model = build("srdml", VEC, width=5, mu=0.5)
    with torch.no_grad():
        model.pair_weights.copy_(torch.tensor([1.0, 3.0, 0.0]))  # pairs (a, b), (a, c), (b, c)
    model(torch.randn(6, 4))
    s = _linear_heads(model)
    expected = (1.0 * (s["a"] - s["b"]).abs().sum() + 3.0 * (s["a"] - s["c"]).abs().sum()) / 4.0
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * expected)


def test_dense_saliency_is_summed_over_positions():
    torch.manual_seed(0)
    problem = Problem(("a", "b"), (2, 3, 3), {"a": 2, "b": 1}, dense=True)
    model = build("srdml", problem, width=4, mu=1.0)
    model(torch.randn(2, 2, 3, 3))
    w = {t: model.heads[t][0].weight[:, :, 0, 0].sum(dim=0) for t in "ab"}  # 1x1 conv heads
    expected = 9 * (w["a"] - w["b"]).abs().sum()  # the same gradient at each of the 9 positions
    torch.testing.assert_close(model.auxiliary_loss(), expected)


def test_saliency_is_per_example_for_a_nonlinear_head():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    h = torch.randn(4, 3, requires_grad=True)
    maps = saliency(head(h), h)
    for i in range(4):
        alone = torch.autograd.functional.jacobian(lambda z: head(z).sum(), h[i])
        torch.testing.assert_close(maps[i], alone)


def test_pair_weight_gradient_is_the_authors_analytic_one():
    """d(mu R)/dc_uv = mu (D_uv / sum c - sum_w c_w D_w / (sum c)^2), as the authors' code writes it."""
    torch.manual_seed(0)
    model = build("srdml", VEC, width=5, mu=0.3)
    with torch.no_grad():
        model.pair_weights.copy_(torch.tensor([0.5, 1.0, 2.0]))
    model(torch.randn(6, 4))
    (grad,) = torch.autograd.grad(model.auxiliary_loss(), model.pair_weights)
    s = _linear_heads(model)
    d = torch.stack([(s[u] - s[v]).abs().sum() for u, v in (("a", "b"), ("a", "c"), ("b", "c"))]).detach()
    c = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(grad, 0.3 * (d / c.sum() - (c * d).sum() / c.sum() ** 2))
    assert grad[d.argmin()] < 0 < grad[d.argmax()]  # descent raises the weight of the closest pair


def test_penalty_pulls_the_saliencies_of_related_tasks_together(params_with_grad):
    torch.manual_seed(0)
    model = build("srdml", VEC, width=5, mu=1.0)
    x = torch.randn(8, 4)
    model(x)
    assert {"heads.a.0.weight", "heads.b.0.weight", "pair_weights"} <= params_with_grad(model, model.auxiliary_loss())
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n.startswith("heads")], lr=0.05)
    before = None
    for _ in range(20):
        model(x)
        loss = model.auxiliary_loss()
        before = loss.item() if before is None else before
        opt.zero_grad()
        loss.backward()
        opt.step()
    model(x)
    assert model.auxiliary_loss().item() < 0.5 * before


def test_relation_matrix_and_no_grad_forward():
    model = build("srdml", VEC, width=5)
    with torch.no_grad():
        model.pair_weights.copy_(torch.tensor([1.0, -2.0, 3.0]))
        out = model(torch.randn(2, 4))  # no saliency under no_grad
    assert out["b"].shape == (2, 2)
    with pytest.raises(RuntimeError, match="forward"):
        model.auxiliary_loss()
    expected = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 3.0, 0.0]])  # c = relu(c_raw)
    torch.testing.assert_close(model.relation(), expected)
    single = build("srdml", Problem(("a",), (4,)), width=5)
    single(torch.randn(2, 4))
    assert single.auxiliary_loss().item() == 0.0


def test_without_the_penalty_it_is_shared_bottom(device):
    torch.manual_seed(0)
    model = build("srdml", VEC, width=6, mu=0.0).to(device)
    x = torch.randn(5, 4, device=device)
    out = model(x)
    h = model.trunk(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.heads[t](h))
    assert model.auxiliary_loss().item() == 0.0
    with pytest.raises(ValueError, match="mu"):
        build("srdml", VEC, mu=-1.0)


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    registry_output_shapes("srdml", device)
    for dense in (True, False):
        before, after = short_training("srdml", dense, device, 30)
        assert after < 0.5 * before


def test_registry_name_builds_the_catalogued_class():
    model = build("srdml", VEC)
    assert type(model) is SRDML and model.name == "srdml"


def test_task_specific_parameters_are_the_head_only(split_by_task):
    torch.manual_seed(0)
    model = build("srdml", VEC, width=6)
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 4)).items():
        assert own == {f"heads.{t}.0.weight", f"heads.{t}.0.bias"}
        assert reached == own | trunk


def _penalty_by_hand(model, c):
    """sum_{u<v} c_uv ||s_u - s_v||_1 / sum c for the linear heads' constant saliencies."""
    s = _linear_heads(model)
    d = torch.stack([(s[u] - s[v]).abs().sum() for u, v in (("a", "b"), ("a", "c"), ("b", "c"))])
    return (c * d).sum() / c.sum()


def test_a_negative_raw_pair_weight_counts_as_zero_and_stays_there():
    torch.manual_seed(0)
    model = build("srdml", VEC, width=5, mu=1.0)
    with torch.no_grad():
        model.pair_weights.copy_(torch.tensor([1.0, -2.0, 3.0]))  # c = relu: (1, 0, 3)
    model(torch.randn(6, 4))
    torch.testing.assert_close(model.auxiliary_loss(), _penalty_by_hand(model, torch.tensor([1.0, 0.0, 3.0])))
    (grad,) = torch.autograd.grad(model.auxiliary_loss(), model.pair_weights)
    assert grad[1] == 0 and grad[0] != 0


def test_a_frozen_trunk_still_gets_the_saliency_penalty():
    torch.manual_seed(0)
    model = build("srdml", VEC, width=5, mu=1.0)
    model.trunk.requires_grad_(False)
    model(torch.randn(6, 4))
    torch.testing.assert_close(model.auxiliary_loss(), _penalty_by_hand(model, torch.ones(3)))
    (grad,) = torch.autograd.grad(model.auxiliary_loss(), model.heads["a"][0].weight)
    assert grad.abs().sum() > 0


def test_authors_defaults_mu_one_tenth_and_pair_weights_starting_at_one():
    model = build("srdml", VEC, width=5)
    assert model.mu == 0.1
    torch.testing.assert_close(model.pair_weights.detach(), torch.ones(3))


def test_a_single_task_has_no_relations_and_a_fresh_model_has_no_penalty():
    """One task: no pair weights, a 1 x 1 zero relation matrix; before any forward pass there is no
    penalty to read."""
    single = build("srdml", Problem(("a",), (4,)), width=5)
    assert single.graph_weights() is None
    assert torch.equal(single.relation(), torch.zeros(1, 1))
    with pytest.raises(RuntimeError, match="forward"):
        build("srdml", VEC, width=5).auxiliary_loss()


def test_saliency_of_sequence_features_is_summed_over_positions():
    """Any axes after the channels are spatial: (B, C, L) features give a (B, C) saliency."""
    features = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(3)
    out = torch.einsum("bcl,c->bl", features, weight)
    torch.testing.assert_close(saliency(out, features), weight.expand(2, 3) * 4)
