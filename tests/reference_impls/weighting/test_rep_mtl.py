import math

import pytest
import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.rep_mtl import RepMTL, saliency_alignment, saliency_entropy, task_saliencies


def test_saliencies_are_gradients_with_respect_to_the_representation():
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    losses = torch.stack([(z ** 2).sum(), (3 * z).sum()])
    s = task_saliencies(losses, z)
    assert s.shape == (2, 3, 4, 4)
    torch.testing.assert_close(s[0], (2 * z).flatten(2))
    torch.testing.assert_close(s[1], torch.full((3, 4, 4), 3.0, dtype=torch.float64))


def test_entropy_matches_hand_computation():
    # T = 2, B = 1, C = 2, one position: channel means 1 and 3 -> P = (1/4, 3/4)
    s = torch.tensor([[[[0.0], [2.0]]], [[[2.0], [4.0]]]], dtype=torch.float64)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(saliency_entropy(s), torch.tensor(expected, dtype=torch.float64))
    one_task = torch.stack([s[0], torch.zeros_like(s[0])])  # a position salient for one task only
    assert saliency_entropy(one_task).item() == pytest.approx(0.0, abs=1e-9)
    equal = torch.stack([s[1], s[1]])
    assert saliency_entropy(equal).item() == pytest.approx(math.log(2))  # maximal for T = 2


def saliency_of(channels_per_task: list[list[list[list[float]]]]) -> torch.Tensor:
    """T x B x C x H'W' saliency from nested lists [task][sample][channel][position]."""
    return torch.tensor(channels_per_task, dtype=torch.float64)


def test_entropy_takes_the_absolute_value_after_the_channel_mean():
    # task 0: channels +1 and -3 average to -1, |Ŝ| = 1 (|S| averaged would give 2); task 1: 3
    s = saliency_of([[[[1.0], [-3.0]]], [[[3.0], [3.0]]]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert saliency_entropy(s).item() == pytest.approx(expected, rel=1e-12)


def test_entropy_is_the_mean_over_samples_and_positions():
    # B = 2, two positions each: every cell is either equal (entropy ln 2) or one-task (entropy 0)
    s = saliency_of([[[[1.0, 1.0]], [[0.0, 2.0]]], [[[1.0, 0.0]], [[2.0, 2.0]]]])
    # cells: (b0, p0) equal, (b0, p1) task 0 only, (b1, p0) task 1 only, (b1, p1) equal
    assert saliency_entropy(s).item() == pytest.approx(math.log(2) / 2, rel=1e-9)


def test_a_batch_of_one_has_no_alignment_term():
    """Eq. 9's denominator runs over the other samples: with B = 1 there are none and the term is 0."""
    s = torch.randn(2, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert saliency_alignment(s).item() == 0.0
    z = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    losses = torch.stack([(z ** 2).sum(), (z ** 3).sum()])
    expected = losses.sum() + 0.1 * saliency_entropy(task_saliencies(losses, z))
    torch.testing.assert_close(RepMTL(tsr_weight=0.1, csa_weight=1.0).combine(losses, representation=z), expected)


@pytest.mark.parametrize("batch", [2, 3])  # B = 2: the smallest batch with a negative
def test_alignment_matches_an_independent_loop(batch):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, batch, 4, 5, generator=g, dtype=torch.float64)  # T, B, C, H'W'
    tau, total = 0.7, 0.0
    anchors = [torch.stack([s[t, b].mean(-1) for t in range(2)], dim=1) for b in range(batch)]
    z_a = [(a @ a.T).flatten() / (a @ a.T).norm() for a in anchors]
    for b in range(batch):
        negatives = sum(math.exp(float(z_a[b] @ z_a[k]) / tau) for k in range(batch) if k != b)
        for t in range(2):
            m = s[t, b] @ s[t, b].T
            positive = float(z_a[b] @ (m.flatten() / m.norm())) / tau
            total += -(positive - math.log(negatives))
    assert saliency_alignment(s, tau).item() == pytest.approx(total / (2 * batch), rel=1e-10)


def test_a_sequence_representation_is_one_with_a_single_spatial_axis():
    """Z of shape B x C x L (one spatial axis) has L positions, exactly as B x C x L x 1 does."""
    z = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def penalty(representation):
        losses = torch.stack([(representation ** 2).sum(), (representation.sin() * representation).sum()])
        return RepMTL().combine(losses, representation=representation)

    torch.testing.assert_close(penalty(z), penalty(z[..., None]), rtol=1e-12, atol=1e-12)


def test_weights_are_equal_and_combine_adds_both_penalties():
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64)
    losses = ((z @ w.T) ** 2).mean(0)
    plain = RepMTL(tsr_weight=0.0, csa_weight=0.0)
    assert torch.equal(plain.weights(losses), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(plain.combine(losses, representation=z), losses.sum())
    s = task_saliencies(losses, z)
    expected = losses.sum() + 0.3 * saliency_entropy(s) + 0.2 * saliency_alignment(s, 0.7)
    torch.testing.assert_close(RepMTL(0.3, 0.2, 0.7).combine(losses, representation=z), expected)
    with pytest.raises(ValueError, match="representation"):
        RepMTL().combine(losses)


def test_penalties_train_the_encoder_and_zero_saliency_is_finite():
    z = torch.zeros(3, 2, 2, 2, requires_grad=True)
    s = task_saliencies(torch.stack([z.sum() * 0, z.sum() * 0]), z)
    assert torch.isfinite(saliency_entropy(s)) and torch.isfinite(saliency_alignment(s))
    problem = make_problem(seed=0)
    features = problem.model(problem.inputs)
    losses = torch.stack([((p - y) ** 2).mean() for p, y in zip(problem.model.predict(features), problem.targets.T)])
    for tsr, csa in ((1.0, 0.0), (0.0, 1.0)):  # each penalty alone reaches the encoder (double backprop)
        penalty = RepMTL(tsr, csa).combine(losses, representation=features) - losses.sum()
        (grad,) = torch.autograd.grad(penalty, problem.model.shared.weight, retain_graph=True)
        assert grad.abs().sum() > 0


def test_training_reduces_total_loss():
    problem = make_problem(seed=0)
    method = RepMTL()
    optimizer = torch.optim.SGD(problem.model.parameters(), lr=0.02)

    def losses_and_features():
        features = problem.model(problem.inputs)
        preds = problem.model.predict(features)
        return torch.stack([((p - y) ** 2).mean() for p, y in zip(preds, problem.targets.T)]), features

    initial = float(losses_and_features()[0].detach().sum())
    for _ in range(80):
        losses, features = losses_and_features()
        optimizer.zero_grad()
        method.combine(losses, representation=features).backward()
        optimizer.step()
    assert float(losses_and_features()[0].detach().sum()) < 0.2 * initial


def test_a_temperature_that_is_not_positive_is_refused():
    for temperature in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            RepMTL(temperature=temperature)
