"""``train.fit``, the training loop, checked through what a user of it sees.

The progress bar ``fit`` draws (its label, its total of ``epochs x batches`` steps, and the note
with the epoch and the epoch's running mean loss), the held-out validation batches of the
methods that read them (bilevel look-aheads run in training mode and follow the batch-norm rule
for a lone example; AW reads its losses in eval mode and keeps every held-out example), the
training set that SVD reweighting is built from, which failures are blamed on ``--method-kw``
options, and the run's label in the refusals and errors that ``fit`` raises.
"""

import re

import numpy as np
import pytest
import torch

from reference_impls import data as datasets
from reference_impls import hooks, train
from reference_impls.architectures.registry import build

from .test_train import _TRAIN_STEP, _tiny_bench

CPU = torch.device("cpu")

# One drawn bar: "\r<label> |<cells>| <done>/<total> <seconds>s <note>"
FRAME = re.compile(r"(?P<label>[^|]*) \|(?P<cells>[#-]*)\| (?P<done>\d+)/(?P<total>\d+) +\d+\.\ds (?P<note>.*)")
NOTE = re.compile(r"epoch (?P<epoch>\d+)/(?P<epochs>\d+) loss (?P<loss>-?[0-9.]+)")


def _recording_totals(monkeypatch) -> list[tuple[int, float]]:
    """Wrap ``train_step``; the list fills with (epoch, logged total) for each step."""
    totals = []

    def recording(model, method, optimizer, x, targets, specs, step, epoch):
        log = _TRAIN_STEP(model, method, optimizer, x, targets, specs, step, epoch)
        totals.append((epoch, log.total))
        return log

    monkeypatch.setattr(train, "train_step", recording)
    return totals


# ----------------------------------------------------------------------------------------------
# The progress bar of the loop
# ----------------------------------------------------------------------------------------------


def test_fit_s_bar_counts_every_step_and_notes_the_epoch_and_its_running_mean_loss(monkeypatch, capsys):
    """8 examples in batches of 4 for 3 epochs: a bar of 3 x 2 = 6 steps under the run's label,
    drawn by default. Each step's note names its epoch (from 1, of 3) and the mean of the logged
    total loss over that epoch's batches so far, recomputed here from the logged steps."""
    totals = _recording_totals(monkeypatch)
    torch.manual_seed(0)
    bench = _tiny_bench()
    train.fit(build("shared_bottom", bench.problem), bench, "ew", epochs=3, lr=1e-2, batch_size=4,
              device=CPU, seed=0, label="mmoe+ew")  # progress left at its default: shown
    shown = capsys.readouterr()
    assert shown.out == ""
    frames = [FRAME.fullmatch(text.removesuffix("\n")) for text in shown.err.split("\r")[1:]]
    assert len(frames) == 6 and all(frames), repr(shown.err)  # 24 cells / 6 steps: every step draws
    assert [f["label"] for f in frames] == ["mmoe+ew"] * 6
    assert [(int(f["done"]), int(f["total"])) for f in frames] == [(done, 6) for done in range(1, 7)]
    expected = []
    for epoch in range(3):
        in_epoch = [total for e, total in totals if e == epoch]
        expected += [(epoch + 1, np.mean(in_epoch[:i + 1])) for i in range(len(in_epoch))]
    notes = [NOTE.fullmatch(f["note"]) for f in frames]
    assert all(notes), [f["note"] for f in frames]
    assert [(int(n["epoch"]), int(n["epochs"])) for n in notes] == [(e, 3) for e, _ in expected]
    assert [float(n["loss"]) for n in notes] == pytest.approx([mean for _, mean in expected], abs=1e-4)
    assert len({round(mean, 4) for _, mean in expected}) > 2  # the losses differ, so the check is sharp


def test_fit_without_progress_draws_no_bar(capsys):
    """``progress=False`` (``--no-progress``): nothing on stderr for a method that holds no data out."""
    torch.manual_seed(0)
    bench = _tiny_bench()
    train.fit(build("shared_bottom", bench.problem), bench, "ew", epochs=2, lr=1e-2, batch_size=4,
              device=CPU, seed=0, label="run", progress=False)
    assert capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------------------------
