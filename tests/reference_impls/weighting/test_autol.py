import torch
from torch.func import functional_call

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.autol import AutoLambda


def _quadratic_problem():
    # one parameter vector θ; task k pulls θ towards its target t_k: L_k = ||θ - t_k||² / 2
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0]])  # primary, helper, conflicting
    theta = torch.zeros(2, requires_grad=True)

    def task_losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((params["theta"] - targets) ** 2).sum(dim=1)

    return {"theta": theta}, task_losses


def test_meta_gradient_matches_finite_differences():
    params, task_losses = _quadratic_problem()
    autol = AutoLambda(num_tasks=3, primary_tasks=[0], init=0.5)
    autol.meta_backward(params, task_losses, task_losses, inner_lr=0.3)
    analytic = autol.task_weights.grad.clone()

    def meta_loss(weights: torch.Tensor) -> float:
        grad = sum(w * (params["theta"].detach() - t) for w, t in zip(weights, task_losses_targets))
        theta_prime = params["theta"].detach() - 0.3 * grad
        return float(0.5 * ((theta_prime - task_losses_targets[0]) ** 2).sum())

    task_losses_targets = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0]])
    base = autol.task_weights.detach()
    numeric = torch.stack([
        torch.tensor((meta_loss(base + 1e-3 * e) - meta_loss(base - 1e-3 * e)) / 2e-3)
        for e in torch.eye(3)
    ])
    assert torch.allclose(analytic, numeric, atol=1e-4)


def test_helpful_auxiliary_task_is_weighted_up_and_conflicting_one_down():
    params, task_losses = _quadratic_problem()
    autol = AutoLambda(num_tasks=3, primary_tasks=[0], init=0.1)
    optimizer = torch.optim.SGD(autol.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        autol.meta_backward(params, task_losses, task_losses, inner_lr=0.1)
        optimizer.step()
    weights = autol.weights(torch.zeros(3))
    assert weights[1] > 0.1 and weights[2] < 0.1
    assert torch.allclose(autol.primary_mask, torch.tensor([1.0, 0.0, 0.0]))


def test_weights_are_the_parameter_and_single_task_works():
    autol = AutoLambda(num_tasks=1, init=0.3)
    assert torch.allclose(autol.weights(torch.tensor([2.0])), torch.tensor([0.3]))
    assert list(autol.parameters())[0] is autol.task_weights


def _targets_loss(targets):
    targets = torch.tensor(targets)
    return lambda params: 0.5 * ((params["theta"] - targets) ** 2).sum(dim=1)


def test_look_ahead_uses_the_training_losses_and_the_meta_loss_the_primary_validation_ones():
    """θ = 0, λ = 0.5, η = 0.2, training targets t_k, validation targets v_k, losses ½||θ − ·||².
    θ' = η Σ λ_k t_k = (0, 0.3); ∂/∂λ_k Σ_p ½||θ' − v_p||² = Σ_p (θ' − v_p) · η t_k.
    Primary task 0: loss ½(4 + 0.09) = 2.045, gradient (−2, 0.3) · 0.2 t_k = (−0.4, 0.12, 0.46).
    All tasks (the default): loss ½(4.09 + 1.69 + 1.49) = 3.635, gradient (−3, 0.9) · 0.2 t_k
    = (−0.6, 0.36, 0.78). A second call sets the same gradient (it does not accumulate)."""
    train = _targets_loss([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    val = _targets_loss([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    cases = (([0], 2.045, [-0.4, 0.12, 0.46]), (None, 3.635, [-0.6, 0.36, 0.78]))
    for primary, loss, grad in cases:
        autol = AutoLambda(num_tasks=3, primary_tasks=primary, init=0.5)
        for _ in range(2):
            params = {"theta": torch.zeros(2, requires_grad=True)}
            returned = autol.meta_backward(params, train, val, inner_lr=0.2)
            torch.testing.assert_close(returned, torch.tensor(loss))
            torch.testing.assert_close(autol.task_weights.grad, torch.tensor(grad))


def test_lambda_starts_at_the_paper_value_and_is_neither_clipped_nor_normalised():
    autol = AutoLambda(num_tasks=3)
    torch.testing.assert_close(autol.weights(torch.ones(3)), torch.full((3,), 0.1))
    with torch.no_grad():
        autol.task_weights.copy_(torch.tensor([-0.5, 2.0, 3.0]))
    torch.testing.assert_close(autol.weights(torch.ones(3)), torch.tensor([-0.5, 2.0, 3.0]))


def test_training_reduces_total_loss():
    problem = make_problem(0)
    model = problem.model
    autol = AutoLambda(num_tasks=2, init=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    meta_optimizer = torch.optim.Adam(autol.parameters(), lr=0.01)
    train = val = problem  # the smoke test reuses the training batch as validation data

    def losses_on(data, params):
        features = functional_call(model, params, (data.inputs,))
        heads = [
            features @ params[f"heads.{k}.weight"].T + params[f"heads.{k}.bias"]
            for k in range(2)
        ]
        predictions = torch.cat(heads, dim=1)
        return ((predictions - data.targets) ** 2).mean(dim=0)

    initial = problem.losses().sum().item()
    for _ in range(100):
        params = dict(model.named_parameters())
        meta_optimizer.zero_grad()
        autol.meta_backward(params, lambda p: losses_on(train, p), lambda p: losses_on(val, p), 0.02)
        meta_optimizer.step()
        losses = problem.losses()
        optimizer.zero_grad()
        autol.combine(losses).backward()
        optimizer.step()
    assert problem.losses().sum().item() < 0.3 * initial


def test_lookahead_leaves_parameters_the_training_losses_do_not_use():
    # θ' = θ − η ∇_θ Σ λ_k L_k: a parameter outside every training loss (here one only the
    # validation side would read) has no gradient and keeps its value.
    params, task_losses = _quadratic_problem()
    extra = torch.tensor([2.0, -3.0], requires_grad=True)
    params = {**params, "extra": extra}
    autol = AutoLambda(num_tasks=3, init=0.5)
    moved = autol.lookahead(params, task_losses, inner_lr=0.3)
    assert torch.equal(moved["extra"], extra)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0]])
    expected = -0.3 * 0.5 * (torch.zeros(2) - targets).sum(0)  # θ = 0
    assert torch.allclose(moved["theta"], expected)
