"""MTA: a shared-encoder generator whose bounded perturbations fool every target task."""

import math

import pytest
import torch
from torch import nn

from reference_impls.adversarial.multitask_attack import MultiTaskAttack, project_to_ball

from ..conftest import DEVICES
INF = float("inf")


def _targets(d: int, classes: int, device, seed: int = 0) -> dict[str, nn.Linear]:
    """Two fixed linear classifiers on d-dim inputs, frozen like real attack targets."""
    g = torch.Generator().manual_seed(seed)
    models = {}
    for t in ("a", "b"):
        m = nn.Linear(d, classes)
        with torch.no_grad():
            m.weight.copy_(torch.randn(classes, d, generator=g))
            m.bias.zero_()
        models[t] = m.requires_grad_(False).to(device)
    return models


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def test_projection_by_hand():
    r = torch.tensor([[3.0, -4.0], [0.1, 0.2], [0.0, 0.0]])
    l2 = project_to_ball(r, 1.0, p=2)
    torch.testing.assert_close(l2, torch.tensor([[0.6, -0.8], [0.1, 0.2], [0.0, 0.0]]))
    linf = project_to_ball(r, 0.5, p=INF)
    torch.testing.assert_close(linf, torch.tensor([[0.375, -0.5], [0.1, 0.2], [0.0, 0.0]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [INF, 2.0])
@pytest.mark.parametrize("shape", [(10,), (3, 8, 8)])
def test_every_perturbation_respects_the_norm_bound_and_reaches_it(device, p, shape):
    torch.manual_seed(0)
    eps = 0.05
    attack = MultiTaskAttack(("seg", "depth"), shape, epsilon=eps, p=p, width=8).to(device)
    with torch.no_grad():  # huge decoder outputs: the bound must do all the work
        for dec in attack.decoders.values():
            for w in dec.parameters():
                w.mul_(1e3)
    x = torch.randn(6, *shape, device=device)
    deltas = attack(x)
    assert set(deltas) == {"seg", "depth"}
    for d in deltas.values():
        assert d.shape == x.shape
        norms = d.flatten(1).norm(p=p, dim=1)
        assert (norms <= eps * (1 + 1e-5)).all()
        torch.testing.assert_close(norms, torch.full_like(norms, eps))  # active: on the sphere


def test_zero_decoder_output_gives_zero_perturbation_and_finite_gradients():
    attack = MultiTaskAttack(("a", "b"), (5,), epsilon=0.1, p=2.0, width=4)
    with torch.no_grad():
        for dec in attack.decoders.values():
            dec.weight.zero_()
            dec.bias.zero_()
    x = torch.randn(3, 5)
    deltas = attack(x)
    assert all((d == 0).all() for d in deltas.values())
    logits = {t: torch.zeros(3, 4) for t in attack.tasks}
    labels = {t: torch.zeros(3, dtype=torch.long) for t in attack.tasks}
    sum(d.sum() for d in deltas.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in attack.parameters() if p.grad is not None)
    # Non-targeted loss at uniform logits over 4 classes: −log(1 − 1/4) per task.
    torch.testing.assert_close(attack.loss(logits, labels), torch.tensor(2 * -math.log(0.75)))


def test_loss_by_hand_targeted_and_not():
    attack = MultiTaskAttack(("a", "b"), (2,), epsilon=1.0, weights={"a": 1.0, "b": 3.0})
    logits = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 1.0, 0.0]])}
    labels = {"a": torch.tensor([0]), "b": torch.tensor([1])}
    pa = math.exp(2) / (math.exp(2) + 1)
    pb = math.e / (math.e + 2)
    expected = -math.log(1 - pa) + 3 * -math.log(1 - pb)
    assert attack.loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    assert attack.loss(logits, labels, targeted=True).item() == pytest.approx(
        -math.log(pa) - 3 * math.log(pb), rel=1e-5)


def test_a_label_the_target_is_certain_of_gives_a_finite_non_targeted_loss():
    """−log(1 − p) is infinite at p = 1 (a logit margin of 40 rounds p to 1): the loss is capped
    at −log(1e-6) instead, so one confident example cannot make the whole batch's loss inf."""
    attack = MultiTaskAttack(("a",), (2,), epsilon=1.0)
    loss = attack.loss({"a": torch.tensor([[40.0, 0.0]])}, {"a": torch.tensor([0])})
    assert loss.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


