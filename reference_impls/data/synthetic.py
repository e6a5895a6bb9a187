"""Two regression tasks with a controllable correlation: the synthetic data of MMoE.

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
Multi-gate Mixture-of-Experts", KDD 2018, Sec. 3.2 ("Synthetic Data Generation"):

1. two orthogonal unit vectors u1, u2 in R^d;
2. for a scale c and a "task correlation" -1 <= p <= 1, the weights
       w1 = c u1,   w2 = c (p u1 + sqrt(1 - p²) u2)              Eq. (2), cos(w1, w2) = p;
3. an input x with every element drawn from N(0, 1);
4. the labels
       y_k = w_k·x + Σ_{i=1..m} sin(α_i w_k·x + β_i) + ε_k      Eqs. (3)-(4),
   with ε1, ε2 i.i.d. N(0, 0.01);
5. repeat 3-4 until there is enough data.

The same α_i, β_i serve both tasks, so p is the only thing that separates them. The
label Pearson correlation grows with p but is not p itself, because of the sines (the
paper's Fig. 2; tested here). The paper applies no normalisation to x or y.

What the paper fixes and what it leaves open:

* d = 100 ("The input dimension is 100", Sec. 5.1).
* c, m, α_i and β_i are "given parameters" whose values the paper does not state.
  Google Research's public generator for this procedure (it says so in a comment) uses
  c = 1, m = 10, α_i = i and β_i = (i - 1)² for i = 1..m; we use the same defaults,
  fixed rather than random, as the paper's wording suggests. ``random_sine_parameters``
  gives the other reading, α_i, β_i drawn once from N(0, 1) (slower sines).
* N(0, 0.01) is read as variance 0.01, i.e. noise standard deviation 0.1 (the same
  generator reads it as standard deviation 0.01; pass ``noise_std=0.01`` for that).

* Step 5 fixes no data size. ``correlated_regression(n, ...)`` makes a finite set of n
  examples; ``epoch_batches`` cuts such a set into shuffled batches, epoch after epoch.

Everything is generated on the fly from the seed (u1, u2 and the inputs and noise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from reference_impls.architectures.registry import Problem
from reference_impls.metrics import MeanSquaredError

from . import Benchmark, TaskSpec

TASKS = ("y1", "y2")


def sine_parameters(num_sines: int) -> tuple[Tensor, Tensor]:
    """Default α_i = i and β_i = (i - 1)², i = 1..m (the paper leaves them open, see above)."""
    i = torch.arange(num_sines, dtype=torch.float64)
    return i + 1.0, i**2


def random_sine_parameters(num_sines: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Another reading of "given parameters": α_i, β_i drawn once from N(0, 1).

    Slower sines than α_i = i: most of the label is then a smooth function of w_k·x.
    """
    draws = torch.randn(2, num_sines, generator=generator, dtype=torch.float64)
    return draws[0], draws[1]


def task_weights(correlation: float, dim: int = 100, scale: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Steps 1-2: the rows w1, w2 of a (2, dim) matrix, both of norm c, with cosine p."""
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [-1, 1], got {correlation}")
    if dim < 2:  # step 1 needs two orthogonal directions
        raise ValueError(f"dim must be at least 2 (two orthogonal task directions), got {dim}")
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64))
    u1, u2 = basis[:, 0], basis[:, 1]  # step 1: orthonormal
    w2 = correlation * u1 + math.sqrt(1.0 - correlation**2) * u2
    return scale * torch.stack([u1, w2])  # Eq. (2)


def labels(x: Tensor, weights: Tensor, alphas: Tensor, betas: Tensor, noise_std: float,
           generator: torch.Generator | None = None) -> Tensor:
    """Step 4, Eqs. (3)-(4): x (..., n, d) and weights (..., 2, d) give labels (..., n, 2).

    ``alphas`` and ``betas`` are (m,) for all, or (..., m) for one set per leading index.
    """
    z = x @ weights.transpose(-1, -2)  # w_k·x, (..., n, 2)
    alphas, betas = alphas.to(z)[..., None, None, :], betas.to(z)[..., None, None, :]
    sines = torch.sin(alphas * z[..., None] + betas).sum(-1)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    return z + sines + noise_std * noise


def correlated_regression(
    n: int, correlation: float, dim: int = 100, scale: float = 1.0, num_sines: int = 10,
    noise_std: float = 0.1, seed: int = 0, alphas: Tensor | None = None, betas: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``n`` inputs (n, dim) and labels {"y1": (n,), "y2": (n,)} for task correlation p.

    Draws, in this order from one generator seeded with ``seed``: the basis of step 1, the
    inputs of step 3 (elements i.i.d. N(0, 1)), then the label noise.
    """
    if num_sines < 0:
        raise ValueError(f"num_sines must be >= 0, got {num_sines}")
    default_alphas, default_betas = sine_parameters(num_sines)
    alphas = default_alphas if alphas is None else _one_per_sine("alphas", alphas, num_sines)
    betas = default_betas if betas is None else _one_per_sine("betas", betas, num_sines)
    g = torch.Generator().manual_seed(seed)
    weights = task_weights(correlation, dim, scale, g)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)  # step 3
    y = labels(x, weights, alphas, betas, noise_std, g).float()
    return x.float(), {name: y[:, k] for k, name in enumerate(TASKS)}


def _one_per_sine(name: str, values: Tensor, num_sines: int) -> Tensor:
    """``values`` as a float64 vector of ``num_sines`` entries. Another length would either be
    broadcast silently (one value for every sine) or fail deep inside ``labels``."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.shape != (num_sines,):
        got = f"{values.numel()} value(s)" if values.dim() == 1 else f"shape {tuple(values.shape)}"
        raise ValueError(f"{name} must hold one value per sine, num_sines = {num_sines}, got {got}; "
                         f"give {num_sines} values, or set num_sines to match")
    return values


def epoch_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Index batches for training on a fixed set of n examples, epoch after epoch.

    Step 5 read literally ("repeat until enough data are generated"): a finite training set.
    Each epoch is a fresh permutation of the same n indices, cut into batches (the last one
    may be shorter); the iterator never ends.
    """
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


class TensorTasks(Dataset):
    """Items ``(x[i], {task: y[task][i]})`` from in-memory tensors."""

    def __init__(self, x: Tensor, labels: dict[str, Tensor]):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {t: y[i] for t, y in self.labels.items()}


def mse_loss(prediction: Tensor, target: Tensor) -> Tensor:
    return torch.nn.functional.mse_loss(prediction.reshape(target.shape), target)


def benchmark(correlation: float = 0.5, n_train: int = 2000, n_test: int = 1000,
              dim: int = 100, seed: int = 0, **kwargs) -> Benchmark:
    """Train and test sets drawn from the same task pair (same w1, w2, α, β)."""
    if n_train < 0 or n_test < 0:  # a negative count would slice from the end, silently
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    x, y = correlated_regression(n_train + n_test, correlation, dim=dim, seed=seed, **kwargs)
    train = TensorTasks(x[:n_train], {t: v[:n_train] for t, v in y.items()})
    test = TensorTasks(x[n_train:], {t: v[n_train:] for t, v in y.items()})
    problem = Problem(TASKS, (dim,), {t: 1 for t in TASKS})
    tasks = {t: TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in TASKS}
    return Benchmark(problem, train, test, tasks)
