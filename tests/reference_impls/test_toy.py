import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_impls.toy import lockstep, regression
from reference_impls.toy import two_objective as toy
from reference_impls.weighting import registry


def autograd_losses_and_jacobian(x: torch.Tensor, first_scale: float = 1.0):
    """The definition differentiated by autograd: what the closed form must reproduce."""
    point = x.detach().clone().requires_grad_()
    values = toy.losses(point, first_scale)
    rows = [torch.autograd.grad(values[k], point, retain_graph=True)[0] for k in range(2)]
    return values.detach(), torch.stack(rows)


def test_loss_values_at_hand_computed_points():
    # (7, -8): x2 < 0 so only the bowl counts, c2 = tanh(4); bowl_1 = (0 + 0) / 10 - 20
    values = toy.losses(torch.tensor([7.0, -8.0], dtype=torch.float64))
    c2 = math.tanh(4.0)
    assert math.isclose(values[0].item(), -20 * c2, rel_tol=1e-12)
    assert math.isclose(values[1].item(), c2 * (196 / 10 - 20), rel_tol=1e-12)
    # (0, 0): both blend weights vanish
    assert torch.equal(toy.losses(torch.zeros(2)), torch.zeros(2))
    # (1, 2): only the valleys count, c1 = tanh(1)
    v = toy.losses(torch.tensor([1.0, 2.0], dtype=torch.float64))
    valley_1 = math.log(abs(0.5 * -8 - math.tanh(-2))) + 6
    valley_2 = math.log(abs(0.5 * 2 + math.tanh(-2) + 2)) + 6
    assert torch.allclose(v, torch.tensor([valley_1, valley_2], dtype=torch.float64) * math.tanh(1))


def test_valley_log_is_floored_at_5e_minus_6():
    # On u_1 = 0.5(-x1 - 7) - tanh(-x2) = 0 the valley term is log(5e-6) + 6 (the official
    # LOWER); x2 = 2 puts the point in the valleys, c1 = tanh(1).
    x = torch.tensor([2 * math.tanh(2.0) - 7, 2.0], dtype=torch.float64)
    expected = math.tanh(1.0) * (math.log(5e-6) + 6)
    assert math.isclose(toy.losses(x)[0].item(), expected, rel_tol=1e-12)


def test_starting_points_are_the_papers():
    assert toy.CAGRAD_STARTS == ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
    assert toy.NASH_FAMO_STARTS == ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def test_first_scale_multiplies_only_the_first_loss():
    x = torch.tensor([1.0, -3.0])
    assert torch.allclose(toy.losses(x, first_scale=0.1), toy.losses(x) * torch.tensor([0.1, 1.0]))


def test_gradients_at_the_ends_of_the_pareto_set():
    front = toy.pareto_set(3)
    _, jacobian_left = toy.losses_and_jacobian(front[0])
    _, jacobian_right = toy.losses_and_jacobian(front[-1])
    assert torch.allclose(jacobian_left[1], torch.zeros(2, dtype=torch.float64), atol=1e-9)  # L2 min
    assert torch.allclose(jacobian_right[0], torch.zeros(2, dtype=torch.float64), atol=1e-9)  # L1 min
    # the x1-gradient of L1 at the left end: c2 * 2 (x1 - 7) / 10 with x1 = -7
    c2 = math.tanh(-front[0, 1].item() / 2)
    assert math.isclose(jacobian_left[0, 0].item(), c2 * -2.8, rel_tol=1e-9)


def test_pareto_set_is_pareto_stationary_and_matches_the_papers_line():
    front = toy.pareto_set(11)
    assert torch.allclose(front[:, 0], torch.linspace(-7, 7, 11, dtype=torch.float64))
    assert abs(front[5, 1].item() - (-8.3552)) < 1e-3  # the CAGrad plot draws y = -8.3552
    for lam, point in zip(torch.linspace(0, 1, 11, dtype=torch.float64), front):
        _, jacobian = toy.losses_and_jacobian(point)
        combined = lam * jacobian[0] + (1 - lam) * jacobian[1]
        assert combined.norm().item() < 1e-8


