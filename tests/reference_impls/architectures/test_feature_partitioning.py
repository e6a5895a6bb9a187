"""Feature partitioning: feasible P, masks that realise it, a task reads only its channels."""

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures.feature_partitioning import (
    FeaturePartitioning, feasible_partition, partition_masks,
)
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_off_diagonal_is_rescaled_into_the_feasible_range():
    raw = torch.tensor([[0.6, 0.5], [0.9, 0.8]])
    p = feasible_partition(raw)
    # overlap of a 0.6 and a 0.8 share lies in [0.6 + 0.8 - 1, min(0.6, 0.8)] = [0.4, 0.6]
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.5], [0.5, 0.8]]))
    torch.testing.assert_close(feasible_partition(torch.tensor([[0.3, 0.0], [0.0, 0.3]]))[0, 1], torch.tensor(0.0))
    torch.testing.assert_close(feasible_partition(torch.tensor([[0.9, 0.0], [0.0, 0.9]]))[0, 1], torch.tensor(0.8))


def test_masks_have_the_asked_sizes_and_overlaps():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.625]])
    masks = partition_masks(p, 8, torch.Generator().manual_seed(0))
    assert masks.sum(1).tolist() == [4, 4, 5]
    assert torch.equal(masks[0], torch.arange(8) < 4)  # the first task takes the first channels
    overlap = (masks[:, None] & masks[None]).sum(-1)
    assert overlap.tolist() == (p * 8).round().long().tolist()


def test_a_task_depends_only_on_its_channels(device):
    torch.manual_seed(0)
    model = build("feature_partitioning", VEC, width=8).to(device)
    x = torch.randn(5, 6, device=device)
    before = model(x)
    with torch.no_grad():
        for block, mask in zip(model.blocks, model.masks):
            block[0].weight[~mask[0]] += 10.0  # rows (output channels) task a does not use
            block[0].bias[~mask[0]] -= 3.0
    after = model(x)
    torch.testing.assert_close(after["a"], before["a"])
    assert not torch.allclose(after["b"], before["b"])  # b uses some of those channels


def test_gradient_of_a_task_stays_in_its_rows(device):
    torch.manual_seed(0)
    model = build("feature_partitioning", VEC, width=8).to(device)
    model(torch.randn(5, 6, device=device))["b"].square().sum().backward()
    for block, mask in zip(model.blocks, model.masks):
        assert block[0].weight.grad[~mask[1]].abs().sum() == 0
        assert block[0].weight.grad[mask[1]].abs().sum() > 0
    assert all(p.grad is None for p in model.heads["a"].parameters())


def test_disjoint_partition_gives_independent_networks(device, fit):
    torch.manual_seed(0)
    model = build("feature_partitioning", VEC, width=8, fraction=0.5, overlap=0.0).to(device)
    assert not (model.masks[:, 0] & model.masks[:, 1]).any()
    x = torch.randn(6, 6, device=device)
    # task a is exactly the narrow network made of its own rows and columns
    keep = [m[0].nonzero().squeeze(1) for m in model.masks]
    h = torch.relu(F.linear(x, model.blocks[0][0].weight[keep[0]], model.blocks[0][0].bias[keep[0]]))
    w1 = model.blocks[1][0].weight[keep[1]][:, keep[0]]
    h = torch.relu(F.linear(h, w1, model.blocks[1][0].bias[keep[1]]))
    head = model.heads["a"][0]
    torch.testing.assert_close(model(x)["a"], F.linear(h, head.weight[:, keep[1]], head.bias))
    # training task b alone leaves task a untouched
    before = model(x)["a"].detach().clone()
    fit(model, x, lambda out: (out["b"] - 1).square().mean(), 10, 1e-2)
    torch.testing.assert_close(model(x)["a"], before)


def test_full_partition_is_shared_bottom(device):
    torch.manual_seed(0)
    model = build("feature_partitioning", VEC, width=8, fraction=1.0, overlap=1.0).to(device)
    assert model.masks.all()
    x = torch.randn(4, 6, device=device)
    trunk = torch.nn.Sequential(*model.blocks)
    for t in VEC.tasks:
        torch.testing.assert_close(model(x)[t], model.heads[t](trunk(x)))


def test_parameter_count_is_the_trunk_plus_heads(n_params):
    model = build("feature_partitioning", VEC, width=8)
    assert isinstance(model, FeaturePartitioning)
    assert n_params(model) == (6 * 8 + 8) + (8 * 8 + 8) + (8 + 1) + (2 * 8 + 2)


def test_registry_build_and_short_training(device, short_training, registry_output_shapes):
    registry_output_shapes("feature_partitioning", device)
    for dense in (True, False):
        first, last = short_training("feature_partitioning", dense, device, 15)
        assert last < 0.8 * first


