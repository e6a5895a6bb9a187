import copy

import pytest
import torch

from reference_impls.architectures.encoders import ChannelLinear
from reference_impls.architectures.mrn import MRN, TensorNormalPrior, mode_unfold
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
MIXED = Problem(("a", "b"), (6,), {"a": 1, "b": 3})


def _random_spd(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def test_penalty_is_the_quadratic_form_with_the_explicit_kronecker_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    prior = TensorNormalPrior(w.shape).double()
    for mode in range(3):
        getattr(prior, f"precision{mode}").copy_(_random_spd(w.shape[mode], g))
    p1, p2, p3 = prior.precisions()
    vec = w.reshape(-1)  # row-major vec pairs with torch.kron's ordering
    expected = vec @ torch.kron(torch.kron(p1, p2), p3) @ vec
    torch.testing.assert_close(prior.penalty(w), expected)


def test_covariance_update_is_the_flip_flop_formula_with_unit_trace():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    prior = TensorNormalPrior(w.shape, eps=1e-3).double()
    for mode in range(3):
        getattr(prior, f"precision{mode}").copy_(_random_spd(w.shape[mode], g))
    sigma = [torch.linalg.inv(p) for p in prior.precisions()]
    prior.update(w)
    new = prior.precisions()
    # mode 1 from the old Sigma_2, Sigma_3; mode 2 from the new Sigma_1 and the old Sigma_3; ...
    s1 = mode_unfold(w, 0) @ torch.linalg.inv(torch.kron(sigma[1], sigma[2])) @ mode_unfold(w, 0).T / 8
    s1 = s1 + 1e-3 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(new[0], torch.linalg.inv(s1) / torch.trace(torch.linalg.inv(s1)))
    s2 = mode_unfold(w, 1) @ torch.kron(new[0], torch.linalg.inv(sigma[2]).contiguous()) @ mode_unfold(w, 1).T / 12
    s2 = s2 + 1e-3 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(new[1], torch.linalg.inv(s2) / torch.trace(torch.linalg.inv(s2)))
    s3 = mode_unfold(w, 2) @ torch.kron(new[0], new[1]) @ mode_unfold(w, 2).T / 6
    s3 = s3 + 1e-3 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(new[2], torch.linalg.inv(s3) / torch.trace(torch.linalg.inv(s3)))
    assert all(abs(torch.trace(p).item() - 1) < 1e-12 for p in new)


def test_task_covariance_learns_that_two_tasks_are_related():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 3, generator=g, dtype=torch.float64)
    other = torch.randn(8, 3, generator=g, dtype=torch.float64)
    w = torch.stack([base, base + 0.05 * other, other], dim=-1)  # tasks 0 and 1 nearly equal
    prior = TensorNormalPrior(w.shape).double()
    for _ in range(5):
        prior.update(w)
    task_cov = torch.linalg.inv(prior.precisions()[2])
    corr = task_cov / torch.outer(task_cov.diag().sqrt(), task_cov.diag().sqrt())
    # the feature and class modes are whitened first, which lowers the raw 0.99 correlation
    assert corr[0, 1] > 0.4 and abs(corr[0, 2]) < 0.1


def test_auxiliary_loss_is_weighted_penalty_and_reaches_only_the_task_layers(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mrn", VEC, width=8, depth=1, prior_weight=0.3).to(device)
    model(torch.randn(5, 6, device=device))  # training mode: one flip-flop sweep
    penalty = sum(model.priors[str(i)].penalty(model.stacked_weights(i)) for i in (0, 1))
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * penalty)
    touched = params_with_grad(model, model.auxiliary_loss())
    assert touched == {f"layers.{t}.{i}.weight" for t in "ab" for i in (0, 1)}


def test_output_layers_of_different_widths_are_not_stacked():
    model = build("mrn", MIXED, width=8)
    assert model.regularised == [0]
    assert model.stacked_weights(0).shape == (8, 8, 2)


def test_forward_updates_covariances_only_in_training_mode(device):
    torch.manual_seed(0)
    model = build("mrn", VEC, width=8).to(device)
    start = copy.deepcopy(model.priors.state_dict())
    model.eval()
    model(torch.randn(3, 6, device=device))
    assert all(torch.equal(start[k], v) for k, v in model.priors.state_dict().items())
    model.train()
    model(torch.randn(3, 6, device=device))
    assert not torch.allclose(start["0.precision2"], model.priors["0"].precision2)


