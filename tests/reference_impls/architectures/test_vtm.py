"""VTM (Kim et al. 2023): token matching by hand, exact recall when sharp, only biases per task."""

import copy

import torch
import torch.nn.functional as F

from reference_impls.architectures.encoders import trunk_for
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.vtm import TaskBiasedEncoder, TokenMatching, VTM

VEC = Problem(("a", "b"), (7,), {"a": 1, "b": 2})
DENSE = Problem(("seg", "depth"), (2, 4, 4), {"seg": 3, "depth": 1}, dense=True)


def dense_model(device, num_heads=1):
    torch.manual_seed(0)
    return build("vtm", DENSE, width=8, num_heads=num_heads).to(device)


def test_prediction_is_the_attention_weighted_mix_of_support_label_tokens(device):
    model = dense_model(device, num_heads=2)
    images, labels = model.support("seg")
    x = torch.randn(2, 2, 4, 4, device=device)
    m = model.matching
    norm = lambda z: F.layer_norm(z, (8,), m.norm.weight, m.norm.bias)  # noqa: E731
    q = norm(model.image_tokens(x, "seg")) @ m.query.weight.T  # (2, 16, 8)
    k = norm(model.image_tokens(images, "seg").reshape(-1, 8)) @ m.key.weight.T  # (4 * 16, 8)
    v = model.label_tokens(labels)  # (3 channels, 64, 8)
    mixed = []
    for h in (slice(0, 4), slice(4, 8)):  # two heads, each mixes its own slice of the label tokens
        weights = torch.softmax(q[..., h] @ k[:, h].T / 2.0, dim=-1)  # temperature sqrt(4)
        mixed.append(torch.einsum("bqs,csd->bcqd", weights, v[..., h]))
    expected = model.decode_labels(torch.cat(mixed, -1), (4, 4))
    torch.testing.assert_close(model.predict("seg", x, images, labels), expected)
    assert expected.shape == (2, 3, 4, 4)


def test_a_query_identical_to_a_support_image_recovers_its_label_tokens_when_sharp(device):
    model = dense_model(device)
    with torch.no_grad():  # equal projections: after the layer norm a token is most similar to itself
        model.matching.query.weight.copy_(torch.eye(8))
        model.matching.key.weight.copy_(torch.eye(8))
    model.matching.temperature = 1e-4
    images, labels = model.support("depth")
    query = images[2:3]
    matched = model.matching(model.image_tokens(query, "depth"),
                             model.image_tokens(images, "depth").flatten(0, 1), model.label_tokens(labels))
    own = model.label_tokens(labels[2:3])  # g(y^2), (1 channel, 16 tokens, 8)
    torch.testing.assert_close(matched[0], own)
    pred = model.predict("depth", query, images, labels)
    torch.testing.assert_close(pred, model.decode_labels(own.unsqueeze(0), (4, 4)))
    model.matching.temperature = 1e3  # flat attention: every token gets the mean label token
    flat = model.predict("depth", query, images, labels)
    mean_token = model.label_tokens(labels).mean(dim=1, keepdim=True).expand(1, 16, 8)
    torch.testing.assert_close(flat, model.decode_labels(mean_token.unsqueeze(0), (4, 4)), atol=1e-3, rtol=0)


def test_one_support_example_is_copied_to_every_query_and_support_order_is_irrelevant(device):
    torch.manual_seed(1)
    model = build("vtm", VEC, width=8).to(device)
    x = torch.randn(5, 7, device=device)
    images, labels = torch.randn(1, 7, device=device), torch.randn(1, 2, device=device)
    one = model.predict("b", x, images, labels)
    copied = model.decode_labels(model.label_tokens(labels).unsqueeze(0), ()).expand(5, 2)  # h(g(y))
    torch.testing.assert_close(one, copied)
    images, labels = torch.randn(6, 7, device=device), torch.randn(6, 2, device=device)
    perm = torch.randperm(6, device=device)
    torch.testing.assert_close(model.predict("b", x, images, labels),
                               model.predict("b", x, images[perm], labels[perm]))


