"""MC-SGD (Mirzadeh et al. 2021): the start on the segment, the sampled line points, the
update direction in closed form on quadratic losses, its fixed point, and a small network."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from reference_impls.merging.mc_sgd import ModeConnectivitySGD


def quadratic(centre: torch.Tensor):
    """L(p) = ½ ||p − centre||², gradient p − centre."""
    return lambda params: 0.5 * (params["w"] - centre).pow(2).sum()


def test_it_starts_init_position_of_the_way_from_the_old_to_the_new_solution():
    previous = {"w": torch.tensor([0.0, 4.0]), "b": torch.tensor([1.0])}
    continual = {"w": torch.tensor([2.0, 0.0]), "b": torch.tensor([3.0])}
    merged = ModeConnectivitySGD(previous, continual, init_position=0.25).merged()
    torch.testing.assert_close(merged["w"], torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(merged["b"], torch.tensor([1.5]))


def test_each_line_has_n_plus_one_evenly_spaced_points_from_its_start_to_the_merged_weights():
    mc = ModeConnectivitySGD({"w": torch.zeros(2)}, {"w": torch.ones(2)}, init_position=0.5, line_samples=4)
    points = mc.line_points(mc.continual)
    assert [s for s, _ in points] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    torch.testing.assert_close(points[0][1], mc.continual)
    torch.testing.assert_close(points[-1][1], mc.weights.detach())
    torch.testing.assert_close(points[1][1], torch.full((2,), 0.875))


def test_the_direction_sums_the_point_gradients_of_both_lines():
    """CL-Gym's grads_prev + grads_curr: memory loss on old → w̄, task loss on new → w̄, no s factor."""
    prev, cont = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
    mc = ModeConnectivitySGD({"w": prev}, {"w": cont}, init_position=0.3, line_samples=5)
    w = mc.weights.detach()
    s = torch.linspace(0, 1, 6)
    expected = sum((prev + t * (w - prev)) - a for t in s) + sum((cont + t * (w - cont)) - b for t in s)
    torch.testing.assert_close(mc.direction(quadratic(a), quadratic(b)), expected)


def test_fit_reaches_the_fixed_point_of_the_direction():
    """On quadratics the direction vanishes where Σ_s[(1−s)w̄_{t-1} + s w − a] + Σ_s[(1−s)ŵ_t + s w − b] = 0,
    i.e. w = a + b − (w̄_{t-1} + ŵ_t) / 2, whatever N is."""
    prev, cont = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
    mc = ModeConnectivitySGD({"w": prev}, {"w": cont}, line_samples=3)
    merged = mc.fit(quadratic(a), quadratic(b), steps=60, lr=0.1, momentum=0.5)
    torch.testing.assert_close(merged["w"], a + b - (prev + cont) / 2, atol=1e-4, rtol=0)


