"""The command line of ``python -m reference_impls.train``: what ``parse_args`` gives a run.

The defaults a run uses without a flag (and that ``--help`` states beside each flag), the GPU
as the default device where there is one, ``--help`` naming every benchmark ``--data`` takes,
every ``--*-kw`` flag adding to its earlier pairs when given twice, a ``KEY=VALUE`` pair whose
value holds ``=`` itself, and a builder's own failure under user options reported as that
flag's error with the builder's message, not as an unknown option.
"""

import re

import pytest
import torch

from reference_impls import data as datasets
from reference_impls import train
from reference_impls.architectures import registry
from reference_impls.hooks import ConfigurationError


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _help_by_flag(capsys) -> dict[str, str]:
    """``--help``, one entry per option: its first flag -> its whole entry, on one line."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-)", text)[1:]  # option lines start with two spaces; wrapped lines with more
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


# The defaults the command line promises (``--help`` prints them): the module docstring's
# example spells out the same epochs and seed. A changed default silently changes the
# results of every documented command that leaves the flag out.
DEFAULTS = {"--arch": ("arch", "shared_bottom"), "--method": ("method", "ew"), "--data": ("data", "synthetic"),
            "--epochs": ("epochs", 3), "--batch-size": ("batch_size", 64), "--lr": ("lr", 1e-3),
            "--seed": ("seed", 0), "--device": ("device", torch.device("cpu"))}


def test_a_run_without_a_flag_uses_the_default_that_help_states_beside_that_flag(monkeypatch, capsys):
    _no_gpu(monkeypatch)
    args = train.parse_args([])
    help_of = _help_by_flag(capsys)
    for flag, (dest, value) in DEFAULTS.items():
        assert getattr(args, dest) == value, flag
        shown = value.type if isinstance(value, torch.device) else value
        assert f"(default: {shown})" in help_of[flag], (flag, help_of[flag])
    # the unset ones: no baselines file, no options, the method's rate follows --lr, the bar is shown
    assert (args.baselines, args.save_baselines, args.stl_arch, args.root, args.method_lr) == (None,) * 5
    assert (args.arch_kw, args.stl_kw, args.data_kw, args.method_kw, args.progress) == ({}, {}, {}, {}, True)


def test_the_default_device_is_the_gpu_where_there_is_one(monkeypatch):
    """A user with a GPU who leaves out --device trains on it, not silently on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert train.parse_args([]).device == torch.device("cuda")
    _no_gpu(monkeypatch)
    assert train.parse_args([]).device == torch.device("cpu")


def test_help_names_every_benchmark_that_data_takes(capsys):
    """The site says ``--help`` lists the registered names; for --data that is every benchmark
    ``datasets.loader`` knows (its refusal of an unknown name lists them)."""
    with pytest.raises(KeyError) as unknown:
        datasets.loader("no such data")
    names = str(unknown.value.args[0]).split("available: ")[1].split(", ")
    assert "synthetic" in names and len(names) >= 5
    data_help = _help_by_flag(capsys)["--data"]
    assert all(re.search(rf"\b{name}\b", data_help) for name in names), (names, data_help)


def test_every_options_flag_given_twice_adds_to_the_first():
    """--arch-kw and --stl-kw, like --data-kw and --method-kw: argparse's default for nargs='*'
    would keep the last occurrence only and silently drop the architecture options before it."""
    args = train.parse_args(["--arch-kw", "width=8", "--stl-kw", "width=4", "--arch", "mmoe",
                             "--arch-kw", "num_experts=2", "--stl-kw", "depth=1"])
    assert args.arch_kw == {"width": 8, "num_experts": 2}
    assert args.stl_kw == {"width": 4, "depth": 1}


def test_a_value_may_hold_an_equals_sign_since_the_key_ends_at_the_first():
    """Option names are Python identifiers, so they cannot hold ``=``; a value can."""
    args = train.parse_args(["--method-kw", "label=a=b", "rule=x==1", "--data-kw", "note=k=v"])
    assert args.method_kw == {"label": "a=b", "rule": "x==1"}
    assert args.data_kw == {"note": "k=v"}


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), IndexError("index 0 is out of range"),
                                   TypeError("unsupported operand type(s) for *: 'int' and 'str'")])
def test_a_builder_failing_on_a_known_option_is_the_flag_s_error_with_the_builder_s_message(error):
    """``run`` always passes the architecture's builders, to name them when an option is unknown;
    a failure that is not an unknown option must still come out as the flag's error, saying what
    failed, and not as a crash while looking for an unknown option's name."""
    def make():
        raise error

    with pytest.raises(ConfigurationError) as raised:
        train.built_from_flags("--arch mmoe", "--arch-kw", {"width": 0}, make, registry.builders("mmoe"))
    assert str(raised.value) == f"--arch mmoe --arch-kw width=0: {error}"
