"""MLoRE: top-k routing per image, re-parameterisation into one conv, sharing and gradient reach."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.mlore import MLoRE, MLoREModule
from reference_impls.architectures.registry import Problem, build

from .conftest import assert_each_task_owns_exactly, names_under

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 3, "b": 1}, dense=True)


def test_router_keeps_exactly_k_experts_per_image(device):
    torch.manual_seed(0)
    module = MLoREModule(6, ("a", "b"), ranks=(1, 2, 2, 3, 3), k=2, task_rank=2, kernel_size=3).to(device)
    f = torch.randn(7, 6, 4, 4, device=device)
    w = module.route(f, "a")
    assert w.shape == (7, 5) and ((w > 0).sum(1) == 2).all()
    torch.testing.assert_close(w.sum(1), torch.ones(7, device=device))
    scores = module.routers["a"](f.mean(dim=(2, 3)))
    torch.testing.assert_close(w.topk(2, -1).values, torch.softmax(scores.topk(2, -1).values, -1))
    assert not torch.equal(w, module.route(f, "b"))  # each task has its own router


def test_three_paths_reparameterise_into_one_convolution(device):
    torch.manual_seed(0)
    module = MLoREModule(6, ("a", "b"), ranks=(1, 2, 3), k=2, task_rank=2, kernel_size=3).to(device)
    f = torch.randn(3, 6, 5, 5, device=device)
    for t in ("a", "b"):
        kernels = module.merged_kernel(f, t)
        merged = torch.cat([F.conv2d(f[i : i + 1], kernels[i], module.generic.bias, padding=1) for i in range(3)])
        torch.testing.assert_close(module.mixed(f, t), merged, rtol=1e-4, atol=1e-5)


def test_low_rank_expert_parameter_count(n_params):
    c, k, r, n = 16, 3, 2, 4
    module = MLoREModule(c, ("a", "b"), ranks=(r,) * n, k=2, task_rank=r, kernel_size=k)
    expert = r * (c * k * k + c)
    assert n_params(module.experts[0]) == expert and expert < c * c * k * k
    generic = c * c * k * k + c
    per_task = expert + (c * n + n) + (c * c + c)  # task expert, router, 1x1 output conv
    assert n_params(module) == generic + n * expert + 2 * per_task


def test_sharing_and_gradient_reach(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mlore", IMG, width=6, ranks=(1, 1, 2, 2, 2), k=2).to(device)
    x = torch.randn(1, 2, 5, 5, device=device)  # one image: one routing vector per task
    chosen = set(model.module.route(model.task_features(x)["a"], "a").nonzero()[:, 1].tolist())
    touched = params_with_grad(model, model(x)["a"].square().sum())
    with_grad = {i for i in range(5) if any(n.startswith(f"module.experts.{i}.") for n in touched)}
    assert with_grad == chosen and len(chosen) == 2  # unselected experts get nothing
    assert {"module.generic.weight", "trunk.blocks.0.0.weight", "module.routers.a.weight",
            "module.task_experts.a.up.weight", "projections.a.weight"} <= touched
    assert not any(".b." in n or n.endswith(".b.weight") or n.startswith(("heads.b", "projections.b")) for n in touched)
    shared = {id(p) for p in model.shared_parameters()}
    assert id(model.module.generic.weight) in shared and id(model.module.experts[0].up.weight) in shared


def test_generic_path_reads_a_detached_feature(device, params_with_grad):
    torch.manual_seed(0)
    model = build("mlore", IMG, width=6).to(device)
    x = torch.randn(2, 2, 5, 5, device=device)
    touched = params_with_grad(model, model.module.mixed(model.task_features(x)["a"], "a").sum())
    assert {"module.generic.weight", "projections.a.weight", "trunk.blocks.0.0.weight"} <= touched
    with torch.no_grad():  # silence the expert paths: only the generic path is left
        for expert in [*model.module.experts, model.module.task_experts["a"]]:
            expert.up.weight.zero_()
    touched = params_with_grad(model, model.module.mixed(model.task_features(x)["a"], "a").sum())
    assert "module.generic.weight" in touched
    assert not any(n.startswith(("projections.", "trunk.")) for n in touched)  # stopped at F_t


def test_vectors_are_one_by_one_maps(device):
    torch.manual_seed(0)
    model = build("mlore", VEC, width=8).to(device)
    assert model.module.generic.kernel_size == (1, 1)
    out = model(torch.randn(4, 6, device=device))
    assert out["a"].shape == (4, 1) and out["b"].shape == (4, 2)
    assert type(model) is MLoRE and model.name == "mlore"


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("mlore", device)
    first, last = short_training("mlore", dense, device, steps=40)
    assert last < 0.8 * first


def test_forward_by_hand_act_then_the_tasks_own_output_conv_and_head(device):
    """y_t = head_t(Conv1x1_t(GELU(G_t))), with G_t the sum of the three paths on F_t."""
    torch.manual_seed(0)
    model = build("mlore", IMG, width=6).to(device)
    x = torch.randn(2, 2, 5, 5, device=device)
    with torch.no_grad():
        out = model(x)
        feats = model.task_features(x)
        for t in IMG.tasks:
            g = model.module.mixed(feats[t], t)
            torch.testing.assert_close(out[t], model.heads[t](model.module.outputs[t](F.gelu(g))))


def test_low_rank_expert_is_k_by_k_down_to_its_rank_then_1x1_up(device):
    """M_i W_i F: W_i a k x k convolution to r_i channels, M_i a 1x1 one back to C (shared and task experts)."""
    torch.manual_seed(0)
    module = MLoREModule(6, ("a", "b"), ranks=(1, 3), k=1, task_rank=2, kernel_size=3).to(device)
    x = torch.randn(2, 6, 5, 5, device=device)
    for expert, r in zip([*module.experts, module.task_experts["a"]], (1, 3, 2)):
        assert expert.down.weight.shape == (r, 6, 3, 3) and expert.up.weight.shape == (6, r, 1, 1)
        torch.testing.assert_close(expert(x), F.conv2d(F.conv2d(x, expert.down.weight, padding=1), expert.up.weight))


def test_task_specific_split_is_exactly_projection_task_expert_router_output_conv_and_head(device, split_by_task):
    """With k = N every shared expert feeds both tasks, so what only task t reaches is what it claims."""
    torch.manual_seed(0)
    model = build("mlore", IMG, width=6, ranks=(1, 2), k=2).to(device)
    split = split_by_task(model, torch.randn(2, 2, 5, 5, device=device))
    own = ("projections.{}.", "module.task_experts.{}.", "module.routers.{}.", "module.outputs.{}.", "heads.{}.")
    assert_each_task_owns_exactly(split, lambda t: names_under(model, *(prefix.format(t) for prefix in own)))


def test_task_expert_reads_the_feature_undetached(device, params_with_grad):
    """Only the generic path is detached: through the task expert alone the gradient still reaches
    the task's projection and the trunk."""
    torch.manual_seed(0)
    model = build("mlore", IMG, width=6).to(device)
    x = torch.randn(2, 2, 5, 5, device=device)
    with torch.no_grad():  # silence the generic and the shared-expert paths
        model.module.generic.weight.zero_()
        for expert in model.module.experts:
            expert.up.weight.zero_()
    touched = params_with_grad(model, model.module.mixed(model.task_features(x)["a"], "a").square().sum())
    assert {"module.task_experts.a.up.weight", "projections.a.weight", "trunk.blocks.0.0.weight"} <= touched


