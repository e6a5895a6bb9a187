import io

import pytest
import torch

from reference_impls import data as datasets
from reference_impls import hooks, train
from reference_impls.architectures.registry import Problem, build
from reference_impls.data.synthetic import mse_loss
from reference_impls.metrics import MeanSquaredError
from reference_impls.weighting.aw import AW


def observe(method: AW, intervals: list[list[float]]) -> list[torch.Tensor]:
    """Feed ``interval`` copies of each loss vector; return the weights after every step."""
    weights = []
    for losses in intervals:
        for _ in range(method.interval):
            method.observe_validation_losses(torch.tensor(losses, dtype=torch.float64))
            weights.append(method.weights(torch.ones(len(losses), dtype=torch.float64)))
    return weights


def authors_rule(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The authors' layer, step by step: normalised trend times normalised level, mean 1."""
    trend = (current - previous).abs() / current
    weights = (trend / trend.mean()) * (current / current.mean())
    return weights / weights.mean()


def test_weights_follow_the_authors_trend_times_loss_rule_on_interval_means():
    g = torch.Generator().manual_seed(0)
    method, steps = AW(interval=3), (0.2 + torch.rand(9, 4, generator=g, dtype=torch.float64))
    weights = []
    for losses in steps:
        method.observe_validation_losses(losses)
        weights.append(method.weights(torch.ones(4, dtype=torch.float64)))
    first, second, third = steps[0:3].mean(0), steps[3:6].mean(0), steps[6:9].mean(0)
    torch.testing.assert_close(weights[5], authors_rule(first, second))
    torch.testing.assert_close(weights[8], authors_rule(second, third))
    assert all(torch.equal(w, weights[5]) for w in weights[5:8])  # constant within the interval


def test_weights_are_one_until_two_intervals_are_averaged():
    weights = observe(AW(interval=4), [[3.0, 1.0], [1.0, 0.9], [0.5, 0.5]])
    assert all(torch.equal(w, torch.ones(2, dtype=torch.float64)) for w in weights[:7])
    torch.testing.assert_close(weights[7], torch.tensor([2 * 2.0 / 2.1, 2 * 0.1 / 2.1], dtype=torch.float64))


def test_the_trend_compares_consecutive_intervals_not_the_first_one():
    # against interval 2 the changes are (0.1, 0.5); against interval 1 they would be equal
    weights = observe(AW(interval=2), [[1.0, 1.0], [0.5, 0.9], [0.4, 0.4]])
    torch.testing.assert_close(weights[-1], torch.tensor([2 * 0.1 / 0.6, 2 * 0.5 / 0.6], dtype=torch.float64))


def test_a_stalled_task_gets_no_weight_and_a_rising_loss_counts_like_a_falling_one():
    weights = observe(AW(interval=1), [[1.0, 1.0, 1.0], [1.0, 1.3, 0.7]])[-1]
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.5, 1.5], dtype=torch.float64))


def test_no_change_at_all_gives_equal_weights_and_sums_stay_k():
    assert torch.equal(observe(AW(interval=1), [[2.0, 0.0], [2.0, 0.0]])[-1], torch.ones(2, dtype=torch.float64))
    weights = observe(AW(interval=2), [[2.0, 0.5, 1.0], [1.0, 0.0, 1.5]])[-1]  # a loss that reached 0
    assert torch.isfinite(weights).all() and abs(weights.sum().item() - 3.0) < 1e-12


