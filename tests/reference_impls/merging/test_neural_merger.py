"""NeuralMerger: sub-vector layout, one codebook shared by both networks, joint k-means fixed
point, exact merge when codewords suffice, calibration objective by hand and in use."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from reference_impls.merging.neural_merger import (
    NeuralMerger,
    calibration_loss,
    join_subvectors,
    joint_codebook,
    split_subvectors,
)


def nearest(points, codebook):
    """Each point's distance to its nearest codeword, by direct differences: torch.cdist takes
    the |a|² − 2ab + |b|² route for larger inputs, whose cancellation leaves 3e-4 on zero gaps."""
    return (points[:, None, :] - codebook[None]).norm(dim=-1).min(dim=1).values


def test_subvectors_are_r_long_slices_of_input_channels():
    w = torch.arange(2 * 4 * 3 * 3, dtype=torch.float).reshape(2, 4, 3, 3)  # (out, in, kh, kw)
    sub = split_subvectors(w, 2)
    assert sub.shape == (2, 2 * 9, 2)
    # segment 1, output 1, kernel position (2, 0): input channels 2 and 3 there
    torch.testing.assert_close(sub[1, 9 + 6], w[1, 2:4, 2, 0])
    torch.testing.assert_close(join_subvectors(sub, w.shape), w)
    linear = torch.randn(5, 6)
    torch.testing.assert_close(split_subvectors(linear, 3)[1, 4], linear[4, 3:6])
    torch.testing.assert_close(join_subvectors(split_subvectors(linear, 3), linear.shape), linear)


def _from_palette(palette: torch.Tensor, out: int, in_channels: int, g: torch.Generator) -> torch.Tensor:
    """A (out, in) weight whose every r-long input slice is one row of ``palette[s]``."""
    segments, size, r = palette.shape
    pick = torch.randint(0, size, (segments, out), generator=g)
    sub = palette[torch.arange(segments).unsqueeze(1), pick]
    return join_subvectors(sub, (out, in_channels))


def test_merge_is_exact_when_both_networks_draw_from_k_shared_subvectors():
    g = torch.Generator().manual_seed(0)
    palette = torch.randn(3, 4, 2, generator=g)  # 3 segments of 4 distinct sub-vectors each
    w1, w2 = _from_palette(palette, 20, 6, g), _from_palette(palette, 30, 6, g)
    merger = NeuralMerger([{"fc.weight": w1}, {"head.weight": w2}], [["fc.weight", "head.weight"]],
                          subspace_dim=2, num_codewords=4)
    torch.testing.assert_close(merger.merged_weight(0, "fc.weight"), w1)
    torch.testing.assert_close(merger.merged_weight(1, "head.weight"), w2)
    for s in range(3):  # the codebook is the palette, in some order
        assert nearest(merger.codebooks[0][s].detach(), palette[s]).max() < 1e-5


def test_both_networks_read_the_same_codewords():
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(8, 4, generator=g), torch.randn(6, 4, generator=g) + 3.0
    merger = NeuralMerger([{"w": w1}, {"w": w2}], [["w", "w"]], subspace_dim=2, num_codewords=3)
    codebook = merger.codebooks[0]
    for k in range(2):  # every sub-vector of each merged weight is a row of the one codebook
        sub = split_subvectors(merger.merged_weight(k, "w").detach(), 2)
        for s in range(2):
            assert nearest(sub[s], codebook[s].detach()).max() < 1e-6
    # a loss on network 2 alone moves codewords that network 1 uses too
    merger.merged_weight(1, "w").sum().backward()
    used_by_1 = merger.index_0_w.unique()
    assert codebook.grad[:, used_by_1].abs().sum() > 0


def test_codebook_is_the_joint_kmeans_fixed_point_over_both_networks():
    """Each codeword is the mean of the sub-vectors of *both* networks assigned to it, and
    each sub-vector is assigned to its nearest codeword."""
    g = torch.Generator().manual_seed(2)
    w1, w2 = torch.randn(12, 4, generator=g), torch.randn(10, 4, generator=g) * 2
    codebook, (i1, i2) = joint_codebook([w1, w2], 2, 4, 100, torch.Generator().manual_seed(0))
    for s in range(2):
        pooled = torch.cat([split_subvectors(w1, 2)[s], split_subvectors(w2, 2)[s]])
        index = torch.cat([i1[s], i2[s]])
        torch.testing.assert_close(index, torch.cdist(pooled, codebook[s]).argmin(dim=1))
        for j in index.unique():
            torch.testing.assert_close(codebook[s, j], pooled[index == j].mean(0))
        assert set(i2[s].tolist()) & set(i1[s].tolist())  # some codeword serves both networks


def test_identical_networks_get_identical_merged_weights():
    w = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    merger = NeuralMerger([{"c": w}, {"c": w.clone()}], [["c", "c"]], subspace_dim=2, num_codewords=5)
    torch.testing.assert_close(merger.merged_weight(0, "c"), merger.merged_weight(1, "c"))


def test_layers_of_different_shapes_share_the_first_segments_codebooks():
    g = torch.Generator().manual_seed(4)
    big, small = torch.randn(3, 6, 3, 3, generator=g), torch.randn(4, 2, 5, 5, generator=g)  # VGG-like vs ZF-like
    merger = NeuralMerger([{"a": big}, {"b": small}], [["a", "b"]], subspace_dim=2, num_codewords=4)
    assert merger.codebooks[0].shape == (3, 4, 2)
    assert merger.index_1_b.shape == (1, 4 * 25)  # one segment, one index per (out, kh, kw)
    assert merger.merged_weight(1, "b").shape == small.shape
    sub = split_subvectors(merger.merged_weight(1, "b").detach(), 2)[0]
    assert nearest(sub, merger.codebooks[0][0].detach()).max() < 1e-6


def test_unmerged_entries_are_tuned_or_fixed_and_the_store_is_smaller():
    g = torch.Generator().manual_seed(5)
    sds = [{"body.weight": torch.randn(16, 8, generator=g), "body.bias": torch.randn(16, generator=g),
            "out.weight": torch.randn(3, 16, generator=g)} for _ in range(2)]
    merger = NeuralMerger(sds, [["body.weight", "body.weight"]], subspace_dim=4, num_codewords=4,
                          tune=["out.weight"])
    trainable = {n for n, _ in merger.named_parameters()}
    assert trainable == {"codebooks.0", "tuned.0.out__weight", "tuned.1.out__weight"}
    sd = merger.state_dict_of(1)
    assert set(sd) == {"body.weight", "body.bias", "out.weight"}
    torch.testing.assert_close(sd["body.bias"], sds[1]["body.bias"])
    # 2 segments x 4 codewords x 4 numbers + 2 networks x 2 segments x 16 indices, against 2 x 128 weights
    assert merger.stored_size() == 32 + 64 < 2 * 16 * 8


def test_a_networks_extra_state_comes_back_with_its_weights():
    """A state dict may hold a module's extra state (a dict, PathNet's pathways): it is kept,
    per network, and state_dict_of gives it back unchanged."""
    g = torch.Generator().manual_seed(6)
    sds = [{"body.weight": torch.randn(16, 8, generator=g), "_extra_state": {"paths": {"a": ((k,),)}}}
           for k in range(2)]
    merger = NeuralMerger(sds, [["body.weight", "body.weight"]], subspace_dim=4, num_codewords=4)
    for k in range(2):
        assert merger.state_dict_of(k)["_extra_state"] == {"paths": {"a": ((k,),)}}


def test_calibration_loss_by_hand():
    merged = [torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 0.0]])]
    original = [torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 1.0]])]
    labels = torch.tensor([0])
    ce = torch.nn.functional.cross_entropy(merged[-1], labels)
    # layer gaps: mean(|1|, |-2|) = 1.5 and mean(0, 1) = 0.5
    torch.testing.assert_close(calibration_loss(merged, original, labels, gamma=10.0), 2.0 + 10 * ce)
    torch.testing.assert_close(calibration_loss(merged, original, labels, gamma=0.0), torch.tensor(2.0))


def _layer_outputs(net: nn.Sequential, params, x):
    h = torch.relu(functional_call(net[0], {"weight": params["0.weight"], "bias": params["0.bias"]}, (x,)))
    return [h, functional_call(net[2], {"weight": params["2.weight"], "bias": params["2.bias"]}, (h,))]


def test_calibrating_the_codewords_brings_each_merged_network_back_towards_its_original():
    torch.manual_seed(6)
    nets = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    sds = [{n: p.detach() for n, p in net.named_parameters()} for net in nets]
    merger = NeuralMerger(sds, [["0.weight", "0.weight"]], subspace_dim=4, num_codewords=3, tune=["2.weight"])
    x = torch.randn(64, 8)
    targets = [_layer_outputs(net, sd, x) for net, sd in zip(nets, sds)]
    labels = [t[-1].argmax(1) for t in targets]

    def total() -> torch.Tensor:
        return sum(calibration_loss(_layer_outputs(nets[k], merger.state_dict_of(k), x), targets[k], labels[k])
                   for k in range(2))

    before = total().item()
    opt = torch.optim.Adam(merger.parameters(), lr=0.02)
    for _ in range(40):
        opt.zero_grad()
        total().backward()
        opt.step()
    assert total().item() < 0.7 * before


@pytest.mark.parametrize("kwargs, message", [
    ({"subspace_dim": 3}, "no input channels divisible by subspace_dim=3"),
    ({"num_codewords": 0}, "num_codewords must be at least 1, got 0"),
    ({"num_codewords": 5}, "num_codewords=5 is more than the 4 sub-vectors"),
    ({"groups": [["w"]]}, "one name \\(or None\\) per network"),
    ({"groups": [["w", "w"], [None, None]]}, "group 1 names no layer"),
    ({"subspace_dim": 0}, "subspace_dim must be at least 1, got 0"),
    ({"iterations": 0}, "iterations must be at least 1, got 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    args = {"state_dicts": [{"w": torch.randn(2, 4)}, {"w": torch.randn(2, 4)}], "groups": [["w", "w"]],
            "subspace_dim": 2, "num_codewords": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        NeuralMerger(**args)


def test_originals_are_targets_and_tuned_layers_are_copies():
    original = [torch.tensor([[0.0, 1.0]], requires_grad=True)]
    merged = [torch.tensor([[1.0, -1.0]], requires_grad=True)]
    calibration_loss(merged, original, torch.tensor([0])).backward()
    assert original[0].grad is None and merged[0].grad is not None
    sd = {"w": torch.randn(2, 4), "out": torch.ones(3, 2)}
    merger = NeuralMerger([sd, dict(sd)], [["w", "w"]], subspace_dim=2, num_codewords=2, tune=["out"])
    with torch.no_grad():
        merger.tuned[0]["out"].add_(1.0)  # training the merged network's head leaves the original's alone
    torch.testing.assert_close(sd["out"], torch.ones(3, 2))


def test_entries_after_a_networks_extra_state_are_kept_too():
    """The extra state may come first in a state dict; what follows it is still tuned or fixed."""
    g = torch.Generator().manual_seed(7)
    sds = [{"_extra_state": {"step": k}, "body.weight": torch.randn(16, 8, generator=g),
            "body.bias": torch.randn(16, generator=g), "out.weight": torch.randn(3, 16, generator=g)}
           for k in range(2)]
    merger = NeuralMerger(sds, [["body.weight", "body.weight"]], subspace_dim=4, num_codewords=4,
                          tune=["out.weight"])
    for k in range(2):
        sd = merger.state_dict_of(k)
        assert set(sd) == set(sds[k])
        torch.testing.assert_close(sd["body.bias"], sds[k]["body.bias"])
        torch.testing.assert_close(sd["out.weight"], sds[k]["out.weight"])


def test_the_codebook_is_reproducible_from_the_seed_alone():
    """k-means starts from the ``seed`` argument's generator, not the global random state."""
    g = torch.Generator().manual_seed(8)
    sds = [{"w": torch.randn(16, 8, generator=g)} for _ in range(2)]

    def codebook(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return NeuralMerger(sds, [["w", "w"]], subspace_dim=4, num_codewords=6, iterations=1, seed=seed).codebooks[0]

    torch.testing.assert_close(codebook(0, 1), codebook(0, 2), rtol=0, atol=0)
    assert not torch.equal(codebook(0, 1), codebook(1, 1))
    assert torch.equal(codebook(0, 1), NeuralMerger(sds, [["w", "w"]], 4, 6, iterations=1).codebooks[0])  # default 0


def test_calibration_needs_one_original_output_per_merged_output():
    merged = [torch.randn(2, 4), torch.randn(2, 3)]
    with pytest.raises(ValueError, match="must give the same number of layer outputs"):
        calibration_loss(merged, merged[:1], torch.tensor([0, 2]))