def test_merged_weights_handed_out_do_not_move_with_later_steps():
    """What merged() or fit() returned is the caller's to load or keep: more steps leave it as it was."""
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
    mc = ModeConnectivitySGD({"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 0.5])}, line_samples=3)
    first = mc.fit(quadratic(a), quadratic(b), steps=1, lr=0.1)
    kept = first["w"].clone()
    mc.fit(quadratic(a), quadratic(b), steps=5, lr=0.1)
    torch.testing.assert_close(first["w"], kept, atol=0, rtol=0)
    assert not torch.equal(mc.merged()["w"], kept)  # the steps did move the weights


def test_on_a_small_network_the_steps_lower_the_loss_along_both_lines():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x_old, x_new = torch.randn(32, 3), torch.randn(32, 3)
    y_old, y_new = (x_old[:, 0] > 0).long(), (x_new[:, 1] > 0).long()

    def trained(x, y, start):
        net.load_state_dict(start)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    previous = trained(x_old, y_old, {k: v.clone() for k, v in net.state_dict().items()})
    continual = trained(x_new, y_new, previous)  # plain SGD on the new task, from the old solution
    memory = lambda p: F.cross_entropy(functional_call(net, p, (x_old[:8],)), y_old[:8])  # noqa: E731
    current = lambda p: F.cross_entropy(functional_call(net, p, (x_new,)), y_new)  # noqa: E731
    mc = ModeConnectivitySGD(previous, continual, line_samples=4)
    before = mc.line_loss(memory, current)
    mc.fit(memory, current, steps=20, lr=0.02, momentum=0.9)
    assert mc.line_loss(memory, current) < 0.9 * before


def test_entries_that_are_not_weights_stay_as_in_the_previous_solution():
    """A step counter and a module's extra state (a dict) are not interpolated: merged() gives
    them back as in ``previous``, and only the floating-point weights move."""
    previous = {"w": torch.zeros(2), "steps": torch.tensor(10), "_extra_state": {"paths": ((0,),)}}
    continual = {"w": torch.ones(2), "steps": torch.tensor(30), "_extra_state": {"paths": ((1,),)}}
    mc = ModeConnectivitySGD(previous, continual, init_position=0.25)
    merged = mc.merged()
    torch.testing.assert_close(merged["w"], torch.full((2,), 0.25))
    assert merged["steps"].item() == 10 and merged["steps"].dtype == torch.int64
    assert merged["_extra_state"] == {"paths": ((0,),)}
    assert mc.weights.numel() == 2


def test_bad_arguments_are_refused():
    p = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="init_position"):
        ModeConnectivitySGD(p, p, init_position=1.5)
    with pytest.raises(ValueError, match="line_samples"):
        ModeConnectivitySGD(p, p, line_samples=0)
    with pytest.raises(ValueError, match="names and shapes"):
        ModeConnectivitySGD(p, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="lr"):
        ModeConnectivitySGD(p, p).fit(quadratic(torch.zeros(2)), quadratic(torch.zeros(2)), lr=0.0)


def test_line_loss_sums_memory_loss_on_the_old_line_and_task_loss_on_the_new_one():
    mc = ModeConnectivitySGD({"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, init_position=0.5, line_samples=2)
    # w = 1; memory (centre 1) at 0, 0.5, 1: 0.5 + 0.125 + 0; task (centre 3) at 2, 1.5, 1: 0.5 + 1.125 + 2
    torch.testing.assert_close(mc.line_loss(quadratic(torch.tensor([1.0])), quadratic(torch.tensor([3.0]))),
                               torch.tensor(4.25))


def test_defaults_follow_cl_gym_and_fit_takes_one_step():
    """α = 0.25, 10 line samples, one step; on quadratics the direction is (N + 1)(w + (prev + cont)/2 − a − b)."""
    prev, cont = torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0])
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mc = ModeConnectivitySGD({"w": prev}, {"w": cont})
    w0 = torch.tensor([1.0, 3.0])  # a quarter of the way
    torch.testing.assert_close(mc.weights.detach(), w0)
    assert mc.line_samples == 10
    step = mc.fit(quadratic(a), quadratic(b), lr=0.001)["w"]
    torch.testing.assert_close(step, w0 - 0.001 * 11 * (w0 + (prev + cont) / 2 - a - b))


def test_fit_uses_heavy_ball_momentum():
    prev, cont, a, b = torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([3.0])
    mc = ModeConnectivitySGD({"w": prev}, {"w": cont}, init_position=0.5, line_samples=1)
    d = lambda w: 2 * (w + 1.0 - 4.0)  # noqa: E731  (N + 1)(w + (prev + cont)/2 − a − b)
    w1 = torch.tensor([1.0]) - 0.1 * d(torch.tensor([1.0]))
    w2 = w1 - 0.1 * (0.5 * d(torch.tensor([1.0])) + d(w1))
    torch.testing.assert_close(mc.fit(quadratic(a), quadratic(b), steps=2, lr=0.1, momentum=0.5)["w"], w2)


@pytest.mark.parametrize("position, start", [(0.0, "previous"), (1.0, "continual")])
def test_the_end_points_of_the_segment_are_allowed_starts(position, start):
    ends = {"previous": {"w": torch.tensor([1.0, -2.0])}, "continual": {"w": torch.tensor([3.0, 0.5])}}
    mc = ModeConnectivitySGD(ends["previous"], ends["continual"], init_position=position)
    torch.testing.assert_close(mc.merged()["w"], ends[start]["w"])


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1])
def test_momentum_outside_zero_to_one_is_refused(momentum):
    mc = ModeConnectivitySGD({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=rf"momentum must lie in \[0, 1\), got {momentum}"):
        mc.fit(quadratic(torch.zeros(2)), quadratic(torch.zeros(2)), momentum=momentum)
