import copy
import math

import pytest
import torch

from reference_impls.architectures.mod_squad import ModSquad, mutual_information, top_k_gates
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
SMALL = dict(width=8, depth=2, num_experts=4, k=2)


def test_mutual_information_matches_a_hand_computation():
    cond = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)  # P(E | T)
    joint = [[0.35, 0.10, 0.05], [0.05, 0.15, 0.30]]  # P(T) = 1/2
    marginal = [0.40, 0.25, 0.35]
    by_hand = sum(joint[t][e] * math.log(joint[t][e] / (0.5 * marginal[e])) for t in range(2) for e in range(3))
    assert mutual_information(cond).item() == pytest.approx(by_hand, rel=1e-9)
    p_task = torch.tensor([0.25, 0.75], dtype=torch.float64)  # a non-uniform P(T)
    j = p_task[:, None] * cond
    expected = (j * (j / (p_task[:, None] * j.sum(0))).log()).sum()
    assert mutual_information(cond, p_task).item() == pytest.approx(expected.item(), rel=1e-9)


def test_mutual_information_limits():
    same = torch.tensor([[0.5, 0.3, 0.2]] * 3)
    assert mutual_information(same).abs().item() < 1e-6  # tasks use experts alike: independent
    disjoint = torch.eye(3)
    assert mutual_information(disjoint).item() == pytest.approx(math.log(3), abs=1e-5)  # = H(T)


def test_top_k_gates_are_sparse_and_renormalised(device):
    probs = torch.softmax(torch.randn(5, 7, 6, device=device), -1)
    gates = top_k_gates(probs, 2)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(5, 7, device=device))
    kept = probs.topk(2, -1)
    torch.testing.assert_close(gates.gather(-1, kept.indices), kept.values / kept.values.sum(-1, keepdim=True))


def test_moe_output_uses_only_the_top_k_experts(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mod_squad", VEC, **SMALL).to(device)
    moe = model.blocks[0].moe
    h = torch.randn(1, 1, 8, device=device)
    out, probs = moe(h, "a")
    chosen = probs[0, 0].topk(2).indices.tolist()
    g = top_k_gates(probs, 2, renormalise=False)[0, 0]
    torch.testing.assert_close(out, sum(g[e] * moe.experts[e](h) for e in chosen))
    touched = params_with_grad(model, out.square().sum())
    assert {n.split(".")[4] for n in touched if ".experts." in n} == {str(e) for e in chosen}


def test_moe_weights_the_top_k_experts_by_their_router_probabilities_unrenormalised(device):
    # official TaskMoE (github.com/UMass-Foundation-Model/Mod-Squad): the kept gates are the
    # softmax probabilities themselves, so with k < E they sum to less than 1
    torch.manual_seed(3)
    model = build("mod_squad", VEC, **SMALL).to(device)
    moe = model.blocks[0].moe
    h = torch.randn(1, 1, 8, device=device)
    out, probs = moe(h, "a")
    q = probs[0, 0]
    chosen = q.topk(2).indices.tolist()
    torch.testing.assert_close(out, sum(q[e] * moe.experts[e](h) for e in chosen))
    assert q[chosen].sum() < 1


def test_routers_are_task_conditioned(device, params_with_grad):
    torch.manual_seed(1)
    model = build("mod_squad", VEC, **SMALL).to(device)
    x = torch.randn(6, 6, device=device)
    h = model.stem(x)
    qa, qb = (model.blocks[0].moe.probabilities(h, t) for t in VEC.tasks)
    assert (qa - qb).abs().max() > 1e-3
    assert (qa.topk(2, -1).indices != qb.topk(2, -1).indices).any()  # different experts for some token
    touched = params_with_grad(model, model(x)["a"].square().sum())
    assert any("routers.a" in n for n in touched)
    assert not any("routers.b" in n or n.startswith("heads.b") for n in touched)


def test_auxiliary_loss_is_minus_weighted_mi_of_the_last_forward(device):
    torch.manual_seed(2)
    model = build("mod_squad", VEC, mi_weight=0.3, **SMALL).to(device)
    with pytest.raises(RuntimeError, match="forward"):
        model.auxiliary_loss()
    x = torch.randn(5, 6, device=device)
    model(x)
    per_layer = []
    for layer in range(2):
        rows = []
        for t in VEC.tasks:
            h = model.stem(x)
            for block in model.blocks[:layer]:
                h, _ = block(h, t)
            block = model.blocks[layer]
            h = h + block.attention(*(block.norm1(h),) * 3, need_weights=False)[0]
            rows.append(block.moe.probabilities(block.norm2(h), t).mean((0, 1)))
        per_layer.append(mutual_information(torch.stack(rows)))
    torch.testing.assert_close(model.auxiliary_loss(), -0.3 * sum(per_layer))
    (grad,) = torch.autograd.grad(model.auxiliary_loss(), model.blocks[1].moe.routers["b"].weight)
    assert grad.abs().sum() > 0  # it trains the routers
    copied = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="forward"):
        copied.auxiliary_loss()


