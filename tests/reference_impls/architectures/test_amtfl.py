import pytest
import torch

from reference_impls.architectures.amtfl import AMTFL
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})


def test_reconstruction_and_loss_weights_by_hand():
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=3, alpha=0.5, gamma=2.0, mu=0.0)
    with torch.no_grad():
        model.feedback.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, -1.0]]))
        model.feedback.bias.zero_()
    x = torch.randn(5, 4)
    out = model(x)
    o = torch.cat([out["a"], out["b"]], dim=1)
    h_hat = torch.relu(o @ model.feedback.weight.T)
    expected = ((model.trunk(x) - h_hat) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(model.auxiliary_loss(), 2.0 * expected)
    weights = model.task_loss_weights()  # column 0 is task a's, columns 1-2 task b's
    torch.testing.assert_close(weights["a"], torch.tensor(1 + 0.5 * 1.0))
    torch.testing.assert_close(weights["b"], torch.tensor(1 + 0.5 * 4.0))


def test_unreliable_tasks_pay_more_for_their_feedback():
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=3, alpha=0.5, gamma=0.0, mu=0.0)
    model(torch.randn(5, 4))
    losses = {"a": torch.tensor(0.1), "b": torch.tensor(2.0)}  # a reliable, b not
    model.zero_grad()
    model.objective(losses).backward()
    a = model.feedback.weight
    # d/dA of sum_t (1 + alpha ||a_t||_1) L_t = alpha L_t sign(A) on task t's columns
    torch.testing.assert_close(a.grad[:, :1], 0.5 * 0.1 * a.detach()[:, :1].sign())
    torch.testing.assert_close(a.grad[:, 1:], 0.5 * 2.0 * a.detach()[:, 1:].sign())


def test_without_feedback_terms_it_is_shared_bottom(device):
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=6, alpha=0.0, gamma=0.0, mu=0.0).to(device)
    x = torch.randn(5, 4, device=device)
    out = model(x)
    h = model.trunk(x)
    for t in "ab":
        torch.testing.assert_close(out[t], model.heads[t](h))
    losses = {t: out[t].square().mean() for t in "ab"}
    torch.testing.assert_close(model.objective(losses), losses["a"] + losses["b"])


def test_which_parameters_each_term_reaches(device, params_with_grad):
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=6).to(device)
    out = model(torch.randn(5, 4, device=device))
    touched = params_with_grad(model, out["a"].sum())
    assert touched and all(n.startswith(("trunk", "heads.a")) for n in touched)
    model(torch.randn(5, 4, device=device))
    touched = params_with_grad(model, model.auxiliary_loss())
    assert {"feedback.weight", "heads.a.0.weight", "heads.b.0.weight", "trunk.blocks.0.0.weight"} <= touched
    with pytest.raises(RuntimeError, match="forward"):
        build("amtfl", VEC).auxiliary_loss()


def test_objective_training_lowers_loss(device, fit):
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=8).to(device)
    x = torch.randn(32, 4, device=device)
    targets = {"a": x[:, :1], "b": x[:, :2] - x[:, 2:]}
    losses = fit(model, x, lambda out: model.objective({t: ((out[t] - targets[t]) ** 2).mean() for t in out}), 60, 0.02)
    assert losses[-1] < 0.3 * losses[0]


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    registry_output_shapes("amtfl", device)
    for dense in (True, False):
        before, after = short_training("amtfl", dense, device, 30)
        assert after < 0.5 * before


def test_registry_name_builds_the_catalogued_class():
    model = build("amtfl", VEC)
    assert type(model) is AMTFL and model.name == "amtfl"


def test_head_penalty_is_l1_of_head_weights_only():
    """mu penalises the heads' weights, not their biases, nor the trunk or A."""
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=3, gamma=0.0, mu=1.0)
    with torch.no_grad():
        for t in "ab":
            model.heads[t][0].bias.fill_(5.0)
    model(torch.randn(2, 4))
    expected = sum(model.heads[t][0].weight.abs().sum() for t in "ab")
    torch.testing.assert_close(model.auxiliary_loss(), expected)


def test_pooled_image_tasks_reconstruct_spatially_averaged_features():
    torch.manual_seed(0)
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=False)
    model = build("amtfl", problem, width=3, gamma=1.0, mu=0.0)
    x = torch.randn(3, 2, 4, 4)
    out = model(x)
    h = model.trunk(x).mean(dim=(2, 3))
    h_hat = model.reconstruct(out)
    torch.testing.assert_close(model.auxiliary_loss(), ((h - h_hat) ** 2).sum(dim=1).mean())


def test_task_specific_parameters_are_the_head_only(split_by_task):
    """A mixes every task's predictions, so it is shared; a task claims its head alone."""
    torch.manual_seed(0)
    model = build("amtfl", VEC, width=6)
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 4)).items():
        assert own == {f"heads.{t}.0.weight", f"heads.{t}.0.bias"}
        assert reached == own | trunk


def _constant_feedback(model, bias):
    """A = 0 and b = ``bias``: h_hat = ReLU(b) for every input, whatever the tasks predict."""
    with torch.no_grad():
        model.feedback.weight.zero_()
        model.feedback.bias.copy_(torch.tensor(bias))


def test_reconstruction_pulls_the_features_toward_relu_of_the_bias():
    """With A = 0 the reconstruction is ReLU(b); its gradient reaches the trunk through h itself
    (h is the thing pulled toward what the tasks predict, not a fixed target)."""
    torch.manual_seed(1)
    model = build("amtfl", VEC, width=3, gamma=1.0, mu=0.0).double()
    _constant_feedback(model, [0.5, -1.0, 2.0])  # ReLU(b) = (0.5, 0, 2)
    x = torch.randn(4, 4, dtype=torch.float64)
    model(x)
    h = model.trunk(x)
    by_hand = (h - torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)).square().sum(dim=1).mean()
    torch.testing.assert_close(model.auxiliary_loss(), by_hand)
    trunk = list(model.trunk.parameters())
    for got, want in zip(torch.autograd.grad(model.auxiliary_loss(), trunk), torch.autograd.grad(by_hand, trunk)):
        torch.testing.assert_close(got, want)


def test_objective_is_the_weighted_task_losses_plus_the_auxiliary_terms():
    torch.manual_seed(2)
    model = build("amtfl", VEC, width=3, alpha=0.5, gamma=2.0, mu=0.1)
    with torch.no_grad():
        model.feedback.weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, -1.0]]))
    model(torch.randn(5, 4))
    losses = {"a": torch.tensor(0.3), "b": torch.tensor(2.0)}
    # weights 1 + 0.5 * 1 = 1.5 (column 0) and 1 + 0.5 * 4 = 3 (columns 1-2)
    torch.testing.assert_close(model.objective(losses), 1.5 * 0.3 + 3.0 * 2.0 + model.auxiliary_loss())
    assert model.auxiliary_loss() > 0


def test_dense_reconstruction_error_is_summed_over_channels_and_averaged_over_inputs_and_pixels():
    torch.manual_seed(3)
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)
    model = build("amtfl", problem, width=3, gamma=1.0, mu=0.0).double()
    _constant_feedback(model, [0.5, -1.0, 2.0])
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    model(x)
    gap = model.trunk(x) - torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(model.auxiliary_loss(), gap.square().sum() / (3 * 4 * 4))
