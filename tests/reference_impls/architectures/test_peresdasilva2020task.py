import math

import torch

from reference_impls.architectures.amtfl import AMTFL
from reference_impls.architectures.peresdasilva2020task import UncertaintyAMTFL
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})
NAME = "peresdasilva2020task"


def with_feedback(model, alpha_columns=((1.0, -2.0, 0.0), (0.0, 0.5, 0.5), (0.0, 0.0, -1.0))):
    with torch.no_grad():
        model.feedback.weight.copy_(torch.tensor(alpha_columns))
        model.feedback.bias.zero_()
    return model  # column 0 is task a's (||a_a||_1 = 1), columns 1-2 task b's (||a_b||_1 = 4)


def test_objective_by_hand():
    """sum_t (1 + alpha ||a_t||_1) (exp(-s_t) L_t + s_t) + the AMTFL auxiliary terms."""
    torch.manual_seed(0)
    model = with_feedback(build(NAME, VEC, width=3, alpha=0.5, gamma=2.0, mu=0.1))
    with torch.no_grad():
        model.log_variances["a"].fill_(math.log(0.5))
        model.log_variances["b"].fill_(1.0)
    model(torch.randn(5, 4))
    losses = {"a": torch.tensor(0.3), "b": torch.tensor(2.0)}
    u_a = 0.3 / 0.5 + math.log(0.5)
    u_b = 2.0 * math.exp(-1.0) + 1.0
    expected = (1 + 0.5 * 1.0) * u_a + (1 + 0.5 * 4.0) * u_b + model.auxiliary_loss()
    torch.testing.assert_close(model.objective(losses), expected)


def test_with_unit_variances_it_is_amtfl(device):
    """s_t = 0 (the initial value): U_t = L_t, and the objective is AMTFL's."""
    torch.manual_seed(0)
    model = build(NAME, VEC, width=6, alpha=0.3).to(device)
    torch.manual_seed(0)
    plain = build("amtfl", VEC, width=6, alpha=0.3).to(device)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("log_variances")})
    x = torch.randn(5, 4, device=device)
    out, out_plain = model(x), plain(x)
    losses = {t: out[t].square().mean() for t in out}
    torch.testing.assert_close(model.objective(losses), AMTFL.objective(plain, {t: out_plain[t].square().mean()
                                                                               for t in out_plain}))


def test_defaults_keep_amtfls_alpha_gamma_and_mu():
    """AMTFL's alpha stays on the l1 term (not the TUGDA code's implicit alpha = 1), and so do its
    gamma and mu: with unit variances and default arguments the objective is default AMTFL's."""
    torch.manual_seed(0)
    model = with_feedback(build(NAME, VEC, width=3))
    plain = with_feedback(build("amtfl", VEC, width=3))
    assert (model.alpha, model.gamma, model.mu) == (plain.alpha, plain.gamma, plain.mu) != (1.0, 1.0, 1.0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("log_variances")})
    x, losses = torch.randn(5, 4), {"a": torch.tensor(0.7), "b": torch.tensor(3.0)}
    model(x), plain(x)
    torch.testing.assert_close(model.objective(losses), AMTFL.objective(plain, losses))


def test_log_variance_settles_at_the_log_of_the_task_loss():
    """d/ds_t of c_t (exp(-s_t) L_t + s_t) vanishes at s_t = log L_t whatever the AMTFL factor c_t;
    gradient descent on the objective alone finds it."""
    torch.manual_seed(0)
    model = with_feedback(build(NAME, VEC, width=3, alpha=0.5, gamma=0.0, mu=0.0))
    losses = {"a": torch.tensor(0.2), "b": torch.tensor(5.0)}
    opt = torch.optim.SGD(model.log_variances.parameters(), lr=0.1)
    for _ in range(300):
        model(torch.randn(2, 4))
        opt.zero_grad()
        model.objective(losses).backward()
        opt.step()
    for t, loss in losses.items():
        torch.testing.assert_close(model.log_variances[t].exp(), loss, rtol=1e-3, atol=0.0)


def test_feedback_price_is_the_uncertainty_loss():
    """The l1 pressure on task t's feedback columns is alpha U_t sign(A), not alpha L_t."""
    torch.manual_seed(0)
    model = with_feedback(build(NAME, VEC, width=3, alpha=0.5, gamma=0.0, mu=0.0))
    with torch.no_grad():
        model.log_variances["a"].fill_(-1.0)
        model.log_variances["b"].fill_(2.0)
    model(torch.randn(5, 4))
    losses = {"a": torch.tensor(0.1), "b": torch.tensor(4.0)}
    model.zero_grad()
    model.objective(losses).backward()
    a = model.feedback.weight.detach()
    u_a, u_b = 0.1 * math.exp(1.0) - 1.0, 4.0 * math.exp(-2.0) + 2.0
    torch.testing.assert_close(model.feedback.weight.grad[:, :1], 0.5 * u_a * a[:, :1].sign())
    torch.testing.assert_close(model.feedback.weight.grad[:, 1:], 0.5 * u_b * a[:, 1:].sign())


def test_a_large_loss_task_is_priced_on_a_log_scale():
    """At the optimal s_t the price of feedback is alpha (1 + log L_t): a task with 100 times
    the loss pays log(100) more per unit of feedback, not 100 times as much (AMTFL)."""
    torch.manual_seed(0)
    model = with_feedback(build(NAME, VEC, width=3, alpha=1.0, gamma=0.0, mu=0.0))
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(100.0)}
    with torch.no_grad():
        for t, loss in losses.items():
            model.log_variances[t].fill_(math.log(loss.item()))
    u = model.uncertainty_losses(losses)
    torch.testing.assert_close(u["a"], torch.tensor(1.0))
    torch.testing.assert_close(u["b"], torch.tensor(1.0 + math.log(100.0)))


def test_objective_training_lowers_loss_and_learns_variances(device, fit):
    torch.manual_seed(0)
    model = build(NAME, VEC, width=8).to(device)
    x = torch.randn(32, 4, device=device)
    targets = {"a": x[:, :1], "b": x[:, :2] - x[:, 2:]}
    mse = lambda out: {t: ((out[t] - targets[t]) ** 2).mean() for t in out}  # noqa: E731
    before = {t: v.item() for t, v in mse(model(x)).items()}
    fit(model, x, lambda out: model.objective(mse(out)), 80, 0.02)
    after = mse(model(x))
    assert all(after[t].item() < 0.3 * before[t] for t in before)
    assert all(model.log_variances[t].item() < 0 for t in model.tasks)  # small losses: low variance


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    registry_output_shapes(NAME, device)
    for dense in (True, False):
        before, after = short_training(NAME, dense, device, 30)
        assert after < 0.5 * before


def test_registry_name_builds_the_catalogued_class():
    model = build(NAME, VEC)
    assert type(model) is UncertaintyAMTFL and model.name == NAME


def test_each_task_claims_its_head_and_its_log_variance(split_by_task):
    torch.manual_seed(0)
    model = build(NAME, VEC, width=6)
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 4)).items():
        assert own == {f"heads.{t}.0.weight", f"heads.{t}.0.bias", f"log_variances.{t}"}
        assert reached == (own - {f"log_variances.{t}"}) | trunk


def test_alpha_gamma_and_mu_given_by_the_user_reach_the_objective():
    """Each weight given to the constructor (through the registry) is the one the objective uses."""
    model = build(NAME, VEC, width=3, alpha=0.3, gamma=0.02, mu=0.05)
    assert (model.alpha, model.gamma, model.mu) == (0.3, 0.02, 0.05)