def test_task_specific_parameters_are_the_head_only(split_by_task):
    """Channel ownership lives inside the shared tensors; a task claims its head and reaches no other."""
    torch.manual_seed(0)
    model = build("feature_partitioning", VEC, width=8)
    trunk = {n for n, _ in model.named_parameters() if n.startswith("blocks.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 6)).items():
        assert own == {f"heads.{t}.0.weight", f"heads.{t}.0.bias"}
        assert reached == own | trunk


def test_raw_values_outside_the_unit_range_still_give_a_feasible_partition():
    """P lies in [0, 1]: the diagonal is clipped to [0, 1] and the off-diagonal to its feasible range."""
    raw = torch.tensor([[1.4, 2.0, -0.5], [0.0, -0.3, 0.5], [0.0, 0.0, 0.7]])
    p = feasible_partition(raw)
    torch.testing.assert_close(p.diagonal(), torch.tensor([1.0, 0.0, 0.7]))
    # a = 1 and c = 0.7 share [max(0, 1 + 0.7 - 1), min(1, 0.7)] = [0.7, 0.7]; b uses nothing, so shares 0
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.7], [0.0, 0.0, 0.0], [0.7, 0.0, 0.7]]))
    # a raw value above 1 reaches the top of the range, one below 0 stays at its bottom
    two = lambda hi, lo: feasible_partition(torch.tensor([[0.6, hi], [lo, 0.8]]))[0, 1]  # noqa: E731
    torch.testing.assert_close(two(3.0, 0.0), torch.tensor(0.6))
    torch.testing.assert_close(two(-2.0, 0.0), torch.tensor(0.4))


def test_channel_counts_are_the_nearest_integers():
    """0.7 of 8 channels is 5.6, so a task gets 6 channels (not 5); a shared 0.45 * 8 = 3.6 gives 4."""
    p = torch.tensor([[0.7, 0.45], [0.45, 0.7]])
    masks = partition_masks(p, 8, torch.Generator().manual_seed(0))
    assert masks.sum(1).tolist() == [6, 6]
    assert (masks[0] & masks[1]).sum().item() == 4


def test_sampling_weights_expect_the_asked_overlap():
    """Against one earlier task s the weights are per-channel probabilities: their sum over s's
    channels is the overlap asked for, their sum over the rest the task's remaining channels."""
    from reference_impls.architectures.feature_partitioning import _sampling_weights

    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, :3] = True  # the earlier task has 3 channels
    counts = torch.tensor([[3, 1], [1, 4]])  # the next one wants 4, one of them shared
    w = _sampling_weights(masks, counts, 1)
    torch.testing.assert_close(w, torch.tensor([1 / 3] * 3 + [3 / 5] * 5, dtype=torch.float64))
    torch.testing.assert_close(w[masks[0]].sum().item(), 1.0)
    torch.testing.assert_close(w[~masks[0]].sum().item(), 3.0)


def test_the_seed_draws_the_channels():
    masks = lambda seed: build("feature_partitioning", VEC, width=8, seed=seed).masks  # noqa: E731
    assert torch.equal(masks(3), masks(3))
    assert not torch.equal(masks(0)[:, 1], masks(1)[:, 1])


def test_sampling_weights_by_hand_at_the_edges():
    """inside = shared / k_s, outside = (k_t - shared) / (C - k_s), and uniform weights when the
    earlier tasks leave no channel with positive weight."""
    from reference_impls.architectures.feature_partitioning import _sampling_weights

    def weights(first: int, counts: list[list[int]], channels: int = 8) -> list[float]:
        masks = torch.zeros(2, channels, dtype=torch.bool)
        masks[0, :first] = True
        return _sampling_weights(masks, torch.tensor(counts), 1).tolist()

    assert weights(1, [[1, 1], [1, 3]]) == pytest.approx([1.0] + [2 / 7] * 7)  # s has a single channel
    assert weights(3, [[3, 2], [2, 2]]) == pytest.approx([2 / 3] * 3 + [0.0] * 5)  # all of t inside s
    assert weights(3, [[3, 1], [1, 2]], channels=4) == pytest.approx([1 / 3] * 3 + [1.0])  # one channel left
    assert weights(3, [[3, 0], [0, 1]]) == pytest.approx([0.0] * 3 + [1 / 5] * 5)  # weights summing to 1
    masks = torch.zeros(3, 8, dtype=torch.bool)
    masks[0, :2], masks[1, 2:4] = True, True
    counts = torch.tensor([[2, 0, 1], [0, 2, 0], [1, 0, 2]])  # two earlier tasks: a product below 1 in sum
    expected = [1 / 2 * 1 / 3] * 2 + [1 / 6 * 0.0] * 2 + [1 / 6 * 1 / 3] * 4
    assert _sampling_weights(masks, counts, 2).tolist() == pytest.approx(expected)
    masks = torch.zeros(3, 8, dtype=torch.bool)
    masks[0, :4], masks[1, 4:] = True, True
    counts = torch.tensor([[4, 0, 0], [0, 4, 0], [0, 0, 2]])  # t may share with neither: nothing is left
    assert _sampling_weights(masks, counts, 2).tolist() == [1.0] * 8


def test_a_task_gets_what_channels_remain_and_single_channel_tasks_are_drawn():
    """t asks for 4 channels shared with neither earlier task, but only 2 are free: it gets those 2
    (never a channel the partition forbids); a task asking for one channel gets one."""
    p = torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.5]])
    masks = partition_masks(p, 8, torch.Generator().manual_seed(0))
    assert masks.sum(1).tolist() == [4, 2, 2]
    assert not (masks[2] & (masks[0] | masks[1])).any()
    single = partition_masks(torch.tensor([[0.5, 0.0], [0.0, 0.125]]), 8, torch.Generator().manual_seed(0))
    assert single[1].sum().item() == 1 and not (single[0] & single[1]).any()


def test_best_of_sixteen_draws_by_default_and_depth_sets_the_number_of_masked_layers():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.625]])
    default = partition_masks(p, 16, torch.Generator().manual_seed(1))  # a seed where 17 draws would differ
    assert torch.equal(default, partition_masks(p, 16, torch.Generator().manual_seed(1), draws=16))
    model = build("feature_partitioning", VEC, width=8, depth=3)
    assert len(model.blocks) == 3 and model.masks.shape == (3, 2, 8)