def test_maximising_mi_specialises_experts_by_task(device):
    torch.manual_seed(3)
    model = build("mod_squad", VEC, mi_weight=1.0, width=8, depth=1, num_experts=4, k=2).to(device)
    x = torch.randn(4, 6, device=device)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "routers" in n], lr=0.2)
    model(x)
    before = model.mutual_information_per_layer()[0].item()
    for _ in range(25):
        model(x)
        opt.zero_grad()
        model.auxiliary_loss().backward()
        opt.step()
    model(x)
    assert model.mutual_information_per_layer()[0].item() > max(0.5, before + 0.3)  # log 2 = 0.69 at most


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("mod_squad", device)
    first, last = short_training("mod_squad", dense, device, steps=40)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("mod_squad", VEC)
    assert type(model) is ModSquad and model.name == "mod_squad"


def forward_by_hand(model, x, task):
    """Tokens + positions, then per block h += attn(LN h); h += MoE_task(LN h); LN; read out; head."""
    stem = model.stem
    if stem.problem.is_image:
        h = stem.tokenise(x).flatten(2).transpose(1, 2)
    else:
        h = stem.tokenise(x).view(x.shape[0], stem.num_tokens, stem.width)
    h = h + stem.position
    for block in model.blocks:
        a = block.norm1(h)
        h = h + block.attention(a, a, a, need_weights=False)[0]
        h = h + block.moe(block.norm2(h), task)[0]
    h = model.norm(h)
    if stem.problem.is_image:
        grid = h.transpose(1, 2).reshape(x.shape[0], stem.width, *stem.grid)  # token i*gw + j at (i, j)
        return model.heads[task](grid)
    return model.heads[task](h.mean(1))  # the mean token


@pytest.mark.parametrize("problem", (VEC, Problem(("a", "b"), (2, 8, 8), {"a": 2, "b": 1}, dense=True)))
def test_forward_is_pre_norm_residual_blocks_then_the_read_out(device, problem):
    torch.manual_seed(4)
    model = build("mod_squad", problem, **SMALL).to(device).eval()
    x = torch.randn(3, *problem.input_shape, device=device)
    with torch.no_grad():
        out = model(x)
        for t in problem.tasks:
            torch.testing.assert_close(out[t], forward_by_hand(model, x, t))


@pytest.mark.parametrize("side, patch", ((16, 4), (8, 2), (12, 2), (6, 1), (4, 1)))
def test_patch_shrinks_until_the_grid_is_at_least_4_by_4(side, patch):
    model = build("mod_squad", Problem(("a", "b"), (2, side, side), {"a": 2, "b": 1}, dense=True), **SMALL)
    assert model.stem.patch == patch and model.stem.grid == (side // patch, side // patch)
    assert model(torch.randn(1, 2, side, side))["a"].shape == (1, 2, side, side)


def test_defaults_add_no_mi_loss_and_each_task_owns_its_routers_and_head():
    torch.manual_seed(0)
    model = build("mod_squad", VEC, **SMALL)
    model(torch.randn(2, 6))
    assert model.auxiliary_loss().item() == 0.0  # mi_weight defaults to 0
    names = {id(p): n for n, p in model.named_parameters()}
    for t in VEC.tasks:
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert own == {n for n in names.values() if f".routers.{t}." in n or n.startswith(f"heads.{t}.")}, t
        assert {n for n in own if ".routers." in n} == {f"blocks.{i}.moe.routers.{t}.weight" for i in range(2)}


def test_every_expert_is_linear_gelu_linear():
    from reference_impls.architectures.registry import Problem, build

    from .conftest import assert_mlps_have_a_gelu

    torch.manual_seed(0)
    model = build("mod_squad", Problem(("a", "b"), (3, 16, 16), {"a": 1, "b": 2}, dense=True))
    assert_mlps_have_a_gelu(e for m in model.modules() if hasattr(m, "experts") for e in m.experts)


def test_an_expert_no_task_uses_adds_nothing_to_the_mutual_information():
    """Two tasks on disjoint experts, a third expert unused: I(T; E) = H(T) = log 2, not NaN."""
    cond = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert mutual_information(cond).item() == pytest.approx(math.log(2), abs=1e-9)


@pytest.mark.parametrize("k", (1, 4))
def test_top_1_and_all_expert_routing_are_allowed(k):
    """1 <= k <= num_experts: k = 1 is switch-style routing, k = E a dense (unrenormalised) mixture."""
    torch.manual_seed(0)
    model = build("mod_squad", VEC, **{**SMALL, "k": k})
    moe = model.blocks[0].moe
    h = torch.randn(1, 3, 8)
    out, probs = moe(h, "a")
    kept = probs.topk(k, -1)
    gates = torch.zeros_like(probs).scatter(-1, kept.indices, kept.values)
    expected = sum(gates[..., e, None] * moe.experts[e](h) for e in range(4))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("k", (0, 5))
def test_k_outside_one_to_num_experts_is_refused(k):
    with pytest.raises(ValueError, match="k <= num_experts"):
        build("mod_squad", VEC, **{**SMALL, "k": k})


def test_the_patch_argument_reaches_the_stem():
    """patch=2 on a 16 x 16 image gives an 8 x 8 grid (the default 4 would give 4 x 4)."""
    model = build("mod_squad", Problem(("a", "b"), (2, 16, 16), {"a": 2, "b": 1}, dense=True), **SMALL, patch=2)
    assert model.stem.patch == 2 and model.stem.grid == (8, 8)
