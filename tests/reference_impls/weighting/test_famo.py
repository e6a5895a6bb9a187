import math

import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.famo import FAMO


def test_weights_match_the_paper_formula():
    famo = FAMO(num_tasks=2, eps=0.0)
    famo.logits.copy_(torch.tensor([math.log(3.0), 0.0]))  # z = (0.75, 0.25)
    weights = famo.weights(torch.tensor([1.0, 4.0]))
    # z/ℓ = (0.75, 0.0625);  c = 1/0.8125;  w = (0.75, 0.0625) / 0.8125
    assert torch.allclose(weights, torch.tensor([0.75, 0.0625]) / 0.8125)


def test_logit_update_matches_hand_computation():
    famo = FAMO(num_tasks=2, lr=0.5, gamma=0.1, eps=0.0)
    famo.weights(torch.tensor([1.0, 4.0]))
    famo.update(torch.tensor([math.exp(-1.0), 4.0]))
    # log-loss decrease δℓ = (1, 0); z = (0.5, 0.5)
    # Jᵀ δℓ = z ⊙ (δℓ - zᵀδℓ) = (0.5 * 0.5, 0.5 * -0.5) = (0.25, -0.25); ξ = 0 so no decay
    # ξ ← 0 - 0.5 * (0.25, -0.25) = (-0.125, 0.125): the task that improved gets less weight
    assert torch.allclose(famo.logits, torch.tensor([-0.125, 0.125]), atol=1e-6)
    famo.weights(torch.tensor([1.0, 1.0]))
    famo.update(torch.tensor([1.0, 1.0]))  # no change: only the decay γξ acts
    assert torch.allclose(famo.logits, torch.tensor([-0.125, 0.125]) * (1 - 0.5 * 0.1), atol=1e-6)


def test_update_compares_with_the_losses_as_they_were_when_weighted():
    """A caller may reuse its loss tensor in place between the step and the update (FAMO needs the
    losses before and after the step): the update must see the old values, not the overwritten ones."""
    famo, reference = (FAMO(num_tasks=2, lr=0.5, gamma=0.1, eps=0.0) for _ in range(2))
    losses = torch.tensor([1.0, 4.0])
    famo.weights(losses)
    reference.weights(torch.tensor([1.0, 4.0]))
    losses.copy_(torch.tensor([math.exp(-1.0), 4.0]))
    famo.update(losses)
    reference.update(torch.tensor([math.exp(-1.0), 4.0]))
    assert torch.equal(famo.logits, reference.logits) and not torch.equal(famo.logits, torch.zeros(2))


def test_loss_lower_bounds_shift_the_losses():
    famo = FAMO(num_tasks=2, lr=0.5, gamma=0.1, loss_lower_bounds=torch.tensor([-21.0, -21.0]), eps=0.0)
    weights = famo.weights(torch.tensor([-20.0, -17.0]))  # shifted ℓ = (1, 4)
    assert torch.allclose(weights, torch.tensor([0.8, 0.2]))
    # The logit step reads the shifted losses too: ℓ' = (e⁻¹, 4) is the hand computation above.
    famo.update(torch.tensor([math.exp(-1.0) - 21.0, -17.0]))
    assert torch.allclose(famo.logits, torch.tensor([-0.125, 0.125]), atol=1e-6)


def test_permutation_single_task_and_zero_losses():
    losses = torch.tensor([1.0, 2.0, 5.0])
    order = torch.tensor([1, 2, 0])
    assert torch.allclose(FAMO(3).weights(losses[order]), FAMO(3).weights(losses)[order])
    assert torch.allclose(FAMO(1).weights(torch.tensor([3.0])), torch.ones(1))
    famo = FAMO(2)
    assert torch.all(torch.isfinite(famo.weights(torch.zeros(2))))
    famo.update(torch.zeros(2))
    assert torch.all(torch.isfinite(famo.logits))


def test_training_reduces_total_loss():
    problem = make_problem(0)
    famo = FAMO(num_tasks=2)
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=0.05)  # Adam, as in the paper
    initial = problem.losses().sum().item()
    for _ in range(300):
        optimizer.zero_grad()
        famo.combine(problem.losses()).backward()
        optimizer.step()
        with torch.no_grad():
            famo.update(problem.losses())
    assert problem.losses().sum().item() < 0.2 * initial


def test_adam_option_equals_torch_adam_with_weight_decay():
    # The official code's logit step: torch.optim.Adam(lr=β, weight_decay=γ) on ξ, fed δ.
    famo = FAMO(num_tasks=3, lr=0.05, gamma=0.01, logit_optimizer="adam")
    reference = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=0.05, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(3, generator=generator) + 1
    for _ in range(25):
        famo.weights(losses)
        new_losses = losses * torch.exp(-0.1 * torch.rand(3, generator=generator))
        decrease = torch.log(losses + famo.eps) - torch.log(new_losses + famo.eps)
        z = torch.softmax(reference.detach(), dim=0)
        reference.grad = z * (decrease - (z * decrease).sum())
        adam.step()
        famo.update(new_losses)
        losses = new_losses
        assert torch.allclose(famo.logits, reference.detach(), atol=1e-6)


