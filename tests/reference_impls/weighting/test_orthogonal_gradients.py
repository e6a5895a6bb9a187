import torch
from torch import nn

from reference_impls.weighting.orthogonal_gradients import OrthogonalGradients, cosine_matrix, penalty


def linear_losses(weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_k = ½||W a_k − b_k||² with fixed inputs a_k: gradients W a_k a_kᵀ − b_k a_kᵀ by hand."""
    inputs = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    return torch.stack([0.5 * (weight @ a - b).pow(2).sum() for a, b in zip(inputs, targets)])


def hand_losses() -> tuple[torch.Tensor, torch.Tensor]:
    """L_1 = θ·(1, 0), L_2 = θ·(1, 1), L_3 = θ·(0, −2) at θ = 0: cosines 1/√2, 0, −1/√2, penalty 1."""
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    losses = torch.stack([theta @ torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0], [1.0, 1.0], [0.0, -2.0])])
    return theta, losses


def test_penalty_matches_a_hand_computation():
    theta, losses = hand_losses()
    assert torch.isclose(penalty(losses, [theta]), torch.tensor(0.5 + 0.0 + 0.5, dtype=torch.float64))
    assert torch.isclose(penalty(losses[:2], [theta]), torch.tensor(0.5, dtype=torch.float64))


def test_gradient_of_the_penalty_matches_finite_differences():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(2, 2, generator=generator, dtype=torch.float64)
    targets = torch.randn(3, 2, generator=generator, dtype=torch.float64)

    def value_at(weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach().requires_grad_()
        return weight, penalty(linear_losses(weight, targets), [weight])

    weight, value = value_at(start)
    (analytic,) = torch.autograd.grad(value, weight)  # through the gradients: double backprop
    numeric = torch.zeros(4, dtype=torch.float64)
    for index in range(4):
        shift = 1e-6 * torch.eye(4, dtype=torch.float64)[index].reshape(2, 2)
        numeric[index] = (value_at(start + shift)[1] - value_at(start - shift)[1]).detach() / 2e-6
    assert analytic.abs().max() > 1e-3
    assert torch.allclose(analytic.reshape(-1), numeric, rtol=1e-6, atol=1e-8)


def two_task_network(seed: int):
    torch.manual_seed(seed)
    shared = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=generator)
    direction = torch.randn(4, generator=generator)
    y = torch.stack([x @ direction, x @ direction + 0.3 * x[:, 0]], dim=1)  # two closely related targets

    def losses() -> torch.Tensor:
        z = shared(x)
        return torch.stack([(heads[k](z).squeeze(1) - y[:, k]).pow(2).mean() for k in range(2)])
    return shared, heads, losses


def test_minimising_the_penalty_makes_the_gradients_more_orthogonal():
    shared, heads, losses = two_task_network(seed=1)
    params = list(shared.parameters())
    before = float(penalty(losses(), params).detach())
    optimizer = torch.optim.Adam(list(shared.parameters()) + list(heads.parameters()), lr=0.01)
    for _ in range(40):
        optimizer.zero_grad()
        penalty(losses(), params).backward()
        optimizer.step()
    after = float(penalty(losses(), params).detach())
    assert before > 0.1 and after < 0.1 * before


def test_objective_trains_both_tasks_and_lowers_the_penalty_against_plain_sum():
    results = {}
    for weight in (0.0, 1.0):
        shared, heads, losses = two_task_network(seed=2)
        method = OrthogonalGradients(weight)
        optimizer = torch.optim.SGD(list(shared.parameters()) + list(heads.parameters()), lr=0.05)
        initial = float(losses().sum().detach())
        for _ in range(150):
            optimizer.zero_grad()
            method.objective(losses(), list(shared.parameters())).backward()
            optimizer.step()
        results[weight] = (initial, float(losses().sum().detach()), float(penalty(losses(), list(shared.parameters())).detach()))
    assert results[1.0][1] < 0.5 * results[1.0][0]  # still learns the tasks
    assert results[1.0][2] < results[0.0][2]  # but with more orthogonal task gradients


def test_objective_is_the_loss_sum_plus_weighted_penalty():
    shared, _, losses = two_task_network(seed=3)
    params = list(shared.parameters())
    value = OrthogonalGradients(0.3).objective(losses(), params)
    assert torch.isclose(value, losses().sum() + 0.3 * penalty(losses(), params))
    assert torch.isclose(OrthogonalGradients().objective(losses(), params), losses().sum() + penalty(losses(), params))
    assert torch.equal(OrthogonalGradients(0.3).objective(losses()[:1], params), losses()[:1].sum())


def test_zero_and_extreme_gradients_stay_finite():
    grads = torch.tensor([[0.0, 0.0], [1e-10, 0.0], [0.0, 1e10], [3e10, 3e10]], dtype=torch.float32, requires_grad=True)
    cosines = cosine_matrix(grads)
    assert torch.allclose(cosines[1:, 1:], torch.tensor([[1.0, 0.0, 0.5 ** 0.5], [0.0, 1.0, 0.5 ** 0.5],
                                                          [0.5 ** 0.5, 0.5 ** 0.5, 1.0]]), atol=1e-6)
    assert torch.equal(cosines[0], torch.zeros(4))
    torch.triu(cosines, 1).pow(2).sum().backward()
    assert torch.isfinite(grads.grad).all()
    theta = torch.zeros(2, requires_grad=True)
    unused = torch.zeros(1, requires_grad=True)
    square = (theta ** 2).sum()
    value = penalty(torch.stack([0 * square, square + theta[0]]), [theta, unused])  # a zero gradient, an unused param
    assert value == 0 and torch.isfinite(torch.autograd.grad(value, theta)[0]).all()


def test_default_weight_is_one():
    theta, losses = hand_losses()  # Σ L_k = 0 and penalty 1 at θ = 0: the objective is λ itself
    assert torch.isclose(OrthogonalGradients().objective(losses, [theta]), torch.tensor(1.0, dtype=torch.float64))


def test_a_list_of_losses_is_the_same_as_their_stacked_tensor():
    """Both functions take a sequence of scalar losses as well as a tensor (the documented interface)."""
    theta, losses = hand_losses()
    as_list = list(losses)
    assert torch.isclose(penalty(as_list, [theta]), torch.tensor(1.0, dtype=torch.float64))  # the hand value
    method = OrthogonalGradients(2.0)
    assert torch.isclose(method.objective(as_list, [theta]), method.objective(losses, [theta]))
