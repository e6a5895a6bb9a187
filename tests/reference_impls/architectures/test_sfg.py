import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.sfg import StochasticFilterGroups, sample_gumbel_softmax

from .harness_probe import harness_step

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_assignments_are_distributions(device):
    torch.manual_seed(0)
    model = build("sfg", VEC, width=8).to(device)
    with torch.no_grad():
        model.logits[0].normal_()
    for z in [*model.assignment_probabilities(), *model.assignments()]:
        assert z.shape == (8, 3) and (z >= 0).all()
        torch.testing.assert_close(z.sum(-1), torch.ones(8, device=device))


def test_eval_is_deterministic_and_training_samples(device):
    torch.manual_seed(0)
    model = build("sfg", VEC, width=8).to(device)
    x = torch.randn(4, 6, device=device)
    model.eval()
    torch.testing.assert_close(model(x)["a"], model(x)["a"])
    model.train()
    assert not torch.equal(model.assignments()[0], model.assignments()[0])


def test_gumbel_max_picks_each_group_with_its_probability():
    """argmax(logits + Gumbel) ~ softmax(logits); the temperature only sharpens or flattens."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    picks = sample_gumbel_softmax(logits, 1.0, g).argmax(-1)
    torch.testing.assert_close(torch.bincount(picks, minlength=3) / 20000.0, probs, atol=0.015, rtol=0)
    hot = sample_gumbel_softmax(logits[:100], 1e-3, g)
    flat = sample_gumbel_softmax(logits[:100], 1e3, g)
    assert (hot.amax(-1) > 0.99).float().mean() > 0.95 and (flat - 1 / 3).abs().max() < 0.01


def _force(model, layer_groups):
    """Make every filter's most probable group the given one (0 shared, 1 + k task k)."""
    with torch.no_grad():
        for logit, groups in zip(model.logits, layer_groups):
            logit.fill_(-10.0)
            logit[torch.arange(len(groups)), torch.tensor(groups)] = 10.0


def test_task_a_specialists_never_feed_task_b(device, params_with_grad):
    torch.manual_seed(0)
    model = build("sfg", VEC, width=6).to(device).eval()
    _force(model, [[0, 0, 1, 1, 2, 2]] * 2)  # filters 2, 3: task a; 4, 5: task b
    x = torch.randn(4, 6, device=device)
    touched = params_with_grad(model, model(x)["b"].sum())
    w0, w1 = model.layers[0][0].weight, model.layers[1][0].weight
    w0.grad, w1.grad = None, None
    model(x)["b"].sum().backward()
    assert w0.grad[2:4].abs().sum() == 0 and w1.grad[2:4].abs().sum() == 0  # a's filters
    assert w1.grad[:, 2:4].abs().sum() == 0  # nothing reads a's features for b
    assert w1.grad[4:6, 4:6].abs().sum() > 0 and w1.grad[4:6, :2].abs().sum() > 0  # b reads b and shared
    assert w1.grad[:2, 4:6].abs().sum() == 0  # shared filters never read a specialist
    assert "layers.0.0.weight" in touched


def test_all_shared_assignment_is_a_shared_bottom(device):
    torch.manual_seed(0)
    model = build("sfg", VEC, width=5).to(device).eval()
    _force(model, [[0] * 5] * 2)
    x = torch.randn(3, 6, device=device)
    trunk = torch.nn.Sequential(*model.layers)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], model.heads[t](trunk(x)))


def test_assignment_logits_get_gradients(device, params_with_grad):
    torch.manual_seed(0)
    model = build("sfg", VEC, width=8).to(device)
    touched = params_with_grad(model, model(torch.randn(4, 6, device=device))["a"].square().sum())
    assert {"logits.0", "logits.1"} <= touched


def test_short_training_lowers_the_loss(short_training, device):
    first, last = short_training("sfg", True, device, 15)
    assert last < first


def test_registry_name_builds_the_catalogued_class(registry_output_shapes, device):
    assert type(build("sfg", VEC)) is StochasticFilterGroups
    registry_output_shapes("sfg", device)


def test_auxiliary_loss_is_the_weighted_kl_from_a_uniform_prior(device):
    torch.manual_seed(0)
    model = build("sfg", VEC, width=8, kl_weight=0.25).to(device)
    # logits start at 0: q is the uniform prior, so the KL is 0 up to rounding (sum q log q and
    # log 3 cancel exactly only for some numbers of filters)
    assert abs(model.auxiliary_loss().item()) < 1e-6
    with torch.no_grad():
        for logit in model.logits:
            logit.normal_()
    by_hand = sum((q * (q * 3).log()).sum() for q in model.assignment_probabilities())  # 3 groups
    torch.testing.assert_close(model.kl_divergence(), by_hand)
    torch.testing.assert_close(model.auxiliary_loss(), 0.25 * by_hand)
    model.kl_weight = 0.0
    assert model.auxiliary_loss().item() == 0.0


