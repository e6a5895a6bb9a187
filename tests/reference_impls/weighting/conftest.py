"""Shared samplers and checks for the gradient-method tests.

Samplers are seeded ``torch.Generator``s, never the global RNG, so every case is
reproducible. ``degenerate_matrices`` lists the inputs on which every method must stay
finite: zeros, K = 1, parallel / antiparallel / duplicate rows, K > d, extreme scales.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.base import Aggregation, GradientMethod
from reference_impls.weighting.gradients import gradient_step

from ..conftest import DEVICES


def gradient_matrix(
    num_tasks: int, dim: int, seed: int, dtype: torch.dtype = torch.float64,
    rank: int | None = None, scale: float = 1.0,
) -> Tensor:
    """A K x d matrix of N(0, 1) rows (of the given rank), times ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    if rank is None:
        rows = torch.randn(num_tasks, dim, generator=generator, dtype=torch.float64)
    else:
        left = torch.randn(num_tasks, rank, generator=generator, dtype=torch.float64)
        rows = left @ torch.randn(rank, dim, generator=generator, dtype=torch.float64)
    return (rows * scale).to(dtype)


def random_cases(count: int, max_tasks: int = 10, max_dim: int = 40, seed: int = 0):
    """``count`` (K, d, rank, scale, seed) tuples covering K = 1..max_tasks, low rank, scales."""
    generator = torch.Generator().manual_seed(seed)
    scales = [1e-10, 1e-3, 1.0, 1e3, 1e10]
    for case in range(count):
        k = int(torch.randint(1, max_tasks + 1, (1,), generator=generator))
        d = int(torch.randint(1, max_dim + 1, (1,), generator=generator))
        rank = None if case % 3 else int(torch.randint(1, max(1, min(k, d)) + 1, (1,), generator=generator))
        yield k, d, rank, scales[case % len(scales)], 1000 * seed + case


def degenerate_matrices(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    g = gradient_matrix(1, 6, seed=1)[0]
    h = gradient_matrix(1, 6, seed=2)[0]
    cases = {
        "all_zero": torch.zeros(3, 6),
        "single_task": g[None],
        "single_zero_task": torch.zeros(1, 6),
        "parallel": torch.stack([g, 2 * g, 0.5 * g]),
        "duplicate": torch.stack([g, g, h]),
        "antiparallel": torch.stack([g, -g]),
        "antiparallel_scaled": torch.stack([g, -3 * g, h]),
        "one_zero_row": torch.stack([g, torch.zeros(6), h]),
        "more_tasks_than_dims": gradient_matrix(10, 3, seed=3),
        "tiny": 1e-10 * torch.stack([g, h, -g]),
        "huge": 1e10 * torch.stack([g, h, -g]),
        "mixed_scales": torch.stack([1e-10 * g, 1e10 * h, h]),
    }
    return {name: m.to(dtype) for name, m in cases.items()}


def assert_finite(aggregation: Aggregation) -> None:
    assert torch.isfinite(aggregation.update).all()
    if aggregation.weights is not None:
        assert torch.isfinite(aggregation.weights).all()


def check_degenerate_inputs(make_method: Callable[[], GradientMethod]) -> None:
    """No NaN/inf on any degenerate case, in float32 and float64, and right shapes/dtypes."""
    for dtype in (torch.float32, torch.float64):
        for name, grads in degenerate_matrices(dtype).items():
            aggregation = make_method()(grads)
            assert aggregation.update.shape == grads.shape[1:], name
            assert aggregation.update.dtype == dtype, name
            assert torch.isfinite(aggregation.update).all(), (name, dtype, aggregation)
            if aggregation.weights is not None:
                assert torch.isfinite(aggregation.weights).all(), (name, dtype, aggregation)
        zero = make_method()(torch.zeros(4, 5, dtype=dtype))
        assert torch.equal(zero.update, torch.zeros(5, dtype=dtype))


def check_permutation_equivariance(make_method: Callable[[], GradientMethod], cases: int = 10) -> None:
    """Permuting the tasks permutes the weights and leaves the update unchanged."""
    for k, d, _, _, seed in random_cases(cases, max_tasks=6, max_dim=12, seed=11):
        grads = gradient_matrix(k, d, seed)
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        original, permuted = make_method()(grads), make_method()(grads[perm])
        scale = grads.norm(dim=1).max() * k
        assert torch.allclose(original.update, permuted.update, atol=1e-9 * scale, rtol=1e-8)
        if original.weights is not None:
            assert torch.allclose(original.weights[perm], permuted.weights, atol=1e-8, rtol=1e-7)


def check_half_precision_gramians(make_method: Callable[[], GradientMethod]) -> None:
    """float16 and bfloat16 Gramians give the float64 answer rounded to their dtype: the K x K
    work runs in float64 whatever the input precision (bfloat16 has no NumPy type)."""
    for seed in range(5):
        grads = gradient_matrix(5, 3, seed)
        for dtype in (torch.float16, torch.bfloat16):
            gram = (grads @ grads.T).to(dtype)
            got = make_method().weights_from_gramian(gram)
            expected = make_method().weights_from_gramian(gram.double()).to(dtype)
            assert got.dtype == dtype and torch.equal(got, expected), (seed, dtype)


def train_two_task_regression(method: GradientMethod, steps: int = 60, lr: float = 0.01) -> tuple[float, float]:
    """SGD on the toy two-task regression, shared layer updated by ``method``; total loss before/after."""
    problem = make_problem(seed=0)
    shared = problem.shared_parameters()
    heads = list(problem.model.heads.parameters())
    optimizer = torch.optim.SGD(shared + heads, lr=lr)
    initial = float(problem.losses().detach().sum())
    for _ in range(steps):
        optimizer.zero_grad()
        gradient_step(method, problem.losses(), shared, task_params=heads)
        optimizer.step()
    return initial, float(problem.losses().detach().sum())


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: one intra-op thread avoids thread hand-off costs on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def grad_checks() -> SimpleNamespace:
    """The samplers and checks above, for the test modules (conftest is not importable)."""
    return SimpleNamespace(
        gradient_matrix=gradient_matrix,
        random_cases=random_cases,
        degenerate_matrices=degenerate_matrices,
        assert_finite=assert_finite,
        check_degenerate_inputs=check_degenerate_inputs,
        check_permutation_equivariance=check_permutation_equivariance,
        check_half_precision_gramians=check_half_precision_gramians,
        train_two_task_regression=train_two_task_regression,
    )


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """CPU always; CUDA too when present."""
    return torch.device(request.param)
