"""benchmarks/bmtas_resource_loss.py: its rows count what the model tabulates."""

import re

from .conftest import load_script


def test_rows_count_joint_choices_bell_many_partitions_and_the_table_bytes(capsys):
    script = load_script("bmtas_resource_loss")
    rows = script.main(["--max-tasks", "4", "--repeats", "1", "--layers", "2"])
    assert [r["choices"] for r in rows] == [4, 27, 256]
    assert [r["partitions"] for r in rows] == [2, 5, 15]  # Bell numbers
    # int64 partition index per joint choice, a bool P x P refinement matrix, int64 sizes, a bool mask
    assert [r["bytes"] for r in rows] == [t**t * 8 + p * p + p * 8 + p for t, p in ((2, 2), (3, 5), (4, 15))]
    assert all(r["loss_ms"] > 0 for r in rows)
    printed = re.findall(r"^\| (\d) \| (\d+) \| (\d+) \| (\d+) \|", capsys.readouterr().out, re.M)
    assert printed == [(str(t), str(r["choices"]), str(r["partitions"]), str(r["bytes"]))
                       for t, r in zip((2, 3, 4), rows)]
