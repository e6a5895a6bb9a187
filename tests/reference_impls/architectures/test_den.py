"""DEN: nested groups, level 0 skips a block, per-instance levels, the REINFORCE reward by hand."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.den import DeepElasticNetwork, group_bounds
from reference_impls.architectures.registry import Problem, build

from .conftest import names_under, reached_by_no_other

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_group_bounds_follow_the_official_split():
    assert group_bounds(16) == [0, 4, 8, 16]  # groups C/4, C/4, C/2
    assert group_bounds(32, groups=2) == [0, 16, 32]
    with pytest.raises(ValueError):
        group_bounds(6, groups=3)


def test_levels_by_hand(device):
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    x = torch.randn(3, 6, device=device)
    h = model.stem(x)
    block = model.blocks[0]
    for level, active in enumerate(group_bounds(16)):
        hidden = torch.relu(F.linear(h, block.inner.weight, block.inner.bias))[:, :active]
        expected = h + hidden @ block.outer.weight[:, :active].T
        got = block(h, torch.full((3,), active, device=device))
        torch.testing.assert_close(got, expected)
        if level == 0:
            torch.testing.assert_close(got, h)  # level 0 skips the block


def test_a_level_uses_only_its_groups(device):
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    x = torch.randn(4, 6, device=device)
    levels = torch.ones(4, 2, dtype=torch.long, device=device)  # first group (4 channels) only
    model.forward_task(x, "a", levels).sum().backward()
    for block in model.blocks:
        assert block.inner.weight.grad[4:].abs().sum() == 0 and block.inner.weight.grad[:4].abs().sum() > 0
        assert block.outer.weight.grad[:, 4:].abs().sum() == 0


def test_each_instance_runs_its_own_configuration(device):
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    x = torch.randn(3, 6, device=device)
    levels = torch.tensor([[0, 3], [2, 1], [3, 3]], device=device)
    together = model.forward_task(x, "b", levels)
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], model.forward_task(x[i : i + 1], "b", levels[i : i + 1]))
    h = model.stem(x[2:])  # the top level is the ordinary residual network
    for block in model.blocks:
        h = h + block.outer(torch.relu(block.inner(h)))
    plain = model.heads["b"](h)
    torch.testing.assert_close(together[2:], plain)


def test_forward_uses_the_selectors_most_likely_levels(device):
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    x = torch.randn(5, 6, device=device)
    probs = model.policy(x, "a")
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 2, device=device))
    out = model(x)
    for t in VEC.tasks:  # each task with its own selector head
        torch.testing.assert_close(out[t], model.forward_task(x, t, model.policy(x, t).argmax(-1)))
    assert not torch.equal(model.select(x, "a"), model.select(x, "b"))


def test_reward_and_selector_loss_by_hand(device):
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    levels = torch.tensor([[3, 1], [0, 2]], device=device)
    u = (16 + 4 + 0 + 8) / 4 / 16  # channel fraction averaged over blocks and batch
    losses = torch.tensor([0.5, 2.0], device=device)
    torch.testing.assert_close(model.reward(losses, levels, rho=10.0),
                               (1 - u**2) / 10 - losses + 1)
    small, full = torch.zeros_like(levels), torch.full_like(levels, 3)
    assert (model.reward(losses, small, 10.0) > model.reward(losses, full, 10.0)).all()  # same loss: smaller wins
    x = torch.randn(2, 6, device=device)
    loss_fn = lambda out: (out - 1).square().mean(1)  # noqa: E731
    got = model.selector_loss(x, "b", loss_fn, torch.Generator().manual_seed(3))
    sampled = model.sample_levels(model.policy(x, "b"), 0.0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        r = model.reward(loss_fn(model.forward_task(x, "b", sampled)), sampled, 10.0)
    logp = model.policy(x, "b").gather(-1, sampled.unsqueeze(-1)).squeeze(-1).log().sum(-1)
    torch.testing.assert_close(got, (-logp * r).mean())


def test_sampling_follows_the_policy_and_explores():
    model = build("den", VEC, width=16)
    probs = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]).expand(200, 2, 4)
    assert (model.sample_levels(probs, 0.0, torch.Generator().manual_seed(0)) == 2).all()
    explored = model.sample_levels(probs, 1.0, torch.Generator().manual_seed(0))
    assert set(explored.unique().tolist()) == {0, 1, 2, 3}
    policy = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(4000, 2, 4)
    levels = model.sample_levels(policy, 0.0, torch.Generator().manual_seed(1))
    freq = torch.stack([(levels == k).float().mean() for k in range(4)])
    torch.testing.assert_close(freq, policy[0, 0], atol=0.02, rtol=0)


def test_exploration_replaces_a_whole_examples_policy():
    """With probability epsilon per example (not per block) every block of it explores."""
    model = build("den", VEC, width=16, num_blocks=4)
    probs = torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(4000, 4, 4)
    levels = model.sample_levels(probs, 0.5, torch.Generator().manual_seed(2))
    on_policy = (levels == 2).all(dim=1).float().mean().item()
    assert 0.47 < on_policy < 0.56  # 1/2, plus explorers that happen to hit level 2 in all 4 blocks


def test_selector_gets_the_only_gradient_a_reinforce_step(device, params_with_grad):
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    x = torch.randn(1, 6, device=device)
    zero_loss = lambda out: out.new_zeros(out.shape[0])  # noqa: E731 - equal accuracy everywhere
    touched = params_with_grad(model, model.selector_loss(x, "a", zero_loss, torch.Generator().manual_seed(0)))
    assert touched and all(n.startswith(("selector_body", "selector_heads.a")) for n in touched)
    # d/dlogits of -log p(k) * R is -R * (onehot(k) - p): the sampled levels are pushed up by R
    levels = model.sample_levels(model.policy(x, "a"), 0.0, torch.Generator().manual_seed(0))
    r = model.reward(torch.zeros(1, device=device), levels, rho=10.0)
    p = model.policy(x, "a").detach()[0]
    expected = -r * (F.one_hot(levels[0], 4).to(p) - p)
    torch.testing.assert_close(model.selector_heads["a"].bias.grad.view(2, 4), expected)
    real_loss = lambda out: (out - 1).square().mean(1)  # noqa: E731 - the reward reads the estimator
    touched = params_with_grad(model, model.selector_loss(x, "a", real_loss, torch.Generator().manual_seed(0)))
    assert touched and all(n.startswith(("selector_body", "selector_heads.a")) for n in touched)


def test_each_task_claims_its_head_and_its_selector_head(device, split_by_task, params_with_grad):
    """The task enters the selector through its own output layer: that layer and the task's head are its own."""
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device)
    x = torch.randn(4, 6, device=device)
    split = split_by_task(model, x)
    loss_fn = lambda out: (out - 1).square().mean(1)  # noqa: E731
    for t in VEC.tasks:
        assert split[t][0] == names_under(model, f"heads.{t}.", f"selector_heads.{t}.")
        assert names_under(model, f"heads.{t}.") <= reached_by_no_other(split, t)
        touched = params_with_grad(model, model.selector_loss(x, t, loss_fn, torch.Generator().manual_seed(0)))
        assert touched & names_under(model, "selector_heads.") == names_under(model, f"selector_heads.{t}.")


