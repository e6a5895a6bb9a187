"""ATRC: 'none' everywhere is the plain task-head path, local context stays in its window, global does not."""

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.atrc import CONTEXT_TYPES, ATRC, GlobalContext, LocalContext

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, contexts=None, **kw):
    torch.manual_seed(0)
    return ATRC(TASKS, 3, OUT, channels=8, contexts=contexts, **kw).to(device)


def test_none_for_every_source_is_the_initial_prediction_path(device, params_with_grad):
    model = make(device, contexts={(t, s): "none" for t in TASKS for s in TASKS})
    x = torch.randn(2, 3, 8, 8, device=device)
    out = model(x)
    names = params_with_grad(model, out["seg"].square().mean())
    assert not any(n.startswith(("task_heads.depth.", "cp.")) for n in names)  # no message at all
    with torch.no_grad():
        own = model.task_heads["seg"](model.backbone(x))
        zeros = torch.zeros(2, 2 * 8, 4, 4, device=device)
        by_hand = model.predict["seg"](model.project["seg"](torch.cat([own, zeros], 1)))
        by_hand = torch.nn.functional.interpolate(by_hand, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["seg"], by_hand)


def test_a_source_context_lets_the_other_tasks_features_in(device, params_with_grad):
    contexts = {(t, s): "none" for t in TASKS for s in TASKS} | {("seg", "depth"): "global"}
    model = make(device, contexts=contexts)
    names = params_with_grad(model, model(torch.randn(2, 3, 8, 8, device=device))["seg"].square().mean())
    assert "task_heads.depth.0.weight" in names and "cp.seg.depth.contexts.global.key.weight" in names
    assert "cp.seg.depth.contexts.local.key.weight" not in names and "cp.seg.seg.contexts.global.key.weight" not in names


def perturbed_at_corner(module, device):
    torch.manual_seed(1)
    target, source = torch.randn(1, 4, 9, 9, device=device), torch.randn(1, 4, 9, 9, device=device)
    bumped = source.clone()
    bumped[:, :, 0, 0] += 3.0
    with torch.no_grad():
        return (module(target, bumped) - module(target, source)).abs().amax(1)[0]


def test_local_context_only_sees_its_window(device):
    torch.manual_seed(0)
    delta = perturbed_at_corner(LocalContext(4, window=3).to(device), device)
    assert (delta[:2, :2] > 0).all()  # the corner is in these pixels' 3x3 windows
    delta[:2, :2] = 0
    assert (delta == 0).all()  # nowhere else


def test_local_context_is_softmax_attention_over_the_window(device):
    torch.manual_seed(0)
    local = LocalContext(2, window=3).to(device)
    target, source = torch.randn(1, 2, 5, 5, device=device), torch.randn(1, 2, 5, 5, device=device)
    q, k, v = (torch.relu(m(z))[0] for m, z in ((local.query, target), (local.key, source), (local.value, source)))
    i, j = 0, 3  # an edge pixel: only 6 of the 9 window positions are inside the image
    keys = [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < 5 and 0 <= b < 5]
    scores = torch.stack([q[:, i, j] @ k[:, a, b] for a, b in keys]) / 2**0.5
    expected = sum(wt * v[:, a, b] for wt, (a, b) in zip(torch.softmax(scores, 0), keys))
    torch.testing.assert_close(local(target, source)[0, :, i, j], expected)


def test_global_context_reaches_every_pixel_and_is_normalised_linear_attention(device):
    torch.manual_seed(0)
    glob = GlobalContext(4).to(device)
    assert (perturbed_at_corner(glob, device) > 0).all()
    target, source = torch.randn(1, 4, 3, 3, device=device), torch.randn(1, 4, 3, 3, device=device)
    q = torch.nn.functional.softplus(glob.query(target)).flatten(2)[0]
    k = torch.nn.functional.softplus(glob.key(source)).flatten(2)[0]
    v = torch.relu(glob.value(source)).flatten(2)[0]
    sim = q.T @ k  # (target pixel, source pixel), all positive
    expected = (sim / sim.sum(1, keepdim=True)) @ v.T
    torch.testing.assert_close(glob(target, source).flatten(2)[0].T, expected)


