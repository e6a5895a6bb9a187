import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.polytropon import Polytropon, relaxed_bernoulli
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def randomise_skills(model: Polytropon) -> None:
    with torch.no_grad():
        for layer in model.layers:
            layer.skills_b.normal_()
            layer.logits.normal_(std=2.0)


def test_untrained_model_is_the_backbone(device):
    torch.manual_seed(0)
    model = build("polytropon", VEC, width=8, depth=2).to(device)
    x = torch.randn(4, 6, device=device)
    h = torch.relu(model.layers[1].base(torch.relu(model.layers[0].base(x))))
    torch.testing.assert_close(model(x)["a"], model.heads["a"](h))


def test_layer_output_is_base_plus_the_averaged_skills(device):
    torch.manual_seed(1)
    model = build("polytropon", VEC, width=8, depth=1, num_skills=3, rank=2).to(device).eval()
    randomise_skills(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    z = torch.sigmoid(layer.logits[1])
    w = z / z.sum()
    a = sum(w[s] * layer.skills_a[s] for s in range(3))
    b = sum(w[s] * layer.skills_b[s] for s in range(3))
    expected = x @ layer.base.weight.T + layer.base.bias + (x @ a.T @ b.T) / 2
    torch.testing.assert_close(layer(x, layer.skill_weights(1, None)), expected)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](torch.relu(expected)))


def test_allocation_lies_in_the_unit_interval_and_rows_on_the_simplex(device):
    torch.manual_seed(2)
    model = build("polytropon", VEC, num_skills=5).to(device)
    randomise_skills(model)
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:
        z = relaxed_bernoulli(layer.logits, g)
        assert ((z >= 0) & (z <= 1)).all()
        w = layer.skill_weights(0, g)
        assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    for w in model.allocation():
        assert w.shape == (2, 5)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, device=device))


def test_relaxed_bernoulli_hard_frequencies_match_sigmoid():
    logits = torch.tensor([-1.0, 0.0, 1.5])
    z = relaxed_bernoulli(logits.expand(40000, -1), torch.Generator().manual_seed(3))
    torch.testing.assert_close((z > 0.5).float().mean(0), torch.sigmoid(logits), atol=0.01, rtol=0)


def test_training_mode_mixes_skills_with_relaxed_bernoulli_samples(device):
    """In training z_t is a Gumbel-sigmoid draw from the model's generator, one per task and layer."""
    torch.manual_seed(1)
    model = build("polytropon", VEC, width=8, depth=1, num_skills=3, rank=2).to(device).train()
    randomise_skills(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(model.generator.get_state())
    out = model(x)
    for t, task in enumerate(VEC.tasks):  # forward draws for the tasks in order
        z = relaxed_bernoulli(layer.logits[t], replay)
        w = z / z.sum()
        a = sum(w[s] * layer.skills_a[s] for s in range(3))
        b = sum(w[s] * layer.skills_b[s] for s in range(3))
        h = torch.relu(x @ layer.base.weight.T + layer.base.bias + (x @ a.T @ b.T) / 2)
        torch.testing.assert_close(out[task], model.heads[task](h))
    assert not torch.allclose(out["a"], model.eval()(x)["a"])  # not the evaluation-mode sigmoid


def test_relaxed_sample_is_the_gumbel_sigmoid_at_temperature_one():
    logits = torch.tensor([[-1.0, 0.0, 2.0], [0.5, -3.0, 1.0]], dtype=torch.float64)
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(7)).double()
    expected = 1 / (1 + torch.exp(-(logits + torch.log(u) - torch.log(1 - u))))  # sigmoid(l + logistic noise)
    torch.testing.assert_close(relaxed_bernoulli(logits, torch.Generator().manual_seed(7)), expected)


def test_every_layer_mixes_its_skills_with_its_own_allocation_row(device):
    torch.manual_seed(6)
    model = build("polytropon", VEC, width=8, depth=2, num_skills=3, rank=2).to(device).eval()
    randomise_skills(model)
    x, allocation = torch.randn(5, 6, device=device), model.allocation()
    h = x
    for layer, w in zip(model.layers, allocation):
        z = torch.sigmoid(layer.logits[1])
        torch.testing.assert_close(w[1], z / z.sum())  # eval-mode row: sigmoid(logits), normalised
        h = torch.relu(layer(h, z / z.sum()))
    torch.testing.assert_close(model(x)["b"], model.heads["b"](h))


