"""PAP / PSD: row-stochastic affinities, diffusion = the matrix product, cross-task reach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.pap import PAP, PSD
from reference_impls.architectures.registry import Problem
from reference_impls.architectures.registry import build as registry_build

from .conftest import names_the_refusal

TASKS = ("depth", "normal", "seg")
OUT = {"depth": 1, "normal": 3, "seg": 5}


def build(cls, device, **kw):
    torch.manual_seed(0)
    return cls(TASKS, 3, OUT, channels=8, embed_channels=4, **kw).to(device)


def test_pap_affinities_are_row_stochastic_and_mixture_is_convex(device):
    model = build(PAP, device)
    with torch.no_grad():
        model.mix_logits["seg"].copy_(torch.tensor([0.3, -1.0, 2.0]))
    x = torch.randn(2, 3, 6, 5, device=device)
    feats = model.task_features(x)
    aff = model.affinities(feats)
    for t in TASKS:
        assert aff[t].shape == (2, 30, 30)
        assert (aff[t] >= 0).all()
        torch.testing.assert_close(aff[t].sum(-1), torch.ones(2, 30, device=device))
    mixed = model.mixed_affinity("seg", aff)
    alpha = torch.softmax(torch.tensor([0.3, -1.0, 2.0], device=device), 0)
    expected = alpha[0] * aff["depth"] + alpha[1] * aff["normal"] + alpha[2] * aff["seg"]
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(2, 30, device=device))


def test_pap_affinity_is_softmax_of_embedding_gram_matrix(device):
    model = build(PAP, device)
    feats = torch.randn(1, 8, 3, 4, device=device)
    emb = model.embeds["depth"](feats).reshape(4, 12)  # (e, HW)
    expected = torch.softmax(emb.T @ emb / 2.0, dim=-1)  # sqrt(e) = 2
    torch.testing.assert_close(model.affinity("depth", feats)[0], expected)


def test_pap_diffusion_equals_matrix_product(device):
    model = build(PAP, device, diffusion_steps=2)
    b, c, h, w = 2, 8, 3, 4
    feats = torch.randn(b, c, h, w, device=device)
    aff = torch.softmax(torch.randn(b, h * w, h * w, device=device), -1)
    beta = torch.tensor(0.7, device=device)
    f0 = feats.flatten(2).transpose(1, 2)
    f1 = 0.7 * aff @ f0 + 0.3 * f0
    f2 = 0.7 * aff @ f1 + 0.3 * f0
    expected = f2.transpose(1, 2).reshape(b, c, h, w)
    torch.testing.assert_close(model.propagate(aff, feats, beta), expected)
    # A row-stochastic affinity keeps a constant map constant.
    const = torch.full((b, c, h, w), 2.5, device=device)
    torch.testing.assert_close(model.propagate(aff, const, beta), const)


@pytest.mark.parametrize("cls", (PAP, PSD))
def test_pap_cross_task_gradients(device, cls):
    """Task 'seg' must learn from the other tasks' affinity parameters, not their heads."""
    model = build(cls, device)
    x = torch.randn(2, 3, 5, 5, device=device)
    out = model(x)
    assert out["normal"].shape == (2, 3, 5, 5)
    out["seg"].square().mean().backward()
    for t in TASKS:
        assert model.embeds[t].weight.grad.abs().sum() > 0  # every task's affinity is used
        assert model.branches[t][0].weight.grad.abs().sum() > 0
        if t == "seg":
            assert model.mix_logits[t].grad.abs().sum() > 0
        else:  # the other tasks' own mixing weights, step sizes and heads stay untouched
            assert model.mix_logits[t].grad is None and model.beta_logits[t].grad is None
            assert all(p.grad is None for p in model.heads[t].parameters())
    specific = {id(p) for t in TASKS for p in model.task_specific_parameters(t)}
    shared = model.shared_parameters()
    assert len(specific) + len(shared) == len(list(model.parameters()))
    assert all(p.grad is not None for p in shared)