def test_search_mixes_types_with_a_relaxed_categorical_and_derives_the_argmax(device):
    model = make(device, generator=torch.Generator().manual_seed(0), tau=0.5)
    with torch.no_grad():
        model.alpha["seg"][1] = torch.tensor([0.0, 2.0, -1.0], device=device)  # seg <- depth: local
        model.alpha["depth"][0] = torch.tensor([0.0, -1.0, 3.0], device=device)  # depth <- seg: none
    model.eval()  # no Gumbel noise: the weights are softmax(alpha / tau)
    w = model.context_weights("seg")[1]
    expected = torch.softmax(torch.tensor([0.0, 2.0, -1.0]) / 0.5, 0).to(device)
    torch.testing.assert_close(torch.stack([w[k] for k in CONTEXT_TYPES]), expected)
    model.train()
    sample = model.context_weights("seg")[1]  # one draw
    noisy = torch.stack([sample[k] for k in CONTEXT_TYPES])
    torch.testing.assert_close(noisy.sum(), torch.tensor(1.0, device=device))
    assert not torch.allclose(noisy, expected)  # Gumbel-perturbed sample
    derived = model.derive()
    assert derived[("seg", "depth")] == "local" and derived[("depth", "seg")] == "none"
    fixed = make(device, contexts=derived)
    assert fixed(torch.randn(1, 3, 8, 8, device=device))["seg"].shape == (1, 3, 8, 8)
    with pytest.raises(ValueError):
        make(device, contexts={("seg", "seg"): "label"})


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("atrc", device)
    for dense in (True, False):
        first, last = short_training("atrc", dense, device, steps=25)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("atrc", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_each_target_concatenates_its_own_features_and_one_message_per_source(device):
    """F_t, then cp[t][s](F_t, F_s) for every source s in task order: the target queries, the source answers."""
    contexts = {("seg", "seg"): "local", ("seg", "depth"): "global",
                ("depth", "seg"): "none", ("depth", "depth"): "global"}
    model = make(device, contexts=contexts)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        out = model(x)
        shared = model.backbone(x)
        feats = {t: model.task_heads[t](shared) for t in TASKS}
        for t in TASKS:
            messages = [torch.zeros_like(feats[t]) if contexts[(t, s)] == "none"
                        else model.cp[t][s].contexts[contexts[(t, s)]](feats[t], feats[s]) for s in TASKS]
            by_hand = model.predict[t](model.project[t](torch.cat([feats[t], *messages], 1)))
            by_hand = torch.nn.functional.interpolate(by_hand, size=(8, 8), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out[t], by_hand)


def test_search_weights_are_gumbel_softmax_of_alpha_over_tau(device):
    """softmax((alpha + g) / tau), g = -log(-log u), u drawn from the model's generator."""
    generator = torch.Generator().manual_seed(0)
    model = make(device, generator=generator, tau=0.5)
    alpha = torch.tensor([[0.0, 2.0, -1.0], [1.0, -0.5, 0.3]])
    with torch.no_grad():
        model.alpha["seg"].copy_(alpha)
    replay = torch.Generator().set_state(generator.get_state())
    weights = model.context_weights("seg")
    u = torch.rand(alpha.shape, generator=replay)
    expected = torch.softmax((alpha - torch.log(-torch.log(u))) / 0.5, dim=-1).to(device)
    torch.testing.assert_close(torch.stack([torch.stack([w[k] for k in CONTEXT_TYPES]) for w in weights]), expected)


def test_task_specific_parameters_are_the_targets_refinement_and_logits(device):
    model = make(device)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in TASKS:
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        expected = {n for n in names.values()
                    if n.startswith((f"cp.{t}.", f"project.{t}.", f"predict.{t}.", f"auxiliary.{t}."))}
        assert own == expected | {f"alpha.{t}"}, t
    shared = {names[id(p)] for p in model.shared_parameters()}
    assert shared == {n for n in names.values() if n.startswith(("backbone.", "task_heads."))}


def test_auxiliary_predictions_read_the_task_features_at_half_scale_and_vector_heads_average(device):
    """A_t = aux_t(F_t) with F_t = head_t(backbone(x)); a vector problem's prediction is the spatial mean."""
    contexts = {(t, s): "global" for t in TASKS for s in TASKS}
    model = make(device, contexts=contexts)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.no_grad():
        final, auxiliary = model.forward_with_intermediate(x)
        feats = {t: model.task_heads[t](model.backbone(x)) for t in TASKS}
        for t in TASKS:
            torch.testing.assert_close(auxiliary[t], model.auxiliary[t](feats[t]))
            assert auxiliary[t].shape == (2, OUT[t], 4, 4)
        model.dense = False
        pooled = model(x)
        model.dense = True
        for t in TASKS:
            messages = [model.cp[t][s].contexts["global"](feats[t], feats[s]) for s in TASKS]
            by_hand = model.predict[t](model.project[t](torch.cat([feats[t], *messages], 1)))
            torch.testing.assert_close(pooled[t], by_hand.mean(dim=(2, 3)))


def test_without_a_generator_the_search_weights_are_plain_softmax_in_training(device):
    model = make(device, tau=2.0)
    alpha = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]])
    with torch.no_grad():
        model.alpha["depth"].copy_(alpha)
    model.train()
    weights = model.context_weights("depth")
    expected = torch.softmax(alpha / 2.0, dim=-1).to(device)
    torch.testing.assert_close(torch.stack([torch.stack([w[k] for k in CONTEXT_TYPES]) for w in weights]), expected)


