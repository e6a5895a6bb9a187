"""AdaShare: select-all = plain ResNet, skip-all = identity, deterministic eval, losses."""

import copy
import math

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.adashare import AdaShare

from .harness_probe import harness_step

TASKS = ("a", "b")
OUT = {"a": 2, "b": 1}


def make(num_blocks=3, **kw):
    torch.manual_seed(0)
    return AdaShare(TASKS, 3, OUT, channels=6, num_blocks=num_blocks, **kw)


def set_policy(model, task, select):
    with torch.no_grad():
        logits = model.policy_logits[task]
        for l, s in enumerate(select):
            logits[l] = torch.tensor([5.0, -5.0] if s else [-5.0, 5.0])


def test_select_all_equals_plain_residual_network(device):
    model = make().to(device).eval()
    set_policy(model, "a", [1, 1, 1])
    x = torch.randn(2, 3, 5, 5, device=device)
    h = torch.relu(model.stem(x))
    for block in model.blocks:
        h = block(h)
    assert torch.equal(model.features(x, "a"), h)


def test_skip_all_passes_input_through_and_mixed_policy_skips_exactly_those(device):
    model = make().to(device).eval()
    x = torch.randn(2, 3, 5, 5, device=device)
    stem = torch.relu(model.stem(x))
    set_policy(model, "a", [0, 0, 0])
    assert torch.equal(model.features(x, "a"), stem)
    set_policy(model, "b", [1, 0, 1])
    assert torch.equal(model.features(x, "b"), model.blocks[2](model.blocks[0](stem)))


def test_eval_policy_is_deterministic_training_policy_is_sampled(device):
    model = make().to(device)
    with torch.no_grad():
        model.policy_logits["a"].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2]]))
    model.eval()
    assert model.policy("a").tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(model.policy("a"), model.policy("a"))
    model.train()
    torch.manual_seed(1)
    samples = torch.stack([model.policy("a") for _ in range(200)])
    assert torch.all((samples > 0) & (samples < 1))  # soft relaxation
    assert samples.std(dim=0).min() > 0.01  # it is random
    model.hard = True
    hard = torch.stack([model.policy("a") for _ in range(200)])
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    # Straight-through samples follow the policy: block 0 selected more often than block 1.
    assert hard[:, 0].mean() > hard[:, 1].mean()


def test_policy_logits_learn_through_gumbel_relaxation(device):
    model = make().to(device).train()
    x = torch.randn(2, 3, 5, 5, device=device)
    model(x)["a"].square().sum().backward()
    assert model.policy_logits["a"].grad.abs().sum() > 0
    assert model.policy_logits["b"].grad is None
    assert all(p.grad is None for p in model.heads["b"].parameters())


def sharing_gap_at(block: int, device, num_blocks: int = 4) -> float:
    """Sharing loss when task a selects ``block`` (0-based) surely and every other choice is even."""
    model = make(num_blocks=num_blocks).to(device)
    with torch.no_grad():
        model.policy_logits["a"][block] = torch.tensor([10.0, -10.0])  # p ~ 1 against b's 1/2
    return model.sharing_loss().item()


def test_sharing_loss_zero_for_identical_policies_and_depth_weighted_as_eq4(device):
    assert make(num_blocks=4).to(device).sharing_loss().item() == 0.0
    # Eq. 4 (NeurIPS copy): ordered pairs, so (a, b) and (b, a) each count the gap 1/2, and block
    # l = 1..L weighs (L - l)/L: 3/4, 2/4, 1/4 and 0 for the top block.
    for block, weight in enumerate((0.75, 0.5, 0.25, 0.0)):
        assert sharing_gap_at(block, device) == pytest.approx(2 * 0.5 * weight, abs=1e-4), block


def test_sharing_loss_of_three_tasks_sums_every_pair():
    torch.manual_seed(0)
    model = AdaShare(("a", "b", "c"), 3, {"a": 1, "b": 1, "c": 1}, channels=6, num_blocks=3)
    with torch.no_grad():
        for task, logits in zip("abc", ([2.0, 0.0], [0.0, 0.0], [-1.0, 0.0])):
            model.policy_logits[task][0] = torch.tensor(logits)
    p = [torch.sigmoid(torch.tensor(z)).item() for z in (2.0, 0.0, -1.0)]  # select probabilities
    pairs = sum(abs(x - y) for x in p for y in p)  # ordered pairs; block l = 1 weighs (3 - 1)/3
    assert model.sharing_loss().item() == pytest.approx(2 / 3 * pairs, rel=1e-5)


def test_sparsity_loss_value_and_direction(device):
    model = make(num_blocks=3).to(device)
    expected = torch.tensor(6 * math.log(0.5), device=device)  # 2 tasks x 3 blocks, p = 1/2
    torch.testing.assert_close(model.sparsity_loss(), expected)
    model.sparsity_loss().backward()
    # Gradient descent on it lowers the select logit and raises the skip logit.
    g = model.policy_logits["a"].grad
    assert torch.all(g[:, 0] > 0) and torch.all(g[:, 1] < 0)


def test_parameter_count():
    c, blocks = 6, 3
    model = make(num_blocks=blocks)
    shared = (3 * c * 9 + c) + blocks * 2 * (c * c * 9 + c)
    per_task = {t: blocks * 2 + c * o + o for t, o in OUT.items()}
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training):
    first, last = short_training("adashare", dense, device, steps=15)
    assert last < 0.7 * first
    with pytest.raises(ValueError):
        registry.build("adashare", registry.Problem(("a", "b"), (4,), {"a": 1, "b": 1}))


