"""L2P: top-N cosine selection from a keyed prompt pool, the key-matching surrogate, pool of one = prompt tuning."""

import pytest
import torch

from reference_impls.architectures.l2p import L2P
from reference_impls.architectures.prompt_tuning import PromptTuning
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (12,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)


def small(problem=VEC, **kw):
    torch.manual_seed(0)
    return build("l2p", problem, width=8, num_heads=2, **kw)


def frozen_query(model, x):
    h = model.tokenizer(x)
    for layer in model.layers:
        h = layer(h)
    return h.mean(dim=1)


def test_selection_is_top_n_cosine_and_prompts_are_prepended(device):
    model = small(pool_size=5, prompt_length=2, top_n=2).to(device)
    x = torch.randn(4, 12, device=device)
    q, keys = frozen_query(model, x), model.pool.keys
    cosine = torch.stack([torch.stack([qi.dot(k) / (qi.norm() * k.norm()) for k in keys]) for qi in q])
    by_hand = torch.argsort(1 - cosine, dim=1)[:, :2]  # the two smallest distances γ = 1 - cos
    torch.testing.assert_close(model.pool.select(q), by_hand)
    h = torch.cat([torch.cat([model.pool.prompts[i] for i in row]).unsqueeze(0) for row in by_hand])
    h = torch.cat([h, model.tokenizer(x)], dim=1)  # [P_s1; P_s2; x_e]
    for layer in model.layers:
        h = layer(h)
    out = model(x)
    torch.testing.assert_close(out["a"], model.heads["a"].linear(h[:, :4].mean(dim=1)))  # f_avg: prompt positions


def test_each_example_picks_the_key_nearest_its_query(device):
    model = small(pool_size=4, top_n=1).to(device)
    x = torch.randn(4, 12, device=device)
    with torch.no_grad():
        model.pool.keys.copy_(3.0 * frozen_query(model, x).flip(0))  # scale does not matter for cosine
    assert model.pool.select(model.query(x))[:, 0].tolist() == [3, 2, 1, 0]


def test_key_matching_loss_by_hand_and_what_it_trains(device, params_with_grad):
    model = small(pool_size=5, top_n=3).to(device)
    x = torch.randn(6, 12, device=device)
    q, keys = frozen_query(model, x), model.pool.keys
    gamma = 1 - torch.nn.functional.cosine_similarity(q[:, None], keys[None], dim=-1)  # (B, M)
    expected = gamma.sort(dim=1).values[:, :3].sum(dim=1).mean()
    torch.testing.assert_close(model.key_matching_loss(x), expected)
    assert params_with_grad(model, model.key_matching_loss(x)) == {"pool.keys"}
    # the task loss never reaches the keys (hard top-N), only the chosen prompts and the head
    touched = params_with_grad(model, model(x)["b"].square().sum())
    assert touched == {"pool.prompts", "heads.b.linear.weight", "heads.b.linear.bias"}
    chosen = model.pool.select(model.query(x)).unique()
    unused = [i for i in range(5) if i not in chosen.tolist()]
    assert model.pool.prompts.grad[unused].abs().sum() == 0 and model.pool.prompts.grad[chosen].abs().sum() > 0


def test_surrogate_pulls_the_selected_keys_to_the_queries(device):
    model = small(pool_size=4, top_n=1).to(device)
    x = torch.randn(8, 12, device=device)
    opt = torch.optim.Adam([model.pool.keys], lr=1e-1)
    losses = []
    for _ in range(12):
        loss = model.key_matching_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_pool_of_one_prompt_is_prompt_tuning_with_one_shared_prompt(device):
    model = small(IMG, pool_size=1, prompt_length=3, top_n=1).to(device)
    tuning = PromptTuning(IMG.tasks, model.tokenizer, model.layers, model.heads, prompt_length=3).to(device)
    with torch.no_grad():
        for t in IMG.tasks:
            tuning.prompts[t].copy_(model.pool.prompts[0])
    x = torch.randn(3, 2, 4, 4, device=device)
    for t in IMG.tasks:
        torch.testing.assert_close(model(x)[t], tuning(x)[t])  # dense heads read the input positions


def test_parameter_count_and_frozen_backbone(n_params):
    w, size, length = 8, 5, 3
    model = small(pool_size=size, prompt_length=length, top_n=2)
    heads = {"a": w + 1, "b": 2 * w + 2}
    for t in VEC.tasks:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == heads[t]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == size * length * w + size * w + sum(heads.values())  # M L_p d + M d + heads
    assert n_params(model) > trainable and type(model) is L2P
    with pytest.raises(ValueError):
        small(pool_size=2, top_n=3)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("l2p", device)
    first, last = short_training("l2p", dense, device, steps=40)
    assert last < 0.8 * first


def test_auxiliary_loss_is_the_weighted_surrogate_of_the_last_forward_pass(device):
    model = small(key_weight=0.3).to(device)
    with pytest.raises(RuntimeError, match="call the model first"):
        model.auxiliary_loss()
    x = torch.randn(5, 12, device=device)
    model(x)
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * model.key_matching_loss(x))
    model.auxiliary_loss().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["pool.keys"]


def test_default_key_weight_is_the_papers_half(device):
    model = small().to(device)  # λ = 0.5 unless told otherwise (Sec. 5.2: "λ = 0.5 consistently")
    x = torch.randn(5, 12, device=device)
    model(x)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * model.key_matching_loss(x))


def test_prompts_and_keys_start_uniform_in_the_unit_interval():
    model = small(pool_size=10, prompt_length=2)  # 160 prompt entries and 80 key entries
    for p in (model.pool.prompts, model.pool.keys):
        assert p.min() >= 0 and p.max() < 1
        assert p.min() < 0.1 and p.max() > 0.9  # U[0, 1), not a narrower or shifted interval
