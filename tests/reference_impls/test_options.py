"""Command-line options are read as the type their function declares (reference_impls.options)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

import pytest
import torch

from reference_impls import data as datasets
from reference_impls import options, train
from reference_impls.architectures import registry
from reference_impls.architectures.registry import Problem
from reference_impls.hooks import ConfigurationError
from reference_impls.weighting import registry as method_registry


@pytest.fixture(autouse=True)
def fresh_adapters():
    """``options.adapter`` caches one validator per type: a test must build its own, or it
    would only check what an earlier test (or process) built."""
    options.adapter.cache_clear()


def configure(flag: bool = False, n: int = 1, sizes: tuple[int, ...] = (1,),
              mode: Literal["sum", "mean"] = "sum", scale: float | None = None) -> None:
    """A stand-in with one option of each kind the harness meets."""


def test_text_that_is_no_python_literal_becomes_the_declared_bool():
    for text, value in [("false", False), ("no", False), ("0", False), ("true", True), ("yes", True)]:
        assert options.typed({"flag": text}, [configure]) == {"flag": value}


def test_literals_are_converted_to_the_declared_container():
    assert options.typed({"sizes": [2, 3], "n": 4}, [configure]) == {"sizes": (2, 3), "n": 4}
    assert isinstance(options.typed({"scale": 2}, [configure])["scale"], float)
    assert options.typed({"scale": None}, [configure]) == {"scale": None}


@pytest.mark.parametrize("name, value, message", [
    ("n", "zero", r"^n must be int \(as test_options\.configure declares it\): .*valid integer"),
    ("n", 1.5, r"^n must be int .*fractional part"),
    ("mode", "max", r"^mode must be Literal\['sum', 'mean'\] .*'sum' or 'mean'"),
    ("flag", "maybe", r"^flag must be bool .*valid boolean"),
    ("scale", "none", r"^scale must be float \| None .*valid number"),
])
def test_a_value_that_is_not_the_declared_type_is_refused_with_both_named(name, value, message):
    with pytest.raises(ValueError, match=message):
        options.typed({name: value}, [configure])


def test_numbers_and_lists_become_tensors_where_a_tensor_is_declared():
    def weigh(preference: torch.Tensor | None = None, matrix: torch.Tensor = torch.eye(2)) -> None: ...

    preference = options.typed({"preference": [1, 3]}, [weigh])["preference"]
    assert torch.equal(preference, torch.tensor([1.0, 3.0])) and preference.dtype == torch.get_default_dtype()
    assert torch.equal(options.typed({"matrix": [[1, 0], [0, 1]]}, [weigh])["matrix"], torch.eye(2))
    given = torch.ones(2)
    assert options.typed({"matrix": given}, [weigh])["matrix"] is given
    assert options.typed({"preference": None}, [weigh]) == {"preference": None}
    for bad in ("text", [[1], [1, 2]], True, [1, True]):  # text, ragged, a bool is no number here
        with pytest.raises(ValueError, match=r"must be Tensor \| None .*instance of Tensor"):
            options.typed({"preference": bad}, [weigh])


def weights(preference: torch.Tensor | Sequence[float] = (1.0,), names: Sequence[str] = ("a",)) -> None:
    """A stand-in with EPO's preference and a list of names."""


@pytest.mark.parametrize("function, name, text, message", [
    (weights, "preference", "[1,2", r"'\[1,2' could not be read as a list of numbers: check its brackets"),
    (weights, "preference", "[1,x]", r"'\[1,x\]' could not be read as a list of numbers"),
    (weights, "preference", "1.2.3", r"'1\.2\.3' could not be read as a number$"),
    (weights, "names", "[a, b", r"'\[a, b' could not be read as a list: check its brackets, commas and quotes"),
    (configure, "sizes", "(2, 3", r"'\(2, 3' could not be read as a list of numbers"),
    (configure, "n", "1e-", r"'1e-' could not be read as a number$"),
])
def test_text_that_is_almost_a_list_or_a_number_is_quoted_and_said_to_be_unreadable(function, name, text, message):
    """``preference=[1,2`` is no Python literal, so it reached the check as text, and the refusal
    said only that a str is not a Tensor nor allowed as a Sequence value."""
    with pytest.raises(ValueError, match=rf"^{name} must be .*\): {message}") as refused:
        options.typed({name: text}, [function])
    assert "instance of" not in str(refused.value) and "not allowed" not in str(refused.value)