def test_a_harness_step_adds_the_kl_gradient_to_the_logits_only():
    x, targets = torch.randn(8, 6), {"a": torch.randn(8), "b": torch.randn(8, 2)}

    def step_gradients(kl_weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build("sfg", VEC, width=8, kl_weight=kl_weight)
        with torch.no_grad():
            for logit in model.logits:
                logit.normal_()
        harness_step(model, x, targets, lr=0.0)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, model

    with_kl, model = step_gradients(0.5)
    without, _ = step_gradients(0.0)
    model.zero_grad(set_to_none=True)
    (0.5 * model.kl_divergence()).backward()
    for name, grad in with_kl.items():
        if name.startswith("logits."):
            torch.testing.assert_close(grad - without[name], dict(model.named_parameters())[name].grad)
        else:
            torch.testing.assert_close(grad, without[name])


def test_kl_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="kl_weight"):
        build("sfg", VEC, kl_weight=-1.0)
    assert build("sfg", VEC, kl_weight=0.0).auxiliary_loss().item() == 0.0


def test_hard_assignment_forward_follows_the_stream_equations(device):
    """h_s' = z_s f(W h_s), h_t' = z_t f(W (h_s + h_t)), head_t(h_s + h_t), recomputed by hand
    for a hard assignment where each task has its own specialists in both layers."""
    torch.manual_seed(0)
    groups = [[0, 1, 2, 0, 1, 2], [2, 0, 1, 1, 0, 2]]
    model = build("sfg", VEC, width=6).to(device).eval()
    _force(model, groups)
    x = torch.randn(4, 6, device=device)
    shared, own = x, {t: torch.zeros_like(x) for t in VEC.tasks}
    for layer, g in zip(model.layers, groups):
        mask = {c: torch.tensor([float(v == c) for v in g], device=device) for c in range(3)}
        own = {t: mask[1 + k] * layer(shared + own[t]) for k, t in enumerate(VEC.tasks)}
        shared = mask[0] * layer(shared)
    out = model(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.heads[t](shared + own[t]))


def test_training_samples_use_the_models_temperature():
    model = build("sfg", VEC, width=8, tau=0.3)
    with torch.no_grad():
        for logit in model.logits:
            logit.normal_(generator=torch.Generator().manual_seed(2))
    model.generator = torch.Generator().manual_seed(5)
    sampled = model.assignments()
    g = torch.Generator().manual_seed(5)
    for z, logit in zip(sampled, model.logits):
        torch.testing.assert_close(z, sample_gumbel_softmax(logit, 0.3, g))


def test_default_kl_weight_is_one_in_a_thousand():
    assert build("sfg", VEC).kl_weight == 1e-3
    model = build("sfg", VEC, width=4)
    direct = StochasticFilterGroups(VEC.tasks, list(model.layers), [4, 4], model.heads)
    assert direct.kl_weight == 1e-3


def test_default_temperature_is_one():
    """The docstring's choice: temperature 1.0 (the first author's code uses 0.1), for both constructors."""
    model = build("sfg", VEC, width=4)
    assert model.tau == 1.0
    assert StochasticFilterGroups(VEC.tasks, list(model.layers), [4, 4], model.heads).tau == 1.0


def test_a_generator_given_to_the_constructor_draws_the_samples():
    """Training-mode samples come from the model's own generator, not from the global RNG."""
    model = build("sfg", VEC, width=4)
    direct = [StochasticFilterGroups(VEC.tasks, list(model.layers), [4, 4], model.heads,
                                     generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.manual_seed(0)
    first = direct[0].train().assignments()
    torch.manual_seed(1)
    second = direct[1].train().assignments()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_one_layer_with_more_groups_than_filters_has_zero_kl_at_the_start_and_one_hot_eval_rows():
    """Logits start at zero, so q is uniform and KL(q || uniform) = 0; in eval every filter's row is
    one-hot over the T + 1 groups, also when a layer has fewer filters than groups."""
    problem = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 1, "c": 1})
    model = build("sfg", problem, width=2, depth=1).eval()
    assert model.auxiliary_loss().item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.logits[0].copy_(torch.tensor([[0.0, 0, 0, 1], [0, 0, 1, 0]]))
    (z,) = model.assignments()
    assert torch.equal(z, torch.tensor([[0.0, 0, 0, 1], [0, 0, 1, 0]]))
