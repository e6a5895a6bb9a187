"""The harness cost table: one row per trained method, EW the reference, refusals with reasons."""

import re
import sys


def test_table_has_equal_weighting_at_one_and_lists_refused_methods(harness_script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["harness_methods.py", "--methods", "gradnorm", "mt_sgd", "epo",
                                      "--repeats", "1", "--epochs", "1", "--n-train", "64", "--batch-size", "16"])
    harness_script.main()
    out = capsys.readouterr().out
    rows = {m.group(1): (m.group(2), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(r"^\| (\w+) \| (\w*) \| ([0-9.]+) \| ([0-9.]+) \|$", out, re.M)}
    assert set(rows) == {"ew", "gradnorm", "epo"}  # epo trains with the script's preference option
    assert rows["ew"][2] == 1.0 and rows["gradnorm"][0] == "balance_step"
    assert abs(rows["gradnorm"][2] - rows["gradnorm"][1] / rows["ew"][1]) < 0.1  # the printed times' ratio
    assert "- mt_sgd: method 'mt_sgd' needs its MTSGD.particle_updates()" in out


def test_time_per_step_counts_the_batches_the_method_trains_on(harness_script):
    """The bilevel methods train on 90 % of the set, so their time is divided by fewer batches."""
    assert harness_script.batches_trained("ew", 160, 16, epochs=2) == 20
    assert harness_script.batches_trained("autol", 160, 16, epochs=2) == 18  # 144 examples after 16 held out
    assert harness_script.batches_trained("moml", 161, 16, epochs=1) == 10  # 145 left: the last batch is short
