import copy

import pytest
import torch

from reference_impls.architectures.adamtl import AdaMTL
from reference_impls.architectures.registry import Problem, build

from .harness_probe import harness_step

VEC = Problem(("a", "b"), (5,), {"a": 1, "b": 2})
IMG = Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)


def _force(model, task, logits):
    """Make ``task``'s policy output constant ``logits`` for every input."""
    last = model.policies[task][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(logits))


def test_skipped_block_is_the_identity(device):
    torch.manual_seed(0)
    model = build("adamtl", VEC, num_blocks=3).to(device).eval()
    _force(model, "a", [5.0, -5.0, 5.0])
    _force(model, "b", [-5.0, -5.0, 5.0])  # union: blocks 0 and 2 run, block 1 skipped
    x = torch.randn(4, 5, device=device)
    z = model.stem(x)
    z = z + model.blocks[0](z)
    z = z + model.blocks[2](z)
    torch.testing.assert_close(model.encode(x), z)
    # the default target is the official 0.9
    torch.testing.assert_close(model.efficiency_loss(), torch.tensor((2 / 3 - 0.9) ** 2, device=device))


def test_union_of_task_policies_decides(device):
    model = build("adamtl", VEC, num_blocks=3).to(device).eval()
    _force(model, "a", [5.0, -5.0, -5.0])
    _force(model, "b", [-5.0, 5.0, -5.0])
    mask = model.block_mask(model.stem(torch.randn(2, 5, device=device)))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0, 0.0]] * 2, device=device))


def test_evaluation_decides_by_the_sign_of_the_logit_without_noise(device):
    """Near-zero logits would flip under Gumbel noise; at evaluation they must not."""
    model = build("adamtl", VEC, num_blocks=3).to(device).eval()
    _force(model, "a", [0.2, -0.2, 0.2])
    _force(model, "b", [-50.0, -50.0, -50.0])
    mask = model.block_mask(model.stem(torch.randn(64, 5, device=device)))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 0.0, 1.0]] * 64, device=device))


def test_image_policies_read_the_spatial_mean_of_the_stem(device):
    torch.manual_seed(5)
    model = build("adamtl", IMG, width=4).to(device)
    z = model.stem(torch.randn(2, 3, 8, 8, device=device))
    for t, logits in model.policy_logits(z).items():
        torch.testing.assert_close(logits, model.policies[t](z.mean(dim=(2, 3))))


def test_decisions_depend_on_the_input(device):
    torch.manual_seed(1)
    model = build("adamtl", VEC, num_blocks=3).to(device).eval()
    with torch.no_grad():
        for t in VEC.tasks:
            model.policies[t][-1].weight.mul_(50)
    masks = model.block_mask(model.stem(torch.randn(64, 5, device=device) * 3))
    assert (masks != masks[:1]).any()  # not the same decision for every input


def test_straight_through_gradient_is_the_relaxed_sigmoid_derivative():
    torch.manual_seed(2)
    model = build("adamtl", VEC, num_blocks=3, seed=11, tau=5.0)
    model.train()
    _force(model, "b", [-50.0, -50.0, -50.0])  # b never asks: the mask is a's sample alone
    z = model.stem(torch.randn(1, 5)).detach()
    logits = model.policy_logits(z)["a"].detach().requires_grad_()
    model.generator.manual_seed(11)
    u = torch.rand(logits.shape, generator=model.generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((logits + u.log() - (-u).log1p()) / 5.0)
    model.generator.manual_seed(11)
    mask = model.block_mask(z)
    torch.testing.assert_close(mask, (s > 0.5).float())  # forward: hard 0/1
    # backward: d mask / d logit_a = s (1 - s) / tau, via the policy's last bias (= the logit)
    mask.sum().backward()
    torch.testing.assert_close(model.policies["a"][-1].bias.grad, (s * (1 - s) / 5.0).detach()[0])


def test_policies_are_shared_heads_are_not(device, params_with_grad):
    torch.manual_seed(3)
    model = build("adamtl", VEC, num_blocks=3).to(device).train()
    _force(model, "a", [0.0, 0.0, 0.0])
    _force(model, "b", [-50.0, -50.0, -50.0])
    touched = params_with_grad(model, model(torch.randn(8, 5, device=device))["b"].square().sum())
    assert any(n.startswith("policies.a.") for n in touched)  # a's policy shapes b's features
    assert not any(n.startswith("heads.a") for n in touched)
    assert {id(p) for p in model.task_specific_parameters("b")} == {id(p) for p in model.heads["b"].parameters()}


def test_dense_outputs_and_efficiency_gradient(device):
    torch.manual_seed(4)
    model = build("adamtl", IMG, width=4).to(device).train()
    out = model(torch.randn(2, 3, 8, 8, device=device))
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)
    model.efficiency_loss().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.policies.parameters())


