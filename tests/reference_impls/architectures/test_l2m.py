import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.architectures.l2m import L2M
from reference_impls.architectures.lora import LoRA
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def with_random_updates(model: L2M) -> L2M:
    """Give every modulator a non-zero B so that which one is retrieved shows in the output."""
    with torch.no_grad():
        for p in model.pool.up.parameters():
            p.normal_()
    return model


def test_retrieval_is_argmax_cosine_to_the_keys_by_hand(device):
    torch.manual_seed(0)
    model = build("l2m", VEC, width=4, pool_size=3).to(device)
    with torch.no_grad():
        model.pool.keys.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0], [-1.0, 0, 0, 5.0]]))
    x = torch.randn(16, 6, device=device)
    q = torch.relu(x @ model.embedding.weight.T + model.embedding.bias)  # the frozen embedding
    cos = torch.stack([F.cosine_similarity(q, k.expand_as(q), dim=1) for k in model.pool.keys], dim=1)
    expected = cos.argmax(dim=1)
    assert torch.equal(model.retrieve(x), expected)
    assert len(expected.unique()) > 1  # the batch really is split between modulators
    torch.testing.assert_close(model.key_pull_loss(x), -cos.max(dim=1).values.mean())


def test_image_queries_average_the_embedding_over_pixels(device):
    torch.manual_seed(6)
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)
    model = build("l2m", problem, width=4, pool_size=4).to(device)
    x = torch.randn(16, 2, 4, 4, device=device) * 2
    q = torch.relu(model.embedding(x)).mean(dim=(2, 3))
    cos = F.normalize(q, dim=1) @ F.normalize(model.pool.keys, dim=1).T
    assert torch.equal(model.retrieve(x), cos.argmax(dim=1))
    torch.testing.assert_close(model.key_pull_loss(x), -cos.max(dim=1).values.mean())


def _modulated_by_hand(model: L2M, x: torch.Tensor, scale: float) -> torch.Tensor:
    """h = W0 h + scale B_j A_j h in the one modulated layer, one example at a time."""
    h, chosen = model.embed(x), model.retrieve(x)
    layer = model.layers[0]
    rows = []
    for n, j in enumerate(chosen.tolist()):
        a, b = model.pool.down[j][0].weight, model.pool.up[j][0].weight
        rows.append(torch.relu(layer(h[n]) + scale * b @ (a @ h[n])))
    return torch.stack(rows)


def test_each_example_is_modulated_by_its_retrieved_lora_only(device):
    torch.manual_seed(1)
    model = with_random_updates(build("l2m", VEC, width=4, pool_size=3, rank=2).to(device))
    x = torch.randn(10, 6, device=device)
    torch.testing.assert_close(model.features(x), _modulated_by_hand(model, x, 2.0))  # alpha = 2r: scale 2


def test_an_explicit_alpha_is_divided_by_the_rank():
    torch.manual_seed(1)
    model = with_random_updates(build("l2m", VEC, width=4, pool_size=3, rank=2, alpha=3.0))
    x = torch.randn(10, 6)
    torch.testing.assert_close(model.features(x), _modulated_by_hand(model, x, 1.5))  # alpha / r = 3 / 2


def test_the_query_carries_no_gradient_and_the_key_weight_defaults_to_the_official_half():
    embedded = torch.randn(3, 4, requires_grad=True)
    assert not L2M.query_of(embedded).requires_grad
    assert not L2M.query_of(embedded.view(3, 1, 2, 2)).requires_grad
    torch.manual_seed(0)
    model = build("l2m", VEC)
    x = torch.randn(5, 6)
    model(x)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * model.key_pull_loss(x))


def test_untrained_model_is_the_frozen_backbone(device):
    torch.manual_seed(2)
    model = build("l2m", VEC).to(device)
    x = torch.randn(5, 6, device=device)
    plain = torch.relu(model.layers[0](model.embed(x)))
    torch.testing.assert_close(model(x)["b"], model.heads["b"](plain), rtol=0, atol=0)