def test_initial_allocation_is_one_half_and_skills_a_uniform_within_one_over_root_fan_in():
    torch.manual_seed(8)
    model = build("polytropon", VEC, width=32, depth=2, num_skills=8, rank=4)
    for layer, fan_in in zip(model.layers, (6, 32)):
        torch.testing.assert_close(torch.sigmoid(layer.logits), torch.full((2, 8), 0.5), atol=1e-3, rtol=0)
        bound = fan_in**-0.5
        assert layer.skills_a.abs().max() <= bound and layer.skills_a.abs().max() > 0.95 * bound


def test_one_hot_allocation_is_a_single_skill(device):
    torch.manual_seed(3)
    model = build("polytropon", VEC, width=8, depth=1, num_skills=3, rank=2).to(device).eval()
    randomise_skills(model)
    layer, x = model.layers[0], torch.randn(5, 6, device=device)
    with torch.no_grad():
        layer.logits[0] = torch.tensor([-40.0, 40.0, -40.0])
    single = x @ layer.base.weight.T + layer.base.bias + (x @ layer.skills_a[1].T @ layer.skills_b[1].T) / 2
    torch.testing.assert_close(layer(x, layer.skill_weights(0, None)), single)


def test_conv_skills_match_the_linear_formula_per_pixel(device):
    torch.manual_seed(4)
    problem = Problem(("a", "b"), (3, 5, 5), {"a": 2, "b": 1}, dense=True)
    model = build("polytropon", problem, width=4, depth=1, num_skills=2).to(device).eval()
    randomise_skills(model)
    layer, x = model.layers[0], torch.randn(2, 3, 5, 5, device=device)
    w = layer.skill_weights(0, None)
    a = w[0] * layer.skills_a[0] + w[1] * layer.skills_a[1]
    b = w[0] * layer.skills_b[0] + w[1] * layer.skills_b[1]
    kernel = layer.base.weight + (b.flatten(1) @ a.flatten(1)).view_as(layer.base.weight) / layer.rank
    torch.testing.assert_close(layer(x, w), F.conv2d(x, kernel, layer.base.bias, padding=1))


def test_backbone_is_frozen_and_a_task_trains_only_its_row_of_z(device, params_with_grad):
    torch.manual_seed(5)
    model = build("polytropon", VEC).to(device)
    randomise_skills(model)
    loss = model(torch.randn(8, 6, device=device))["a"].square().sum()
    touched = params_with_grad(model, loss)
    assert not any(".base." in n for n in touched)
    assert {"layers.0.skills_a", "layers.0.skills_b", "layers.0.logits"} <= touched
    assert not any(n.startswith("heads.b") for n in touched)
    assert model.layers[0].logits.grad[1].abs().sum() == 0 and model.layers[0].logits.grad[0].abs().sum() > 0


def test_parameter_count(n_params):
    d, w, S, r, T = 6, 16, 3, 2, 2
    model = build("polytropon", VEC, width=w, depth=2, num_skills=S, rank=r)
    backbone = (d * w + w) + (w * w + w)
    skills = S * r * (d + w) + S * r * (w + w)
    assert n_params(model) == backbone + skills + 2 * T * S + (w + 1) + (2 * w + 2)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("polytropon", device)
    first, last = short_training("polytropon", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("polytropon", VEC)
    assert type(model) is Polytropon and model.name == "polytropon"


def test_relaxed_sample_divides_by_its_temperature():
    """Gumbel-sigmoid at temperature tau: sigmoid((l + log u - log(1 - u)) / tau); a low tau sharpens."""
    logits = torch.tensor([[-1.0, 0.0, 2.0], [0.5, -3.0, 1.0]], dtype=torch.float64)
    u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(7)).double()
    expected = torch.sigmoid((logits + torch.log(u) - torch.log(1 - u)) / 0.25)
    torch.testing.assert_close(relaxed_bernoulli(logits, torch.Generator().manual_seed(7), tau=0.25), expected)


def test_skills_a_fill_the_whole_symmetric_interval():
    """A_s ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): both ends of the interval are reached, not one side."""
    torch.manual_seed(8)
    model = build("polytropon", VEC, width=32, depth=2, num_skills=8, rank=4)
    for layer, fan_in in zip(model.layers, (6, 32)):
        bound = fan_in**-0.5
        assert layer.skills_a.min() < -0.95 * bound and layer.skills_a.max() > 0.95 * bound
        assert layer.skills_a.abs().max() <= bound
        assert abs(layer.skills_a.mean().item()) < 0.1 * bound
