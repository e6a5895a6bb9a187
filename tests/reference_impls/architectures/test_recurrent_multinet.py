"""Recurrent multinet: answers fed back through task encoders; zero steps = shared-bottom."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.recurrent_multinet import RecurrentMultinet
from reference_impls.architectures.shared_bottom import SharedBottom

from .harness_probe import harness_step, mse_specs

DENSE = registry.Problem(("seg", "depth"), (3, 6, 6), {"seg": 3, "depth": 1}, dense=True)
POOLED = registry.Problem(("a", "b"), (3, 6, 6), {"a": 2, "b": 1})


def make(problem=DENSE, steps=1):
    torch.manual_seed(0)
    return RecurrentMultinet.from_problem(problem, width=5, steps=steps)


def test_zero_steps_is_shared_bottom(device):
    model = make(steps=0).to(device)
    baseline = SharedBottom(DENSE.tasks, model.image_encoder, model.decoders).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    for t, y in model(x).items():
        torch.testing.assert_close(y, baseline(x)[t])
    assert sum(p.numel() for p in model.task_specific_parameters("seg")) == 5 * 3 + 3


def test_one_step_by_hand(device):
    model = make(POOLED).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    h0 = model.image_encoder(x)
    first = {t: model.decoders[t](h0) for t in POOLED.tasks}
    codes = [model.task_encoders[t].map(first[t])[:, :, None, None].expand_as(h0) for t in POOLED.tasks]
    h1 = torch.relu(model.integrator[0](torch.cat([h0, *codes], dim=1)))
    steps = model.forward_steps(x)
    for t in POOLED.tasks:
        torch.testing.assert_close(steps[0][t], first[t])
        torch.testing.assert_close(steps[1][t], model.decoders[t](h1))
        torch.testing.assert_close(model(x)[t], steps[1][t])


def test_every_step_integrates_the_image_code_not_the_last_state(device):
    """h^{t+1} = integrator(h^0, phi(x^t)): the image code h^0 enters at every step, same weights."""
    model = make(steps=2).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    h0 = model.image_encoder(x)
    h, estimates = h0, None
    for _ in range(3):
        estimates = {t: model.decoders[t](h) for t in DENSE.tasks}
        codes = [model.task_encoders[t].map(estimates[t]) for t in DENSE.tasks]
        h = torch.relu(model.integrator[0](torch.cat([h0, *codes], dim=1)))
    for t in DENSE.tasks:
        torch.testing.assert_close(model(x)[t], estimates[t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("problem", (DENSE, POOLED), ids=("dense", "pooled"))
def test_each_final_answer_depends_on_the_other_tasks_earlier_answer(device, params_with_grad, problem):
    """Both kinds of task encoder pass the gradient back into the other task's estimate."""
    first, other = problem.tasks
    model = make(problem).to(device)
    out = model(torch.randn(2, 3, 6, 6, device=device))
    got = params_with_grad(model, out[first].square().sum())
    assert any(n.startswith(f"decoders.{other}") for n in got)  # other's estimate is fed back into first
    assert any(n.startswith(f"task_encoders.{other}") for n in got)
    assert all(list(model.task_specific_parameters(t)) == [] for t in problem.tasks)


def test_feedback_changes_the_answer_and_is_the_only_change(device):
    model = make().to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    before = model(x)["seg"]
    with torch.no_grad():
        model.task_encoders["depth"].map.weight.mul_(3.0)
    after = model(x)["seg"]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(model.forward_steps(x)[0]["seg"], model.decoders["seg"](model.image_encoder(x)))


def test_parameter_count_does_not_grow_with_steps(n_params):
    c, K = 5, 2
    plain = make(steps=0)
    shared_bottom = n_params(plain.image_encoder) + n_params(plain.decoders)
    extra = (3 * c + c) + (1 * c + c) + ((1 + K) * c * c + c)  # phi_seg, phi_depth, integrator
    for steps in (1, 3):
        assert n_params(make(steps=steps)) == shared_bottom + extra


def test_registry_shapes_training_and_vector_rejection(device, registry_output_shapes, short_training):
    registry_output_shapes("recurrent_multinet", device)
    for dense in (True, False):
        first, last = short_training("recurrent_multinet", dense, device, steps=15)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError):
        registry.build("recurrent_multinet", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_the_harness_supervises_every_step():
    """One harness step minimises the task losses of the estimates of every unrolled step."""
    model = make(steps=2)
    x = torch.randn(2, 3, 6, 6)
    targets = {"seg": torch.randn(2, 3, 6, 6), "depth": torch.randn(2, 1, 6, 6)}
    specs = mse_specs(DENSE.tasks)
    final, intermediate = model.forward_with_intermediate(x)
    history = model.forward_steps(x)
    assert list(intermediate) == ["step_0", "step_1"]
    for got, expected in zip([*intermediate.values(), final], history, strict=True):
        for t in DENSE.tasks:
            torch.testing.assert_close(got[t], expected[t])
    by_hand = sum(specs[t].loss(step[t], targets[t]) for step in history for t in DENSE.tasks)
    model.zero_grad(set_to_none=True)
    by_hand.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    log = harness_step(model, x, targets, lr=0.0)
    assert log.auxiliary > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n])
    assert make(steps=0).forward_with_intermediate(x)[1] == {}


def test_one_recurrent_step_by_default():
    """Docstring: one step by default (the paper runs two), so there are two estimates, step 0 and step 1."""
    torch.manual_seed(0)
    model = registry.build("recurrent_multinet", DENSE, width=5)
    assert model.steps == 1
    assert len(model.forward_steps(torch.randn(1, 3, 6, 6))) == 2
