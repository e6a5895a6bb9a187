"""The toy benchmark's method list: decided for every registered method, and each one runs.

A method added to the registry used to join the full run silently; two of them (continuous
Pareto, FS-MTL) then crashed it at the end of a 12-minute run, losing every table."""

import pytest

from reference_impls.weighting import registry

from .conftest import load_script

toy = load_script("toy_trajectories")


def test_every_registered_method_is_runnable_or_skipped_with_a_reason():
    runnable = set(toy.method_names())
    for name in registry.methods():
        assert (name in runnable) != (name in toy.SKIPPED), f"{name}: run and skipped, or neither"
    assert all(reason for reason in toy.SKIPPED.values())
    assert set(toy.MEASURED) <= runnable


@pytest.mark.parametrize("name", toy.method_names())
def test_each_runnable_method_takes_steps_on_the_toy(name):
    results = toy.run_group([name], "cagrad", 30, 1e-3, 0.1)
    assert len(results) == len(toy.SETTINGS["cagrad"].starts)
    assert all(r["diverged_at"] is None for r in results), name


def test_a_skipped_or_unknown_method_is_refused_before_any_run():
    with pytest.raises(SystemExit, match="fs_mtl: not run on the toy: needs each task's gradient"):
        toy.chosen_methods(["pcgrad", "fs_mtl"])
    with pytest.raises(SystemExit, match="nope: unknown"):
        toy.chosen_methods(["nope"])
    assert toy.chosen_methods(None) == list(toy.MEASURED)
    assert toy.chosen_methods(["all"]) == toy.method_names()
