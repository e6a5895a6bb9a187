import copy

import torch

from reference_impls.architectures.popart import PopArt, PopArtLayer
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (5,), {"a": 1, "b": 2})
DENSE = Problem(("seg", "depth"), (2, 4, 4), {"seg": 3, "depth": 1}, dense=True)


def test_pop_preserves_unnormalised_outputs_when_statistics_change(device):
    torch.manual_seed(0)
    for problem, shape in ((VEC, (7, 5)), (DENSE, (3, 2, 4, 4))):
        model = build("popart", problem, width=8, beta=0.5).to(device).double()
        x = torch.randn(*shape, device=device, dtype=torch.float64)
        before = model(x)
        for scale, shift in ((100.0, -50.0), (1e-3, 7.0), (1e4, 1e3)):
            targets = {t: shift + scale * torch.randn_like(o) for t, o in before.items()}
            model.update_statistics(targets)
            for t, o in model(x).items():
                torch.testing.assert_close(o, before[t], rtol=1e-10, atol=1e-8)


def test_running_moments_follow_the_exponential_average(device):
    layer = PopArtLayer(3, 2, beta=0.25).to(device)
    mu, nu = torch.zeros(2, device=device), torch.ones(2, device=device)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        y = (torch.randn(6, 2, generator=g) * torch.tensor([10.0, 0.1]) + torch.tensor([3.0, -1.0])).to(device)
        layer.update(y)
        mu = 0.75 * mu + 0.25 * y.mean(0)
        nu = 0.75 * nu + 0.25 * y.square().mean(0)
    torch.testing.assert_close(layer.mu, mu)
    torch.testing.assert_close(layer.nu, nu)
    torch.testing.assert_close(layer.sigma, (nu - mu.square()).sqrt())


def test_normalised_targets_have_zero_mean_and_unit_variance(device):
    y = (torch.randn(500, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([1e3, 1e-2])
         + torch.tensor([-4e3, 5.0])).to(device, torch.float64)
    # float64: nu - mu^2 cancels badly in float32 when the mean dwarfs the spread (mean 5, std 0.01)
    exact = PopArtLayer(3, 2, beta=1.0).to(device, torch.float64)  # beta = 1: the batch's own statistics
    exact.update(y)
    z = exact.normalise(y)
    torch.testing.assert_close(z.mean(0), torch.zeros(2, device=device, dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(2, device=device, dtype=torch.float64), atol=1e-8, rtol=0)
    running = PopArtLayer(3, 2, beta=0.05).to(device, torch.float64)  # a stream of batches from the same law
    for batch in y.split(10) * 5:  # 250 updates: the pull of the initial (0, 1) has decayed
        running.update(batch)
    z = running.normalise(y)
    assert z.mean(0).abs().max() < 0.3 and (z.std(0) - 1).abs().max() < 0.3


def test_each_task_keeps_its_own_statistics(device):
    model = build("popart", VEC, beta=1.0).to(device)
    model.update_statistics({"a": torch.full((4, 1), 10.0, device=device) + torch.arange(4.0, device=device)[:, None]})
    torch.testing.assert_close(model.heads["a"].mu, torch.tensor([11.5], device=device))
    assert torch.equal(model.heads["b"].mu, torch.zeros(2, device=device))
    assert torch.equal(model.heads["b"].nu, torch.ones(2, device=device))


def test_normalised_loss_is_the_loss_divided_by_sigma_squared(device):
    torch.manual_seed(0)
    model = build("popart", VEC, beta=1.0).to(device).double()
    x = torch.randn(6, 5, device=device, dtype=torch.float64)
    targets = {"a": 50 * torch.randn(6, 1, device=device, dtype=torch.float64),
               "b": 0.1 * torch.randn(6, 2, device=device, dtype=torch.float64)}
    model.update_statistics(targets)
    out, norm = model(x), model.normalised_losses(x, targets)
    for t in VEC.tasks:
        weighted = ((out[t] - targets[t]).square() / model.heads[t].sigma.square()).mean()
        torch.testing.assert_close(norm[t], weighted)


def test_at_initialisation_it_is_a_shared_bottom_with_linear_heads(device, params_with_grad):
    torch.manual_seed(0)
    model = build("popart", VEC).to(device)
    x = torch.randn(3, 5, device=device)
    z = model.encode(x)
    lin = model.heads["b"].linear
    torch.testing.assert_close(model(x)["b"], z @ lin.weight.T + lin.bias)
    touched = params_with_grad(model, model(x)["a"].sum())
    assert not any(n.startswith("heads.b") for n in touched) and any(n.startswith("trunk") for n in touched)


def test_training_on_normalised_losses_fits_targets_of_very_different_scales(device):
    torch.manual_seed(0)
    model = build("popart", VEC, width=16, beta=0.1).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, generator=g).to(device)
    targets = {"a": (1e4 * x[:, :1] + 3e3), "b": 1e-3 * x[:, 1:3]}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def relative_errors() -> list[float]:
        with torch.no_grad():
            out = model(x)
        return [((out[t] - y).square().mean() / y.var()).item() for t, y in targets.items()]

    first = relative_errors()
    for _ in range(150):
        model.update_statistics(targets)
        opt.zero_grad()
        sum(model.normalised_losses(x, targets).values()).backward()
        opt.step()
    last = relative_errors()
    assert all(l < 0.1 * f for l, f in zip(last, first)), (first, last)


def test_registry_name_builds_the_catalogued_class(device, registry_output_shapes):
    model = build("popart", VEC)
    assert type(model) is PopArt and model.name == "popart"
    registry_output_shapes("popart", device)
    clone = copy.deepcopy(model)
    assert torch.equal(clone.heads["a"].mu, model.heads["a"].mu)


def test_sigma_is_clamped_to_its_bounds_and_pop_still_preserves_outputs(device):
    """sigma = sqrt(nu - mu^2) clamped to [sigma_min, sigma_max]: a constant channel gets sigma_min
    (not 0), a channel of spread 1e8 gets sigma_max; outputs stay preserved through the clamp."""
    layer = PopArtLayer(3, 2, beta=1.0, sigma_min=1e-3, sigma_max=1e6).to(device, torch.float64)
    h = torch.randn(4, 3, device=device, dtype=torch.float64)
    before = layer(h)
    y = torch.tensor([[5.0, 1e8], [5.0, -1e8]], device=device, dtype=torch.float64)  # std 0 and 1e8
    layer.update(y)
    torch.testing.assert_close(layer.sigma, torch.tensor([1e-3, 1e6], device=device, dtype=torch.float64))
    torch.testing.assert_close(layer.mu, torch.tensor([5.0, 0.0], device=device, dtype=torch.float64))
    torch.testing.assert_close(layer(h), before, rtol=1e-10, atol=1e-8)
    assert torch.isfinite(layer.normalise(y)).all()


def test_image_level_tasks_read_the_spatial_average_of_the_trunk(device):
    torch.manual_seed(0)
    model = build("popart", Problem(("a",), (2, 4, 4), {"a": 2}), width=8).to(device, torch.float64)
    x = torch.randn(3, 2, 4, 4, device=device, dtype=torch.float64)
    features = model.trunk[0](x)  # the resolution-keeping conv trunk, (3, 8, 4, 4)
    lin = model.heads["a"].linear
    torch.testing.assert_close(model(x)["a"], features.mean(dim=(2, 3)) @ lin.weight.T + lin.bias)


def test_from_problem_honours_the_trunk_depth():
    model = build("popart", VEC, width=4, depth=3)
    assert len(model.trunk.blocks) == 3
