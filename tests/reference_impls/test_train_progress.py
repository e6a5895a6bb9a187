"""The training harness's progress bar, run header and early refusals, checked in-process.

``train.ProgressBar`` draws one carriage-return line on stderr: it redraws only when the bar
grows, ends its line itself once the total is reached, and ends a line an error left open
when its ``with`` block exits. These tests read what it writes through ``capsys`` (the
subprocess tests in test_train.py see the same text, but a mutation run cannot see inside a
subprocess). The rest: the header ``main`` prints above the results table, the advice of a
divergence error, and the ``--save-baselines`` check before training.
"""

import re
from pathlib import Path

import pytest
import torch

from reference_impls import train
from reference_impls.hooks import ConfigurationError

from .test_train import _fit_without_training, _run_tiny

# One drawn bar: "<label> |<cells>| <done>/<total> <seconds>s <note>"
FRAME = re.compile(r"(?P<label>[^|]*) \|(?P<cells>[^|]*)\| (?P<done>\d+)/(?P<total>\d+) +(?P<secs>\d+\.\d)s "
                   r"(?P<note>[^\n]*)")


def _frames(err: str) -> list[re.Match]:
    """The bars drawn on stderr, in order: each starts with a carriage return."""
    assert err.startswith("\r"), repr(err)
    frames = [FRAME.fullmatch(text.removesuffix("\n")) for text in err.split("\r")[1:]]
    assert all(frames), repr(err)
    return frames


@pytest.mark.parametrize("total, redrawn_at", [
    (24, list(range(1, 25))),  # 24 cells, 24 steps: every step adds a cell, the first one included
    (48, [1, *range(2, 49, 2)]),  # a cell every second step; step 1 draws the still empty bar
    (1, [1]),  # a one-step run: its only step fills the bar
])
def test_the_bar_redraws_only_when_it_grows_and_ends_its_own_line_when_full(total, redrawn_at, capsys):
    """The bar is redrawn when a step adds a cell (``done * width // total`` cells are filled),
    on stderr, on one line (carriage returns, no newline) until the last step, whose bar is
    full and ends the line, so what is printed next starts on a line of its own."""
    with train.ProgressBar("mmoe+ew", total, width=24) as bar:
        for done in range(1, total + 1):
            bar.show(done)
        shown = capsys.readouterr()
    assert shown.out == ""
    frames = _frames(shown.err)
    assert [int(f["done"]) for f in frames] == redrawn_at
    for frame in frames:
        done = int(frame["done"])
        filled = done * 24 // total
        assert frame["cells"] == "#" * filled + "-" * (24 - filled)
        assert (frame["label"], int(frame["total"]), frame["note"]) == ("mmoe+ew", total, "")
    assert frames[-1]["cells"] == "#" * 24
    assert shown.err.count("\n") == 1 and shown.err.endswith("\n")  # the full bar ended its line itself
    assert capsys.readouterr() == ("", "")  # and leaving the block adds no blank line


def test_the_bar_shows_the_time_since_it_was_created_and_the_note(monkeypatch, capsys):
    """The clock is faked: the bar starts at t = 100 s, so at t = 103.5 s it has run 3.5 s."""
    now = [100.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: now[0])
    with train.ProgressBar("run", 4, width=8) as bar:
        now[0] = 103.5
        bar.show(1, "epoch 1/2 loss 0.5000")
        now[0] = 112.0
        bar.show(4, "epoch 2/2 loss 0.2500")
    first, last = _frames(capsys.readouterr().err)
    assert (first["secs"], first["note"], first["cells"]) == ("3.5", "epoch 1/2 loss 0.5000", "##------")
    assert (last["secs"], last["note"], last["cells"]) == ("12.0", "epoch 2/2 loss 0.2500", "########")


def test_a_bar_left_mid_line_by_an_error_is_ended_on_stderr(capsys):
    """Ctrl-C (or an error) mid-run: the message that follows must not be glued to the bar."""
    with pytest.raises(KeyboardInterrupt):
        with train.ProgressBar("run", 10, width=10) as bar:
            bar.show(3)
            raise KeyboardInterrupt
    shown = capsys.readouterr()
    assert shown.out == ""
    assert [f["cells"] for f in _frames(shown.err)] == ["###-------"]
    assert shown.err.count("\n") == 1 and shown.err.endswith("\n")


def test_a_disabled_bar_writes_nothing(capsys):
    """--no-progress: no bar, and no stray newline when the block ends (normally or not)."""
    with train.ProgressBar("run", 5, enabled=False) as bar:
        for done in range(1, 6):
            bar.show(done, "note")
    with pytest.raises(RuntimeError):
        with train.ProgressBar("run", 5, enabled=False) as bar:
            bar.show(2)
            raise RuntimeError("stopped")
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("note", [None, "mtan: in the paper, ..."])
def test_main_prints_which_run_the_table_belongs_to(note, monkeypatch, capsys):
    """The header above the table names the architecture, method, data, epochs and seed, so a
    saved log says what was run; a procedure note follows the table."""
    monkeypatch.setattr(train, "run", lambda args: {"table": "<the table>", "note": note})
    train.main(["--arch", "mmoe", "--method", "dwa", "--data", "synthetic", "--epochs", "7", "--seed", "5",
                "--no-progress", "--device", "cpu"])
    header, table, after = re.split(r"(<the table>)", capsys.readouterr().out)
    for fact in ("mmoe", "dwa", "synthetic", "7 epochs", "seed 5"):
        assert fact in header
    assert (note is None and after.strip() == "") or (note is not None and note in after)


def _help_flags(capsys) -> set[str]:
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    return set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))


def test_divergence_advice_names_only_flags_the_command_line_has(capsys):
    """A diverged run's error advises a flag to change; that flag must be one ``--help`` lists."""
    flags = _help_flags(capsys)
    assert "--lr" in flags
    diverged = [train.StepLog(torch.tensor([1.0, float("nan")]), 1.0, 0.0),  # a task loss
                train.StepLog(torch.tensor([1.0, 2.0]), 3.0, float("inf"))]  # the auxiliary loss
    for log in diverged:
        with pytest.raises(train.TrainingDiverged) as caught:
            train.check_finite(log, ("a", "b"), "where")
        advised = set(re.findall(r"--[A-Za-z][\w-]*", str(caught.value)))
        assert advised and advised <= flags, str(caught.value)


def test_a_directory_in_the_place_the_save_writes_is_refused_before_training(tmp_path, monkeypatch):
    """--save-baselines writes beside its target and renames. Which files it writes is observed
    first; then a directory is put in each one's place: the save would fail after training, so
    the run must be refused before it."""
    target = tmp_path / "baselines.json"
    written = []
    write = Path.write_text

    def recording(self, *args, **kwargs):
        written.append(self)
        return write(self, *args, **kwargs)

    with monkeypatch.context() as spy:
        spy.setattr(train, "fit", _fit_without_training([]))
        spy.setattr(Path, "write_text", recording)
        _run_tiny("--save-baselines", str(target))
    beside = [p for p in written if p.parent == tmp_path and p != target]
    assert target.is_file() and beside  # written beside the target, not in place
    target.unlink()
    for path in beside:
        path.mkdir()
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ConfigurationError, match=rf"--save-baselines {re.escape(str(target))}: cannot write there"):
        _run_tiny("--save-baselines", str(target))
