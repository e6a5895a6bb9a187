import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.mcn import MCN, centernet_focal_loss, decode_detections
from reference_impls.architectures.registry import Problem, build

KINDS = {"cars": "detection", "people": "pose", "road": "segmentation"}
OUT = {"cars": 3, "people": 5, "road": 4}


def mixed(**kwargs) -> MCN:
    torch.manual_seed(0)
    return MCN(tuple(KINDS), 3, OUT, kinds=KINDS, channels=8, **kwargs)


def test_centernet_outputs_of_each_kind(device):
    model = mixed().to(device)
    out = model(torch.randn(2, 3, 16, 12, device=device))
    assert out["cars"].shape == (2, 3 + 2 + 2, 4, 3)  # C heatmaps, size, offset at stride 4
    assert out["people"].shape == (2, 1 + 2 + 2 + 2 * 5 + 5 + 2, 4, 3)
    assert out["road"].shape == (2, 4, 16, 12)  # per-pixel classes at input size
    maps = model.split("people", out["people"])
    assert list(maps) == ["heatmap", "size", "offset", "joints", "joint_heatmap", "joint_offset"]
    assert maps["joints"].shape[1] == 10 and maps["joint_heatmap"].shape[1] == 5


def test_every_head_reads_one_backbone_pass():
    model = mixed()
    x = torch.randn(2, 3, 8, 8)
    z = model.encode(x)
    assert z.shape == (2, 8, 2, 2)
    for t, y in model(x).items():
        head = model.heads[t]
        first = next(iter(head))
        torch.testing.assert_close(y[:, : model.maps[t][first]], head[first](z) if t != "road"
                                   else F.interpolate(head[first](z), size=(8, 8), mode="bilinear"))


def test_backbone_and_every_head_by_hand_relu_after_each_3x3_conv(device):
    """F = ReLU(conv s2(ReLU(conv s2(ReLU(conv(x)))))), each map = conv1x1(ReLU(conv3x3(F))), from the weights."""
    model = mixed().to(device).double()
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    c0, c1, c2 = (m for m in model.backbone if isinstance(m, torch.nn.Conv2d))
    z = torch.relu(F.conv2d(x, c0.weight, c0.bias, padding=1))
    z = torch.relu(F.conv2d(z, c1.weight, c1.bias, stride=2, padding=1))
    z = torch.relu(F.conv2d(z, c2.weight, c2.bias, stride=2, padding=1))
    torch.testing.assert_close(model.encode(x), z, rtol=1e-12, atol=1e-12)
    out = model.decode(z, size=(8, 8))
    for t in ("cars", "people"):
        maps = []
        for head in model.heads[t].values():
            hidden = torch.relu(F.conv2d(z, head[0].weight, head[0].bias, padding=1))
            maps.append(F.conv2d(hidden, head[-1].weight, head[-1].bias))
        torch.testing.assert_close(out[t], torch.cat(maps, dim=1), rtol=1e-12, atol=1e-12)


def test_decode_of_encode_is_forward_when_the_input_side_is_not_a_multiple_of_the_stride():
    """MGDA-UB and Rep-MTL train on decode(encode(x)): segmentation must come back at the input's size."""
    model = mixed()
    x = torch.randn(2, 3, 9, 7)  # a 3 x 2 grid at stride 4, which 4x up-sampling would make 12 x 8
    expected = model(x)
    for t, y in model.decode(model.encode(x)).items():
        torch.testing.assert_close(y, expected[t])
    z = model.encode(torch.randn(1, 3, 16, 16))
    assert model.decode(z)["road"].shape[-2:] == (16, 16)
    assert model.decode(torch.randn(1, 8, 5, 5))["road"].shape[-2:] == (20, 20)  # no input seen: stride x grid


def test_a_task_loss_reaches_the_backbone_and_only_its_own_heads(params_with_grad):
    model = mixed()
    touched = params_with_grad(model, model(torch.randn(2, 3, 8, 8))["people"].square().sum())
    assert {n.split(".")[0] for n in touched} == {"backbone", "heads"}
    assert all(n.startswith("heads.people.") for n in touched if n.startswith("heads"))
    assert {n.split(".")[2] for n in touched if n.startswith("heads")} == set(model.maps["people"])


