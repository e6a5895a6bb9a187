"""Predict whether an auxiliary task helps a main task from dataset and learning-curve features.

Bingel, Søgaard, "Identifying beneficial task relations for multi-task learning in deep
neural networks", EACL 2017, arXiv:1702.08303. Equations are named, not numbered: the
paper's text was not available here. Every rule below follows the authors' notebook
(github.com/jbingel/eacl2017_mtl, ``experiments.ipynb``).

Ten NLP sequence-labelling tasks are trained alone and in every pair (one shared recurrent
network, a head per task). For an ordered pair (main, aux) the MTL gain is the relative
change of the main task's score when trained with the auxiliary one,

    gain = (score_MTL(main | aux) / score_STL(main) − 1) · 100 .

The question is whether gain > 0 can be predicted without training the pair, from
features of each task measured alone:

- dataset features: the number of training sentences, the number of labels, the entropy
  of the label distribution, the token/type ratio, the Frobenius norm of the sentence x word
  count matrix, the Jensen-Shannon divergence between the train and dev word distributions
  and the out-of-vocabulary rate (percent) against the word-embedding vocabulary;
- learning-curve features of the single-task training loss: its slope at 10, 20, 30, 50
  and 70 % of training (a central difference around that point, on the whole log), and two
  parameters, b and c, of the curve a + b · log(c · t + d) fitted to a thinned log: every
  tenth of its first 5000 entries, as the notebook reads its 5000-line logs.

A pair is described by the main task's features, the auxiliary task's, and their ratio
main / aux for every feature; the columns are min-max scaled and an L2-regularised logistic
regression predicts whether the gain is positive. The notebook calls ``LogisticRegression()``
with its defaults of the time (scikit-learn before 0.22: the liblinear solver, C = 1), which
treat the intercept as the weight of a constant input 1 and penalise it with the rest:
the objective is ½(‖w‖² + b²) + C Σ log(1 + exp(−y (z·w + b))). The paper reads the
fitted coefficients to see which features matter (learning-curve slopes of the main task
most).

Note on the curve fit: a + b · log(c t + d) = (a + b log c) + b · log(t + d/c), so only b,
d/c and a + b log c are determined by the curve; c (the second "steepness" feature of the
notebook) depends on where the fit starts. :func:`fit_log_curve` starts, as
``scipy.optimize.curve_fit`` does by default, from a = b = c = d = 1; even from that start the
two optimisers end at different c (e.g. 0.17 against the notebook's 0.05, with the same b and
the same curve), so the c feature is not reproducible across fitters.

Left out: training the single-task and pair networks (the caller's), the recursive
feature elimination and the feature-ablation runs, and the linear-regression variant that
predicts the gain itself. Our choices: a gain of exactly 0 counts as no benefit (the
notebook's list of gains keeps diff > 0 only), and the logistic regression is solved with
L-BFGS in float64.

Where the notebook's data features differ from what :func:`dataset_features` computes on the
sentences it is given: its token/type ratio, label entropy and the training side of the
Jensen-Shannon divergence read the vectorised matrices, each sentence wrapped in start/end
markers and cut or padded to 30 symbols (the end marker and the out-of-vocabulary id count
as tokens, the padding enters the divergence's training counts); the dev side of its
divergence is, through a variable overwritten in the vectorising cell, the dev *label* ids,
not the dev words (we compare words with words, as the feature is described); and its count
matrix for the Frobenius norm comes from scikit-learn's CountVectorizer on the raw text,
which lowercases and drops one-character tokens. For curves of fewer than ten entries
:func:`curve_gradients` keeps the difference inside the curve, where the notebook's index
would wrap around to its end or run past it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from reference_impls.checks import require_above, require_positive

CURVE_POSITIONS = (0.1, 0.2, 0.3, 0.5, 0.7)


def mtl_gain(single_task_score: float, multi_task_score: float) -> float:
    """Relative change of the main task's score (higher is better) in percent."""
    require_above(0, single_task_score=single_task_score)
    return (multi_task_score / single_task_score - 1.0) * 100.0


def entropy(counts: Sequence[float]) -> float:
    """Shannon entropy in nats of the distribution proportional to ``counts``."""
    p = torch.tensor([float(c) for c in counts if c > 0], dtype=torch.float64)
    p = p / p.sum()
    return float(-(p * p.log()).sum())


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence (nats) of two count vectors, each normalised to sum to one."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        keep = a > 0
        return (a[keep] * (a[keep] / m[keep]).log()).sum()
    return float((kl(p) + kl(q)) / 2)


def dataset_features(train: Sequence[Sequence[int]], dev: Sequence[Sequence[int]],
                     labels: Sequence[int], num_labels: int, vocab_size: int,
                     known_words: set[int] | None = None) -> dict[str, float]:
    """The notebook's data features of one task: sentences of word ids, the flat training labels."""
    tokens = [w for sentence in train for w in sentence]
    if not tokens or not any(dev) or not labels:
        raise ValueError("need training tokens, dev tokens and labels")
    counts = torch.zeros(len(train), vocab_size, dtype=torch.float64)
    for i, sentence in enumerate(train):
        for w in sentence:
            counts[i, w] += 1
    dev_counts = torch.bincount(torch.tensor([w for s in dev for w in s]), minlength=vocab_size)
    out = {
        "length": float(len(train)),
        "n_labels": float(num_labels),
        "label_entropy": entropy(list(Counter(labels).values())),
        "tokens/types": len(tokens) / len(set(tokens)),
        "fro_norm": float(counts.norm()),
        "js_div": js_divergence(counts.sum(0), dev_counts),
    }
    if known_words is not None:
        out["oov_rate"] = 100.0 * sum(w not in known_words for w in tokens) / len(tokens)
    return out


