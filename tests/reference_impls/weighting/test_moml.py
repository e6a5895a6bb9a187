import torch

from reference_impls.weighting.moml import MOML, mgda_on_normalized, unrolled_parameters

DTYPE = torch.float64


def quadratic_tasks(train_targets: torch.Tensor, val_targets: torch.Tensor):
    """L_k(θ) = ||θ - target_k||² on the train and validation side."""

    def train_losses(params):
        return (params["theta"] - train_targets).square().sum(dim=1)

    def val_losses(params):
        return (params["theta"] - val_targets).square().sum(dim=1)

    return train_losses, val_losses


def test_starts_from_equal_weights():
    assert torch.allclose(MOML(num_tasks=4).weights(torch.ones(4)), torch.full((4,), 0.25))


def test_hypergradients_match_hand_computation():
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(3, generator=generator, dtype=DTYPE, requires_grad=True)
    a, b = torch.randn(2, 3, generator=generator, dtype=DTYPE), torch.randn(2, 3, generator=generator, dtype=DTYPE)
    method = MOML(num_tasks=2, inner_lr=0.1).double()
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.3, -0.4]))
    hyper = method.hypergradients({"theta": theta}, *quadratic_tasks(a, b))
    # θ' = θ - α Σ_j w_j 2(θ - a_j);  ∂L_k/∂w_j = 2(θ' - b_k) · (-2α(θ - a_j));  ∂w/∂ω = diag(w) - w wᵀ
    w = torch.softmax(method.logits.detach(), dim=0)
    alpha, th = 0.1, theta.detach()
    fast = th - alpha * (w[:, None] * 2 * (th - a)).sum(dim=0)
    d_loss_d_w = torch.stack([torch.stack([2 * (fast - b[k]) @ (-2 * alpha * (th - a[j])) for j in range(2)]) for k in range(2)])
    expected = d_loss_d_w @ (torch.diag(w) - torch.outer(w, w))
    assert torch.allclose(hyper, expected)


def test_mgda_weights_are_the_min_norm_point_of_the_normalised_rows():
    hyper = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0], [1.0, 1.0, 0.0]], dtype=DTYPE)
    gamma = mgda_on_normalized(hyper)
    unit = hyper / hyper.norm(dim=1, keepdim=True)
    d = gamma @ unit
    assert torch.isclose(gamma.sum(), torch.tensor(1.0, dtype=DTYPE)) and (gamma >= 0).all()
    assert (unit @ d >= d @ d - 1e-9).all()  # KKT of min ||Σ γ_k u_k||² on the simplex
    # two orthogonal unit rows and their normalised sum: the midpoint of the first two is optimal
    assert torch.allclose(d, torch.tensor([0.5, 0.5, 0.0], dtype=DTYPE))
    # scaling a row does not change γ (it is normalised first)
    assert torch.allclose(mgda_on_normalized(hyper * torch.tensor([[100.0], [1.0], [0.01]], dtype=DTYPE)), gamma)


def test_without_mgda_the_step_follows_the_summed_validation_loss():
    generator = torch.Generator().manual_seed(1)
    theta = torch.randn(3, generator=generator, dtype=DTYPE, requires_grad=True)
    a, b = torch.randn(2, 3, generator=generator, dtype=DTYPE), torch.randn(2, 3, generator=generator, dtype=DTYPE)
    method = MOML(num_tasks=2, inner_lr=0.1, meta_lr=0.5, use_mgda=False).double()
    before = method.logits.detach().clone()
    hyper = method.hypergradients({"theta": theta}, *quadratic_tasks(a, b)).detach()
    gamma = method.meta_step({"theta": theta}, *quadratic_tasks(a, b))
    assert torch.equal(gamma, torch.ones(2, dtype=DTYPE))
    assert torch.allclose(method.logits.detach(), before - 0.5 * hyper.sum(dim=0))


