"""What ``train.run`` passes on from the command line to the multi-task run, and what it refuses.

``run`` wires the flags into ``fit``: the progress bar (shown, labelled with the architecture and
the method, or hidden by ``--no-progress``), ``--method-lr`` for the method's own parameters, and
the run's name in a refusal raised while its batches are drawn. Before training it checks a
``--stl-arch`` by building one single-task model, which must also work for a benchmark of one task,
and it refuses single-task options that ``--baselines`` makes pointless, naming those flags.
"""

import json
import re

import pytest

from reference_impls import data as datasets
from reference_impls import train
from reference_impls.architectures.registry import Problem
from reference_impls.data.synthetic import TensorTasks
from reference_impls.hooks import ConfigurationError

from .test_train import _recorded_learning_rates, _run_tiny

# A drawn bar: "\r<label> |<cells>| <done>/<total> <seconds>s <note>"
BAR = re.compile(r"\r(?P<label>[^|\r]*) \|[#-]*\| \d+/\d+ ")


def _baselines(tmp_path, keys=("y1/mse", "y2/mse")):
    """A stored --baselines file, so that ``run`` trains the multi-task model only."""
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps({k: 1.0 for k in keys}))
    return str(path)


@pytest.mark.parametrize("progress", [True, False])
def test_the_run_s_bar_names_its_architecture_and_method_and_no_progress_hides_it(progress, tmp_path, capsys):
    """The user watches one bar per trained model; the multi-task one must say which run it is
    (architecture and method), and --no-progress must silence it as it does the baselines'."""
    flags = ["--arch", "mmoe", "--method", "uw", "--epochs", "2", "--batch-size", "4",
             "--baselines", _baselines(tmp_path)]
    train.run(train.parse_args(["--data-kw", "n_train=8", "n_test=4", "dim=4", *flags, "--device", "cpu",
                                *([] if progress else ["--no-progress"])]))
    err = capsys.readouterr().err
    labels = [m.group("label") for m in BAR.finditer(err)]
    if not progress:
        assert labels == [] and "\r" not in err
        return
    assert len(labels) >= 2  # 2 epochs of 2 batches: redrawn as it grows
    assert all("mmoe" in label and "uw" in label for label in labels), labels


def test_the_method_lr_flag_reaches_the_method_s_parameters_in_the_run(tmp_path, monkeypatch):
    """--method-lr sets the learning rate of UW's log variances in the multi-task run, the
    network keeping --lr (fit's own handling of method_lr is tested in test_train.py)."""
    rates = _recorded_learning_rates(monkeypatch)
    _run_tiny("--method", "uw", "--lr", "0.01", "--method-lr", "0.05", "--epochs", "1",
              "--baselines", _baselines(tmp_path))
    assert rates == [[0.01, 0.05]]  # the network's group, then the method's; no baseline trained


def test_a_batch_size_refused_for_batch_norm_names_the_run_it_refuses():
    """NDDR has batch norm, which cannot train on batches of 1. The refusal comes from drawing the
    batches, deep in fit; it must still name the run (its architecture), since the single-task
    baselines are refused the same way and the user must know which model to change."""
    with pytest.raises(ConfigurationError) as caught:
        _run_tiny("--arch", "nddr", "--batch-size", "1", "--epochs", "1")
    before, _, _ = str(caught.value).partition("batch norm needs at least 2 examples")
    assert "nddr" in before, str(caught.value)


@pytest.mark.parametrize("flags", [["--stl-arch", "mmoe"], ["--stl-kw", "width=8"]])
def test_single_task_options_with_baselines_are_refused_naming_the_flags(flags, tmp_path, monkeypatch):
    """With --baselines no single-task model is trained, so --stl-arch and --stl-kw would be silently
    ignored; the refusal must name both single-task flags and --baselines as they are typed."""
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ConfigurationError) as caught:
        _run_tiny("--baselines", _baselines(tmp_path), *flags)
    for flag in ("--stl-arch", "--stl-kw", "--baselines"):
        assert re.search(rf"{flag}\b", str(caught.value)), (flag, str(caught.value))


def test_a_benchmark_of_one_task_trains_and_reports_its_one_row(monkeypatch):
    """CelebA with one attribute or QM9 with one target is a one-task benchmark. run() checks
    --stl-arch by building the single-task model of a task before training: the benchmark's
    first task, the only one there is here."""
    full = datasets.load("synthetic", n_train=8, n_test=4, dim=4, seed=0)
    one = datasets.Benchmark(Problem(("y1",), full.problem.input_shape, {"y1": 1}),
                             TensorTasks(full.train.x, {"y1": full.train.labels["y1"]}),
                             TensorTasks(full.test.x, {"y1": full.test.labels["y1"]}), {"y1": full.tasks["y1"]})
    monkeypatch.setattr(datasets, "load", lambda *args, **kwargs: one)
    result = _run_tiny("--epochs", "1", "--batch-size", "4")
    assert set(result["multi_task"]) == set(result["single_task"]) == {"y1/mse"}
    rows = [line for line in result["table"].splitlines() if line.startswith("| y1/mse |")]
    assert len(rows) == 1


def test_a_single_task_architecture_that_cannot_train_on_the_batches_is_refused_before_any_training(monkeypatch):
    """A batch-norm --stl-arch with --batch-size 1 was refused only once the multi-task model had
    trained, when the first baseline drew its batches; the run's work was lost."""
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: pytest.fail("fit() was called"))
    with pytest.raises(ConfigurationError, match=r"^single-task y1: batch norm needs at least 2 examples"):
        _run_tiny("--arch", "mmoe", "--stl-arch", "nddr", "--batch-size", "1", "--epochs", "1")