def test_during_the_search_each_message_mixes_every_context_by_its_weight(device):
    """cp[t][s] = w_global * global(F_t, F_s) + w_local * local(F_t, F_s); 'none' adds nothing."""
    model = make(device).eval()  # no generator: the weights are softmax(alpha / tau)
    alpha = torch.tensor([[0.5, -1.0, 0.2], [1.0, 0.3, -0.4]], device=device)
    with torch.no_grad():
        model.alpha["seg"].copy_(alpha)
        x = torch.randn(2, 3, 8, 8, device=device)
        out = model(x)
        feats = {t: model.task_heads[t](model.backbone(x)) for t in TASKS}
        weights = torch.softmax(alpha, dim=-1)
        messages = []
        for i, s in enumerate(TASKS):
            blocks = model.cp["seg"][s].contexts
            mixed = sum(weights[i, CONTEXT_TYPES.index(k)] * blocks[k](feats["seg"], feats[s])
                        for k in ("global", "local"))
            messages.append(mixed)
        by_hand = model.predict["seg"](model.project["seg"](torch.cat([feats["seg"], *messages], 1)))
        by_hand = torch.nn.functional.interpolate(by_hand, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out["seg"], by_hand)


def test_local_window_defaults_to_3_must_be_positive_and_odd_and_1_is_allowed(device):
    """A 1x1 window attends to the source pixel at the same position only: the output is its value map."""
    from reference_impls.architectures.atrc import ContextPooling

    assert LocalContext(2).window == 3 and ContextPooling(2).contexts["local"].window == 3
    for bad in (0, 2, 4):
        with pytest.raises(ValueError, match="window"):
            LocalContext(2, window=bad)
    torch.manual_seed(0)
    local = LocalContext(2, window=1).to(device)
    target, source = torch.randn(1, 2, 4, 4, device=device), torch.randn(1, 2, 4, 4, device=device)
    torch.testing.assert_close(local(target, source), torch.relu(local.value(source)))


def test_a_window_covering_the_whole_image_is_full_softmax_attention(device):
    """A 5x5 window on a 3x3 map holds every pixel, so local attention equals attention over all pixels."""
    torch.manual_seed(0)
    local = LocalContext(2, window=5).to(device)
    target, source = torch.randn(1, 2, 3, 3, device=device), torch.randn(1, 2, 3, 3, device=device)
    q = torch.relu(local.query(target)).flatten(2)[0]
    k = torch.relu(local.key(source)).flatten(2)[0]
    v = torch.relu(local.value(source)).flatten(2)[0]
    expected = torch.softmax(q.T @ k / 2**0.5, dim=1) @ v.T  # (target pixel, channel)
    torch.testing.assert_close(local(target, source).flatten(2)[0].T, expected)


def test_the_models_window_reaches_every_local_context():
    model = ATRC(TASKS, 3, OUT, channels=4, window=5)
    assert {cp.contexts["local"].window for row in model.cp.values() for cp in row.values()} == {5}


def test_global_context_stays_normalised_when_queries_and_keys_are_tiny(device):
    """The normaliser sum_j q_p . k_j may be far below 1; it must still divide (the clamp only guards 0)."""
    torch.manual_seed(0)
    glob = GlobalContext(4).to(device)
    with torch.no_grad():
        glob.query.bias.fill_(-12.0)  # softplus(-12) ~ 6e-6
        glob.key.bias.fill_(-12.0)
    target, source = torch.randn(1, 4, 3, 3, device=device), torch.randn(1, 4, 3, 3, device=device)
    q = torch.nn.functional.softplus(glob.query(target)).flatten(2)[0]
    k = torch.nn.functional.softplus(glob.key(source)).flatten(2)[0]
    v = torch.relu(glob.value(source)).flatten(2)[0]
    sim = q.T @ k
    assert sim.sum(1).max() < 1e-6
    expected = (sim / sim.sum(1, keepdim=True)) @ v.T
    torch.testing.assert_close(glob(target, source).flatten(2)[0].T, expected)


def test_fixed_contexts_must_name_a_known_type_for_every_pair_and_are_what_derive_returns():
    every = {(t, s): "local" for t in TASKS for s in TASKS}
    assert ATRC(TASKS, 3, OUT, channels=4, contexts=every).derive() == every
    with pytest.raises(ValueError, match="missing"):
        ATRC(TASKS, 3, OUT, channels=4, contexts={k: v for k, v in every.items() if k != ("seg", "depth")})
    with pytest.raises(ValueError, match="unknown"):
        ATRC(TASKS, 3, OUT, channels=4, contexts={**every, ("seg", "depth"): "label"})


def test_the_projection_is_one_by_one_and_a_two_pixel_image_is_enough():
    """The Task-t block reads [F_t; messages] pointwise (1x1); the encoder halves once, so side 2 suffices."""
    model = ATRC(TASKS, 3, OUT, channels=4)
    assert all(block[0].kernel_size == (1, 1) for block in model.project.values())
    small = registry.build("atrc", registry.Problem(TASKS, (3, 2, 2), OUT, dense=True), width=4)
    assert small(torch.randn(1, 3, 2, 2))["seg"].shape == (1, 3, 2, 2)
