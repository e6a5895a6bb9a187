"""Surrogate modelling (Li, Nguyen & Zhang 2023): planted relevance scores recovered, negative transfers found."""

import pytest
import torch

from reference_impls.affinity.surrogate_negative_transfer import SurrogateModel, design, sample_subsets

THETA = torch.tensor([-0.30, 0.25, -0.10, 0.40, -0.05, 0.15], dtype=torch.float64)  # loss deltas
BIAS = 1.2


def planted_losses(masks: torch.Tensor, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return BIAS + masks.double() @ THETA + noise * torch.randn(len(masks), generator=g, dtype=torch.float64)


def test_sampled_subsets_have_sizes_in_range_and_are_seeded():
    masks = sample_subsets(6, 400, 2, 4, torch.Generator().manual_seed(0))
    sizes = masks.sum(1)
    assert masks.dtype == torch.bool and sizes.min() == 2 and sizes.max() == 4
    assert set(sizes.tolist()) == {2, 3, 4}
    per_task = masks.sum(0).double() / 400  # each task is equally likely: mean size 3 / 6
    torch.testing.assert_close(per_task, torch.full((6,), 0.5, dtype=torch.float64), atol=0.07, rtol=0)
    assert torch.equal(masks, sample_subsets(6, 400, 2, 4, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError):
        sample_subsets(6, 10, 4, 7)


def test_noise_free_planted_coefficients_are_recovered_exactly_from_2k_subsets():
    masks = sample_subsets(6, 12, 1, 5, torch.Generator().manual_seed(1))
    model = SurrogateModel().fit(masks, planted_losses(masks))
    torch.testing.assert_close(model.theta, THETA)
    torch.testing.assert_close(model.bias, torch.tensor(BIAS, dtype=torch.float64))
    unseen = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(model.predict(unseen), planted_losses(unseen))


def test_noisy_losses_still_identify_the_negative_transfers():
    masks = sample_subsets(6, 60, 1, 5, torch.Generator().manual_seed(2))
    model = SurrogateModel().fit(masks, planted_losses(masks, noise=0.03))
    assert (model.theta - THETA).abs().max() < 0.05
    assert model.select().tolist() == [0, 2, 4]  # θ < 0: these lower the target's loss
    assert model.negative_transfers().tolist() == [1, 3, 5]
    assert model.select(threshold=-0.2).tolist() == [0]  # a stricter γ keeps only the best


def test_equal_sizes_identify_only_differences_and_predictions():
    masks = sample_subsets(6, 30, 3, 3, torch.Generator().manual_seed(3))
    model = SurrogateModel().fit(masks, planted_losses(masks))
    diffs = model.theta[:, None] - model.theta[None, :]
    torch.testing.assert_close(diffs, THETA[:, None] - THETA[None, :])
    torch.testing.assert_close(model.predict(masks), planted_losses(masks))
    # minimum norm: (b, θ) is orthogonal to the null direction (s, −1, …, −1), so s · b = Σ θ
    torch.testing.assert_close(3 * model.bias, model.theta.sum())
    assert not torch.allclose(model.theta, THETA)


def test_selection_is_strictly_below_gamma_zero_by_default_and_negative_transfers_are_the_rest():
    model = SurrogateModel()
    model.bias, model.theta = torch.tensor(0.0, dtype=torch.float64), torch.tensor([-0.1, 0.0, 0.1], dtype=torch.float64)
    assert model.select().tolist() == [0] and model.negative_transfers().tolist() == [1, 2]  # θ = 0 = γ: not kept
    assert model.select(threshold=0.1).tolist() == [0, 1]
    assert model.select(higher_is_better=True).tolist() == [2]
    assert model.negative_transfers(higher_is_better=True).tolist() == [0, 1]


def test_scores_instead_of_losses_and_unfitted_model():
    masks = sample_subsets(6, 20, 1, 5, torch.Generator().manual_seed(4))
    accuracy = 0.8 - (planted_losses(masks) - BIAS)  # higher is better: signs flip
    model = SurrogateModel().fit(masks, accuracy)
    assert model.select(higher_is_better=True).tolist() == [0, 2, 4]
    with pytest.raises(RuntimeError):
        SurrogateModel().select()
    with pytest.raises(RuntimeError):
        SurrogateModel().predict(masks)


@pytest.mark.parametrize("call, message", [
    (lambda: sample_subsets(6, 0, 1, 2), "num_samples must be at least 1, got 0"),
    (lambda: sample_subsets(6, -1, 1, 2), "num_samples must be at least 1, got -1"),
    (lambda: sample_subsets(6, 10, 4, 7), "num_tasks, got 4, 7, 6"),
    (lambda: sample_subsets(6, 10, 0, 2), "1 <= min_size"),
    (lambda: SurrogateModel().fit(sample_subsets(4, 20, 1, 3), torch.randn(20)).select(float("nan")),
     "threshold must be a number, got nan"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_subsets_may_hold_every_source_task():
    """max_size = num_tasks is allowed: with min_size = max_size = k every subset is the full set."""
    masks = sample_subsets(4, 5, 4, 4, torch.Generator().manual_seed(0))
    assert masks.all() and masks.shape == (5, 4)


def test_the_design_is_built_in_the_dtype_asked_for():
    masks = torch.tensor([[True, False], [False, True]])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = design(masks, dtype)
        assert x.dtype == dtype
        assert x.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_negative_transfers_are_an_index_tensor_even_when_there_are_none():
    """Every source task helps: the empty complement is still a long tensor, usable as an index."""
    model = SurrogateModel()
    model.bias, model.theta = torch.tensor(0.0, dtype=torch.float64), torch.tensor([-0.2, -0.1], dtype=torch.float64)
    hurt = model.negative_transfers()
    assert hurt.dtype == torch.long and hurt.numel() == 0
    assert model.theta[hurt].numel() == 0