def test_mgda_reaches_the_front_from_the_bowl():
    method = registry.make("mgda") if "mgda" in registry.methods() else registry.make("ew")
    x = torch.tensor([-3.0, -6.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.02)
    start_distance = toy.distance_to_pareto_set(x)
    for _ in range(400):
        _, jacobian = toy.losses_and_jacobian(x.detach())
        optimizer.zero_grad()
        x.grad = method(jacobian).update.to(x)
        optimizer.step()
    assert start_distance > 2 and toy.distance_to_pareto_set(x) < 0.05


coordinate = st.floats(-12, 12, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(coordinate, coordinate, st.sampled_from([1.0, 0.1]))
def test_closed_form_jacobian_equals_autograd(x1, x2, first_scale):
    x = torch.tensor([x1, x2], dtype=torch.float64)
    values, jacobian = toy.losses_and_jacobian(x, first_scale)
    expected_values, expected_jacobian = autograd_losses_and_jacobian(x, first_scale)
    assert torch.allclose(values, expected_values, rtol=1e-12, atol=1e-12)
    assert torch.allclose(jacobian, expected_jacobian, rtol=1e-9, atol=1e-11)


@settings(max_examples=100, deadline=None)
@given(coordinate, st.floats(1e-7, 1e-3), st.sampled_from([-1.0, 1.0]))
def test_closed_form_near_the_log_floor_equals_autograd(x2, offset, side):
    # x1 puts u_1 = 0.5(-x1 - 7) + tanh(x2) at ±offset: inside the flat floor or just above it
    x1 = 2 * math.tanh(x2) - 7 - 2 * side * offset
    x = torch.tensor([x1, x2], dtype=torch.float64)
    _, jacobian = toy.losses_and_jacobian(x)
    _, expected = autograd_losses_and_jacobian(x)
    assert torch.allclose(jacobian, expected, rtol=1e-9, atol=1e-9)


def test_closed_form_on_the_blend_boundary_and_in_batches():
    # (0, 0) is a Nash-MTL / FAMO start; there both blend weights are 0 but their slopes are not
    origin = torch.zeros(2, dtype=torch.float64)
    _, jacobian = toy.losses_and_jacobian(origin)
    assert torch.equal(jacobian, autograd_losses_and_jacobian(origin)[1])
    assert jacobian[0, 1] > 10  # ∂L1/∂x2 = (valley_1 - bowl_1) / 2 at the origin
    points = torch.randn(4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6
    values, jacobians = toy.losses_and_jacobian(points, 0.1)
    assert values.shape == (4, 3, 2) and jacobians.shape == (4, 3, 2, 2)
    for index in [(0, 0), (2, 1), (3, 2)]:
        single_values, single_jacobian = toy.losses_and_jacobian(points[index], 0.1)
        assert torch.allclose(values[index], single_values, rtol=1e-14)
        assert torch.allclose(jacobians[index], single_jacobian, rtol=1e-14)


def test_distances_to_the_pareto_set():
    front = toy.pareto_set(3)
    middle, left_end = front[1], front[0]
    points = torch.stack([middle + torch.tensor([0.0, 0.5], dtype=torch.float64),
                          left_end - torch.tensor([1.0, 0.0], dtype=torch.float64), middle])
    distances = toy.distances_to_pareto_set(points)
    # the set is flat at x1 = 0 (its highest point) and ends at x1 = -7
    assert torch.allclose(distances, torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64), atol=1e-6)
    assert toy.distance_to_pareto_set(points[1]) == float(distances[1])


def test_lockstep_adam_equals_torch_adam_and_sgd():
    """The lock-step runner must take the same steps as torch.optim on a lone point."""
    starts = [(-8.5, 7.5), (9.0, -1.0), (0.0, 0.0)]
    methods = [registry.make("mgda"), registry.make("ew_grad"), registry.make("ew_grad")]
    directions = [lambda values, jacobian, step, m=m: m(jacobian).update for m in methods]
    traces = lockstep.simulate(directions, starts, steps=300, lr=0.01, first_scale=0.1,
                               plain_sgd=[False, False, True], record_every=100)
    assert traces.steps.tolist() == [0, 100, 200, 300]
    for r, (start, method) in enumerate(zip(starts, methods)):
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        fresh = type(method)()
        optimizer = (torch.optim.SGD if r == 2 else torch.optim.Adam)([x], lr=0.01)
        for _ in range(300):
            _, jacobian = autograd_losses_and_jacobian(x, 0.1)
            x.grad = fresh(jacobian).update
            optimizer.step()
        assert torch.allclose(traces.points[-1, r], x.detach(), rtol=0, atol=1e-9)
        assert torch.dist(traces.points[-1, r], traces.points[0, r]) > 0.5  # it moved


def test_lockstep_float32_runs_in_float32_and_tracks_float64():
    ew = registry.make("ew_grad")
    directions = [lambda values, jacobian, step: ew(jacobian).update]
    single = lockstep.simulate(directions, [(-8.5, -5.0)], steps=200, lr=0.01, dtype=torch.float32)
    double = lockstep.simulate(directions, [(-8.5, -5.0)], steps=200, lr=0.01)
    assert single.points.dtype == torch.float32 and double.points.dtype == torch.float64
    moved = float(torch.dist(double.points[-1, 0], double.points[0, 0]))
    assert moved > 0.5 and torch.allclose(single.points[-1].double(), double.points[-1], atol=1e-4)
    assert not torch.equal(single.points[-1].double(), double.points[-1])  # really a different precision


def test_lockstep_stops_a_diverged_run_and_leaves_the_others_alone():
    ew = registry.make("ew_grad")
    seen: list[int] = []

    def exploding(values, jacobian, step):
        seen.append(step)
        return ew(jacobian).update * (math.inf if step == 3 else 1.0)

    def healthy(values, jacobian, step):
        return ew(jacobian).update

    starts = [(-8.5, -5.0), (9.0, -1.0)]
    together = lockstep.simulate([exploding, healthy], starts, steps=20, lr=0.01, record_every=5)
    alone = lockstep.simulate([healthy], starts[1:], steps=20, lr=0.01, record_every=5)
    assert together.diverged_at == [3, None]
    assert seen == [0, 1, 2, 3]  # each step's index, and no call once the run is dead
    assert torch.equal(together.points[:, 1], alone.points[:, 0])


def test_regression_problem_is_built_from_its_seed_only():
    torch.manual_seed(123)
    first = regression.make_problem(seed=7)
    torch.manual_seed(456)
    second = regression.make_problem(seed=7)
    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.targets, second.targets)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(regression.make_problem(seed=8).targets, first.targets)
    # Task 2's targets are 10 times task 1's scale (tanh of unit-variance projections plus noise).
    spread = first.targets.std(dim=0)
    assert 4 < float(spread[1] / spread[0]) < 25


def test_regression_losses_and_gradients_by_hand():
    problem = regression.make_problem(seed=1)
    model = problem.model
    features = torch.tanh(problem.inputs @ model.shared.weight.T + model.shared.bias)
    for k, head in enumerate(model.heads):
        prediction = features @ head.weight[0] + head.bias[0]
        expected = ((prediction - problem.targets[:, k]) ** 2).mean()
        assert torch.allclose(problem.losses()[k], expected, rtol=1e-6)
    losses, shared = problem.losses(), problem.shared_parameters()
    rows = regression.task_gradients(losses, shared)
    for k in range(2):
        expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[k], shared, retain_graph=True)])
        assert torch.allclose(rows[k], expected)
    for p in shared:
        p.grad = torch.ones_like(p)
    regression.assign_gradient(shared, rows[0])  # adds to what is there
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in shared]), rows[0] + 1)