def test_short_training_lowers_the_loss(device, short_training):
    before, after = short_training("adamtl", True, device, 30)
    assert after < 0.7 * before


def test_registry_name_builds_the_catalogued_class():
    assert type(build("adamtl", VEC)) is AdaMTL


def test_auxiliary_loss_is_the_weighted_efficiency_loss_and_the_training_step_follows_it():
    """The harness adds auxiliary_loss() to the task losses: without it the target set no budget."""
    x = torch.randn(8, 5)
    targets = {"a": torch.randn(8, 1), "b": torch.randn(8, 2)}
    moved = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = build("adamtl", VEC, num_blocks=3, efficiency_weight=weight).train()
        start = copy.deepcopy(model)
        model(x)
        torch.testing.assert_close(model.auxiliary_loss(), weight * model.efficiency_loss())
        model.generator.manual_seed(0)
        harness_step(model, x, targets, lr=1.0)
        moved[weight] = {n: p0 - p1 for (n, p0), p1 in zip(start.named_parameters(), model.parameters())}
    start.generator.manual_seed(0)
    start(x)
    grads = torch.autograd.grad(0.5 * start.efficiency_loss(), list(start.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for (n, g) in zip(moved[0.5], grads):
        torch.testing.assert_close(moved[0.5][n] - moved[0.0][n], torch.zeros_like(moved[0.5][n]) if g is None else g)
    assert build("adamtl", VEC).efficiency_weight == 1.0
    with pytest.raises(ValueError, match="efficiency_weight"):
        build("adamtl", VEC, efficiency_weight=-1.0)


def test_efficiency_loss_is_the_batch_mean_of_each_input_s_squared_gap(device):
    """As in the official loss (an MSE over per-input fractions): every input is held to the
    budget, so one input running all blocks and one running none do not average to the target."""
    model = build("adamtl", VEC, num_blocks=2, target=0.5).to(device)
    model._last_mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]], device=device)  # fractions 1 and 0
    torch.testing.assert_close(model.efficiency_loss(), torch.tensor(0.25, device=device))


def test_each_decision_gates_its_own_block(device):
    """Decision i runs block i: with distinct blocks, a lone decision picks out which one runs.
    (The blocks start as copies of one block, so they are made distinct first.)"""
    torch.manual_seed(6)
    model = build("adamtl", VEC, num_blocks=3).to(device).eval()
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.normal_()
    x = torch.randn(4, 5, device=device)
    z = model.stem(x)
    _force(model, "b", [-5.0, -5.0, -5.0])
    for i in range(3):
        _force(model, "a", [5.0 if j == i else -5.0 for j in range(3)])
        torch.testing.assert_close(model.encode(x), z + model.blocks[i](z))


def test_policy_logits_are_a_relu_mlp_of_the_stem_features_by_hand(device):
    """l_t = W2 relu(W1 z + b1) + b2, written out from the policy's weights in float64."""
    torch.manual_seed(0)
    model = build("adamtl", VEC, num_blocks=3).to(device).double()
    z = model.stem(torch.randn(6, 5, device=device, dtype=torch.float64))
    for t, logits in model.policy_logits(z).items():
        first, last = model.policies[t][0], model.policies[t][-1]
        hidden = (z @ first.weight.T + first.bias).clamp_min(0)
        torch.testing.assert_close(logits, hidden @ last.weight.T + last.bias, rtol=1e-12, atol=1e-12)


def test_every_block_has_its_own_weights():
    # the blocks are copies of one template, not the same module repeated (no weight tying)
    model = build("adamtl", VEC, num_blocks=3)
    ids = [{id(p) for p in block.parameters()} for block in model.blocks]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_any_positive_temperature_is_accepted_and_zero_refused():
    build("adamtl", VEC, tau=0.5)
    with pytest.raises(ValueError, match="tau"):
        build("adamtl", VEC, tau=0.0)


def test_the_efficiency_loss_needs_a_forward_pass_first():
    with pytest.raises(RuntimeError):
        build("adamtl", VEC).efficiency_loss()