def test_task_loss_trains_only_retrieved_modulators_and_pull_loss_only_their_keys(device, params_with_grad):
    torch.manual_seed(3)
    model = with_random_updates(build("l2m", VEC, width=4, pool_size=4).to(device))
    x = torch.randn(3, 6, device=device)
    chosen = set(model.retrieve(x).tolist())
    assert len(chosen) < 4
    touched = params_with_grad(model, model(x)["a"].square().sum())
    pool = {int(n.split(".")[2]) for n in touched if n.startswith("pool.")}
    assert pool == chosen and "pool.keys" not in touched
    assert not any(n.startswith(("embedding", "layers", "heads.b")) for n in touched)
    assert all(not p.requires_grad for p in [*model.embedding.parameters(), *model.layers.parameters()])
    model.zero_grad()
    model.key_pull_loss(x).backward()
    rows = model.pool.keys.grad.abs().sum(dim=1) > 0
    assert set(rows.nonzero().flatten().tolist()) == chosen


def test_pull_loss_moves_keys_towards_their_queries():
    torch.manual_seed(4)
    model = build("l2m", VEC, pool_size=3)
    x = torch.randn(32, 6)
    opt = torch.optim.SGD([model.pool.keys], lr=0.5)
    first = model.key_pull_loss(x).item()
    for _ in range(20):
        opt.zero_grad()
        model.key_pull_loss(x).backward()
        opt.step()
    assert model.key_pull_loss(x).item() < first - 0.05


def test_a_pool_of_one_is_lora_with_one_update_for_every_task(device):
    torch.manual_seed(5)
    model = with_random_updates(build("l2m", VEC, pool_size=1, rank=2, depth=3).to(device))
    layers = [copy.deepcopy(model.embedding), *copy.deepcopy(model.layers)]
    backbone = nn.Sequential(*(m for layer in layers for m in (layer, nn.ReLU())))  # L2M's ReLU after each
    lora = LoRA(VEC.tasks, backbone, copy.deepcopy(model.heads), rank=2, alpha=4.0).to(device)
    with torch.no_grad():
        for t in VEC.tasks:  # layer 0 (the embedding) keeps B = 0; the others get the one modulator
            for i in range(len(model.layers)):
                lora.layers[i + 1].down[t].weight.copy_(model.pool.down[0][i].weight)
                lora.layers[i + 1].up[t].weight.copy_(model.pool.up[0][i].weight)
    x = torch.randn(4, 6, device=device)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], lora(x)[t])


def test_parameter_count(n_params):
    d, w, r, m = 6, 16, 2, 4
    model = build("l2m", VEC, width=w, rank=r, pool_size=m)
    frozen = (d * w + w) + (w * w + w)
    pool = m * (w + r * (w + w))
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == frozen + pool + heads
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == pool + heads


def test_one_layer_backbone_is_rejected():
    with pytest.raises(ValueError, match="at least one layer to modulate"):
        build("l2m", VEC, depth=1)


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("l2m", device)
    first, last = short_training("l2m", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("l2m", VEC)
    assert type(model) is L2M and model.name == "l2m"


def test_auxiliary_loss_is_the_weighted_key_pull_of_the_last_forward_pass(device):
    torch.manual_seed(0)
    model = build("l2m", VEC, key_weight=0.5).to(device)
    with pytest.raises(RuntimeError, match="call the model first"):
        model.auxiliary_loss()
    x = torch.randn(5, 6, device=device)
    model(x)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * model.key_pull_loss(x))
    model.auxiliary_loss().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["pool.keys"]


def test_fresh_keys_are_distinct_so_inputs_already_reach_different_modulators():
    """Before any key pull the keys differ: a batch of random inputs is split between modulators
    (identical keys would send everything to one modulator and leave the others untrained)."""
    torch.manual_seed(0)
    model = build("l2m", VEC)
    keys = F.normalize(model.pool.keys, dim=-1)
    assert (keys @ keys.T - torch.eye(4)).abs().max() < 0.99
    assert len(model.retrieve(torch.randn(256, 6)).unique()) > 1


def test_pool_of_four_rank_two_modulators_by_default():
    """The docstring's defaults: a pool of 4 modulators (30 officially) of rank 2 (8 officially)."""
    torch.manual_seed(0)
    model = build("l2m", VEC)
    assert model.pool.keys.shape[0] == 4 and len(model.pool.down) == 4
    assert all(a.out_features == 2 for entry in model.pool.down for a in entry)
    assert model.scale == 2.0  # alpha = 2 r