def test_batched_adam_returns_new_points_and_leaves_its_input_alone():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    moved = lockstep.BatchedAdam(lr=0.1).step(x, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
    # the first Adam step moves every coordinate by lr against the sign of its gradient
    assert x.tolist() == [[1.0, 2.0]] and torch.allclose(moved, torch.tensor([[0.9, 2.1]], dtype=torch.float64))


def test_regression_data_and_weights_follow_the_documented_recipe():
    # Draws in order from one generator: inputs, directions, noise, then each parameter (x 0.5).
    problem = regression.make_problem(seed=3, num_samples=16)
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(16, 8, generator=g)
    clean = torch.tanh(inputs @ torch.randn(8, 2, generator=g) / 8**0.5)
    targets = (clean + 0.1 * torch.randn(16, 2, generator=g)) * torch.tensor([1.0, 10.0])
    assert torch.equal(problem.inputs, inputs) and torch.allclose(problem.targets, targets)
    for parameter in problem.model.parameters():
        assert torch.equal(parameter, 0.5 * torch.randn(parameter.shape, generator=g))


class ScaledSum(torch.nn.Module):
    """A learnable weight per task; records the step and epoch it is given at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.0, 0.5]))
        self.steps: list[int] = []
        self.epochs: list[int] = []

    def combine(self, losses, step=0, epoch=0):
        self.steps.append(step)
        self.epochs.append(epoch)
        return (self.scale * losses).sum()


def test_train_with_weighting_is_adam_on_network_and_weighting_and_reports_unweighted_sums():
    weighting = ScaledSum()
    initial, final = regression.train_with_weighting(weighting, steps=25, lr=0.01, seed=2, adam=True)
    problem, scale = regression.make_problem(2), torch.nn.Parameter(torch.tensor([1.0, 0.5]))
    optimizer = torch.optim.Adam([*problem.model.parameters(), scale], lr=0.01)
    assert initial == float(problem.losses().detach().sum())
    for _ in range(25):
        optimizer.zero_grad()
        (scale * problem.losses()).sum().backward()
        optimizer.step()
    assert final == pytest.approx(float(problem.losses().detach().sum()), rel=1e-6)
    assert torch.allclose(weighting.scale, scale) and not torch.equal(scale, torch.tensor([1.0, 0.5]))
    assert weighting.steps == list(range(25))  # step-dependent weightings see the real index
    assert weighting.epochs == [step // 10 for step in range(25)]


def test_train_with_weighting_defaults_to_plain_sgd():
    # ``adam`` is opt-in: without it the network and the weighting take plain SGD steps.
    weighting = ScaledSum()
    initial, final = regression.train_with_weighting(weighting, steps=15, lr=0.001, seed=4)
    problem, scale = regression.make_problem(4), torch.tensor([1.0, 0.5], requires_grad=True)
    parameters = [*problem.model.parameters(), scale]
    assert initial == float(problem.losses().detach().sum())
    for _ in range(15):
        grads = torch.autograd.grad((scale * problem.losses()).sum(), parameters)
        with torch.no_grad():
            for parameter, grad in zip(parameters, grads):
                parameter -= 0.001 * grad  # θ ← θ - lr ∇
    assert final == pytest.approx(float(problem.losses().detach().sum()), rel=1e-6)
    assert torch.allclose(weighting.scale, scale) and not torch.equal(scale, torch.tensor([1.0, 0.5]))
    assert weighting.steps == list(range(15))


def test_losses_of_a_batch_of_points_are_the_losses_of_each_point():
    # ``losses`` takes ... x 2 and returns ... x 2 (last axis: L1, L2), like losses_and_jacobian.
    points = torch.randn(4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 6
    values = toy.losses(points, 0.1)
    assert values.shape == (4, 3, 2)
    for index in [(0, 0), (1, 2), (3, 1)]:
        assert torch.equal(values[index], toy.losses(points[index], 0.1))
    assert torch.allclose(values, toy.losses_and_jacobian(points, 0.1)[0], rtol=1e-14)


def test_closed_form_equals_autograd_exactly_on_the_log_floor():
    # At x1 = -7, u_1 = tanh(x2); pick the float x2 whose tanh is exactly 5e-6. There
    # torch.clamp passes the gradient through, so ∂L1/∂x1 = -c1 / (2 u_1), not 0.
    for dtype in (torch.float64, torch.float32):
        floor = torch.tensor(toy.LOG_FLOOR, dtype=dtype)
        x2 = torch.tensor(toy.LOG_FLOOR + toy.LOG_FLOOR**3 / 3, dtype=dtype)  # atanh(5e-6), to ~1 ulp
        candidates = [x2]
        for direction in (-1.0, 1.0):
            near = x2
            for _ in range(20):
                near = torch.nextafter(near, torch.tensor(direction, dtype=dtype))
                candidates.append(near)
        x2 = next(c for c in candidates if torch.tanh(c) == floor)
        x = torch.stack([torch.tensor(-7.0, dtype=dtype), x2])
        _, jacobian = toy.losses_and_jacobian(x)
        assert torch.allclose(jacobian, autograd_losses_and_jacobian(x)[1], rtol=1e-6, atol=1e-9)
        c1 = math.tanh(x2.item() / 2)
        assert math.isclose(jacobian[0, 0].item(), -c1 / (2 * toy.LOG_FLOOR), rel_tol=1e-5)  # about -0.25


def test_distances_are_measured_to_the_reference_given():
    reference = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    points = torch.tensor([[0.0, 1.0], [3.0, 0.0], [3.0, 5.0]], dtype=torch.float64)
    # nearest reference points: (0,0) at 1, (0,0) at 3 (vs 4 to (3,4)), (3,4) at 1
    expected = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    assert torch.allclose(toy.distances_to_pareto_set(points, reference), expected)
    assert [toy.distance_to_pareto_set(p, reference) for p in points] == pytest.approx(expected.tolist())


def test_regression_losses_can_evaluate_another_model():
    # With zero head weights a head predicts its bias, so the task MSE is mean((b_k - y_k)²).
    problem = regression.make_problem(seed=5, num_samples=16)
    other = copy.deepcopy(problem.model)
    with torch.no_grad():
        for head, bias in zip(other.heads, (1.0, -2.0)):
            head.weight.zero_()
            head.bias.fill_(bias)
    expected = ((torch.tensor([1.0, -2.0]) - problem.targets) ** 2).mean(dim=0)
    assert torch.allclose(problem.losses(other), expected)
    assert not torch.allclose(problem.losses(), expected)  # its own model is a different one


def test_task_gradients_put_zeros_where_a_loss_does_not_reach():
    # Row k is ∇L_k over every parameter given; a parameter outside the losses' graph (here a
    # spare one, as an unused auxiliary layer would be) has gradient 0, not an error. L_1 does
    # not depend on head 2 either (nor L_2 on head 1): those entries are 0 as well.
    problem = regression.make_problem(seed=6, num_samples=16)
    spare = torch.ones(3, requires_grad=True)
    parameters = [*problem.model.parameters(), spare]
    losses = problem.losses()
    rows = regression.task_gradients(losses, parameters)
    assert rows.shape == (2, sum(p.numel() for p in parameters))
    assert torch.equal(rows[:, -3:], torch.zeros(2, 3))
    shared = list(problem.model.shared.parameters())
    for k, head in enumerate(problem.model.heads):
        used = shared + list(head.parameters())
        grads = dict(zip(map(id, used), torch.autograd.grad(losses[k], used, retain_graph=True)))
        expected = torch.cat([grads.get(id(p), torch.zeros_like(p)).reshape(-1) for p in parameters])
        assert torch.allclose(rows[k], expected)


def test_assign_gradient_splits_the_vector_in_parameter_order():
    # Each parameter without a gradient receives its own consecutive slice of the vector.
    parameters = list(regression.make_problem(seed=0, num_samples=4).model.parameters())
    assert len(parameters) > 2 and all(p.grad is None for p in parameters)
    vector = torch.arange(sum(p.numel() for p in parameters), dtype=torch.float32)
    regression.assign_gradient(parameters, vector)
    start = 0
    for p in parameters:
        assert torch.equal(p.grad, vector[start: start + p.numel()].view_as(p))
        start += p.numel()


def test_lockstep_defaults_are_torch_adam_on_the_unscaled_problem():
    """By default every run is torch.optim.Adam with its own defaults on L1, L2 unscaled (CAGrad's toy).

    The direction Σ_k L_k ∇L_k needs the losses handed to it, so they are checked too."""

    def loss_weighted(values, jacobian, step):
        return values @ jacobian

    starts = [(-8.5, 7.5), (9.0, -1.0)]
    traces = lockstep.simulate([loss_weighted] * 2, starts, steps=40)
    for r, start in enumerate(starts):
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([x])
        for _ in range(40):
            optimizer.zero_grad()
            (0.5 * (toy.losses(x) ** 2).sum()).backward()  # gradient Σ_k L_k ∇L_k
            optimizer.step()
        assert torch.allclose(traces.points[-1, r], x.detach(), rtol=0, atol=1e-9)
        assert torch.dist(traces.points[-1, r], traces.points[0, r]) > 0.01  # it moved


def test_lockstep_float32_stays_float32_whatever_dtype_a_direction_returns():
    # Updates are cast to the points' dtype, so a method answering in float64 changes nothing.
    ew = registry.make("ew_grad")

    def in_float32(values, jacobian, step):
        return ew(jacobian).update

    def in_float64(values, jacobian, step):
        return ew(jacobian).update.double()

    starts = [(-8.5, -5.0)]
    single = lockstep.simulate([in_float32], starts, steps=30, lr=0.01, dtype=torch.float32)
    upcast = lockstep.simulate([in_float64], starts, steps=30, lr=0.01, dtype=torch.float32)
    assert upcast.points.dtype == torch.float32 and torch.equal(upcast.points, single.points)
