import torch

from reference_impls.weighting.attittud import ATTITTUD, decompose, orthonormal_basis


def examples_and_aux(seed: int, n: int = 5, d: int = 12):
    """Per-example primary gradients (rank n), their mean, and two auxiliary gradients."""
    generator = torch.Generator().manual_seed(seed)
    examples = torch.randn(n, d, generator=generator, dtype=torch.float64)
    aux = torch.randn(2, d, generator=generator, dtype=torch.float64)
    return examples, examples.mean(0), aux


def test_parts_sum_to_the_auxiliary_gradient_and_neutral_is_orthogonal():
    for seed in range(10):
        examples, mean, aux = examples_and_aux(seed)
        basis = orthonormal_basis(examples)
        parts = decompose(aux, basis, mean)
        assert torch.allclose(parts.positive + parts.negative + parts.neutral, aux, atol=1e-12)
        assert torch.allclose(parts.neutral @ examples.T, torch.zeros(2, 5, dtype=torch.float64), atol=1e-10)
        # helpful and harmful parts lie in S: projecting onto S leaves them unchanged
        for part in (parts.positive, parts.negative):
            assert torch.allclose(part @ basis.T @ basis, part, atol=1e-10)


def test_positive_and_negative_split_by_the_sign_of_each_coordinate():
    # S = span(e1, e2); primary mean (1, -1, 0); aux (2, 3, 5): along e1 they agree, along e2 not.
    basis = torch.eye(3, dtype=torch.float64)[:2]
    parts = decompose(torch.tensor([[2.0, 3.0, 5.0]], dtype=torch.float64), basis,
                      torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))
    assert torch.equal(parts.positive[0], torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(parts.negative[0], torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))
    assert torch.equal(parts.neutral[0], torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))


