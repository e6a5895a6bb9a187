"""SAK: adapter paths per teacher, MoR routers mixing them per task, per-teacher distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.sak import SAK, MoRRouter, distill_loss

IMAGE = Problem(("seg", "depth"), (3, 8, 8), {"seg": 4, "depth": 1}, dense=True)
VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def model_for(problem: Problem, device: torch.device, **kw) -> SAK:
    torch.manual_seed(0)
    return build("sak", problem, width=8, **kw).to(device)


def test_router_is_a_distribution_and_mixes_stem_and_paths(device):
    model = model_for(IMAGE, device, teachers=3)
    x = torch.randn(2, 3, 8, 8, device=device)
    stem, paths = model.levels(x)
    router = model.routers["seg"][1]
    w = router.weights(stem[1])
    assert w.shape == (2, 4) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2, device=device))
    pooled = router.mlp(stem[1]).mean(dim=(2, 3))  # the official router averages its logits over positions
    torch.testing.assert_close(w, pooled.softmax(dim=1))
    reps = [stem[1]] + [paths[t][1] for t in model.teachers]
    expected = sum(w[:, e, None, None, None] * reps[e] for e in range(4))
    torch.testing.assert_close(router(stem[1], reps[1:]), expected)


def test_adapter_path_recurrence_by_hand(device):
    model = model_for(VEC, device)
    x = torch.randn(3, 6, device=device)
    stem, paths = model.levels(x)
    t = model.teachers[1]
    h0 = model.embed(x)
    r = model.paths[t][0](h0)
    for i in range(2):
        a = model.paths[t][i + 1]
        r = (r + stem[i]) + a.scale * a.up(F.gelu(a.down(r + stem[i])))  # r_i = A_i(r_{i-1} + x_i)
        torch.testing.assert_close(paths[t][i], model.path_norms[t][i](r))


def test_router_pinned_to_stem_is_hard_sharing(device):
    model = model_for(IMAGE, device)
    with torch.no_grad():
        for routers in model.routers.values():
            for r in routers:
                r.mlp[-1].weight.zero_()
                r.mlp[-1].bias.copy_(torch.tensor([60.0, 0.0, 0.0]))
    x = torch.randn(2, 3, 8, 8, device=device)
    stem, _ = model.levels(x)
    out = model(x)
    for task in IMAGE.tasks:
        torch.testing.assert_close(out[task], model.heads[task](torch.cat(stem, dim=1)))


def test_distilling_one_teacher_trains_stem_and_its_own_path_only(device, params_with_grad):
    model = model_for(IMAGE, device)
    x = torch.randn(2, 3, 8, 8, device=device)
    first, second = model.teachers
    targets = {first: [torch.randn(2, 8, 8, 8, device=device) for _ in range(2)]}
    touched = params_with_grad(model, model.distillation_loss(x, targets))
    assert any(n.startswith(f"paths.{first}.") for n in touched)
    assert any(n.startswith(f"aligners.{first}.") for n in touched)
    assert any(n.startswith("blocks.") for n in touched) and any(n.startswith("embed.") for n in touched)
    assert not any(n.startswith((f"paths.{second}", f"aligners.{second}", "routers", "heads")) for n in touched)


def test_task_loss_reaches_every_path_but_not_other_tasks(device, params_with_grad):
    model = model_for(IMAGE, device)
    touched = params_with_grad(model, model(torch.randn(2, 3, 8, 8, device=device))["depth"].square().sum())
    assert all(any(n.startswith(f"paths.{t}.") for n in touched) for t in model.teachers)
    assert any(n.startswith("routers.depth") for n in touched)
    assert not any(n.startswith(("routers.seg", "heads.seg", "aligners")) for n in touched)


def test_distill_loss_by_hand(device):
    s, t = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device)
    cos = torch.stack([(s[b].flatten() @ t[b].flatten()) / (s[b].norm() * t[b].norm()) for b in range(2)])
    diff = (s - t).abs()
    smooth = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(distill_loss(s, t), 0.9 * (1 - cos).mean() + 0.1 * smooth)
    assert distill_loss(t, t).abs() < 1e-6


def test_student_paths_learn_frozen_teachers(device):
    model = model_for(IMAGE, device)
    torch.manual_seed(1)
    teachers = {t: torch.nn.Conv2d(3, 8, 3, padding=1).to(device).requires_grad_(False) for t in model.teachers}
    x = torch.randn(4, 3, 8, 8, device=device)
    targets = {t: [net(x), torch.tanh(net(x))] for t, net in teachers.items()}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(25):
        loss = model.distillation_loss(x, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for net in teachers.values() for p in net.parameters())


def test_trains(device, short_training):
    first, last = short_training("sak", True, device, 20)
    assert last < 0.5 * first


def test_sak_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("sak", device)
    out = model_for(VEC, device)(torch.randn(3, 6, device=device))
    assert out["a"].shape == (3, 1) and out["b"].shape == (3, 2)


def test_distillation_loss_sums_every_teacher_and_level_through_its_own_aligner():
    model = model_for(IMAGE, torch.device("cpu"))
    x = torch.randn(2, 3, 8, 8)
    targets = {t: [torch.randn(2, 8, 8, 8) for _ in range(2)] for t in model.teachers}
    _, paths = model.levels(x)
    by_hand = sum(distill_loss(model.aligners[t][i](paths[t][i]), targets[t][i])
                  for t in model.teachers for i in range(2))
    torch.testing.assert_close(model.distillation_loss(x, targets), by_hand)


def test_distillation_sends_no_gradient_into_the_teacher_features():
    """The teachers are frozen: even a target that carries a graph gets no gradient."""
    model = model_for(IMAGE, torch.device("cpu"))
    target = torch.randn(2, 8, 8, 8, requires_grad=True)
    model.distillation_loss(torch.randn(2, 3, 8, 8), {model.teachers[0]: [target]}).backward()
    assert target.grad is None


def test_noisy_gating_adds_softplus_scaled_noise_in_training_only():
    """Logits' first half plus N(0, 1) x (softplus(second half) + 0.01) in training; no noise in eval."""
    model = model_for(IMAGE, torch.device("cpu"), noisy_gating=True)
    router = model.routers["seg"][0]
    stem = model.levels(torch.randn(2, 3, 8, 8))[0][0]
    logits, raw_std = router.mlp(stem).mean(dim=(2, 3)).chunk(2, dim=1)
    router.eval()
    torch.testing.assert_close(router.weights(stem), logits.softmax(dim=1))
    router.train()
    torch.manual_seed(5)
    noise = torch.randn_like(logits)
    torch.manual_seed(5)
    torch.testing.assert_close(router.weights(stem), (logits + noise * (F.softplus(raw_std) + 1e-2)).softmax(dim=1))