def test_combine_weights_the_training_losses_and_leaves_the_weights_without_gradient():
    method = AW(interval=1)
    observe(method, [[1.0, 1.0], [0.8, 0.4]])  # weights (0.5, 1.5)
    losses = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    total = method.combine(losses)
    total.backward()
    assert total.item() == pytest.approx(0.5 * 2.0 + 1.5 * 3.0)
    torch.testing.assert_close(losses.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_a_reloaded_aw_continues_mid_interval_as_the_original():
    g = torch.Generator().manual_seed(1)
    steps = 0.1 + torch.rand(11, 3, generator=g, dtype=torch.float64)
    trained = AW(interval=3)
    for losses in steps[:7]:  # two intervals and one step into the third
        trained.observe_validation_losses(losses)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    restored = AW(interval=3)
    restored.load_state_dict(torch.load(buffer))
    for losses in steps[7:]:
        trained.observe_validation_losses(losses)
        restored.observe_validation_losses(losses)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(restored.weights(ones), trained.weights(ones))
    torch.testing.assert_close(trained.weights(ones), authors_rule(steps[3:6].mean(0), steps[6:9].mean(0)))


def test_validation_losses_are_taken_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    model = build("shared_bottom", Problem(("a", "b"), (6,), {"a": 1, "b": 1}))
    specs = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in ("a", "b")}
    x, targets = torch.randn(8, 6), {"a": torch.randn(8, 1), "b": torch.randn(8, 1)}
    modes = []
    model.register_forward_hook(lambda module, args, out: modes.append(module.training))
    losses = hooks.validation_losses(model, (x, targets), specs)
    assert modes == [False] and model.training and not losses.requires_grad
    model.eval()
    torch.testing.assert_close(losses, hooks.task_losses(model(x), targets, specs, model.tasks))


def test_the_loop_feeds_one_held_out_batch_per_step_and_the_weights_move(capsys, monkeypatch):
    seen, original = [], AW.observe_validation_losses
    monkeypatch.setattr(AW, "observe_validation_losses",
                        lambda self, losses: (seen.append((losses.clone(), self)), original(self, losses))[1])
    result = train.main(["--arch", "shared_bottom", "--method", "aw", "--method-kw", "interval=2", "--no-progress",
                         "--data", "synthetic", "--data-kw", "n_train=256", "n_test=64", "dim=20", "num_sines=2",
                         "--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--seed", "0", "--device", "cpu"])
    assert "[train] aw: 26 of 256 training examples held out" in capsys.readouterr().err
    assert len(seen) == 2 * 8  # one per step: 2 epochs of ceil(230 / 32) batches
    assert all(losses.shape == (2,) and not losses.requires_grad for losses, _ in seen)
    method = seen[-1][1]
    assert method.task_weights.numel() == 2 and not torch.equal(method.task_weights, torch.ones(2))
    assert all(torch.isfinite(torch.tensor(result["train_loss"])))


def test_default_interval_is_the_authors_200_iterations():
    method, ones = AW(), torch.ones(2, dtype=torch.float64)
    seen = []
    for losses in [[1.0, 1.0]] * 200 + [[0.8, 0.4]] * 200:
        method.observe_validation_losses(torch.tensor(losses, dtype=torch.float64))
        seen.append(method.weights(ones))
    assert all(torch.equal(w, ones) for w in seen[:399])  # two full intervals only at step 400
    torch.testing.assert_close(seen[-1], torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_validation_losses_with_a_graph_give_weights_without_one():
    """Validation losses are recorded, not trained on: the weights must not carry their graph."""
    method = AW(interval=1)
    for values in ([1.0, 1.0], [0.8, 0.4]):
        method.observe_validation_losses(torch.tensor(values, dtype=torch.float64, requires_grad=True))
    weights = method.weights(torch.ones(2, dtype=torch.float64))
    assert not weights.requires_grad and weights.grad_fn is None
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_weights_come_in_the_dtype_of_the_losses_they_weigh():
    aw = AW(interval=1)
    for losses in ([1.0, 2.0], [0.5, 1.0]):  # two intervals: trend weights K|v − p| / Σ|v − p|
        aw.observe_validation_losses(torch.tensor(losses, dtype=torch.float32))
    weights = aw.weights(torch.ones(2, dtype=torch.float64))
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor([2.0 / 3.0, 4.0 / 3.0], dtype=torch.float64))
