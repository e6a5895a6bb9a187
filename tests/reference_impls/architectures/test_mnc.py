import pytest
import torch

from reference_impls.architectures.mnc import MNC, decode_boxes, grid_anchors, paste_masks, roi_warp
from reference_impls.architectures.registry import Problem, build

DENSE = Problem(("seg", "parts"), (3, 8, 8), {"seg": 3, "parts": 2}, dense=True)
POOLED = Problem(("cls", "attr"), (3, 8, 8), {"cls": 3, "attr": 1})


def linear_map(a: float, b: float, c: float, size: int = 8) -> torch.Tensor:
    """A (1, 1, size, size) map whose cell (y, x) holds a (x + 0.5) + b (y + 0.5) + c."""
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    return (a * centres[None, :] + b * centres[:, None] + c)[None, None]


def test_roi_warp_samples_a_linear_map_exactly_and_differentiates_in_the_box():
    """Bilinear sampling reproduces a linear map, so the warp and its box derivative are known."""
    a, b, c, s = 2.0, -3.0, 1.0, 4
    box = torch.tensor([[[1.5, 2.0, 5.5, 6.5]]], dtype=torch.float64, requires_grad=True)
    warped = roi_warp(linear_map(a, b, c), box, s)[0, 0, 0]  # (s, s), rows y, columns x
    steps = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    xs, ys = 1.5 + 4.0 * steps, 2.0 + 4.5 * steps
    torch.testing.assert_close(warped, a * xs[None, :] + b * ys[:, None] + c)
    (grad,) = torch.autograd.grad(warped.sum(), box)
    # d/dx1 = a sum_j (1 - step_j) per row, d/dx2 = a sum_j step_j per row, likewise in y.
    expected = torch.stack([a * s * (1 - steps).sum(), b * s * (1 - steps).sum(),
                            a * s * steps.sum(), b * s * steps.sum()])
    torch.testing.assert_close(grad[0, 0], expected)


def test_box_decoding_moves_the_centre_by_anchor_size_and_scales_exponentially():
    anchors = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    deltas = torch.tensor([[[0.5, -1.0, torch.log(torch.tensor(2.0)), 0.0]]])
    torch.testing.assert_close(decode_boxes(anchors, deltas), torch.tensor([[[0.0, -2.0, 8.0, 0.0]]]))


def test_box_scale_is_capped_so_a_diverging_delta_gives_a_finite_box():
    anchors = torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    boxes = decode_boxes(anchors, torch.tensor([[[0.0, 0.0, 1e4, 1e4]]]))
    assert torch.isfinite(boxes).all()
    torch.testing.assert_close(boxes[0, 0, 2] - boxes[0, 0, 0], torch.tensor(4.0 * 1000 / 16))