def _channel_layer_norm(x, norm):
    """LayerNorm over dimension 1, written out."""
    centred = x - x.mean(1, keepdim=True)
    shape = (1, -1, *([1] * (x.dim() - 2)))
    scale = (centred.square().mean(1, keepdim=True) + norm.eps).sqrt()
    return centred / scale * norm.weight.view(shape) + norm.bias.view(shape)


def test_router_mlp_by_hand(device):
    """Router logits W2 gelu(LN(W1 x_i + b1)) + b2 per position, averaged over positions, then a
    softmax over the T + 1 representations."""
    torch.manual_seed(0)
    model = build("sak", IMAGE, width=8).double().to(device)
    assert all(isinstance(r.mlp[1], torch.nn.LayerNorm) for rs in model.routers.values() for r in rs)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # a layer norm with non-trivial affine parameters
        for routers in model.routers.values():
            for r in routers:
                r.mlp[1].weight.copy_(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
                r.mlp[1].bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    stem = torch.randn(2, 8, 4, 4, dtype=torch.float64, device=device)
    for routers in model.routers.values():
        for router in routers:
            first, norm, last = router.mlp[0], router.mlp[1], router.mlp[3]
            hidden = torch.einsum("oc,bchw->bohw", first.weight, stem) + first.bias.view(1, -1, 1, 1)
            hidden = _channel_layer_norm(hidden, norm)
            hidden = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
            logits = torch.einsum("oc,bchw->bohw", last.weight, hidden) + last.bias.view(1, -1, 1, 1)
            torch.testing.assert_close(router.weights(stem), logits.mean(dim=(2, 3)).softmax(dim=1),
                                       rtol=0, atol=1e-12)


def test_noisy_routers_still_weigh_every_representation():
    """With noisy gating the router MLP predicts a mean and a noise scale per representation: the weights
    cover the stem and both teachers (3), and sum to one."""
    model = model_for(IMAGE, torch.device("cpu"), noisy_gating=True)
    router = model.routers["seg"][0]
    assert router.mlp[-1].weight.shape[0] == 2 * 3
    w = router.weights(model.levels(torch.randn(2, 3, 8, 8))[0][0])
    assert w.shape == (2, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_down_ratio_sets_the_adapter_bottleneck_and_defaults_are_quiet_vector_outputs():
    """down_ratio r: bottleneck width // r; built directly, gating is not noisy (the docstring) and outputs
    are not dense."""
    model = model_for(VEC, torch.device("cpu"), down_ratio=2)
    assert all(a.down.weight.shape[0] == 4 for path in model.paths.values() for a in path)
    torch.manual_seed(0)
    direct = SAK(("a",), (3, 8, 8), {"a": 2}, {"t": 16})
    assert not any(r.noisy for routers in direct.routers.values() for r in routers)
    assert not MoRRouter(8, 3).noisy  # the router on its own too
    assert direct(torch.randn(2, 3, 8, 8))["a"].shape == (2, 2)