def test_temperature_sets_how_soft_the_training_samples_are(device):
    """Gumbel-Softmax at tau: a huge tau gives u ~ 1/2 whatever the noise, a tiny one near 0/1."""
    model = make(tau=1e4).to(device).train()
    torch.manual_seed(2)
    soft = torch.stack([model.policy("a") for _ in range(100)])
    torch.testing.assert_close(soft, torch.full_like(soft, 0.5), atol=2e-3, rtol=0)
    model.tau = 1e-3
    sharp = torch.stack([model.policy("a") for _ in range(100)])
    assert torch.all((sharp < 1e-3) | (sharp > 1 - 1e-3))


def test_auxiliary_loss_is_the_weighted_regularisers_and_the_training_step_follows_it():
    """The harness adds auxiliary_loss() every step: without it the regularisers never shaped a policy."""
    x = torch.randn(4, 3, 6, 6)
    targets = {t: torch.randn(4, OUT[t], 6, 6) for t in TASKS}
    moved = {}
    for weights in ((0.0, 0.0), (0.3, 0.7)):
        model = make(sparsity_weight=weights[0], sharing_weight=weights[1])
        with torch.no_grad():
            model.policy_logits["a"].copy_(torch.randn(3, 2))  # policies that differ, so sharing is not 0
        start = copy.deepcopy(model)
        torch.testing.assert_close(model.auxiliary_loss(),
                                   weights[0] * model.sparsity_loss() + weights[1] * model.sharing_loss())
        torch.manual_seed(1)  # the same Gumbel samples in both steps
        harness_step(model, x, targets, lr=1.0)
        moved[weights] = [p0 - p1 for p0, p1 in zip(start.parameters(), model.parameters())]
    aux = 0.3 * start.sparsity_loss() + 0.7 * start.sharing_loss()
    grads = torch.autograd.grad(aux, list(start.parameters()), allow_unused=True)
    reached = {n for (n, _), g in zip(start.named_parameters(), grads) if g is not None}
    assert reached == {"policy_logits.a", "policy_logits.b"}
    for with_aux, without, g in zip(moved[(0.3, 0.7)], moved[(0.0, 0.0)], grads):
        torch.testing.assert_close(with_aux - without, torch.zeros_like(without) if g is None else g)
    with pytest.raises(ValueError, match="sharing_weight"):
        make(sharing_weight=-1.0)


def test_equal_logits_select_at_eval_and_documented_defaults(device):
    """Eval selects when select >= skip, so the initial (equal) policy runs every block; defaults as documented."""
    model = AdaShare(TASKS, 3, OUT, channels=6, num_blocks=3).to(device).eval()
    assert model.policy("a").tolist() == [1.0, 1.0, 1.0]
    x = torch.randn(2, 3, 5, 5, device=device)
    h = torch.relu(model.stem(x))
    for block in model.blocks:
        h = block(h)
    assert torch.equal(model.features(x, "b"), h)
    assert (model.tau, model.hard) == (5.0, False)
    assert (model.sparsity_weight, model.sharing_weight) == (0.01, 0.05)


def test_a_residual_block_is_relu_of_input_plus_conv2_relu_conv1_by_hand():
    """F(x) = ReLU(x + conv2(ReLU(conv1 x))), written out from the block's weights."""
    from torch.nn import functional as F
    from reference_impls.architectures.adashare import ResidualBlock

    torch.manual_seed(0)
    block, x = ResidualBlock(3), torch.randn(2, 3, 5, 5)
    inner = F.relu(F.conv2d(x, block.conv1.weight, block.conv1.bias, padding=1))
    torch.testing.assert_close(block(x), F.relu(x + F.conv2d(inner, block.conv2.weight, block.conv2.bias, padding=1)))


def test_select_probability_is_the_softmax_weight_of_the_select_column_by_hand():
    """p_{l,k} = e^select / (e^select + e^skip): column 0 is "select", column 1 "skip"."""
    model = make()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, -3.0]])
    with torch.no_grad():
        model.policy_logits["a"].copy_(logits)
    expected = [math.exp(s) / (math.exp(s) + math.exp(k)) for s, k in logits.tolist()]
    torch.testing.assert_close(model.select_probabilities("a"), torch.tensor(expected))


def test_sharing_loss_in_float64_has_the_exact_block_weights():
    """Eq. 4 in double precision: with L = 3 the weight 2/3 must not be rounded to float32 on the way."""
    model = make(num_blocks=3).double()
    with torch.no_grad():
        model.policy_logits["a"][0] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    gap = 1 / (1 + math.exp(-1.0)) - 0.5  # select probabilities sigmoid(1) against 1/2, block l = 1
    loss = model.sharing_loss()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, torch.tensor(2 * gap * 2 / 3, dtype=torch.float64), rtol=1e-12, atol=0)


def test_documented_ranges_are_accepted_and_the_rest_refused_by_name():
    """tau > 0 (the paper anneals it from 5 towards 0, so tau below 1 is valid); weights >= 0; channels >= 1."""
    assert make(tau=0.5).tau == 0.5
    for bad, name in ((dict(tau=0.0), "tau"), (dict(sparsity_weight=-0.1), "sparsity_weight"),
                      (dict(channels=0), "channels")):
        torch.manual_seed(0)
        with pytest.raises(ValueError, match=name):
            AdaShare(TASKS, 3, OUT, **{"num_blocks": 2, "channels": 4, **bad})


def test_registry_width_is_the_backbone_width():
    torch.manual_seed(0)
    model = registry.build("adashare", registry.Problem(("a", "b"), (3, 6, 6), {"a": 2}, dense=True), width=5)
    assert model.stem.out_channels == 5
    assert all(b.conv1.in_channels == b.conv2.out_channels == 5 for b in model.blocks)