def test_categories_depend_on_the_stage1_boxes_through_warping_and_masking():
    """The paper's point: stage 3's scores have a gradient in stage 1's box deltas, through the
    warped features of stage 2 and the mask; it matches finite differences."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4).double()
    features = model.encode(torch.randn(1, 3, 8, 8, dtype=torch.float64)).detach()
    _, deltas, _ = model.propose(features)
    deltas = deltas.detach().requires_grad_()

    anchors = grid_anchors(2, 8, 8).double()

    def cascade(d):
        boxes = decode_boxes(anchors, d)
        roi, masks = model.estimate_masks(features, boxes)
        return model.categorize(roi, masks)["cls"].sum(), masks.sum()

    score, mask_total = cascade(deltas)
    score_grad, mask_grad = (torch.autograd.grad(v, deltas, retain_graph=True)[0] for v in (score, mask_total))
    assert score_grad.abs().min() > 0 and mask_grad.abs().max() > 0
    for index in [(0, 0, 0), (0, 1, 2), (0, 3, 1)]:
        step = torch.zeros_like(deltas)
        step[index] = 1e-6
        numeric = (cascade(deltas + step)[0] - cascade(deltas - step)[0]) / 2e-6
        torch.testing.assert_close(score_grad[index], numeric, rtol=1e-5, atol=1e-8)


def test_stage3_reads_the_mask_product_and_the_task_loss_trains_the_proposal_head(params_with_grad):
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4)
    s = model.stages(model.encode(torch.randn(2, 3, 8, 8)))
    roi, _ = model.estimate_masks(model.encode(torch.randn(2, 3, 8, 8)), s["boxes"])
    ones = torch.ones_like(s["masks"])
    torch.testing.assert_close(model.masked_features(roi, ones), roi)
    torch.testing.assert_close(model.masked_features(roi, 0.5 * ones), 0.5 * roi)
    assert not torch.allclose(model.categorize(roi, ones)["cls"], model.categorize(roi, 0 * ones)["cls"])
    out = model(torch.randn(2, 3, 8, 8))
    assert {"proposal.0.weight", "mask_head.1.weight"} <= params_with_grad(model, out["cls"].sum())


def test_dense_output_is_the_background_outside_every_box():
    torch.manual_seed(0)
    model = build("mnc", DENSE, width=4, anchor_grid=1)
    with torch.no_grad():
        model.proposal[2].weight.zero_()
        model.proposal[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, -1.0]))  # a box 8 e^-1 = 2.9 wide
    out = model(torch.randn(1, 3, 8, 8))["seg"] - model.background["seg"][:, None, None]
    box = model.stages(model.encode(torch.randn(1, 3, 8, 8)))["boxes"][0, 0]
    torch.testing.assert_close(box, torch.full((4,), 4.0) + 4 / torch.e * torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert (out[..., :2, :] == 0).all() and (out[..., 6:, :] == 0).all() and (out[..., :, :2] == 0).all()
    assert (out[..., 3:5, 3:5] != 0).all()
    masks = torch.ones(1, 1, 2, 2)
    pasted = paste_masks(masks, torch.tensor([[[2.0, 2.0, 6.0, 6.0]]]), 8, 8)[0, 0]
    torch.testing.assert_close(pasted[2:6, 2:6], torch.ones(4, 4))
    assert pasted.sum() == 16


def test_refusals_and_registry(device, short_training, registry_output_shapes):
    with pytest.raises(ValueError, match="image"):
        build("mnc", Problem(("a", "b"), (5,)))
    with pytest.raises(ValueError, match="mask_size"):
        build("mnc", DENSE, mask_size=0)
    assert type(build("mnc", DENSE)) is MNC
    registry_output_shapes("mnc", device)
    before, after = short_training("mnc", False, device, 30)
    assert after < 0.5 * before


def test_task_specific_parameters_are_the_classifiers(split_by_task):
    torch.manual_seed(0)
    model = build("mnc", DENSE, width=4)
    for t, (own, reached) in split_by_task(model, torch.randn(2, 3, 8, 8)).items():
        assert own == {f"classifiers.{t}.weight", f"classifiers.{t}.bias", f"background.{t}"} and own <= reached


def test_stage3_max_pools_both_paths_2x2_before_their_fc_layers():
    # The authors' prototxt pools the (masked) 14 x 14 RoI features 2 x 2 to 7 x 7 before fc6_mask
    # and fc6 ("roi_interpolate_conv5_mask", "roi_interpolate_conv5_box").
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4)
    roi = torch.randn(2, 4, 4, model.roi_size, model.roi_size)
    masks = torch.rand(2, 4, model.mask_size, model.mask_size)
    assert model.masked_path[1].in_features == 4 * (model.roi_size // 2) ** 2
    assert model.box_path[1].in_features == 4 * (model.roi_size // 2) ** 2
    pool = torch.nn.functional.max_pool2d
    masked = model.masked_path[1:](pool(model.masked_features(roi, masks).flatten(0, 1), 2).flatten(1))
    box = model.box_path[1:](pool(roi.flatten(0, 1), 2).flatten(1))
    expected = model.classifiers["cls"](torch.cat([masked, box], dim=1)).view(2, 4, -1)
    torch.testing.assert_close(model.categorize(roi, masks)["cls"], expected)


def test_stage2_warps_at_twice_the_grid_then_max_pools_2x2():
    """On a linear map a x + b y + c (a > 0, b < 0) each 2 x 2 block's maximum is its sample with the
    larger x and the smaller y, so the pooled RoI features are known in closed form."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4).double()
    a, b, c, s = 2.0, -3.0, 1.0, model.roi_size
    features = linear_map(a, b, c).expand(1, 4, 8, 8)
    roi, _ = model.estimate_masks(features, torch.tensor([[[1.0, 2.0, 5.0, 6.0]]], dtype=torch.float64))
    fine = 1.0 + 4.0 * (torch.arange(2 * s, dtype=torch.float64) + 0.5) / (2 * s)  # x (from 1) and y (from 2 = 1 + 1)
    xs, ys = fine[1::2], fine[0::2] + 1.0
    expected = a * xs[None, :] + b * ys[:, None] + c
    torch.testing.assert_close(roi[0, 0], expected.expand(4, s, s))