def test_a_5x5_module_keeps_the_map_size_and_still_merges_into_one_convolution():
    """Every k x k path is 'same'-padded (k // 2), for k = 5 as for k = 3."""
    torch.manual_seed(0)
    module = MLoREModule(4, ("a",), ranks=(1, 2), k=1, task_rank=1, kernel_size=5)
    f = torch.randn(2, 4, 6, 6)
    kernels = module.merged_kernel(f, "a")
    merged = torch.cat([F.conv2d(f[i:i + 1], kernels[i], module.generic.bias, padding=2) for i in range(2)])
    torch.testing.assert_close(module.mixed(f, "a"), merged, rtol=1e-4, atol=1e-5)


def test_images_get_3x3_convolutions_and_the_requested_trunk_depth():
    """From a problem: images use 3 x 3 convolutions (vectors 1 x 1), the trunk has ``depth`` blocks; built
    directly, the default kernel is 3 x 3 too and keeps the map size."""
    model = build("mlore", IMG, width=8, depth=3)
    assert model.module.generic.kernel_size == (3, 3) and model.module.experts[0].down.kernel_size == (3, 3)
    assert len(model.trunk.blocks) == 3
    torch.manual_seed(0)
    identity = {t: torch.nn.Identity() for t in IMG.tasks}
    direct = MLoRE(IMG.tasks, build("mlore", IMG, width=8).trunk, identity, 8)
    assert direct.module.generic.kernel_size == (3, 3)
    assert direct(torch.randn(1, 2, 5, 5))["a"].shape == (1, 8, 5, 5)