def test_a_zero_primary_coordinate_counts_as_disagreement():
    # S = span(e1, e2); the primary mean has no e2 component, so aux's e2 coordinate goes to g−.
    basis = torch.eye(3, dtype=torch.float64)[:2]
    parts = decompose(torch.tensor([[2.0, 3.0, 5.0]], dtype=torch.float64), basis,
                      torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(parts.positive[0], torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(parts.negative[0], torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))


def test_defaults_keep_help_and_neutral_and_drop_harm():
    """(η+, η−, η⊥) = (1, 0, 1) by default, as the docstring states."""
    primary = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for aux, expected in (([-2.0, 3.0], [1.0, 3.0]), ([2.0, 3.0], [3.0, 3.0])):
        grads = torch.stack([primary, torch.tensor(aux, dtype=torch.float64)])
        assert torch.equal(ATTITTUD()(grads).update, torch.tensor(expected, dtype=torch.float64))


def test_unit_weights_give_the_plain_sum(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(30, max_tasks=6, max_dim=15):
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        method = ATTITTUD(1.0, 1.0, 1.0)
        assert torch.allclose(method(grads).update, grads.sum(0), rtol=1e-9, atol=1e-12 * scale)
        if k > 1 and d > 2:  # also with a subspace from per-example rows
            method.set_primary_examples(grad_checks.gradient_matrix(3, d, seed + 1))
            assert torch.allclose(method(grads).update, grads.sum(0), rtol=1e-9, atol=1e-9 * scale * k)


def test_dropping_the_harmful_part_never_conflicts_with_the_primary_gradient(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(40, max_tasks=6, max_dim=15):
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        primary = grads[0]
        aux_part = ATTITTUD(1.0, 0.0, 1.0)(grads).update - primary
        assert float(aux_part @ primary) >= -1e-9 * float(grads.norm(dim=1).max() * primary.norm())


def test_per_example_subspace_drops_exactly_the_harmful_coordinates():
    examples, mean, aux = examples_and_aux(3)
    grads = torch.cat([mean[None], aux])
    method = ATTITTUD(1.0, 0.0, 1.0)
    method.set_primary_examples(examples)
    basis = orthonormal_basis(examples)
    coords, reference = aux @ basis.T, basis @ mean
    expected = mean + (aux - torch.where(coords * reference > 0, 0, coords) @ basis).sum(0)
    assert torch.allclose(method(grads).update, expected, atol=1e-12)
    # mean lies in S, so every auxiliary coordinate agrees with it or is removed: no conflict
    for row in aux:
        kept = method(torch.stack([mean, row])).update - mean
        assert float(kept @ mean) >= -1e-12
    assert method(grads).weights is None


def test_default_weights_reproduce_the_update(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(30, max_tasks=6, max_dim=15):
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        result = ATTITTUD(0.7, -0.5, 0.3)(grads)
        assert torch.allclose(result.weights @ grads, result.update, rtol=1e-8, atol=1e-10 * scale * k)


def test_two_task_hand_case():
    primary = torch.tensor([1.0, 0.0], dtype=torch.float64)
    harmful = torch.tensor([-2.0, 3.0], dtype=torch.float64)
    result = ATTITTUD(1.0, 0.0, 1.0)(torch.stack([primary, harmful]))
    assert torch.equal(result.update, torch.tensor([1.0, 3.0], dtype=torch.float64))  # −2 e1 removed
    helpful = torch.tensor([2.0, 3.0], dtype=torch.float64)
    result = ATTITTUD(0.5, 0.0, 1.0)(torch.stack([primary, helpful]))
    assert torch.equal(result.update, torch.tensor([2.0, 3.0], dtype=torch.float64))  # 1 + 0.5·2


def test_basis_rank_and_degenerate_rows():
    row = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert orthonormal_basis(torch.stack([row, 2 * row, torch.zeros(3, dtype=torch.float64)])).shape == (1, 3)
    assert orthonormal_basis(torch.zeros(2, 3)).shape == (0, 3)
    examples, _, _ = examples_and_aux(0, n=6, d=10)
    basis = orthonormal_basis(examples, rank=2)
    assert basis.shape == (2, 10) and torch.allclose(basis @ basis.T, torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_zero_primary_makes_everything_neutral():
    grads = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    result = ATTITTUD(1.0, 0.0, 0.25)(grads)
    assert torch.equal(result.update, torch.tensor([0.25, -0.5], dtype=torch.float64))


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(ATTITTUD)


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(ATTITTUD(), lr=0.01)
    assert final < 0.5 * initial


def test_a_limited_rank_keeps_the_top_singular_directions():
    # rows 3 e1, e2 and 0.5 e3: singular values 3 > 1 > 0.5, so rank 2 keeps span(e1, e2) up to sign
    rows = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    basis = orthonormal_basis(rows, rank=2)
    assert torch.allclose(basis.abs(), torch.eye(3, dtype=torch.float64)[:2], atol=1e-12)


def test_setting_no_examples_goes_back_to_the_span_of_row_0():
    grads = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 3.0, 4.0]], dtype=torch.float64)
    method = ATTITTUD(1.0, 0.0, 1.0)
    method.set_primary_examples(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
    # S = span(e2): the primary mean has no e2 part, so aux's 3 e2 is harmful and dropped
    assert torch.equal(method(grads).update, torch.tensor([-1.0, 0.0, 4.0], dtype=torch.float64))
    method.set_primary_examples(None)
    # S = span(row 0) again: aux's −2 e1 is harmful and dropped
    result = method(grads)
    assert torch.equal(result.update, torch.tensor([1.0, 3.0, 4.0], dtype=torch.float64))
    assert result.weights is not None


def test_the_method_rank_limits_the_primary_subspace():
    # Examples 3 e1, e2, 0.5 e3. With rank 1, S = span(e1): the auxiliary −e2 has no coordinate
    # in S, so it is all neutral and kept. With every direction, −e2 opposes the primary's +e2
    # and is dropped (η− = 0).
    examples = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    grads = torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    for rank, expected in ((1, [1.0, 0.0, 0.0]), (None, [1.0, 1.0, 0.0])):
        method = ATTITTUD(rank=rank)
        method.set_primary_examples(examples)
        assert torch.allclose(method(grads).update, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_exactly_dependent_rows_add_no_noise_direction_in_either_precision():
    # a, b and 2a span a plane; the SVD's rounding-level third singular value is no direction,
    # for float32 rows as for float64 ones, and the basis comes back in the rows' dtype.
    a, b = torch.randn(2, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        basis = orthonormal_basis(torch.stack([a, b, 2 * a]).to(dtype))
        assert basis.shape == (2, 50) and basis.dtype == dtype, dtype


def test_a_float64_example_subspace_serves_float32_gradients():
    examples, mean, aux = examples_and_aux(4)
    method = ATTITTUD()
    method.set_primary_examples(examples)
    grads = torch.cat([mean[None], aux]).float()
    expected = method(grads.double()).update
    update = method(grads).update
    assert update.dtype == torch.float32 and torch.allclose(update.double(), expected, rtol=1e-5, atol=1e-5)