def test_stage2_masks_are_a_sigmoid_of_the_mask_head():
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4)
    with torch.no_grad():
        model.mask_head[3].weight.zero_()
        model.mask_head[3].bias.fill_(torch.log(torch.tensor(3.0)).item())
    features = model.encode(torch.randn(2, 3, 8, 8))
    _, masks = model.estimate_masks(features, model.propose(features)[2])
    torch.testing.assert_close(masks, torch.full_like(masks, 0.75))


def test_roi_warp_reads_the_border_past_the_image():
    """Samples past the image read the border cell (not zero), as the module docstring says."""
    warped = roi_warp(linear_map(1.0, 0.0, 0.0), torch.tensor([[[6.0, 0.0, 10.0, 8.0]]], dtype=torch.float64), 4)
    torch.testing.assert_close(warped[0, 0, 0, 0], torch.tensor([6.5, 7.5, 7.5, 7.5], dtype=torch.float64))


def with_stages(model: MNC, objectness: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                scores: torch.Tensor) -> MNC:
    """``model`` whose decode reads these hand-made stage outputs (one task, ``cls`` or ``seg``)."""
    model.stages = lambda z: {"objectness": objectness, "boxes": boxes, "masks": masks,
                              "scores": {model.tasks[0]: scores}}
    return model


def test_pooled_output_averages_the_rois_with_softmax_objectness_weights():
    # objectness (0, log 3) -> weights (1/4, 3/4); scores 1 and 5 -> 1/4 + 15/4 = 4.
    model = with_stages(build("mnc", POOLED, width=4), torch.tensor([[0.0, torch.log(torch.tensor(3.0))]]),
                        torch.zeros(1, 2, 4), torch.ones(1, 2, 6, 6), torch.tensor([[[1.0], [5.0]]]))
    torch.testing.assert_close(model.decode(torch.zeros(1, 4, 4, 4))["cls"], torch.tensor([[4.0]]))


def test_dense_output_pastes_weighted_masks_and_fills_the_uncovered_share_with_the_background():
    """RoI A (weight 1/4, mask 1, score 2) covers the left half of a 4 x 4 image, RoI B (weight 3/4,
    mask 1/2, score 4) all of it. Left: covered 1/4 + 3/8 = 5/8, output 1/2 + 3/2 + 3/8 bg;
    right: covered 3/8, output 3/2 + 5/8 bg."""
    problem = Problem(("seg", "parts"), (3, 4, 4), {"seg": 1, "parts": 1}, dense=True)
    masks = torch.stack([torch.ones(6, 6), torch.full((6, 6), 0.5)])[None]
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 4.0], [0.0, 0.0, 4.0, 4.0]]])
    model = with_stages(build("mnc", problem, width=4), torch.tensor([[0.0, torch.log(torch.tensor(3.0))]]),
                        boxes, masks, torch.tensor([[[2.0], [4.0]]]))
    bg = model.background["seg"].item()
    out = model.decode(torch.zeros(1, 4, 4, 4))["seg"][0, 0]
    torch.testing.assert_close(out[:, :2], torch.full((4, 2), 2.0 + 3 / 8 * bg))
    torch.testing.assert_close(out[:, 2:], torch.full((4, 2), 1.5 + 5 / 8 * bg))


