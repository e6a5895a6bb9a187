import torch

from reference_impls.toy.regression import train_with_weighting
from reference_impls.weighting.imtl_l import IMTLL


def test_objective_matches_hand_computation():
    imtl = IMTLL(num_tasks=2)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.0, -1.0]))
    losses = torch.tensor([2.0, 3.0])
    # e^0 * 2 - 0 + e^-1 * 3 + 1
    expected = 2.0 + 3.0 * torch.exp(torch.tensor(-1.0)) + 1.0
    assert torch.isclose(imtl.combine(losses), expected)


def test_starts_as_equal_weighting_and_weights_are_detached():
    """s = 0 at the start (weights 1); ``weights`` is a read-out, the s_k learn through ``combine``."""
    imtl = IMTLL(num_tasks=3)
    weights = imtl.weights(torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64))
    assert torch.equal(weights, torch.ones(3, dtype=torch.float64)) and not weights.requires_grad
    (grad,) = torch.autograd.grad(imtl.combine(torch.tensor([0.5, 2.0, 9.0])), imtl.log_scales)
    assert torch.allclose(grad, torch.tensor([0.5, 2.0, 9.0]) - 1)  # ∂/∂s (e^s L − s) = e^s L − 1


def test_optimal_scale_makes_scaled_losses_equal_to_one():
    imtl = IMTLL(num_tasks=3)
    losses = torch.tensor([0.1, 1.0, 50.0])
    optimizer = torch.optim.SGD(imtl.parameters(), lr=0.01)
    for _ in range(3000):
        optimizer.zero_grad()
        imtl.combine(losses).backward()
        optimizer.step()
    # ∂/∂s (e^s L - s) = 0  ⇔  e^s L = 1
    assert torch.allclose(imtl.weights(losses) * losses, torch.ones(3), atol=1e-3)


def test_scale_invariance_at_the_optimum():
    # at e^s = 1/L the parameter gradient is ∇L / L: multiplying L by c changes nothing
    prediction = torch.tensor([0.3], requires_grad=True)
    grads = []
    for c in (1.0, 100.0):
        loss = c * ((prediction - 1.0) ** 2).sum()
        imtl = IMTLL(num_tasks=1)
        with torch.no_grad():
            imtl.log_scales.fill_(-torch.log(loss.detach()))
        (grad,) = torch.autograd.grad(imtl.combine(loss[None]), prediction)
        grads.append(grad)
    assert torch.allclose(grads[0], grads[1])


def test_permutation_and_zero_losses():
    imtl = IMTLL(num_tasks=2)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.5, -0.5]))
    swapped = IMTLL(num_tasks=2)
    with torch.no_grad():
        swapped.log_scales.copy_(torch.tensor([-0.5, 0.5]))
    losses = torch.tensor([1.0, 2.0])
    assert torch.allclose(swapped.weights(losses.flip(0)), imtl.weights(losses).flip(0))
    assert torch.isfinite(imtl.combine(torch.zeros(2)))


def test_training_reduces_total_loss():
    # Adam, not SGD at lr 0.05: there this toy run is chaotic (seed 0 ends at 0.05 of the initial
    # loss in float32 and 0.37 in float64, and CPUs differ); with Adam seeds 0-5 all end below 0.03
    # in both precisions: train_with_weighting(IMTLL(num_tasks=2), lr=0.01, steps=300, adam=True, seed=s).
    initial, final = train_with_weighting(IMTLL(num_tasks=2), lr=0.01, steps=300, adam=True)
    assert final < 0.2 * initial