def test_psd_local_affinity_and_dense_equivalence(device):
    model = build(PSD, device, window=3, diffusion_steps=2)
    b, c, h, w = 1, 8, 4, 5
    feats = torch.randn(b, c, h, w, device=device)
    local = model.local_affinity("depth", feats)  # (B, HW, 9)
    assert local.shape == (b, h * w, 9)
    torch.testing.assert_close(local.sum(-1), torch.ones(b, h * w, device=device))
    # Corner pixel (0, 0) has only 4 neighbours inside the image: 5 of 9 weights are 0.
    assert (local[0, 0] == 0).sum() == 5
    # Build the equivalent dense HW x HW matrix by hand and compare one diffusion.
    dense = torch.zeros(h * w, h * w, device=device)
    for p in range(h * w):
        i, j = divmod(p, w)
        for k in range(9):
            di, dj = divmod(k, 3)
            ii, jj = i + di - 1, j + dj - 1
            if 0 <= ii < h and 0 <= jj < w:
                dense[p, ii * w + jj] = local[0, p, k]
    f0 = feats[0].flatten(1).T
    f1 = 0.4 * dense @ f0 + 0.6 * f0
    f2 = 0.4 * dense @ f1 + 0.6 * f0
    got = model.propagate(local, feats, torch.tensor(0.4, device=device))
    torch.testing.assert_close(got[0].flatten(1).T, f2, rtol=1e-5, atol=1e-5)
    # Embedding check: a_t(p, q) is the softmax of scaled dot products over the window.
    emb = model.embeds["depth"](feats)[0]
    p = 7  # pixel (1, 2): its whole window lies inside the image
    window = [((p // w) + di - 1) * w + (p % w) + dj - 1 for di in range(3) for dj in range(3)]
    scores = torch.stack([emb.flatten(1)[:, p] @ emb.flatten(1)[:, r] for r in window]) / 2.0
    torch.testing.assert_close(local[0, p], torch.softmax(scores, 0))


def test_psd_inter_task_matching(device):
    model = build(PSD, device)
    feats = model.task_features(torch.randn(2, 3, 4, 4, device=device))
    aff = model.affinities(feats)
    match = model.matching_weights("normal", aff)
    torch.testing.assert_close(match.sum(-1), torch.ones(2, 16, device=device))
    # Matching uses cosine similarity of graphlets: the task's own graphlet scores 1.
    cos_self = (F.normalize(aff["normal"], dim=-1) ** 2).sum(-1)
    torch.testing.assert_close(cos_self, torch.ones_like(cos_self))
    mixed = model.mixed_affinity("normal", aff)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(2, 16, device=device))
    # With identical structures in all tasks the mixture is that structure.
    same = {t: aff["depth"] for t in TASKS}
    torch.testing.assert_close(model.mixed_affinity("seg", same), aff["depth"])


def test_psd_and_pap_train_and_are_deterministic(device, fit):
    for cls in (PAP, PSD):
        outs = [build(cls, device)(torch.ones(1, 3, 4, 4, device=device))["seg"] for _ in range(2)]
        torch.testing.assert_close(outs[0], outs[1])
        model = build(cls, device)
        x = torch.randn(4, 3, 4, 4, device=device)
        target = {t: torch.randn(4, OUT[t], 4, 4, device=device) for t in TASKS}
        losses = fit(model, x, lambda out: sum(F.mse_loss(out[t], target[t]) for t in TASKS), steps=30, lr=0.02)
        assert losses[-1] < 0.8 * losses[0]


def test_pap_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("pap", device)


def test_psd_builds_from_registry_problem(device, registry_output_shapes):
    registry_output_shapes("psd", device)


def test_psd_mix_is_alpha_prior_times_cosine_match_by_hand(device):
    model = build(PSD, device, temperature=0.5)
    with torch.no_grad():
        model.mix_logits["seg"].copy_(torch.tensor([1.5, -0.5, 0.0]))
    aff = model.affinities(model.task_features(torch.randn(2, 3, 4, 4, device=device)))
    unit = {t: a / a.norm(dim=-1, keepdim=True) for t, a in aff.items()}
    cos = torch.stack([(unit["seg"] * unit[s]).sum(-1) for s in TASKS], -1)
    match = torch.softmax(cos / 0.5, -1)
    torch.testing.assert_close(model.matching_weights("seg", aff), match)
    w = torch.softmax(torch.tensor([1.5, -0.5, 0.0], device=device), 0) * match
    w = w / w.sum(-1, keepdim=True)
    expected = sum(w[..., j : j + 1] * aff[s] for j, s in enumerate(TASKS))
    torch.testing.assert_close(model.mixed_affinity("seg", aff), expected)


@pytest.mark.parametrize("cls", (PAP, PSD))
def test_forward_diffuses_each_tasks_own_features_with_its_own_beta_by_hand(device, cls):
    """out_t = head_t(propagate(Â_t, F_t, sigmoid(beta_logit_t))), with a different beta per task."""
    model = build(cls, device)
    with torch.no_grad():
        for t, logit, mix in zip(TASKS, (2.0, -1.5, 0.5), ([1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [-1.0, 0.5, 1.0])):
            model.beta_logits[t].fill_(logit)
            model.mix_logits[t].copy_(torch.tensor(mix))
    x = torch.randn(2, 3, 4, 4, device=device)
    feats = model.task_features(x)
    aff = model.affinities(feats)
    out = model(x)
    for t in TASKS:
        beta = torch.sigmoid(model.beta_logits[t].detach())
        expected = model.heads[t](model.propagate(model.mixed_affinity(t, aff), feats[t], beta))
        torch.testing.assert_close(out[t], expected)


def test_psd_matching_divides_cosines_by_temperature_on_distinct_graphlets(device):
    """w_t(p) = softmax_j(cos(a_t(p), a_j(p)) / tau) on graphlets that differ a lot between tasks.

    Graphlets of a freshly built model are all close to uniform, so their cosines are all near 1 and
    any temperature gives a near-uniform match; sharp hand-made graphlets make tau visible.
    """
    g = torch.Generator().manual_seed(2)
    aff = {t: torch.softmax(4 * torch.randn(2, 16, 9, generator=g), -1).to(device) for t in TASKS}
    unit = {t: a / a.norm(dim=-1, keepdim=True) for t, a in aff.items()}
    cos = torch.stack([(unit["normal"] * unit[s]).sum(-1) for s in TASKS], -1)
    assert cos[..., 0].std() > 0.1  # the graphlets really differ
    for tau in (0.1, 1.0):
        model = build(PSD, device, temperature=tau)
        torch.testing.assert_close(model.matching_weights("normal", aff), torch.softmax(cos / tau, -1))


@pytest.mark.parametrize("cls", (PAP, PSD))
def test_parameter_count(cls):
    """Shared: a two-layer 3x3 encoder, and per task a 3x3 branch and a 1x1 embedding phi_t (read by
    every task's mixture). Task-specific: T mixing logits, one beta logit and a head of a 3x3 conv
    with ReLU and a 1x1 conv to the task's outputs."""
    c, e, T = 8, 4, len(TASKS)
    model = build(cls, "cpu")
    conv3 = c * c * 9 + c
    shared = (3 * c * 9 + c) + conv3 + T * (conv3 + (c * e + e))
    per_task = {t: T + 1 + conv3 + (c * o + o) for t, o in OUT.items()}
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    for t in TASKS:
        assert sum(p.numel() for p in model.task_specific_parameters(t)) == per_task[t]
    assert sum(p.numel() for p in model.parameters()) == shared + sum(per_task.values())


@pytest.mark.parametrize("cls", (PAP, PSD))
@pytest.mark.parametrize("argument", ("channels", "embed_channels"))
def test_refuses_a_zero_size_and_names_it(cls, argument):
    """checks.require_positive: a zero width is refused when the model is built, naming the argument."""
    kwargs = {"channels": 8, "embed_channels": 4, argument: 0}
    with pytest.raises(ValueError) as error:
        cls(TASKS, 3, OUT, **kwargs)
    assert names_the_refusal(error.value, argument, 0)


@pytest.mark.parametrize("name", ("pap", "psd"))
def test_registry_width_is_the_channel_count(name):
    """build(..., width=w): encoder, branches and heads all work on w channels."""
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True)
    model = registry_build(name, problem, width=6)
    assert model.encoder.out_channels == 6
    assert {model.branches[t][0].out_channels for t in problem.tasks} == {6}
    assert {model.heads[t][0].in_channels for t in problem.tasks} == {6}


def test_psd_window_one_is_each_pixel_alone_so_diffusion_keeps_the_features(device):
    """The window must be a positive odd size; k = 1 is the smallest: each graphlet is the pixel
    itself with affinity 1, so every diffusion step returns the features unchanged."""
    model = build(PSD, device, window=1)
    feats = torch.randn(2, 8, 3, 4, device=device)
    local = model.local_affinity("depth", feats)
    assert torch.equal(local, torch.ones(2, 12, 1, device=device))
    torch.testing.assert_close(model.propagate(local, feats, torch.tensor(0.7, device=device)), feats)
    for bad in (0, 2, 4, -1):
        with pytest.raises(ValueError):
            build(PSD, device, window=bad)


def test_psd_local_affinity_by_brute_force_for_a_5x5_window(device):
    """a_t(p, q) = softmax over the in-image q of p's 5x5 window of <phi(F)_p, phi(F)_q> / sqrt(e),
    zero for window positions outside the image; here H = 3 differs from e = 4 and the window
    overhangs every side of the 3 x 6 map."""
    model = build(PSD, device, window=5)
    h, w, k = 3, 6, 5
    feats = torch.randn(1, 8, h, w, device=device)
    local = model.local_affinity("depth", feats)
    assert local.shape == (1, h * w, k * k)
    emb = model.embeds["depth"](feats)[0].flatten(1)  # (e, HW)
    for p in range(h * w):
        i, j = divmod(p, w)
        expected = torch.zeros(k * k, device=device)
        inside, scores = [], []
        for slot in range(k * k):
            ii, jj = i + slot // k - k // 2, j + slot % k - k // 2
            if 0 <= ii < h and 0 <= jj < w:
                inside.append(slot)
                scores.append(emb[:, p] @ emb[:, ii * w + jj] / 2.0)  # sqrt(e) = 2
        expected[inside] = torch.softmax(torch.stack(scores), 0)
        torch.testing.assert_close(local[0, p], expected)


def test_psd_mix_multiplies_the_prior_by_the_match_on_distinct_graphlets(device):
    """weight_tj(p) ∝ alpha_tj * w_tj(p). Fresh graphlets are near uniform, so w_t(p) is near uniform
    and hides how it enters; sharp hand-made graphlets make the per-pixel match matter."""
    g = torch.Generator().manual_seed(5)
    aff = {t: torch.softmax(4 * torch.randn(2, 16, 9, generator=g), -1).to(device) for t in TASKS}
    model = build(PSD, device, temperature=0.2)
    with torch.no_grad():
        model.mix_logits["depth"].copy_(torch.tensor([0.5, -1.0, 1.0]))
    unit = {t: a / a.norm(dim=-1, keepdim=True) for t, a in aff.items()}
    match = torch.softmax(torch.stack([(unit["depth"] * unit[s]).sum(-1) for s in TASKS], -1) / 0.2, -1)
    assert match.std() > 0.1  # far from uniform
    weights = torch.softmax(torch.tensor([0.5, -1.0, 1.0], device=device), 0) * match
    weights = weights / weights.sum(-1, keepdim=True)
    expected = sum(weights[..., j : j + 1] * aff[s] for j, s in enumerate(TASKS))
    torch.testing.assert_close(model.mixed_affinity("depth", aff), expected)