def test_network_size_is_one_backbone_plus_heads(n_params):
    """MCN's efficiency claim: adding a task adds its heads only, not another backbone."""
    model = mixed()
    backbone = n_params(model.backbone)
    singles = [MCN((t,), 3, {t: OUT[t]}, kinds={t: KINDS[t]}, channels=8) for t in KINDS]
    assert n_params(model) == sum(n_params(s) for s in singles) - 2 * backbone
    assert n_params(model) == backbone + sum(n_params(model.heads[t]) for t in KINDS)


def test_heatmaps_start_at_the_centernet_prior():
    model = mixed()
    for t, name in (("cars", "heatmap"), ("people", "heatmap"), ("people", "joint_heatmap")):
        torch.testing.assert_close(model.heads[t][name][-1].bias.sigmoid(),
                                   torch.full_like(model.heads[t][name][-1].bias, 0.1))
    assert not torch.allclose(model.heads["cars"]["size"][-1].bias.sigmoid(), torch.tensor(0.1))


def test_decoding_recovers_a_planted_box():
    out = torch.full((1, 3 + 4, 6, 5), -8.0)
    out[0, 1, 4, 2] = 3.0  # class 1 peak at x = 2, y = 4 (stride-4 grid)
    out[0, 1, 4, 3] = 2.0  # a weaker neighbour: not a 3x3 peak, suppressed
    out[0, 0, 1, 1] = 0.0  # a separate class-0 peak
    out[0, 3:5, 4, 2] = torch.tensor([2.5, 1.5])  # size w, h
    out[0, 5:7, 4, 2] = torch.tensor([0.25, 0.5])  # offset dx, dy
    boxes, scores, classes = decode_detections(out, num_classes=3, k=2)
    torch.testing.assert_close(scores[0], torch.tensor([torch.sigmoid(torch.tensor(3.0)).item(), 0.5]))
    assert classes[0].tolist() == [1, 0]
    cx, cy = (2 + 0.25) * 4, (4 + 0.5) * 4
    torch.testing.assert_close(boxes[0, 0], torch.tensor([cx - 5.0, cy - 3.0, cx + 5.0, cy + 3.0]))


def test_decoding_keeps_peaks_two_cells_apart_and_reads_each_image_of_a_batch():
    out = torch.full((2, 3 + 4, 6, 5), -8.0)
    out[:, 3:] = 0.0  # sizes and offsets 0 unless set
    out[0, 2, 1, 0], out[0, 2, 1, 2] = 2.0, 1.0  # two class-2 peaks two cells apart: both 3x3 maxima
    out[1, 0, 3, 4] = 1.0  # the second image: one class-0 peak elsewhere
    out[0, 3:5, 1, 2] = torch.tensor([1.0, 1.0])
    out[1, 3:5, 3, 4] = torch.tensor([2.0, 0.5])
    boxes, scores, classes = decode_detections(out, num_classes=3, k=2)
    torch.testing.assert_close(scores[0], torch.tensor([2.0, 1.0]).sigmoid())
    assert classes[0].tolist() == [2, 2] and classes[1, 0] == 0
    torch.testing.assert_close(boxes[0, 1], torch.tensor([2 - 0.5, 1 - 0.5, 2 + 0.5, 1 + 0.5]) * 4)
    torch.testing.assert_close(boxes[1, 0], torch.tensor([4 - 1.0, 3 - 0.25, 4 + 1.0, 3 + 0.25]) * 4)