# Held-out validation batches
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, use, lone_kept", [
    ("autol", "meta step", False),  # the look-ahead runs NDDR's batch norm in training mode
    ("aw", "validation-loss trend", True),  # eval mode: running statistics, one example is fine
])
def test_held_out_batches_drop_a_lone_example_only_where_they_run_in_training_mode(method, use, lone_kept,
                                                                                   monkeypatch, capsys):
    """50 examples: round(0.1 x 50) = 5 are held out, in batches of 4, i.e. 4 and a lone 1. A
    bilevel method's look-ahead runs them through the network in training mode, where batch norm
    cannot normalise one example, so that lone example is dropped as for training batches. AW
    reads its validation losses in eval mode, so it keeps every held-out example. The notice
    names what the held-out data is for."""
    bench = datasets.load("synthetic", n_train=50, n_test=8, dim=4, num_sines=2, seed=0)
    sizes = []
    if method == "autol":
        meta_update = train.meta_update
        monkeypatch.setattr(train, "meta_update", lambda method_, model, batch, val, *rest: (
            sizes.append(len(val[0])), meta_update(method_, model, batch, val, *rest))[1])
    else:
        validation_losses = train.validation_losses
        monkeypatch.setattr(train, "validation_losses", lambda model, val, specs: (
            sizes.append(len(val[0])), validation_losses(model, val, specs))[1])
    torch.manual_seed(0)
    model = build("nddr", bench.problem)
    assert any(isinstance(m, hooks.BATCH_NORMS) for m in model.modules())
    _, history = train.fit(model, bench, method, epochs=1, lr=1e-3, batch_size=4, device=CPU, seed=0,
                           label="run", progress=False)
    assert np.isfinite(history["total"]).all()
    assert len(sizes) == 11  # 45 training examples in batches of 4, the lone 45th dropped: 11 steps
    assert sizes == (([4, 1] * 6)[:11] if lone_kept else [4] * 11)
    notice = [line for line in capsys.readouterr().err.splitlines() if "held out" in line]
    assert len(notice) == 1 and "5 of 50 training examples" in notice[0]
    assert use in notice[0].lower()
    assert ("meta" in notice[0].lower()) == (method == "autol")


# ----------------------------------------------------------------------------------------------
# What the method is built from, and what an error blames
# ----------------------------------------------------------------------------------------------


def test_svd_reweighting_in_fit_is_built_from_the_training_inputs_and_labels(monkeypatch):
    """Its task weights come from X (inputs as rows) and Y (one label column per task) of the
    training set, stacked here independently of ``hooks.design_matrices``."""
    from reference_impls.weighting.svd_reweighting import svd_task_weights
    made, make = [], train.make_method
    monkeypatch.setattr(train, "make_method", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    bench = datasets.load("synthetic", n_train=32, n_test=8, dim=5, num_sines=2, seed=0)
    torch.manual_seed(0)
    train.fit(build("shared_bottom", bench.problem), bench, "svd_reweighting", epochs=1, lr=1e-3, batch_size=16,
              device=CPU, seed=0, label="run", progress=False)
    x = torch.stack([bench.train[i][0] for i in range(32)])
    y = torch.tensor([[float(bench.train[i][1][t]) for t in ("y1", "y2")] for i in range(32)], dtype=torch.float64)
    torch.testing.assert_close(made[0].alpha, svd_task_weights(x, y, 1).to(made[0].alpha))


@pytest.mark.parametrize("failing_step, blamed", [(0, True), (1, False)])
def test_only_a_failure_of_the_first_step_is_blamed_on_the_method_options(failing_step, blamed, monkeypatch):
    """A value the method refuses at its first step (where it first meets the data) is the
    options' error; a ValueError later, after steps with the same options succeeded, is a bug
    of the method and keeps its own type and traceback."""
    def failing(model, method, optimizer, x, targets, specs, step, epoch):
        if step == failing_step:
            raise ValueError("refused at this step")
        return _TRAIN_STEP(model, method, optimizer, x, targets, specs, step, epoch)

    monkeypatch.setattr(train, "train_step", failing)
    bench = _tiny_bench()
    with pytest.raises(ValueError, match="refused at this step") as caught:
        train.fit(build("shared_bottom", bench.problem), bench, "dwa", epochs=2, lr=1e-2, batch_size=4, device=CPU,
                  seed=0, label="run", progress=False, method_options={"temperature": 3.0})
    assert isinstance(caught.value, hooks.ConfigurationError) == blamed
    if blamed:
        assert "'dwa' --method-kw temperature=3.0" in str(caught.value)


def test_a_batch_norm_refusal_of_the_training_batches_names_the_run():
    """The label tells which model is refused: the multi-task one or a single-task baseline
    (whose --stl-arch may have batch norm where the multi-task architecture has none)."""
    bench = datasets.load("synthetic", n_train=9, n_test=4, dim=4, seed=0)
    with pytest.raises(hooks.ConfigurationError, match=r"^single-task y1: batch norm needs at least 2 examples"):
        train.fit(build("nddr", bench.problem), bench, "ew", epochs=1, lr=1e-3, batch_size=1, device=CPU, seed=0,
                  label="single-task y1", progress=False)


def test_a_model_broken_by_its_last_update_is_stopped_at_evaluation_naming_the_run(monkeypatch):
    """The last step's losses were finite (computed before its update); the update then made a
    weight NaN. The evaluation refuses the predictions and says which run's evaluation it was."""
    def last_update_breaks_a_weight(model, method, optimizer, x, targets, specs, step, epoch):
        log = _TRAIN_STEP(model, method, optimizer, x, targets, specs, step, epoch)
        if step == 3:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return log

    monkeypatch.setattr(train, "train_step", last_update_breaks_a_weight)
    bench = _tiny_bench()
    with pytest.raises(train.TrainingDiverged, match=r"^mmoe\+ew, evaluation: task y1's predictions"):
        train.fit(build("mmoe", bench.problem), bench, "ew", epochs=2, lr=1e-2, batch_size=4, device=CPU, seed=0,
                  label="mmoe+ew", progress=False)