def test_task_losses_reach_the_box_deltas_and_the_features_through_the_warping():
    """End to end training of the cascade: a task output's gradient reaches the proposal head's
    delta outputs (through the decoded boxes, not only objectness) and stage 2 reads the features
    with their gradient."""
    torch.manual_seed(0)
    for problem in (POOLED, DENSE):
        model = build("mnc", problem, width=4)
        model(torch.randn(2, 3, 8, 8))[problem.tasks[0]].sum().backward()
        assert (model.proposal[2].weight.grad[1:].abs().sum(dim=(1, 2, 3)) > 0).all()
    features = model.encode(torch.randn(1, 3, 8, 8)).detach().requires_grad_()
    roi, masks = model.estimate_masks(features, torch.tensor([[[1.0, 1.0, 7.0, 7.0]]]))
    for value in (roi, masks):
        assert torch.autograd.grad(value.sum(), features, retain_graph=True)[0].abs().sum() > 0


def test_stage1_reads_objectness_and_deltas_at_the_anchor_centres():
    """With the proposal head replaced by the identity, channel 0 of the features holds the cell
    centres' x and channel 1 their y: the 2 x 2 anchors of an 8 x 8 map are centred at x, y in {2, 6}."""
    model = build("mnc", POOLED, width=4).double()
    model.proposal = torch.nn.Identity()
    features = torch.cat([linear_map(1.0, 0.0, 0.0), linear_map(0.0, 1.0, 0.0),
                          torch.zeros(1, 3, 8, 8, dtype=torch.float64)], dim=1)
    objectness, deltas, _ = model.propose(features)
    torch.testing.assert_close(objectness[0], torch.tensor([2.0, 6.0, 2.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(deltas[0, :, 0], torch.tensor([2.0, 2.0, 6.0, 6.0], dtype=torch.float64))
    assert (deltas[0, :, 1:] == 0).all()


def test_stage3_pools_an_odd_grid_in_caffe_ceil_mode():
    """roi_size 3: the 2 x 2 windows are rows / columns {0, 1} and {2}, so a 3 x 3 map 0 ... 8
    pools to [[4, 5], [7, 8]] on both paths (the mask is all ones)."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4, roi_size=3)
    seen = {}
    for name in ("masked_path", "box_path"):
        getattr(model, name).register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0]))
    roi = torch.arange(9.0).view(3, 3).expand(1, 1, 4, 3, 3)
    model.categorize(roi, torch.ones(1, 1, model.mask_size, model.mask_size))
    for name in ("masked_path", "box_path"):
        torch.testing.assert_close(seen[name], torch.tensor([[4.0, 5.0], [7.0, 8.0]]).expand(1, 4, 2, 2))


def _relu_affine(layer, t):
    return (t @ layer.weight.T + layer.bias).clamp_min(0)


def test_stage1_head_is_conv3x3_relu_conv1x1_read_at_the_anchor_centres_by_hand():
    """Objectness and deltas: conv1x1(ReLU(conv3x3(f))) read bilinearly at each anchor centre,
    which on an 8 x 8 map with 2 x 2 anchors is the mean of the four cells around (x, y) in {2, 6}."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4).double()
    features = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    c1, c2 = model.proposal[0], model.proposal[2]
    F = torch.nn.functional
    maps = F.conv2d(F.conv2d(features, c1.weight, c1.bias, padding=1).clamp_min(0), c2.weight, c2.bias)
    read = torch.stack([maps[:, :, y - 1:y + 1, x - 1:x + 1].mean(dim=(2, 3)) for y in (2, 6) for x in (2, 6)], 1)
    objectness, deltas, _ = model.propose(features)
    torch.testing.assert_close(objectness, read[..., 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(deltas, read[..., 1:], rtol=1e-12, atol=1e-12)


def test_stage2_mask_head_is_sigmoid_of_fc_relu_fc_by_hand():
    """masks = sigmoid(W2 ReLU(W1 vec(RoI) + b1) + b2), from the pooled RoI features."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4).double()
    features = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    boxes = torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.5, 0.0, 8.0, 7.5]], dtype=torch.float64).expand(2, 2, 4)
    roi, masks = model.estimate_masks(features, boxes)
    hidden = _relu_affine(model.mask_head[1], roi.flatten(2))
    last = model.mask_head[3]
    expected = torch.sigmoid(hidden @ last.weight.T + last.bias).view(2, 2, model.mask_size, model.mask_size)
    torch.testing.assert_close(masks, expected, rtol=1e-12, atol=1e-12)


def test_stage3_paths_are_relu_fc_layers_on_the_pooled_features_by_hand():
    """scores = W_t [ReLU(W_m pool(masked RoI) + b_m); ReLU(W_b pool(RoI) + b_b)] + b_t."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4).double()
    s, m = model.roi_size, model.mask_size
    roi = torch.randn(2, 3, 4, s, s, dtype=torch.float64)
    masks = torch.rand(2, 3, m, m, dtype=torch.float64)
    def pool(t):
        return torch.nn.functional.max_pool2d(t, 2, ceil_mode=True).flatten(1)
    masked = _relu_affine(model.masked_path[1], pool(model.masked_features(roi, masks).flatten(0, 1)))
    box = _relu_affine(model.box_path[1], pool(roi.flatten(0, 1)))
    for t in POOLED.tasks:
        head = model.classifiers[t]
        expected = (torch.cat([masked, box], dim=1) @ head.weight.T + head.bias).view(2, 3, -1)
        torch.testing.assert_close(model.categorize(roi, masks)[t], expected, rtol=1e-12, atol=1e-12)


def test_box_decoding_uses_the_anchor_size_wherever_the_anchor_sits():
    """An anchor away from the origin, (2, 4)-(6, 10): width 4, height 6. Zero deltas give the
    anchor back; dx = 0.5 moves the centre by 2, dh = log 2 doubles the height."""
    anchors = torch.tensor([[2.0, 4.0, 6.0, 10.0]])
    torch.testing.assert_close(decode_boxes(anchors, torch.zeros(1, 1, 4)), anchors[None])
    moved = decode_boxes(anchors, torch.tensor([[[0.5, 0.0, 0.0, torch.log(torch.tensor(2.0))]]]))
    torch.testing.assert_close(moved, torch.tensor([[[4.0, 1.0, 8.0, 13.0]]]))


def test_stages_expose_the_deltas_that_give_the_boxes():
    """stages() hands each stage's output to its loss: the stage-1 deltas decode to its boxes."""
    torch.manual_seed(0)
    model = build("mnc", POOLED, width=4)
    z = model.encode(torch.randn(2, 3, 8, 8))
    s = model.stages(z)
    anchors = grid_anchors(model.anchor_grid, *z.shape[-2:])
    torch.testing.assert_close(s["boxes"], decode_boxes(anchors, s["deltas"]))


def test_stage3_reads_the_mask_at_roi_cell_centres():
    """The m x m mask is resized to the s x s RoI grid by cell centres (align_corners=False), as the
    warping reads features: a mask that is 0, 1, ..., 5 across its columns gives RoI column u the
    mask at (u + 0.5) * 6 / 4 - 0.5, that is 0.25, 1.75, 3.25, 4.75."""
    model = build("mnc", POOLED, width=4, roi_size=4)
    roi = torch.ones(1, 1, 4, 4, 4)
    masks = torch.arange(6.0).expand(1, 1, 6, 6)
    expected = torch.tensor([0.25, 1.75, 3.25, 4.75]).expand(1, 1, 4, 4, 4)
    torch.testing.assert_close(model.masked_features(roi, masks), expected)


def test_an_even_roi_grid_larger_than_4_and_positive_channels():
    """roi_size 6 pools to 3 x 3 per channel before the stage-3 fc layers; zero channels are refused."""
    torch.manual_seed(0)
    model = build("mnc", DENSE, width=4, roi_size=6)
    assert model.masked_path[1].in_features == 4 * 9 and model.box_path[1].in_features == 4 * 9
    assert model(torch.randn(1, 3, 8, 8))["seg"].shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        MNC(("a",), torch.nn.Identity(), 0, {"a": 1}, False)