def test_only_the_encoder_biases_are_task_specific(device, params_with_grad, n_params):
    model = dense_model(device)
    x = torch.randn(2, 2, 4, 4, device=device)
    for task, other in (("seg", "depth"), ("depth", "seg")):  # each task reads its own biases
        touched = params_with_grad(model, model(x)[task].square().sum())
        assert {f"encoder.biases.{task}.0", f"encoder.biases.{task}.1"} <= touched
        assert not any(n.startswith(f"encoder.biases.{other}") for n in touched)
        assert {"encoder.trunk.blocks.0.0.weight", "matching.query.weight"} <= touched
        assert any(n.startswith("label_encoder") for n in touched) and any(n.startswith("label_decoder") for n in touched)
    assert all(p.numel() == 8 for p in model.task_specific_parameters("seg"))  # one bias per layer


def test_parameter_count(n_params):
    d, w = 7, 8
    model = build("vtm", VEC, width=w, depth=2)
    shared_trunk = d * w + w * w  # weights only: the biases moved to the tasks
    task_biases = 2 * (w + w)
    codec = (w + w) + (w * w + w) + (w * w + w) + (w + 1)  # g: 1 -> w -> w, h: w -> w -> 1
    matching = 2 * w + 2 * w * w  # layer norm, bias-free query and key projections
    assert n_params(model) == shared_trunk + task_biases + codec + matching


