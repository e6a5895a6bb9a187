"""MPT: P_k = P* ∘ (u_k v_k^T) by hand, rank one, l d + K (l + d) parameters, u = v = 1 shares P*."""

import pytest
import torch

from reference_impls.architectures.mpt import MPT
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})


def test_task_prompt_is_the_shared_prompt_times_a_rank_one_matrix(device):
    torch.manual_seed(0)
    model = build("mpt", VEC, width=8, num_heads=2, prompt_length=5).to(device)
    with torch.no_grad():
        for t in VEC.tasks:
            model.u[t].normal_(), model.v[t].normal_()
    p_star, u, v = model.shared_prompt, model.u["a"][:, 0], model.v["a"][:, 0]
    by_hand = torch.stack([torch.stack([p_star[i, j] * u[i] * v[j] for j in range(8)]) for i in range(5)])
    torch.testing.assert_close(model.task_prompt("a"), by_hand)
    singular = torch.linalg.svdvals(model.task_prompt("b") / p_star)
    assert singular[1] < 1e-5 * singular[0]  # the task's twist of P* is rank one
    assert not torch.allclose(model.task_prompt("a"), model.task_prompt("b"))


def test_forward_prepends_the_task_prompt_to_the_frozen_transformer(device):
    torch.manual_seed(0)
    model = build("mpt", VEC, width=8, num_heads=2, prompt_length=3).to(device)
    x = torch.randn(4, 12, device=device)
    prompt = model.shared_prompt * torch.outer(model.u["b"][:, 0], model.v["b"][:, 0])
    h = torch.cat([prompt.expand(4, -1, -1), model.tokenizer(x)], dim=1)
    for layer in model.layers:
        h = layer(h)
    torch.testing.assert_close(model(x)["b"], model.heads["b"](h[:, 3:]))


def test_unit_factors_give_every_task_the_shared_prompt(device):
    """u_k = v_k = 1: prompt tuning with one prompt shared by all tasks."""
    torch.manual_seed(0)
    model = build("mpt", VEC, width=8, num_heads=2).to(device)
    x = torch.randn(4, 12, device=device)
    with torch.no_grad():
        model.heads["b"].linear.weight[:1].copy_(model.heads["a"].linear.weight)
        model.heads["b"].linear.bias[:1].copy_(model.heads["a"].linear.bias)
        assert not torch.equal(model.task_prompt("a"), model.task_prompt("b"))  # noise at init
        for t in VEC.tasks:
            model.u[t].fill_(1.0), model.v[t].fill_(1.0)
        out = model(x)
    torch.testing.assert_close(model.task_prompt("a"), model.shared_prompt)
    torch.testing.assert_close(out["a"], out["b"][:, :1])


@pytest.mark.parametrize("rank", (1, 2))
def test_every_task_starts_from_the_shared_prompt(rank):
    """u_k v_k^T starts near the all-ones matrix, whatever the rank: P_k starts near P*."""
    torch.manual_seed(0)
    model = build("mpt", VEC, width=8, num_heads=2, prompt_length=5, rank=rank)
    for t in VEC.tasks:
        twist = model.u[t] @ model.v[t].T
        assert (twist - 1).abs().max() < 0.2 and not torch.equal(twist, torch.ones_like(twist))


@pytest.mark.parametrize("rank", (1, 2))
def test_parameter_counts(rank):
    w, length, depth = 8, 5, 2
    model = build("mpt", VEC, width=w, depth=depth, num_heads=2, prompt_length=length, rank=rank)
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:  # r (l + d) per task instead of prompt tuning's l d
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == rank * (length + w) + heads[t]
    trainable_shared = [p for p in model.shared_parameters() if p.requires_grad]
    assert len(trainable_shared) == 1 and trainable_shared[0].numel() == length * w  # P* only


def test_only_the_shared_prompt_and_the_tasks_own_factors_learn(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mpt", VEC, width=8, num_heads=2).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 12, device=device))["a"].square().sum())
    assert touched == {"shared_prompt", "u.a", "v.a", "heads.a.linear.weight", "heads.a.linear.bias"}
    assert type(model) is MPT


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("mpt", device)
    first, last = short_training("mpt", dense, device, steps=30)
    assert last < 0.8 * first
