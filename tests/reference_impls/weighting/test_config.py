import torch

from reference_impls.weighting.config import ConFIG


def cosines(grads, update):
    return grads @ update / (grads.norm(dim=1) * update.norm())


def reference_update(grads):
    """The paper's operator computed in parameter space with an explicit pseudo-inverse."""
    units = grads / grads.norm(dim=1, keepdim=True)
    direction = torch.linalg.pinv(units) @ torch.ones(len(grads), dtype=grads.dtype)  # g_v
    unit = direction / direction.norm()  # g_u
    return (grads @ unit).sum() * unit


def test_equal_positive_cosine_with_every_gradient(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(60, max_tasks=8, max_dim=30):
        if k > d:
            continue  # independent rows only
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        cos = cosines(grads, ConFIG()(grads).update)
        assert (cos > 0).all()
        assert torch.allclose(cos, cos[0].expand_as(cos), atol=1e-9, rtol=0)


def test_length_is_the_sum_of_projections(grad_checks):
    for k, d, _, scale, seed in grad_checks.random_cases(40, max_tasks=6, max_dim=20, seed=1):
        grads = grad_checks.gradient_matrix(k, d, seed, scale=scale)
        update = ConFIG()(grads).update
        # update = s·g_u with s = Σ_k g_k·g_u, hence ||update||² = Σ_k g_k·update.
        assert torch.allclose(update @ update, (grads @ update).sum(), rtol=1e-9, atol=1e-300)


def test_matches_the_pseudo_inverse_in_parameter_space(grad_checks):
    for k, d, seed in [(2, 5, 0), (3, 3, 1), (5, 12, 2), (4, 40, 3)]:
        grads = grad_checks.gradient_matrix(k, d, seed)
        assert torch.allclose(ConFIG()(grads).update, reference_update(grads), rtol=1e-9, atol=1e-12)


def test_two_tasks_match_the_orthogonal_component_form(grad_checks):
    # K = 2: g_v ∝ unit(O(g1, g2)) + unit(O(g2, g1)), O(a, b) = b − (a·b/|a|²) a.
    for seed in range(10):
        g1, g2 = grad_checks.gradient_matrix(2, 6, seed, scale=10.0 ** (seed % 5 - 2))
        o12 = g2 - (g1 @ g2) / (g1 @ g1) * g1
        o21 = g1 - (g1 @ g2) / (g2 @ g2) * g2
        v = o12 / o12.norm() + o21 / o21.norm()
        v = v / v.norm()
        expected = (g1 @ v + g2 @ v) * v
        assert torch.allclose(ConFIG()(torch.stack([g1, g2])).update, expected, rtol=1e-9, atol=0)


def test_direction_ignores_the_gradient_scales(grad_checks):
    grads = grad_checks.gradient_matrix(3, 8, seed=4)
    rescaled = grads * torch.tensor([[1e-6], [1.0], [1e6]], dtype=torch.float64)
    a, b = ConFIG()(grads).update, ConFIG()(rescaled).update
    assert torch.allclose(a / a.norm(), b / b.norm(), atol=1e-9)


def test_opposite_gradients_give_no_update_and_zero_rows_no_weight(grad_checks):
    g, h = grad_checks.gradient_matrix(2, 5, seed=5)
    assert torch.equal(ConFIG()(torch.stack([g, -2 * g])).update, torch.zeros(5, dtype=torch.float64))
    result = ConFIG()(torch.stack([g, torch.zeros(5, dtype=torch.float64), h]))
    assert result.weights[1] == 0
    assert torch.allclose(result.update, ConFIG()(torch.stack([g, h])).update, atol=1e-14)


def test_degenerate_inputs(grad_checks):
    grad_checks.check_degenerate_inputs(ConFIG)


def test_permutation_equivariance(grad_checks):
    grad_checks.check_permutation_equivariance(ConFIG)


def test_device(device, grad_checks):
    grads = grad_checks.gradient_matrix(3, 9, seed=6).to(device)
    result = ConFIG()(grads)
    assert result.update.device == grads.device and result.weights.device == grads.device


def test_training_decreases_total_loss(grad_checks):
    initial, final = grad_checks.train_two_task_regression(ConFIG(), lr=0.05)
    assert final < 0.5 * initial


def test_float32_gradients_get_the_float64_update_when_rows_are_dependent():
    """Rounding noise of a float32 Gramian must not be inverted as a direction: three rows in a
    plane (a combination or a multiple of the others) get float64's update, not ~0 or a tilt."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, b = torch.randn(2, 20, generator=generator, dtype=torch.float64)
        for grads in (torch.stack([a, b, a + 0.5 * b]), torch.stack([a, b, 3 * a]),
                      torch.randn(3, 20, generator=generator, dtype=torch.float64)):
            exact = ConFIG()(grads).update
            rounded = ConFIG()(grads.float()).update
            assert rounded.dtype == torch.float32
            assert torch.allclose(rounded.double(), exact, rtol=0, atol=1e-3 * float(exact.norm()))


def test_half_precision_keeps_the_direction(grad_checks):
    """The float32 cut-off grows with eps but is capped: float16 and bfloat16 still follow
    float64 (a cut-off of 1000·eps, about 1 there, would discard every direction)."""
    for seed in range(3):
        grads = grad_checks.gradient_matrix(3, 50, seed)
        exact = ConFIG()(grads).update
        for dtype in (torch.float16, torch.bfloat16):
            rounded = ConFIG()(grads.to(dtype)).update.double()
            assert torch.allclose(rounded, exact, rtol=0, atol=2e-2 * float(exact.norm())), dtype


def test_float32_gradients_slightly_out_of_plane_keep_their_direction():
    """A third float32 gradient 0.4 degrees out of the others' plane is a real direction (float32
    resolves ~1e-7): the update keeps equal cosines and is float64's. A Gramian computed in
    float32 needed a ~1e-4 eigenvalue cut-off and dropped it (cosines 0.65, 0.72, 0.89)."""
    generator = torch.Generator().manual_seed(0)
    a, b, n = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    grads = torch.stack([a, b, a + 0.5 * b + 0.01 * n]).float()
    update = ConFIG()(grads).update.double()
    rows = grads.double()
    cosines = rows @ update / (rows.norm(dim=1) * update.norm())
    assert torch.allclose(cosines, cosines[0].expand(3), atol=1e-3)
    exact = ConFIG()(rows).update
    assert torch.allclose(update, exact, rtol=0, atol=1e-3 * float(exact.norm()))


def truncated_reference(grads, cutoff):
    """The paper's operator with the pseudo-inverse dropping cosine-matrix eigenvalues below
    cutoff · max, i.e. singular values of the unit rows below √cutoff · max."""
    units = grads / grads.norm(dim=1, keepdim=True)
    direction = torch.linalg.pinv(units, rtol=cutoff**0.5) @ torch.ones(len(grads), dtype=grads.dtype)
    unit = direction / direction.norm()
    return (grads @ unit).sum() * unit


def test_weights_from_gramian_uses_the_given_or_the_dtype_cutoff():
    """``weights_from_gramian(G, cutoff)`` inverts the cosine eigenvalues above ``cutoff``; with no
    cutoff it takes that of a Gramian computed in G's dtype (1e-10 for float64, ~1e-4 for
    float32) and returns weights in G's dtype."""
    generator = torch.Generator().manual_seed(7)
    a, b, n = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    grads = torch.stack([a, b, a + 0.5 * b + 1e-3 * n])  # a real third direction, cosine eigenvalue ~1e-7
    units = grads / grads.norm(dim=1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(units @ units.T)
    assert 1e-9 < eigenvalues[0] / eigenvalues[-1] < 1e-5 and eigenvalues[1] / eigenvalues[-1] > 1e-2
    gramian = grads @ grads.T
    method = ConFIG()
    for cutoff, expected in ((None, reference_update(grads)), (1e-3, truncated_reference(grads, 1e-3))):
        update = method.weights_from_gramian(gramian, cutoff) @ grads
        assert torch.allclose(update, expected, rtol=1e-6, atol=1e-9 * float(expected.norm()))
    assert not torch.allclose(truncated_reference(grads, 1e-3), reference_update(grads), rtol=1e-2)
    # float32: a Gramian computed from dependent float32 rows holds ~1e-7 rounding noise, which
    # the default float32 cut-off must not invert; the answer is float64's, in float32.
    dependent = torch.stack([a, b, a + 0.5 * b])
    single = dependent.float()
    weights = method.weights_from_gramian(single @ single.T)
    assert weights.dtype == torch.float32
    exact = ConFIG()(dependent).update
    assert torch.allclose((weights @ single).double(), exact, rtol=0, atol=1e-3 * float(exact.norm()))


def test_a_float32_gramian_is_solved_in_float64():
    """The K x K solve runs in the solver dtype: weights of a float32 Gramian are those of the same
    (exactly representable) Gramian in float64, rounded once to float32."""
    generator = torch.Generator().manual_seed(8)
    grads = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    grads[3] = grads[0] + grads[1] + 0.05 * grads[3]  # moderately ill-conditioned
    gramian = (grads @ grads.T).float()
    single = ConFIG().weights_from_gramian(gramian, 1e-10)
    double = ConFIG().weights_from_gramian(gramian.double(), 1e-10)
    assert torch.allclose(single.double(), double, rtol=1e-6, atol=0)