def test_focal_loss_matches_the_centernet_formula():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.5], [0.0, 0.9]]]])
    p = logits.sigmoid()
    positive = (1 - p[0, 0, 0, 0]) ** 2 * p[0, 0, 0, 0].log()
    negative = sum((1 - target[0, 0, i, j]) ** 4 * p[0, 0, i, j] ** 2 * (1 - p[0, 0, i, j]).log()
                   for i, j in ((0, 1), (1, 0), (1, 1)))
    torch.testing.assert_close(centernet_focal_loss(logits, target), -(positive + negative))
    near = centernet_focal_loss(torch.tensor([[[[2.0, 1.0]]]]), torch.tensor([[[[1.0, 0.99]]]]))
    far = centernet_focal_loss(torch.tensor([[[[2.0, 1.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    assert near < far  # a confident pixel next to a center is penalised less (1 - Y)^beta


def test_the_registry_builds_per_pixel_tasks_for_dense_problems():
    problem = Problem(("seg", "depth"), (3, 9, 7), {"seg": 5, "depth": 1}, dense=True)
    model = build("mcn", problem, width=8)
    assert type(model) is MCN and model.name == "mcn" and set(model.kinds.values()) == {"segmentation"}
    out = model(torch.randn(2, 3, 9, 7))
    assert out["seg"].shape == (2, 5, 9, 7) and out["depth"].shape == (2, 1, 9, 7)
    for problem in (Problem(("a",), (4,)), Problem(("a",), (3, 8, 8))):
        with pytest.raises(ValueError, match="needs a dense image problem"):
            build("mcn", problem)


@pytest.mark.parametrize("kwargs, message", [
    ({"kinds": {"cars": "tracking", "people": "pose", "road": "segmentation"}}, "unknown task kind 'tracking'"),
    ({"kinds": {"cars": "detection"}}, "kinds must name every task"), ({"head_channels": 0}, "head_channels must be"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MCN(tuple(KINDS), 3, OUT, **{"kinds": KINDS, **kwargs})



def test_split_names_the_maps_of_detection_and_segmentation_tasks():
    # a detection task's output is C heatmaps, then size and offset; a segmentation task's is its logits
    model = mixed()
    out = model(torch.randn(1, 3, 8, 8))
    assert list(model.split("cars", out["cars"])) == ["heatmap", "size", "offset"]
    assert [m.shape[1] for m in model.split("cars", out["cars"]).values()] == [3, 2, 2]
    assert list(model.split("road", out["road"])) == ["logits"]


@pytest.mark.parametrize("kwargs, message", [({"in_channels": 0}, "^in_channels must be"),
                                             ({"channels": 0}, "^channels must be")])
def test_zero_input_or_backbone_channels_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MCN(tuple(KINDS), out_dims=OUT, kinds=KINDS, **{"in_channels": 3, **kwargs})


def test_the_registry_width_is_the_backbone_width_and_keywords_reach_the_model():
    problem = Problem(("seg",), (3, 8, 8), {"seg": 2}, dense=True)
    model = build("mcn", problem, width=6, head_channels=5)
    assert model.backbone[0].out_channels == 6 and model.heads["seg"]["logits"][0].out_channels == 5


def test_a_fresh_model_decodes_at_stride_times_the_grid():
    # nothing encoded yet: segmentation comes back at 4x the grid
    model = mixed()
    assert model.decode(torch.randn(1, 8, 3, 2))["road"].shape[-2:] == (12, 8)


def test_focal_loss_is_normalised_by_the_number_of_centers():
    # the same pixel pair twice: twice the sum, twice the centers, the same loss
    logits, target = torch.tensor([[[[2.0, -1.0]]]]), torch.tensor([[[[1.0, 0.3]]]])
    once = centernet_focal_loss(logits, target)
    torch.testing.assert_close(centernet_focal_loss(logits.repeat(1, 1, 2, 1), target.repeat(1, 1, 2, 1)), once)


def test_decoding_returns_every_cell_when_k_exceeds_them_and_refuses_k_or_classes_of_zero():
    out = torch.zeros(1, 1 + 4, 2, 3)
    boxes, scores, classes = decode_detections(out, num_classes=1, k=10)
    assert boxes.shape == (1, 6, 4) and scores.shape == (1, 6)  # 1 class x 2 x 3 cells, all equal peaks
    for bad in ({"k": 0}, {"num_classes": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            decode_detections(out, **{"num_classes": 1, **bad})
