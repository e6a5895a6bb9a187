"""Florence-2: what differs from Unified-IO (vision encoder first, text + location tokens only)."""

from __future__ import annotations

import pytest
import torch

from reference_impls.architectures.florence_2 import Florence2
from reference_impls.architectures.registry import Problem, build as registry_build
from reference_impls.architectures.unified_io import UnifiedIO

VECTOR = Problem(("a", "b"), (12,), {"a": 2, "b": 1})
IMAGE = Problem(("cls", "box"), (2, 8, 8), {"cls": 3, "box": 4})


def build(device, problem=VECTOR, **kw):
    torch.manual_seed(0)
    return Florence2.from_problem(problem, width=16, num_heads=2, num_tokens=4, **kw).to(device)


def test_no_image_tokens_and_dense_refused(device):
    model = build(device, IMAGE)
    assert model.image_start == model.vocab_size  # text + location tokens only
    assert not hasattr(model, "codebook")
    with pytest.raises(ValueError, match="no image tokens"):
        Florence2.from_problem(Problem(("seg",), (2, 8, 8), {"seg": 2}, dense=True))
    dense_uio = UnifiedIO.from_problem(Problem(("seg",), (2, 8, 8), {"seg": 2}, dense=True))
    assert dense_uio.vocab_size > dense_uio.image_start  # Unified-IO has image codes


def test_location_tokens_quantise_coordinates(device):
    model = build(device, IMAGE, num_bins=1000)
    box = torch.tensor([[0.0, 13.7, 511.9, 640.0]], device=device)  # x0 y0 x1 y1 in a 640-pixel image
    tokens = model.location_tokens(box, 640.0)
    assert tokens.shape == (1, 4)
    assert torch.equal(tokens - model.bin_start, torch.tensor([[0, 21, 799, 999]], device=device))
    assert ((model.location_values(tokens, 640.0) - box).abs() <= 0.32 + 1e-4).all()  # half a bin (0.64 px)
    coords = torch.linspace(0, 640, 101, device=device)
    assert (model.location_tokens(coords, 640.0).diff() >= 0).all()  # order-preserving


def test_vision_encoder_runs_before_the_prompt(device, params_with_grad):
    model = build(device, IMAGE)
    x = torch.randn(2, 2, 8, 8, device=device)
    visual = model.embed_input(x)
    unfused = model.inputs(x)
    assert visual.shape == unfused.shape and not torch.allclose(visual, unfused)
    # The visual tokens are the same whatever the task; only the prompt then tells tasks apart.
    assert all(list(model.task_specific_parameters(t)) == [] for t in IMAGE.tasks)
    encoded = {t: model.encode_prompted(x, model.prompt(t)) for t in IMAGE.tasks}
    assert not torch.allclose(encoded["cls"], encoded["box"])
    loss = model(x)["box"].square().mean()
    names = params_with_grad(model, loss)
    assert any(n.startswith("vision_encoder.") for n in names) and "embedding.weight" in names


def test_trains(device, fit):
    model = build(device)
    x = torch.randn(8, 12, device=device)
    target = {"a": x[:, :2], "b": x[:, 2:3] - x[:, 3:4]}
    losses = fit(model, x, lambda out: sum((out[t] - target[t]).square().mean() for t in target), 40, 1e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_florence_2_builds_from_registry_problems(device):
    for problem in (Problem(("a", "b"), (100,), {"a": 1, "b": 1}), IMAGE):
        model = registry_build("florence_2", problem, width=16).to(device)
        out = model(torch.randn(3, *problem.input_shape, device=device))
        assert {t: o.shape for t, o in out.items()} == {t: (3, d) for t, d in problem.out_dims.items()}


def test_vision_encoder_is_a_stack_of_blocks(device):
    """With two vision blocks, the second reads the first's output (not the patches again)."""
    model = build(device, IMAGE, vision_depth=2)
    x = torch.randn(2, 2, 8, 8, device=device)
    first, second = model.vision_encoder
    torch.testing.assert_close(model.embed_input(x), second(first(model.inputs(x))))


def test_location_values_are_bin_centres_in_the_images_coordinates(device):
    """10 bins over a 50-pixel side are 5 pixels wide: bin 3 decodes to 17.5, at any size its centre."""
    model = build(device, IMAGE, num_bins=10)
    tokens = model.bin_start + torch.tensor([0, 3, 9], device=device)
    torch.testing.assert_close(model.location_values(tokens, 50.0), torch.tensor([2.5, 17.5, 47.5], device=device))
    torch.testing.assert_close(model.location_values(tokens, 200.0), torch.tensor([10.0, 70.0, 190.0], device=device))
    coords = torch.tensor([1.0, 33.0, 99.0], device=device)
    torch.testing.assert_close(model.location_values(model.location_tokens(coords, 100.0), 100.0),
                               torch.tensor([5.0, 35.0, 95.0], device=device))


def test_loss_is_eq_1_averaged_over_tokens_and_summed_over_tasks(device):
    """-log p(target token | image, prompt, earlier tokens), the mean over a task's tokens, summed over tasks."""
    model = build(device)
    x = torch.randn(3, 12, device=device)
    targets = {"a": torch.randn(3, 2, device=device), "b": torch.randn(3, 1, device=device)}
    expected = 0.0
    for t, y in targets.items():
        tokens = model.bin_start + (y[..., None] - model.bin_centres).abs().argmin(-1)  # nearest bin
        log_p = model.teacher_forced_logits(x, t, tokens).log_softmax(-1)
        expected = expected - log_p.gather(-1, tokens[..., None]).mean()
    torch.testing.assert_close(model.loss(x, targets), expected)


def test_direct_construction_defaults_to_a_non_dense_image_model_and_allows_one_encoder_block():
    torch.manual_seed(0)
    model = Florence2(IMAGE.tasks, IMAGE.input_shape, IMAGE.out_dims, dim=16, num_heads=2, depth=1)
    out = model(torch.randn(2, *IMAGE.input_shape))
    assert out["cls"].shape == (2, 3) and len(model.vision_encoder) == 1


def test_the_registry_width_is_the_token_width():
    assert build("cpu", IMAGE).embedding.embedding_dim == 16


def test_a_coordinate_outside_the_image_still_gets_a_location_token():
    # coordinates are clamped into the first and last bins: never a text token or past the vocabulary
    model = build("cpu", IMAGE, num_bins=10)
    tokens = model.location_tokens(torch.tensor([-3.0, 100.0]), 64.0)
    assert (tokens - model.bin_start).tolist() == [0, 9]