def test_other_text_keeps_the_reason_pydantic_gives():
    with pytest.raises(ValueError, match=r"^n must be int .*: Input should be a valid integer"):
        options.typed({"n": "3x3"}, [configure])


@pytest.mark.parametrize("name, value, message", [
    ("n", True, r"^n must be int .*: Input should be an integer, not a boolean \(True\)$"),
    ("scale", False, r"^scale must be float \| None .*: Input should be a number, not a boolean \(False\)"),
    ("sizes", (2, True), r"^sizes must be tuple\[int, \.\.\.\] .*not a boolean \(True\)"),
])
def test_a_boolean_is_refused_where_a_number_is_declared(name, value, message):
    """Lax mode read ``num_experts=True`` as 1 and ``False`` as 0, without a word."""
    with pytest.raises(ValueError, match=message):
        options.typed({name: value}, [configure])
    assert options.typed({"n": 2, "scale": 2, "flag": True}, [configure]) == {"n": 2, "scale": 2.0, "flag": True}


def test_a_boolean_option_for_a_number_or_bad_list_text_is_a_one_line_error_of_the_harness():
    """The two cases as the tester met them, from the command line to the run's refusal."""
    tiny = ["--data-kw", "n_train=16", "n_test=8", "dim=4", "--epochs", "1", "--no-progress"]
    with pytest.raises(ConfigurationError, match=r"num_experts must be int .*not a boolean \(True\)"):
        train.run(train.parse_args(["--arch", "mmoe", "--arch-kw", "num_experts=True", *tiny]))
    with pytest.raises(ConfigurationError, match=r"preference .*'\[1,2' could not be read as a list of numbers"):
        train.run(train.parse_args(["--method", "epo", "--method-kw", "preference=[1,2", *tiny]))


def test_a_tensor_option_can_be_given_on_the_command_line():
    """STCH and Aligned-MTL stored a list as given and failed with a traceback at the first step."""
    argv = ["--data-kw", "n_train=64", "n_test=32", "dim=8", "--epochs", "1", "--no-progress"]
    for method, option in [("stch", "preference=[1,3]"), ("aligned_mtl", "task_weights=[1,3]")]:
        result = train.main(["--method", method, "--method-kw", option, *argv])
        assert set(result["multi_task"]) == {"y1/mse", "y2/mse"}


def test_an_option_no_function_names_is_left_for_the_call_to_report():
    assert options.typed({"bogus": "x"}, [configure]) == {"bogus": "x"}
    assert options.typed({"bogus": "x", "flag": "no"}, [configure]) == {"bogus": "x", "flag": False}  # read on


def sized(widths: int | list[int] = 1) -> None:
    """A stand-in whose option two types may take."""


def test_every_reason_a_value_is_refused_is_given_once():
    with pytest.raises(ValueError) as error:
        options.typed({"widths": ["a", "b"]}, [sized])  # two entries fail the list arm the same way
    assert str(error.value) == (
        "widths must be int | list[int] (as test_options.sized declares it): Input should be a valid integer; "
        "Input should be a valid integer, unable to parse string as an integer")


def test_the_first_function_that_names_an_option_declares_its_type():
    def outer(n: str = "a", **kw: object) -> None: ...

    assert options.typed({"n": "7", "flag": "no"}, [outer, configure]) == {"n": "7", "flag": False}
    assert options.typed({"n": "7"}, [configure, outer]) == {"n": 7}


def test_the_registry_lists_the_constructor_only_where_from_problem_forwards_to_it():
    assert registry.builders("mmoe") == [registry.get("mmoe").from_problem]  # closed signature
    cross_stitch = registry.get("cross_stitch")
    assert registry.builders("cross_stitch") == [cross_stitch.from_problem, cross_stitch.__init__]  # **kw


def _every_option_function():
    for name in registry.available():
        for function in registry.builders(name):
            yield f"--arch {name}", function
    for name, cls in method_registry.methods().items():
        yield f"--method {name}", cls.__init__
    for name in ("synthetic", "nyuv2", "cityscapes", "celeba", "qm9"):
        yield f"--data {name}", datasets.loader(name)