def test_episodic_training_learns_to_match(device):
    """Each step draws a new support/query split of y = <w, x>; matching must generalise."""
    torch.manual_seed(0)
    model = build("vtm", Problem(("a",), (4,), {"a": 1}), width=16).to(device)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 1, generator=g).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        x = torch.randn(40, 4, generator=g).to(device)
        y = x @ w
        loss = (model.predict("a", x[:16], x[16:], y[16:]) - y[:16]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_registry_builds_vtm_for_both_problem_kinds(device, registry_output_shapes):
    registry_output_shapes("vtm", device)
    model = build("vtm", Problem(("a", "b"), (100,), {"a": 1, "b": 1}))
    assert type(model) is VTM and model.name == "vtm"
    assert model(torch.randn(3, 100))["a"].shape == (3, 1)


def test_task_biased_encoder_starts_as_the_trunk_for_every_task(device):
    """Each task's biases start as a copy of the trunk's own, and the rest of every block
    (ReLU) still runs: at initialisation f_T(x) is the plain trunk's output, for every task."""
    for shape in ((2, 4, 4), (7,)):
        torch.manual_seed(0)
        trunk = trunk_for(shape, 8, 2).to(device)
        encoder = TaskBiasedEncoder(copy.deepcopy(trunk), ("a", "b"))
        x = torch.randn(3, *shape, device=device)
        for task in ("a", "b"):
            torch.testing.assert_close(encoder(x, task), trunk(x))


def cells(t, patch):
    """Average of every ``patch x patch`` cell of ``(B, C, H, W)``, by reshaping: (B, C, H/p, W/p)."""
    b, c, h, w = t.shape
    return t.reshape(b, c, h // patch, patch, w // patch, patch).mean(dim=(3, 5))


def test_patch_tokens_and_label_tokens_average_their_cells_and_maps_upsample_bilinearly(device):
    torch.manual_seed(0)
    model = build("vtm", Problem(("seg",), (2, 8, 8), {"seg": 2}, dense=True), width=8, patch=2).to(device, torch.float64)
    x = torch.randn(3, 2, 8, 8, device=device, dtype=torch.float64)
    tokens = cells(model.encoder(x, "seg"), 2).flatten(2).transpose(1, 2)  # (3, 16 cells, 8)
    torch.testing.assert_close(model.image_tokens(x, "seg"), tokens)
    labels = torch.randn(2, 2, 8, 8, device=device, dtype=torch.float64)  # two examples, two channels
    g = model.label_encoder(cells(labels, 2).reshape(4, 1, 4, 4)).reshape(2, 2, 8, 16)  # (S, C, D, cells)
    torch.testing.assert_close(model.label_tokens(labels), g.permute(1, 0, 3, 2).reshape(2, 32, 8))
    query_tokens = torch.randn(1, 2, 16, 8, device=device, dtype=torch.float64)
    maps = model.label_decoder(query_tokens.transpose(2, 3).reshape(2, 8, 4, 4)).reshape(1, 2, 4, 4)
    expected = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.decode_labels(query_tokens, (8, 8)), expected)


def test_image_level_task_has_one_spatially_averaged_token_per_example(device):
    torch.manual_seed(0)
    model = build("vtm", Problem(("a",), (2, 4, 4), {"a": 2}), width=8).to(device)
    x = torch.randn(3, 2, 4, 4, device=device)
    torch.testing.assert_close(model.image_tokens(x, "a"), model.encoder(x, "a").mean(dim=(2, 3))[:, None])


def test_forward_matches_each_task_against_its_own_stored_support(device):
    model = dense_model(device)
    g = torch.Generator().manual_seed(5)
    support = {t: (torch.randn(3, 2, 4, 4, generator=g).to(device), torch.randn(3, c, 4, 4, generator=g).to(device))
               for t, c in DENSE.out_dims.items()}
    for t, (images, labels) in support.items():
        model.set_support(t, images, labels)
    x = torch.randn(2, 2, 4, 4, device=device)
    out = model(x)
    for t, (images, labels) in support.items():
        torch.testing.assert_close(out[t], model.predict(t, x, images, labels))


def test_label_encoder_and_decoder_are_relu_mlps_by_hand(device):
    """g(y) = W2 relu(W1 y + b1) + b2 per label channel; h(z) = V2 relu(V1 z + c1) + c2 per token."""
    torch.manual_seed(0)
    model = build("vtm", VEC, width=8).double().to(device)
    labels = torch.randn(5, 2, dtype=torch.float64, device=device)  # 5 support examples, 2 channels
    g1, g2 = model.label_encoder[0], model.label_encoder[2]
    per_value = torch.relu(labels[..., None] * g1.weight[:, 0] + g1.bias) @ g2.weight.T + g2.bias  # (5, 2, 8)
    torch.testing.assert_close(model.label_tokens(labels), per_value.transpose(0, 1), rtol=0, atol=1e-12)
    tokens = torch.randn(3, 2, 1, 8, dtype=torch.float64, device=device)  # (B, C, one token, D)
    h1, h2 = model.label_decoder[0], model.label_decoder[2]
    decoded = torch.relu(tokens[:, :, 0] @ h1.weight.T + h1.bias) @ h2.weight.T + h2.bias  # (3, 2, 1)
    torch.testing.assert_close(model.decode_labels(tokens, ()), decoded[..., 0], rtol=0, atol=1e-12)


def test_default_matching_has_one_head_scaled_by_the_whole_width():
    """One head by default (the docstring: the head width equals the token width at the default), so the
    scores are divided by sqrt(width), wherever the model is built from."""
    assert TokenMatching(8).num_heads == 1 and TokenMatching(8).temperature == 8**0.5
    torch.manual_seed(0)
    direct = VTM(("a",), trunk_for((7,), 8, 1), 8, spatial=False)
    built = build("vtm", VEC, width=8)
    for model in (direct, built):
        assert model.matching.num_heads == 1 and model.matching.temperature == 8**0.5


def test_from_problem_honours_the_trunk_depth():
    """depth=3: three trunk blocks, each with its own per-task bias."""
    model = build("vtm", VEC, width=8, depth=3)
    assert len(model.encoder.trunk.blocks) == 3 and len(model.encoder.biases["a"]) == 3
