"""Task2Vec (Achille et al. 2019): Fisher closed form, d_sym's properties, similar tasks closer."""

import copy

import pytest
import torch
from torch import nn

from reference_impls.affinity.task2vec import (
    Task2Vec,
    diagonal_fisher,
    distance_matrix,
    fit_head,
    filter_means,
    symmetric_distance,
)


def logistic_probe(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 4).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 3, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return model, x


def closed_form(model: nn.Linear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Softmax regression: F[W_ck] = mean_n p_nc (1 − p_nc) x_nk², F[b_c] = mean_n p_nc (1 − p_nc)."""
    p = torch.softmax(model(x), dim=-1).detach()
    v = p * (1 - p)  # n x C
    return {"weight": v.T @ x.square() / len(x), "bias": v.mean(0)}


def test_exact_fisher_of_a_logistic_regression_probe_equals_the_closed_form():
    model, x = logistic_probe()
    fisher = diagonal_fisher(model, x, samples=None)
    expected = closed_form(model, x)
    for name in ("weight", "bias"):
        torch.testing.assert_close(fisher[name], expected[name])


def test_monte_carlo_fisher_with_sampled_labels_converges_to_the_closed_form():
    model, x = logistic_probe(1)
    g = torch.Generator().manual_seed(0)
    fisher = diagonal_fisher(model, x, samples=4000, generator=g)
    expected = closed_form(model, x)
    torch.testing.assert_close(fisher["weight"], expected["weight"], rtol=0.08, atol=1e-3)
    again = diagonal_fisher(model, x, samples=4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fisher["weight"], again["weight"])  # deterministic given the generator


def test_filter_means_average_each_output_unit_and_skip_biases():
    fisher = {"w": torch.tensor([[1.0, 3.0], [2.0, 4.0]]), "b": torch.tensor([9.0, 9.0])}
    torch.testing.assert_close(filter_means(fisher), torch.tensor([2.0, 3.0]))


def test_symmetric_distance_is_symmetric_zero_for_identical_tasks_and_scale_aware():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(10, generator=g), torch.rand(10, generator=g)
    torch.testing.assert_close(symmetric_distance(a, b), symmetric_distance(b, a))
    torch.testing.assert_close(symmetric_distance(a, a), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert symmetric_distance(a, b) > 1e-3
    # by hand: a = (1, 0), b = (0, 1) -> (1, 0) vs (0, 1): cosine distance 1
    torch.testing.assert_close(symmetric_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])),
                               torch.tensor(1.0))
    d = distance_matrix([a, b, a])
    assert torch.equal(d, d.T) and d.diagonal().abs().max() == 0 and d[0, 2].abs() < 1e-6


def test_d_sym_is_invariant_to_a_common_scale_even_for_fisher_sized_values():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(6, generator=g, dtype=torch.float64) + 0.1 for _ in range(2))
    torch.testing.assert_close(symmetric_distance(1e-6 * a, 1e-6 * b), symmetric_distance(a, b))


def test_embed_is_the_filter_mean_fisher_of_the_probe_under_a_head_fitted_on_its_features():
    torch.manual_seed(1)
    probe = nn.Sequential(nn.Linear(3, 5), nn.Tanh()).double()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    ours = Task2Vec(probe, samples=3, head_steps=7).embed(x, y, 2, generator=torch.Generator().manual_seed(5))
    head = fit_head(probe(x).detach(), y, 2, steps=7)
    fisher = diagonal_fisher(nn.Sequential(probe, head), x, ["0.0.weight", "0.0.bias"], samples=3,
                             generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, fisher["0.0.weight"].mean(1))


def test_the_head_starts_at_zero_and_its_weight_penalty_shrinks_it():
    features = torch.randn(8, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    head = fit_head(features, labels, 3, steps=1, lr=0.05)
    # zero logits: uniform p; the first Adam step moves every parameter by lr against its gradient (up to eps)
    residual = torch.full((8, 3), 1 / 3, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)[labels]
    torch.testing.assert_close(head.weight, -0.05 * torch.sign(residual.T @ features), atol=1e-6, rtol=0)
    torch.testing.assert_close(head.bias, -0.05 * torch.sign(residual.sum(0)), atol=1e-6, rtol=0)
    free, penalised = (fit_head(features, labels, 3, steps=100, weight_decay=w).weight.norm() for w in (0.0, 1.0))
    assert penalised < 0.7 * free


def test_similar_tasks_are_closer_than_different_ones_and_the_probe_is_untouched():
    torch.manual_seed(0)
    probe = nn.Sequential(nn.Linear(6, 24), nn.Tanh())
    before = copy.deepcopy(probe.state_dict())
    g = torch.Generator().manual_seed(10)
    x = torch.randn(200, 6, generator=g)
    tasks = {  # same inputs, labels from a direction in input space: two nearly equal, two others
        "x0": (x[:, 0] > 0).long(),
        "x0_tilted": (x[:, 0] + 0.1 * x[:, 1] > 0).long(),
        "x3": (x[:, 3] > 0).long(),
        "x4": (x[:, 4] > 0).long(),
    }
    t2v = Task2Vec(probe, samples=4)
    emb = {k: t2v.embed(x, y, 2, generator=torch.Generator().manual_seed(2)) for k, y in tasks.items()}
    assert emb["x0"].shape == (24,) and (emb["x0"] >= 0).all()
    close = symmetric_distance(emb["x0"], emb["x0_tilted"])
    for other in ("x3", "x4"):
        assert close + 0.2 < symmetric_distance(emb["x0"], emb[other])
    for name, value in probe.state_dict().items():
        assert torch.equal(value, before[name])


def test_symmetric_distance_normalises_each_coordinate_by_the_pair_sum():
    """(3, 1) vs (1, 1) become (3/4, 1/2) vs (1/4, 1/2): cosine 7/√65 (unnormalised: 4/√20)."""
    a, b = torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(symmetric_distance(a, b), torch.tensor(1 - 7 / 65**0.5, dtype=torch.float64))
    # so rescaling one filter for both tasks alike changes nothing
    g = torch.Generator().manual_seed(1)
    a, b, s = (torch.rand(8, generator=g, dtype=torch.float64) + 0.1 for _ in range(3))
    torch.testing.assert_close(symmetric_distance(100 * s * a, 100 * s * b), symmetric_distance(a, b))


@pytest.mark.parametrize("call, message", [
    (lambda: Task2Vec(nn.Linear(3, 3), samples=0), "samples must be at least 1, got 0"),
    (lambda: Task2Vec(nn.Linear(3, 3), samples=-1), "samples must be at least 1, got -1"),
    (lambda: Task2Vec(nn.Linear(3, 3), head_steps=0), "head_steps must be at least 1, got 0"),
    (lambda: diagonal_fisher(*logistic_probe(), samples=0), "samples must be at least 1, got 0"),
    (lambda: fit_head(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), 0), "num_classes must be at least 1"),
    (lambda: fit_head(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), 2, steps=-1), "steps must be at least 0"),
    (lambda: fit_head(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), 2, lr=0.0), "lr must be above 0, got 0.0"),
    (lambda: fit_head(torch.randn(6, 3), torch.zeros(6, dtype=torch.long), 2, weight_decay=-1.0),
     "weight_decay must be at least 0, got -1.0"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_defaults_are_one_sampled_label_per_input_and_200_head_steps():
    """Same seed: Task2Vec(probe) equals samples=1, head_steps=200 spelled out and built by hand."""
    torch.manual_seed(1)
    probe = nn.Sequential(nn.Linear(3, 5), nn.Tanh()).double()
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    t2v = Task2Vec(probe)
    assert (t2v.samples, t2v.head_steps) == (1, 200)
    default = t2v.embed(x, y, 2, generator=torch.Generator().manual_seed(5))
    explicit = Task2Vec(probe, samples=1, head_steps=200).embed(x, y, 2,
                                                                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    # the head: 200 Adam steps at lr 0.05 with a 1e-3 weight penalty, as the module docstring says
    head = fit_head(probe(x).detach(), y, 2, steps=200, lr=0.05, weight_decay=1e-3)
    default_head = fit_head(probe(x).detach(), y, 2)
    torch.testing.assert_close(default_head.weight, head.weight, rtol=0, atol=0)
    torch.testing.assert_close(default_head.bias, head.bias, rtol=0, atol=0)
    assert not any(p.requires_grad for p in default_head.parameters())  # handed back frozen
    network = nn.Sequential(probe, head)
    fisher = diagonal_fisher(network, x, ["0.0.weight", "0.0.bias"], samples=1,
                             generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(default, fisher["0.0.weight"].mean(1))
    unset = diagonal_fisher(network, x, ["0.0.weight", "0.0.bias"], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(unset["0.0.weight"], fisher["0.0.weight"], rtol=0, atol=0)  # samples=1 default


def test_monte_carlo_fisher_is_exact_when_every_possible_label_gives_the_same_squared_score():
    """Logits (0, 0, −1e4): p = (1/2, 1/2, 0), class 2 is never drawn. ∇_b log p(y) = e_y − p squares to
    (1/4, 1/4, 0) for y = 0 and y = 1 alike, so any draw gives F[b] = (1/4, 1/4, 0), F[W] = F[b] ⊗ mean x²."""
    model = nn.Linear(2, 3).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 0.0, -1e4], dtype=torch.float64))
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bias = torch.tensor([0.25, 0.25, 0.0], dtype=torch.float64)
    for samples in (1, 3):
        fisher = diagonal_fisher(model, x, samples=samples, generator=torch.Generator().manual_seed(samples))
        torch.testing.assert_close(fisher["bias"], bias)
        torch.testing.assert_close(fisher["weight"], torch.outer(bias, x.square().mean(0)))


def test_d_sym_of_embeddings_of_very_different_size_is_the_plain_cosine_formula():
    """A task whose Fisher is 1e-10 times another's: its normalised vector has norm ~1e-10, which the
    cosine must not clamp. Expected: 1 − p·q / (|p| |q|) with p = a / (a + b), q = b / (a + b)."""
    g = torch.Generator().manual_seed(3)
    a = 1e-10 * (torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    b = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    p, q = a / (a + b), b / (a + b)
    expected = 1 - (p @ q) / (p.norm() * q.norm())
    torch.testing.assert_close(symmetric_distance(a, b), expected)
    assert expected < 0.5  # the two directions are close: a clamped norm would read as distance ~1


def test_the_distance_matrix_holds_d_sym_of_every_pair_in_the_embeddings_dtype():
    g = torch.Generator().manual_seed(4)
    embeddings = [torch.rand(5, generator=g, dtype=torch.float64) + 0.1 for _ in range(4)]
    matrix = distance_matrix(embeddings)
    assert matrix.dtype == torch.float64
    for i in range(4):
        for j in range(4):
            expected = 0.0 if i == j else symmetric_distance(embeddings[i], embeddings[j]).item()
            assert matrix[i, j].item() == pytest.approx(expected, abs=1e-15)
    assert torch.equal(distance_matrix(embeddings[:1]), torch.zeros(1, 1, dtype=torch.float64))  # one task