def test_every_option_is_annotated_and_its_default_is_of_its_declared_type():
    """What makes the reading trustworthy: an option without an annotation would not be read at
    all, and a default its own annotation refuses means the annotation is wrong, so a user's
    value of the same kind would be refused too."""
    problems, checked = [], 0
    for flag, function in _every_option_function():
        declared = options.parameter_types(function)
        for pname, param in list(inspect.signature(function).parameters.items())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if pname not in declared:
                problems.append(f"{flag}: {options.where(function)}({pname}) has no annotation")
                continue
            try:
                options.adapter(declared[pname])
            except Exception as error:  # noqa: BLE001 - whatever pydantic cannot read is a problem
                problems.append(f"{flag}: {options.where(function)}({pname}): {error}")
                continue
            if param.default is not param.empty:
                checked += 1
                try:
                    options.typed({pname: param.default}, [function])
                except ValueError as error:
                    problems.append(f"{flag}: default {param.default!r}: {error}")
    assert not problems, "\n".join(problems)
    assert checked > 900  # every architecture, method and loader, not a few


class _Stopped(Exception):
    """Ends run() once a stand-in has seen the keywords it was called with."""


def test_the_harness_passes_every_kind_of_option_as_declared(monkeypatch):
    """--data-kw, --stl-kw, --arch-kw and --method-kw each reach their function typed."""
    seen = {}
    real_load, real_build = datasets.load, registry.build

    def load(name, root=None, **kw):
        seen["data"] = kw
        return real_load(name, root, **kw)

    def build(name, problem, **kw):
        seen[name] = kw
        return real_build(name, problem, **kw)

    def built_method(method, name, model):  # called with what make_method built
        raise _Stopped(method)

    monkeypatch.setattr(train.datasets, "load", load)
    monkeypatch.setattr(train.registry, "build", build)
    monkeypatch.setattr(train, "check_method_fits_model", built_method)
    args = train.parse_args(["--data-kw", "n_train=64.0", "n_test=32", "dim=8", "--stl-arch", "mmoe",
                             "--stl-kw", "num_experts=2.0", "--arch", "dselect_k", "--arch-kw", "per_example=false",
                             "--method", "pcgrad", "--method-kw", "random_order=no", "--no-progress"])
    with pytest.raises(_Stopped) as stopped:
        train.run(args)
    assert stopped.value.args[0].generator is None  # PCGrad keeps no generator when random_order is False
    assert seen["dselect_k"]["per_example"] is False
    assert type(seen["mmoe"]["num_experts"]) is int and type(seen["data"]["n_train"]) is int


def test_per_example_false_now_builds_the_default_model_not_the_per_example_one():
    """The defect this module fixes: the text 'false' used to reach DSelect-k as a true value."""
    problem = Problem(("a", "b"), (8,))
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    default = registry.build("dselect_k", problem)
    per_example = registry.build("dselect_k", problem, per_example=True)
    from_text = registry.build("dselect_k", problem, **train.typed_arch_options("dselect_k", {"per_example": "false"}))
    assert count(per_example) != count(default)
    assert count(from_text) == count(default)


def test_nan_is_refused_where_a_number_is_declared_and_infinity_is_kept():
    """The text 'nan' reads as a float, and then the run diverged with the learning rate blamed."""
    with pytest.raises(ValueError, match=r"^scale must be float \| None .*: Input should be a number, not nan$"):
        options.typed({"scale": "nan"}, [configure])
    assert options.typed({"scale": "inf"}, [configure]) == {"scale": float("inf")}  # 'no limit' is a setting


@pytest.mark.parametrize("lookup, name, suggestion", [
    ("architecture", "mmeo", "mmoe"), ("architecture", "MMoE", "mmoe"), ("method", "PCGrad", "pcgrad"),
    ("method", "pcgard", "pcgrad"), ("data", "nyu_v2", "nyuv2")])
def test_a_mistyped_or_wrongly_cased_name_gets_the_closest_one(lookup, name, suggestion):
    from reference_impls.architectures import registry as architectures
    from reference_impls.data import loader as data_loader
    from reference_impls.weighting import registry as methods
    find = {"architecture": architectures.get, "method": methods.make, "data": data_loader}[lookup]
    with pytest.raises(KeyError, match=rf"unknown {lookup} '{name}' \(did you mean '{suggestion}'\?\); "):
        find(name)
    with pytest.raises(KeyError) as nothing_close:
        find("zzzz")
    assert "did you mean" not in str(nothing_close.value)