def curve_gradients(steps: Sequence[float], losses: Sequence[float],
                    positions: Sequence[float] = CURVE_POSITIONS) -> list[float]:
    """Slope of the loss curve at each fraction p of its length: a central difference around int(n·p)."""
    n = len(steps)
    if n != len(losses) or n < 3:
        raise ValueError(f"need as many steps as losses, at least 3, got {n} and {len(losses)}")
    out = []
    for p in positions:
        i = min(max(int(n * p), 1), n - 2)
        out.append((losses[i + 1] - losses[i - 1]) / (steps[i + 1] - steps[i - 1]))
    return out


def log_curve(t: Tensor, params: Tensor) -> Tensor:
    a, b, c, d = params
    return a + b * torch.log(c * t + d)


def _residuals_and_jacobian(t: Tensor, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    a, b, c, d = params
    u = c * t + d
    jac = torch.stack([torch.ones_like(t), torch.log(u), b * t / u, b / u], dim=1)
    return a + b * torch.log(u) - y, jac


def fit_log_curve(steps: Sequence[float], losses: Sequence[float], iterations: int = 500) -> Tensor:
    """Least-squares fit of a + b·log(c·t + d) from all ones by Levenberg-Marquardt; returns (a, b, c, d).

    The same kind of solver as ``curve_fit``'s default; a step leaving the curve's domain
    (c·t + d ≤ 0 somewhere) or raising the squared error is refused and damped further.
    """
    t = torch.as_tensor(steps, dtype=torch.float64)
    y = torch.as_tensor(losses, dtype=torch.float64)
    if t.shape != y.shape or t.dim() != 1 or (t < 0).any():
        raise ValueError("need as many non-negative steps as losses")
    params, damping = torch.ones(4, dtype=torch.float64), 1e-3
    r, jac = _residuals_and_jacobian(t, y, params)
    for _ in range(iterations):
        jtj, jtr = jac.T @ jac, jac.T @ r
        step = torch.linalg.solve(jtj + damping * torch.diag(jtj.diagonal().clamp_min(1e-12)), -jtr)
        trial = params + step
        if (trial[2] * t + trial[3] > 0).all():
            r_new, jac_new = _residuals_and_jacobian(t, y, trial)
            if (r_new ** 2).sum() < (r ** 2).sum():
                converged = (r ** 2).sum() - (r_new ** 2).sum() <= 1e-15 * (r ** 2).sum()
                params, r, jac, damping = trial, r_new, jac_new, max(damping / 10, 1e-12)
                if converged:
                    break
                continue
        damping *= 10
        if damping > 1e12:
            break
    return params


def curve_features(steps: Sequence[float], losses: Sequence[float], fit_first: int = 5000,
                   fit_every: int = 10) -> dict[str, float]:
    """The notebook's learning-curve features: five slopes of the whole curve, b and c of the fit.

    The fit reads entries[:fit_first:fit_every] only, the slopes every entry.
    """
    require_positive(fit_first=fit_first, fit_every=fit_every)
    grads = curve_gradients(steps, losses)
    out = {f"loss_grad_{round(100 * p)}": g for p, g in zip(CURVE_POSITIONS, grads)}
    thinned = slice(None, fit_first, fit_every)
    _, b, c, _ = fit_log_curve(list(steps)[thinned], list(losses)[thinned]).tolist()
    out["curve_steepness0"], out["curve_steepness1"] = b, c
    return out


def pair_features(main: Mapping[str, float], aux: Mapping[str, float]) -> dict[str, float]:
    """One (main, aux) instance: both tasks' features and their ratio main / aux."""
    if set(main) != set(aux):
        raise ValueError("main and auxiliary tasks must have the same features")
    out = {}
    for name in sorted(main):
        out["main_" + name] = main[name]
        out["aux_" + name] = aux[name]
        out["main/aux_" + name] = main[name] / aux[name]
    return out


class BenefitPredictor:
    """Min-max scaling, then L2-regularised logistic regression of whether the MTL gain is positive."""

    name = "beneficial_task_relations"

    def __init__(self, c: float = 1.0) -> None:
        require_above(0, c=c)
        self.c = c

    def scale(self, x: Tensor) -> Tensor:
        span = self.high - self.low
        return (x - self.low) / torch.where(span > 0, span, torch.ones_like(span))

    def fit(self, x: Tensor, gains: Tensor, iterations: int = 500) -> BenefitPredictor:
        """x: N x F features of the pairs, gains: N MTL gains; only their sign is learnt."""
        if x.dim() != 2 or gains.shape != (x.shape[0],):
            raise ValueError(f"need an N x F matrix and N gains, got {tuple(x.shape)} and {tuple(gains.shape)}")
        x = x.double()
        self.low, self.high = x.min(0).values, x.max(0).values
        z, y = self.scale(x), torch.where(gains > 0, 1.0, -1.0).double()
        w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = self.objective(w, z, y)
            loss.backward()
            return loss

        optimizer.step(closure)
        self.weight, self.bias = w.detach()[:-1], w.detach()[-1]
        return self

    def objective(self, w: Tensor, z: Tensor, y: Tensor) -> Tensor:
        """½(‖weights‖² + bias²) + C Σ log(1 + exp(−y (z·weights + bias))), as liblinear."""
        margins = y * (z @ w[:-1] + w[-1])
        return 0.5 * (w ** 2).sum() + self.c * torch.nn.functional.softplus(-margins).sum()

    def probability(self, x: Tensor) -> Tensor:
        """P(the auxiliary task helps the main task) for each row of x."""
        return torch.sigmoid(self.scale(x.double()) @ self.weight + self.bias)

    def predict(self, x: Tensor) -> Tensor:
        return self.probability(x) > 0.5