def test_registry_build_and_short_training(device, short_training, registry_output_shapes):
    assert type(build("den", VEC)) is DeepElasticNetwork
    registry_output_shapes("den", device)
    for dense in (True, False):
        first, last = short_training("den", dense, device, 15)
        assert last < 0.8 * first


def _affine(layer, t):
    return t @ layer.weight.T + (layer.bias if layer.bias is not None else 0)


def test_full_level_features_are_a_relu_stem_then_residual_relu_blocks_by_hand(device):
    """h0 = relu(W_s x + b_s), h <- h + W2 relu(W1 h + b1), from the weights in float64."""
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device).double()
    x = torch.randn(4, 6, device=device, dtype=torch.float64)
    h = _affine(model.stem[0], x).clamp_min(0)
    for block in model.blocks:
        h = h + _affine(block.outer, _affine(block.inner, h).clamp_min(0))
    got = model.forward_task(x, "a", model.full_levels(4, device))
    torch.testing.assert_close(got, model.heads["a"](h), rtol=1e-12, atol=1e-12)


def test_selector_policy_is_a_softmax_over_levels_of_a_relu_network_by_hand(device):
    """p = softmax_levels(W_t relu(W_b x + b_b) + b_t), from the weights in float64."""
    torch.manual_seed(0)
    model = build("den", VEC, width=16).to(device).double()
    x = torch.randn(4, 6, device=device, dtype=torch.float64)
    for t in VEC.tasks:
        hidden = _affine(model.selector_body[0], x).clamp_min(0)
        logits = _affine(model.selector_heads[t], hidden).view(4, len(model.blocks), model.num_levels)
        torch.testing.assert_close(model.policy(x, t), logits.softmax(-1), rtol=1e-12, atol=1e-12)