def test_meta_steps_shift_weight_away_from_a_task_with_misleading_training_data():
    target = torch.tensor([1.0, -1.0, 2.0], dtype=DTYPE)
    theta = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    # both validation losses want θ = target; task 1's training labels point the other way
    train_losses, val_losses = quadratic_tasks(torch.stack([target, -target]), torch.stack([target, target]))
    method = MOML(num_tasks=2, inner_lr=0.1, meta_lr=1.0).double()
    for _ in range(30):
        method.meta_step({"theta": theta}, train_losses, val_losses)
        w = method.weights(torch.ones(2, dtype=DTYPE))
        grad = torch.autograd.grad((w * train_losses({"theta": theta})).sum(), theta)[0]
        with torch.no_grad():  # lower level: a step on the weighted training loss
            theta -= 0.05 * grad
    w = method.weights(torch.ones(2, dtype=DTYPE))
    assert w[0] > 0.9 and torch.isclose(w.sum(), torch.tensor(1.0, dtype=DTYPE))
    # with the fixed equal weights the two training targets cancel and θ stays at 0
    assert val_losses({"theta": theta}).sum() < 0.5 * val_losses({"theta": torch.zeros(3, dtype=DTYPE)}).sum()


def test_degenerate_hypergradients_stay_finite():
    theta = torch.ones(2, dtype=DTYPE, requires_grad=True)
    train_losses, val_losses = quadratic_tasks(torch.ones(3, 2, dtype=DTYPE), torch.zeros(3, 2, dtype=DTYPE))
    method = MOML(num_tasks=3, inner_lr=0.1).double()  # θ already fits every training target: h = 0
    before = method.logits.detach().clone()
    gamma = method.meta_step({"theta": theta}, train_losses, val_losses)
    assert torch.isfinite(gamma).all() and torch.allclose(gamma, torch.full((3,), 1 / 3, dtype=DTYPE))
    assert torch.equal(method.logits.detach(), before)
    single = MOML(num_tasks=1).double()
    assert torch.equal(single.meta_step({"theta": theta}, train_losses, lambda p: val_losses(p)[:1]), torch.ones(1, dtype=DTYPE))


def test_weights_are_the_softmax_of_the_logits_and_carry_no_gradient():
    method = MOML(num_tasks=2).double()
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.0, 3.0]).log1p())  # e^ω = (1, 4): w = (1/5, 4/5)
    losses = torch.tensor([2.0, 1.0], dtype=DTYPE, requires_grad=True)
    assert torch.allclose(method.weights(losses), torch.tensor([0.2, 0.8], dtype=DTYPE))
    method.combine(losses).backward()  # ω moves only through meta_step, never through the training loss
    assert method.logits.grad is None
    assert torch.allclose(losses.grad, torch.tensor([0.2, 0.8], dtype=DTYPE))


def test_a_zero_hypergradient_row_stays_zero_in_the_mgda_problem():
    # Rows e1 and 0: the zero row is not normalised (it stays 0), and the min-norm point of
    # {e1, 0} is 0 itself, all weight on the zero row.
    gamma = mgda_on_normalized(torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=DTYPE))
    assert torch.allclose(gamma, torch.tensor([0.0, 1.0], dtype=DTYPE), atol=1e-12)


def test_a_parameter_the_training_loss_does_not_use_is_left_as_it_is():
    theta = torch.ones(2, dtype=DTYPE, requires_grad=True)
    unused = torch.full((3,), 5.0, dtype=DTYPE, requires_grad=True)
    fast = unrolled_parameters({"theta": theta, "unused": unused}, (3 * theta).sum(), lr=0.1)
    assert fast["unused"] is unused and torch.allclose(fast["theta"], theta - 0.3)


def test_default_moml_in_float32_takes_the_documented_step_sizes():
    # The default dtype (float32) and defaults α = 1e-4, β = 1e-3; γ on the simplex.
    generator = torch.Generator().manual_seed(2)
    theta = torch.randn(3, generator=generator, requires_grad=True)
    a, b = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    method = MOML(num_tasks=2)
    hyper = MOML(num_tasks=2, inner_lr=1e-4).hypergradients({"theta": theta}, *quadratic_tasks(a, b)).detach()
    before = method.logits.detach().clone()
    gamma = method.meta_step({"theta": theta}, *quadratic_tasks(a, b))
    assert gamma.dtype == torch.float32 and torch.isclose(gamma.sum(), torch.tensor(1.0))
    torch.testing.assert_close(method.logits.detach(), before - 1e-3 * gamma @ hyper)


def test_one_task_without_mgda_steps_on_its_validation_loss():
    theta = torch.ones(2, dtype=DTYPE, requires_grad=True)
    train_losses, val_losses = quadratic_tasks(torch.zeros(1, 2, dtype=DTYPE), torch.ones(1, 2, dtype=DTYPE))
    gamma = MOML(num_tasks=1, use_mgda=False).double().meta_step({"theta": theta}, train_losses, val_losses)
    assert torch.equal(gamma, torch.ones(1, dtype=DTYPE))
