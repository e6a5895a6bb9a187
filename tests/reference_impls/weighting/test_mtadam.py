import torch

from reference_impls.toy.regression import make_problem, task_gradients
from reference_impls.weighting.mtadam import MTAdam


def test_first_step_matches_hand_computation():
    grads = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    method = MTAdam(betas=(0.9, 0.999, 0.9), eps=0.0)
    update = method(grads).update
    # balanced: task 2 rescaled to the anchor's norm 5 -> (0, 5)
    # m̂_k = g̃_k, sqrt(v̂_k) = |g̃_k|; denominators: max(|3|,|0|)=3, max(|4|,|5|)=5
    # update = ((3 + 0) / 3, (4 + 5) / 5) = (1, 1.8)
    assert torch.allclose(update, torch.tensor([1.0, 1.8]))


def test_second_step_uses_running_norms_and_the_default_betas():
    """Step 2 by hand: norms averaged with β3 = 0.9, moments with β1 = 0.9, β2 = 0.999."""
    first, second = torch.tensor([[3.0, 4.0], [0.0, 10.0]]), torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    method = MTAdam(eps=0.0)
    method(first)
    update = method(second).update
    norms = 0.9 * torch.tensor([5.0, 10.0]) + 0.1 * torch.tensor([10.0, 2.0])  # running ||g_k||
    balanced = [torch.tensor([[3.0, 4.0], [0.0, 5.0]]), second * torch.tensor([[1.0], [norms[0] / norms[1]]])]
    m = 0.9 * 0.1 * balanced[0] + 0.1 * balanced[1]
    v = 0.999 * 0.001 * balanced[0] ** 2 + 0.001 * balanced[1] ** 2
    expected = (m / (1 - 0.9**2)).sum(0) / (v / (1 - 0.999**2)).sqrt().max(0).values
    assert torch.allclose(update, expected)


def test_loss_scale_does_not_change_the_step():
    generator = torch.Generator().manual_seed(1)
    sequence = [torch.randn(2, 5, generator=generator) for _ in range(5)]
    plain, scaled = MTAdam(layer_sizes=[2, 3]), MTAdam(layer_sizes=[2, 3])
    for grads in sequence:
        a = plain(grads).update
        b = scaled(grads * torch.tensor([[1.0], [1000.0]])).update
    assert torch.allclose(a, b, atol=1e-5)


def test_layers_are_balanced_separately_and_ranks_apply():
    grads = torch.tensor([[1.0, 0.0, 2.0], [0.0, 4.0, 0.0]])
    method = MTAdam(layer_sizes=[1, 2], ranks=[1.0, 0.5])
    method.step = 1
    balanced = method._balance(grads)
    # layer 1: task 2 has norm 0 there -> unscaled. layer 2: anchor norm 2, task 2 norm 4 -> x 0.5 x rank 0.5
    assert torch.allclose(balanced, torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]))


def test_permutation_invariance_of_the_update_when_norms_are_equal():
    grads = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(MTAdam()(grads).update, MTAdam()(grads.flip(0)).update)
    assert torch.all(torch.isfinite(MTAdam()(torch.zeros(2, 3)).update))
    assert torch.allclose(MTAdam(eps=0.0)(torch.tensor([[2.0, -4.0]])).update, torch.tensor([1.0, -1.0]))


def test_training_reduces_total_loss():
    problem = make_problem(0)
    parameters = list(problem.model.parameters())
    method = MTAdam(layer_sizes=[p.numel() for p in parameters])
    initial = problem.losses().sum().item()
    for _ in range(200):
        update = method(task_gradients(problem.losses(), parameters)).update
        with torch.no_grad():  # plain SGD step with the MTAdam direction
            offset = 0
            for p in parameters:
                p -= 0.02 * update[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
    assert problem.losses().sum().item() < 0.2 * initial


def balanced_first_step(grads: torch.Tensor) -> torch.Tensor:
    method = MTAdam()
    method.step = 1  # first step: the running norms are the current norms
    return method._balance(grads)


def test_the_anchor_is_the_first_loss_above_1e_10_and_tinier_losses_stay_unscaled():
    grads = torch.tensor([[1e-11, 0.0], [3.0, 4.0], [0.0, 1e-9], [0.0, 5e-11]], dtype=torch.float64)
    # loss 1 (norm 1e-11) is below 1e-10: unscaled, not the anchor; loss 2 (norm 5) anchors;
    # loss 3 (norm 1e-9, above the threshold) is rescaled to norm 5; loss 4 (5e-11) is kept as it is
    expected = torch.tensor([[1e-11, 0.0], [3.0, 4.0], [0.0, 5.0], [0.0, 5e-11]], dtype=torch.float64)
    torch.testing.assert_close(balanced_first_step(grads), expected, rtol=1e-12, atol=0.0)


def test_epsilon_is_added_outside_the_square_root_and_defaults_to_1e_8():
    # one loss, first step: m̂ = g, sqrt(v̂) = |g|, so the update is g / (|g| + ε)
    grads = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(MTAdam(eps=1.0)(grads).update, torch.tensor([3 / 4, -4 / 5], dtype=torch.float64))
    tiny = torch.tensor([[1e-8]], dtype=torch.float64)  # |g| = ε: half a unit step
    torch.testing.assert_close(MTAdam()(tiny).update, torch.tensor([0.5], dtype=torch.float64))