def test_zero_weight_is_shared_bottom_with_two_layer_heads(device):
    torch.manual_seed(0)
    model = build("mrn", VEC, width=8, prior_weight=0.0).to(device)
    x = torch.randn(4, 6, device=device)
    out = model(x)
    z = model.trunk(x)
    for t in VEC.tasks:
        first, second = model.layers[t]
        torch.testing.assert_close(out[t], second(torch.relu(first(z))))
    assert model.auxiliary_loss().item() == 0.0


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    for dense in (True, False):
        before, after = short_training("mrn", dense, device, 30)
        assert after < 0.5 * before
    registry_output_shapes("mrn", device)


def test_registry_name_builds_the_catalogued_class():
    model = build("mrn", VEC)
    assert type(model) is MRN and model.name == "mrn"


def test_stacked_weights_are_inputs_by_outputs_by_tasks():
    torch.manual_seed(0)
    model = build("mrn", MIXED, width=8)
    w = model.stacked_weights(0)
    for k, t in enumerate(MIXED.tasks):
        assert torch.equal(w[..., k], model.layers[t][0].weight.T)  # W[i, o, k]: input i to unit o of task k
    assert build("mrn", VEC, width=8).stacked_weights(1).shape == (8, 1, 2)


@pytest.mark.parametrize("every", [2, 3])
def test_covariances_update_once_every_update_every_training_calls(every):
    torch.manual_seed(0)
    model = build("mrn", VEC, width=8, update_every=every)
    changed = []
    for _ in range(6):
        before = model.priors["0"].precision2.clone()
        model(torch.randn(3, 6))
        with torch.no_grad():  # move the weights so that every sweep has something new to estimate
            model.layers["a"][0].weight.add_(0.5 * torch.randn(8, 8))
        changed.append(not torch.equal(before, model.priors["0"].precision2))
    assert changed == [i % every == 0 for i in range(6)]  # the first call, then every `every`-th


def test_task_specific_parameters_are_what_only_that_task_reaches(split_by_task):
    """Task t's output reaches the trunk plus exactly its own two layers, which it claims."""
    torch.manual_seed(0)
    model = build("mrn", VEC, width=8)
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 6)).items():
        assert own == {f"layers.{t}.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
        assert reached == own | trunk


def test_start_is_isotropic_unit_trace_and_defaults_are_the_documented_ones():
    """Before any update each precision is I / D (unit trace), so the penalty is ||W||_F^2 / (D1 D2 K);
    prior_weight defaults to 1e-2 and eps to the authors' code's 1e-5."""
    torch.manual_seed(0)
    model = build("mrn", VEC, width=8).eval()  # eval: no flip-flop sweep
    hidden, output = model.stacked_weights(0), model.stacked_weights(1)  # 8 x 8 x 2 and 8 x 1 x 2
    expected = hidden.square().sum() / (8 * 8 * 2) + output.square().sum() / (8 * 1 * 2)
    torch.testing.assert_close(model.auxiliary_loss(), 1e-2 * expected)
    assert all(torch.equal(p, torch.eye(p.shape[0]) / p.shape[0]) for p in model.priors["1"].precisions())
    assert model.priors["0"].eps == 1e-5 and TensorNormalPrior((2, 2, 2)).eps == 1e-5


def test_options_reach_the_trunk_and_priors_and_heads_put_a_relu_between_their_layers():
    """``depth`` sets the trunk's layers and ``eps`` every prior's; each head is
    layer_2(relu(layer_1(z))) with no ReLU before its first layer (checked on a trunk that
    passes negative values through)."""
    torch.manual_seed(0)
    model = MRN.from_problem(VEC, width=8, depth=3, eps=0.25)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.trunk.modules()) == 3
    assert all(prior.eps == 0.25 for prior in model.priors.values())
    layers = {t: [ChannelLinear(4, 5), ChannelLinear(5, 2)] for t in ("a", "b")}
    plain = MRN(("a", "b"), torch.nn.Identity(), layers).eval()
    z = torch.randn(3, 4)
    out = plain(z)
    for t in ("a", "b"):
        first, second = layers[t]
        torch.testing.assert_close(out[t], second(torch.relu(first(z))))


def test_without_a_stackable_layer_the_penalty_is_a_zero_tensor():
    """When no layer has the same shape in every task there is no prior: the auxiliary loss is
    a zero tensor (which a training loop can add, backpropagate or read with ``item()``)."""
    layers = {"a": [ChannelLinear(4, 1)], "b": [ChannelLinear(4, 3)]}
    model = MRN(("a", "b"), torch.nn.Identity(), layers)
    assert model.regularised == []
    loss = model.auxiliary_loss()
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0
