"""RSA (Dwivedi & Roig 2019): the dissimilarity matrix, Spearman over image pairs, source ranking."""

import math

import pytest
import torch

from reference_impls.affinity.rsa import (
    average_ranks,
    rank_sources,
    rdm,
    rdm_similarity,
    spearman,
    task_similarity,
)


def features(seed: int, n: int = 12, d: int = 6) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_rdm_is_one_minus_the_pearson_correlation_of_unit_centred_features():
    x = features(0, n=5, d=4)
    centred = x - x.mean(0)  # independent route: torch.corrcoef pair by pair
    expected = torch.tensor([[1 - torch.corrcoef(torch.stack([centred[p], centred[q]]))[0, 1].item()
                              for q in range(5)] for p in range(5)], dtype=torch.float64)
    r = rdm(x.reshape(5, 2, 2))  # any trailing shape is flattened
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(r, r.T)
    torch.testing.assert_close(r.diagonal(), torch.zeros(5, dtype=torch.float64))


def test_the_rdm_ignores_unit_offsets_unit_order_and_scale_but_not_other_changes():
    x = features(1)
    offsets = torch.linspace(-3, 5, x.shape[1], dtype=torch.float64)  # one constant per unit
    same = 2.5 * (x + offsets)[:, torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))]
    torch.testing.assert_close(rdm(same), rdm(x))
    assert not torch.allclose(rdm(x * torch.linspace(0.5, 3, x.shape[1], dtype=torch.float64)), rdm(x))


def test_an_image_with_constant_centred_features_gets_nan_and_a_constant_vector_ranks_as_zero():
    x = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # unit means 0: image 0 centres to 0
    r = rdm(x)
    assert r[0].isnan().all() and r[:, 0].isnan().all()
    # images 1 and 2 centre to (−0.5, 0.5) and (0.5, −0.5): correlation −1, dissimilarity 2
    assert r[1, 2].item() == pytest.approx(2.0) and r[1, 1].item() == pytest.approx(0.0)
    constant = torch.ones(5, dtype=torch.float64)
    assert spearman(constant, features(8, n=5, d=1).flatten()).item() == 0.0


def test_spearman_by_hand_with_a_tie_and_under_monotone_maps():
    a = torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(average_ranks(a), torch.tensor([1.0, 2.5, 2.5, 4.0], dtype=torch.float64))
    # centred ranks (−1.5, 0, 0, 1.5) and (−1.5, 0.5, −0.5, 1.5): 4.5 / √(4.5 · 5) = √0.9
    torch.testing.assert_close(spearman(a, b), torch.tensor(math.sqrt(0.9), dtype=torch.float64))
    x = features(2).flatten()
    torch.testing.assert_close(spearman(x, x.exp()), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(spearman(x, -x**3), torch.tensor(-1.0, dtype=torch.float64))


def test_rdms_are_compared_by_rank_over_the_pairs_above_the_diagonal_only():
    r = rdm(features(3))
    torch.testing.assert_close(rdm_similarity(r, r.pow(3)), torch.tensor(1.0, dtype=torch.float64))  # order only
    noisy = r + 10 * torch.diag(torch.arange(1.0, r.shape[0] + 1, dtype=torch.float64))
    other = rdm(features(4))
    torch.testing.assert_close(rdm_similarity(noisy, other), rdm_similarity(r, other))  # diagonal unread
    below = r.clone()
    below.tril_(-1).add_(torch.rand(r.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tril(-1))
    below = below + r.triu(1)  # entries under the diagonal changed, above kept
    torch.testing.assert_close(rdm_similarity(below, other), rdm_similarity(r, other))


def planted(n: int = 40):
    """Images with two independent factors; each 'model' encodes one factor through its own net."""
    g = torch.Generator().manual_seed(6)
    u, v = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)

    def net(z, width):
        return torch.tanh(z @ torch.randn(3, width, generator=g, dtype=torch.float64))

    return net(u, 16), net(u, 32) + 0.05 * torch.randn(n, 32, generator=g, dtype=torch.float64), net(v, 16)


def test_the_source_that_encodes_the_same_factor_ranks_first_and_the_matrix_is_a_similarity():
    target, related, unrelated = planted()
    order, scores = rank_sources(target, [unrelated, related])
    assert order == [1, 0] and scores[1] > 0.8 and abs(scores[0]) < 0.3
    s = task_similarity([target, related, unrelated])
    torch.testing.assert_close(s, s.T)
    torch.testing.assert_close(s.diagonal(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(s[0, 1:], scores.flip(0))
    shuffle = torch.randperm(target.shape[0], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(task_similarity([f[shuffle] for f in (target, related, unrelated)]), s)


@pytest.mark.parametrize("call, message", [
    (lambda: rdm(torch.zeros(2, 4)), "at least 3 images"),
    (lambda: rdm(torch.zeros(5)), "at least 3 images"),
    (lambda: rdm_similarity(torch.zeros(4, 4), torch.zeros(5, 5)), "same images"),
    (lambda: rdm_similarity(torch.zeros(3, 4), torch.zeros(3, 4)), "n x n RDMs"),
    (lambda: task_similarity([torch.randn(5, 3), torch.randn(6, 3)]), "every model must see the same images"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_two_distinct_values_are_perfectly_monotone_in_either_direction():
    """Spearman of two-element vectors is ±1: any two distinct pairs are ordered alike or reversed."""
    a = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(spearman(a, torch.tensor([-5.0, 2.0], dtype=torch.float64)),
                               torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(spearman(a, torch.tensor([2.0, -5.0], dtype=torch.float64)),
                               torch.tensor(-1.0, dtype=torch.float64))


def test_each_model_is_fully_similar_to_itself_even_when_its_rdm_has_no_ranking():
    """The diagonal is 1 by definition. One-hot features of 3 images: every pair has correlation −½, so the
    RDM's pairs are all tied (a rank correlation with them is 0) while the model is still identical to itself."""
    one_hot = torch.eye(3, dtype=torch.float64)
    r = rdm(one_hot)
    torch.testing.assert_close(r, torch.full((3, 3), 1.5, dtype=torch.float64).fill_diagonal_(0.0))
    other = features(9, n=3, d=4)
    s = task_similarity([one_hot, other])
    assert s[0, 0].item() == 1.0 and s[1, 1].item() == 1.0
    assert s[0, 1].item() == 0.0 and s[1, 0].item() == 0.0
    single = task_similarity([other])  # one model: a 1 x 1 matrix
    assert single.shape == (1, 1) and single.item() == 1.0