IMG = Problem(("a", "b"), (2, 5, 5), {"a": 1, "b": 2})


def test_the_smallest_nested_split_has_one_channel_groups():
    """Width 4 in three groups: C/4, C/4, C/2 = 1, 1, 2 channels, all non-empty, so it is allowed."""
    assert group_bounds(4) == [0, 1, 2, 4]
    assert group_bounds(2, groups=2) == [0, 1, 2]


@pytest.mark.parametrize("problem", [VEC, IMG], ids=["vector", "image"])
def test_a_block_is_relu_of_a_biased_first_layer_then_an_unbiased_second_one(problem):
    """x + W2 (m_k * relu(W1 x + b1)): only W1 has a bias, so level 0 is exactly the identity."""
    torch.manual_seed(0)
    model = build("den", problem, width=8, num_blocks=3)
    assert len(model.blocks) == 3
    for block in model.blocks:
        assert block.inner.bias is not None and block.outer.bias is None
    h = model.stem(torch.randn(2, *problem.input_shape))
    torch.testing.assert_close(model.blocks[0](h, torch.zeros(2, dtype=torch.long)), h, rtol=0, atol=0)


def test_the_default_width_builds():
    """The constructor's default width must split into the default three nested groups."""
    model = DeepElasticNetwork(VEC.tasks, VEC.input_shape, {t: torch.nn.Identity() for t in VEC.tasks})
    assert model.bounds == group_bounds(model.width)


def test_image_selector_is_a_same_size_relu_conv_then_a_global_mean_by_hand():
    """p = softmax_levels(W_t mean_pixels(relu(conv3x3_same(x))) + b_t), in float64."""
    torch.manual_seed(0)
    model = build("den", IMG, width=8).double()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    conv = model.selector_body[0]
    hidden = F.conv2d(x, conv.weight, conv.bias, padding=1).clamp_min(0).mean(dim=(2, 3))
    for t in IMG.tasks:
        logits = _affine(model.selector_heads[t], hidden).view(3, len(model.blocks), model.num_levels)
        torch.testing.assert_close(model.policy(x, t), logits.softmax(-1), rtol=1e-12, atol=1e-12)


def test_sampling_draws_only_from_the_given_generator_as_the_rule_says():
    """Per example: explore with probability epsilon (one uniform), then a random softmax of its own
    (one uniform per level and block), then inverse-CDF sampling with one uniform per block. The global
    RNG is not touched, so a seeded generator reproduces the levels whatever else ran before."""
    model = build("den", VEC, width=16, num_blocks=3)
    probs = torch.softmax(torch.randn(50, 3, 4, generator=torch.Generator().manual_seed(5)), -1)
    g = torch.Generator().manual_seed(7)
    explore = torch.rand(50, 1, 1, generator=g) < 0.5
    noise = torch.rand(50, 3, 4, generator=g).softmax(-1)
    u = torch.rand(50, 3, 1, generator=g)
    cdf = torch.where(explore, noise, probs).cumsum(-1)
    expected = torch.tensor([[sum(float(cdf[i, j, k]) < float(u[i, j]) for k in range(3)) for j in range(3)]
                             for i in range(50)])
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(model.sample_levels(probs, 0.5, torch.Generator().manual_seed(7)), expected)


def test_selector_loss_stays_finite_when_exploration_picks_a_level_of_zero_probability():
    """The policy can underflow to probability 0 for a level that exploration still picks: the small
    constant inside the log keeps the REINFORCE loss finite."""
    model = build("den", VEC, width=16)
    with torch.no_grad():
        for head in model.selector_heads.values():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 200.0]).repeat(len(model.blocks)))
    assert (model.policy(torch.randn(2, 6), "a")[..., :3] == 0).all()  # the float32 softmax underflows
    loss = model.selector_loss(torch.randn(64, 6), "a", lambda out: out.square().flatten(1).mean(1),
                               torch.Generator().manual_seed(0), epsilon=1.0)
    assert torch.isfinite(loss)