def test_the_universal_noise_input_is_uniform_on_minus_one_to_one():
    attack = MultiTaskAttack(("a",), (3, 8, 8), epsilon=0.1, universal=True,
                             generator=torch.Generator().manual_seed(0), width=4)
    assert attack.noise.min() >= -1 and attack.noise.max() < 1 and attack.noise.min() < -0.9
    assert abs(attack.noise.mean().item()) < 0.1  # 192 draws: centred on 0


def test_shared_encoder_serves_every_task_and_decoders_only_their_own():
    torch.manual_seed(0)
    attack = MultiTaskAttack(("a", "b", "c"), (6,), epsilon=1.0, p=2.0, width=8)
    attack.zero_grad()
    attack(torch.randn(4, 6))["b"].square().sum().backward()
    touched = {n for n, p in attack.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("encoder.") for n in touched)
    assert any(n.startswith("decoders.b.") for n in touched)
    assert not any(n.startswith(("decoders.a.", "decoders.c.")) for n in touched)
    specific = {id(p) for p in attack.task_specific_parameters("a")}
    assert specific == {id(p) for p in attack.decoders["a"].parameters()}


def test_one_generator_stores_less_than_one_per_task():
    """The point of sharing: E + K decoders instead of K copies of (E + decoder)."""
    d, w, k = 10, 16, 3
    multi = MultiTaskAttack(tuple("abc"), (d,), epsilon=1.0, width=w, depth=2)
    single = MultiTaskAttack(("a",), (d,), epsilon=1.0, width=w, depth=2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    encoder = (d * w + w) + (w * w + w)
    decoder = w * d + d
    assert count(single) == encoder + decoder
    assert count(multi) == encoder + k * decoder < k * count(single)


def test_universal_perturbation_is_the_same_for_every_input():
    g = torch.Generator().manual_seed(3)
    attack = MultiTaskAttack(("a", "b"), (3, 4, 4), epsilon=0.1, universal=True, generator=g, width=4)
    d1, d2 = attack(torch.randn(2, 3, 4, 4)), attack(torch.randn(5, 3, 4, 4) * 10)
    for t in attack.tasks:
        assert d1[t].shape == (2, 3, 4, 4) and d2[t].shape == (5, 3, 4, 4)
        torch.testing.assert_close(d1[t][0], d2[t][4])
    per_instance = MultiTaskAttack(("a", "b"), (3, 4, 4), epsilon=0.1, width=4)
    x = torch.randn(2, 3, 4, 4)
    assert not torch.allclose(per_instance(x)["a"][0], per_instance(x)["a"][1])


@pytest.mark.parametrize("device", DEVICES)
def test_training_the_generator_lowers_every_targets_accuracy(device):
    """Two frozen classifiers; a bounded random perturbation barely hurts, MTA's breaks both."""
    d, eps = 10, 0.6
    targets = _targets(d, 3, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, d, generator=g).to(device)
    labels = {t: m(x).argmax(1) for t, m in targets.items()}  # clean predictions, accuracy 1
    noise = project_to_ball(torch.randn(256, d, generator=g).sign().to(device), eps)
    random_acc = {t: _accuracy(m, x + noise, labels[t]) for t, m in targets.items()}

    torch.manual_seed(0)
    attack = MultiTaskAttack(("a", "b"), (d,), epsilon=eps, width=32).to(device)
    opt = torch.optim.Adam(attack.parameters(), lr=1e-2)
    for _ in range(150):
        adv = attack.perturb(x)
        loss = attack.loss({t: targets[t](adv[t]) for t in attack.tasks}, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for m in targets.values() for p in m.parameters())
    with torch.no_grad():
        adv = attack.perturb(x)
        for t, m in targets.items():
            assert random_acc[t] > 0.6, random_acc
            assert (adv[t] - x).abs().max() <= eps + 1e-5
            assert _accuracy(m, adv[t], labels[t]) < 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"epsilon": float("nan")}, "epsilon must be finite and above 0, got nan"),
    ({"epsilon": float("inf")}, "epsilon must be finite and above 0, got inf"),
    ({"epsilon": 0.0}, "epsilon must be finite and above 0, got 0.0"),
    ({"p": 0.5}, "p must be at least 1, got 0.5"),
    ({"p": 0.0}, "p must be at least 1, got 0.0"),
    ({"p": float("nan")}, "p must be at least 1, got nan"),
    ({"width": 0}, "width must be at least 1, got 0"),
    ({"width": -1}, "width must be at least 1, got -1"),
    ({"weights": {"a": -1.0, "b": 1.0}}, r"weights\[a\] must be at least 0, got -1.0"),
    ({"weights": {"a": float("nan"), "b": 1.0}}, r"weights\[a\] must be at least 0, got nan"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskAttack(["a", "b"], (6,), **{"epsilon": 0.1, **kwargs})


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan")])
def test_projection_needs_a_radius_above_zero(epsilon):
    with pytest.raises(ValueError, match=f"epsilon must be above 0, got {epsilon}"):
        project_to_ball(torch.randn(2, 3), epsilon)


def test_per_pixel_losses_take_the_softmax_over_classes_on_axis_one():
    """Logits 1 x 2 classes x 3 pixels, p(class 1) = 3/4 at every pixel: targeted −log ¾, non-targeted −log ¼."""
    attack = MultiTaskAttack(("seg",), (2,), epsilon=1.0)
    logits = torch.stack([torch.zeros(3), torch.full((3,), math.log(3.0))]).unsqueeze(0)
    labels = {"seg": torch.ones(1, 3, dtype=torch.long)}
    assert math.isclose(attack.loss({"seg": logits}, labels, targeted=True).item(), -math.log(0.75), rel_tol=1e-6)
    assert math.isclose(attack.loss({"seg": logits}, labels).item(), -math.log(0.25), rel_tol=1e-5)


@pytest.mark.parametrize("outputs, labels, message", [
    ({"a": torch.zeros(2, 3)}, {"a": torch.zeros(2, dtype=torch.long), "b": torch.zeros(2, dtype=torch.long)},
     r"^outputs lack task\(s\) \['b'\]"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, {"b": torch.zeros(2, dtype=torch.long)},
     r"^labels lack task\(s\) \['a'\]"),
])
def test_a_task_missing_from_the_outputs_or_labels_is_named(outputs, labels, message):
    """It was a bare KeyError from inside the loss."""
    with pytest.raises(ValueError, match=message):
        MultiTaskAttack(("a", "b"), (2,), epsilon=1.0).loss(outputs, labels)


def test_unlabelled_pixels_are_left_out_of_the_mean_and_a_task_with_none_adds_nothing():
    """Same logits as above (p(class 1) = 3/4 everywhere); one pixel labelled −1 changes no mean."""
    attack = MultiTaskAttack(("seg",), (2,), epsilon=1.0)
    logits = torch.stack([torch.zeros(3), torch.full((3,), math.log(3.0))]).unsqueeze(0).requires_grad_(True)
    labels = {"seg": torch.tensor([[1, -1, 0]])}
    expected = (-math.log(0.75) - math.log(0.25)) / 2  # targeted: pixel 0 wants class 1, pixel 2 class 0
    loss = attack.loss({"seg": logits}, labels, targeted=True)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    loss.backward()
    assert logits.grad[0, :, 1].abs().sum() == 0 and logits.grad[0, :, 0].abs().sum() > 0
    assert attack.loss({"seg": logits}, {"seg": torch.full((1, 3), -1)}).item() == 0.0


@pytest.mark.parametrize("tasks", [[], ["a", "a"], ["a", "b", "a"]])
def test_no_tasks_or_a_repeated_task_name_is_refused_with_the_names(tasks):
    with pytest.raises(ValueError, match=r"need at least one task and unique names, got \[.*\]") as refusal:
        MultiTaskAttack(tasks, (6,), epsilon=0.1)
    assert str(list(tasks)) in str(refusal.value)


def test_each_task_target_sees_the_clean_input_plus_its_own_bounded_perturbation():
    torch.manual_seed(0)
    attack = MultiTaskAttack(("a", "b"), (6,), epsilon=0.3, width=8)
    x = torch.randn(4, 6)
    deltas, adversarial = attack(x), attack.perturb(x)
    for t in attack.tasks:
        torch.testing.assert_close(adversarial[t] - x, deltas[t])
        assert deltas[t].abs().amax() > 0 and (adversarial[t] - x).abs().amax() <= 0.3 + 1e-6


def test_a_universal_attack_is_reproducible_from_its_generator_seed():
    """The fixed noise input comes from the given generator, not the global random state."""
    def build(seed: int, global_seed: int) -> MultiTaskAttack:
        torch.manual_seed(global_seed)  # a different global state for each build
        return MultiTaskAttack(("a",), (3, 4, 4), epsilon=0.1, universal=True, width=4,
                               generator=torch.Generator().manual_seed(seed))
    first, again, other = build(5, 100), build(5, 101), build(6, 100)
    torch.testing.assert_close(first.noise, again.noise, rtol=0, atol=0)
    assert not torch.equal(first.noise, other.noise)