def test_adam_moves_logits_where_plain_steps_barely_do():
    # Slowly moving losses give a tiny δ: the plain step hardly changes ξ, Adam steps ~β.
    plain, adam = FAMO(num_tasks=2, gamma=0.0), FAMO(num_tasks=2, gamma=0.0, logit_optimizer="adam")
    losses = torch.tensor([1.0, 1.0])
    for famo in (plain, adam):
        famo.weights(losses)
        famo.update(losses * torch.tensor([0.999, 1.0]))  # task 0 improved by 0.1 %
    assert float(plain.logits[1] - plain.logits[0]) < 1e-4
    assert float(adam.logits[1] - adam.logits[0]) > 0.9 * 2 * adam.lr  # both move by ~β


def test_unknown_logit_optimizer_is_refused():
    import pytest

    with pytest.raises(ValueError, match="logit_optimizer"):
        FAMO(num_tasks=2, logit_optimizer="rmsprop")


def test_adam_state_survives_a_state_dict_round_trip():
    famo = FAMO(num_tasks=2, logit_optimizer="adam")
    losses = torch.tensor([1.0, 2.0])
    for scale in (0.9, 0.95, 0.99):
        famo.weights(losses)
        famo.update(losses * torch.tensor([scale, 1.0]))
    restored = FAMO(num_tasks=2, logit_optimizer="adam")
    restored.load_state_dict(famo.state_dict())
    for method in (famo, restored):  # the next step needs the moments and the step count
        method.weights(losses)
        method.update(losses * torch.tensor([1.0, 0.9]))
    assert int(restored.adam_steps) == 4
    assert torch.equal(restored.logits, famo.logits)


def _step(famo: FAMO, before: list[float], after: list[float]) -> None:
    famo.weights(torch.tensor(before))
    famo.update(torch.tensor(after))


def test_defaults_are_the_official_codes():
    # β = 0.025: the hand computation above (Jᵀδℓ = (0.25, -0.25)) times -β.
    famo = FAMO(num_tasks=2)
    _step(famo, [1.0, 4.0], [math.exp(-1.0), 4.0])
    assert torch.allclose(famo.logits, torch.tensor([-0.00625, 0.00625]), atol=1e-7, rtol=0)
    # γ = 0.01: unchanged losses leave only the decay, ξ ← ξ (1 − βγ).
    famo.logits.copy_(torch.tensor([-1.0, 1.0]))
    _step(famo, [1.0, 4.0], [1.0, 4.0])
    assert torch.allclose(famo.logits, torch.tensor([-1.0, 1.0]) * (1 - 0.025 * 0.01), atol=1e-7, rtol=0)
    # eps = 1e-8: losses (0, 1e-8) are shifted to (1e-8, 2e-8), so w = (2/3, 1/3).
    weights = FAMO(num_tasks=2).weights(torch.tensor([0.0, 1e-8], dtype=torch.float64))
    assert torch.allclose(weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), atol=1e-6)


def test_weights_are_detached_and_combine_weights_each_loss():
    famo = FAMO(num_tasks=2, eps=0.0)
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    assert not famo.weights(losses).requires_grad
    famo.combine(losses).backward()  # d/dL_k Σ w_k L_k = w_k, with w = (0.8, 0.2)
    assert torch.allclose(losses.grad, torch.tensor([0.8, 0.2]))


def test_logits_are_a_buffer_not_a_parameter():
    famo = FAMO(num_tasks=2)
    _step(famo, [1.0, 2.0], [0.5, 2.0])
    assert list(famo.parameters()) == [] and "logits" in dict(famo.named_buffers())


def test_update_before_weights_is_refused():
    import pytest

    with pytest.raises(RuntimeError, match="before update"):
        FAMO(num_tasks=2).update(torch.tensor([1.0, 2.0]))


def test_adam_epsilon_bounds_the_step_for_a_tiny_logit_gradient():
    # Adam's first step is g / (|g| + 1e-8): with |g| = 1e-8 that is ±½, not a division by ~0.
    # ℓ = (1, 1) -> ℓ' = (1, e^(−4e-8)): log-decrease d = (0, 4e-8), z = (½, ½), so the logit
    # gradient is z ⊙ (d − z·d) = (−1e-8, 1e-8) (γ ξ = 0 at ξ = 0).
    famo = FAMO(num_tasks=2, eps=0.0, logit_optimizer="adam")
    famo.weights(torch.ones(2, dtype=torch.float64))
    famo.update(torch.tensor([1.0, math.exp(-4e-8)], dtype=torch.float64))
    assert torch.allclose(famo.logits, torch.tensor([0.5 * famo.lr, -0.5 * famo.lr]), rtol=1e-5, atol=0)


def test_buffers_keep_their_dtype_when_the_losses_are_float64():
    """The logits and Adam moments stay in the module's dtype (float32 here), so a checkpoint
    has the same layout whatever precision the losses came in."""
    famo = FAMO(num_tasks=2, logit_optimizer="adam")
    famo.weights(torch.tensor([1.0, 2.0], dtype=torch.float64))
    famo.update(torch.tensor([0.5, 1.9], dtype=torch.float64))
    assert famo.logits.dtype == famo.adam_moments.dtype == torch.float32
