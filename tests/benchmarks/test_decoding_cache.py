"""The decoding-cache benchmark times what it says: the cached and the rerun decoding."""

import itertools
import sys

import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.unified_io import UnifiedIO

from .conftest import load_script


def test_the_uncached_variant_reruns_the_decoder_and_the_cached_one_never_does(monkeypatch):
    script = load_script("decoding_cache")
    problem = script.dense(8, 8)  # 2 x 2 patches of 4 x 4: 4 answer tokens per task
    calls = []
    original = UnifiedIO.run_decoder
    monkeypatch.setattr(UnifiedIO, "run_decoder", lambda self, inputs, *rest: (calls.append(inputs.shape[1]),
                                                                                original(self, inputs, *rest))[1])
    for name in script.MODELS:
        calls.clear()
        script.build(name, problem, 2, cache=True)()
        assert calls == []
        script.build(name, problem, 2, cache=False)()
        assert calls == [1, 2, 3, 4] * len(problem.tasks)  # the whole prefix at every step


def test_odd_images_give_one_answer_token_per_pixel():
    """17 x 23 is tiled by no patch above 1: the long-answer case the docstring names."""
    script = load_script("decoding_cache")
    (problem, _), = script.ODD.values()
    assert registry.build("unified_io", problem).target_length("seg") == 17 * 23


def test_its_dense_problems_are_arch_step_times_dense_tasks_at_other_sizes():
    """Same tasks and output widths (seg 5 classes, depth 1) on 3-channel images; only the size differs."""
    script = load_script("decoding_cache")
    step_problem, _ = script.arch_step_time.PROBLEMS["dense (8 x 3 x 32 x 32)"]
    assert script.dense(32, 32) == step_problem
    assert script.dense(17, 23).input_shape == (3, 17, 23)


def fake_variants(monkeypatch, script, steps=3):
    """Replace build: with the cache a step takes 0.1, 0.3, 0.2 s, without 0.5, 0.7, 0.6 s (cycled for
    ``steps`` steps) after a 9 s warm-up; returns the log of (model, image size, batch, cache) per step,
    in the order they ran."""
    ran = []

    def build(name, problem, batch, cache):
        timed = itertools.cycle([s / 10 for s in ((1, 3, 2) if cache else (5, 7, 6))])
        durations = itertools.chain([9.0], itertools.islice(timed, steps))
        return lambda: ran.append((name, problem.input_shape[1:], batch, cache)) or next(durations)

    monkeypatch.setattr(script, "build", build)
    return ran


@pytest.mark.parametrize("odd", [False, True])
def test_main_alternates_the_two_variants_and_prints_their_medians_and_ratio(monkeypatch, capsys, odd):
    script = load_script("decoding_cache")
    ran = fake_variants(monkeypatch, script)
    threads = []
    monkeypatch.setattr(script.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sys, "argv", ["decoding_cache.py", "--steps", "3"] + ["--odd"] * odd)
    script.main()
    problems = [("dense (8 x 3 x 32 x 32)", (32, 32), 8, 64), ("dense (2 x 3 x 48 x 48)", (48, 48), 2, 144)]
    problems += [("dense (2 x 3 x 17 x 23)", (17, 23), 2, 17 * 23)] * odd
    assert ran == [(name, size, batch, cache) for _, size, batch, _ in problems for name in script.MODELS
                   for _ in range(1 + 3) for cache in (True, False)]  # 1 warm-up and 3 rounds of both
    lines = capsys.readouterr().out.splitlines()
    assert threads == [1]
    assert lines[:3] == [f"torch {torch.__version__}, 1 thread, median of 3 steps after 1 warm-up, process CPU "
                         "time, the two variants in alternating rounds",
                         "| model | problem | answer tokens | with cache ms/step | without ms/step | without / with |",
                         "|---|---|---|---|---|---|"]
    assert lines[3:] == [f"| {name} | {label} | {tokens} | 200.0 | 600.0 | 3.00 |"
                         for label, _, _, tokens in problems for name in script.MODELS]


def test_main_defaults_to_five_steps_after_one_warm_up(monkeypatch, capsys):
    script = load_script("decoding_cache")
    ran = fake_variants(monkeypatch, script, steps=5)
    monkeypatch.setattr(sys, "argv", ["decoding_cache.py"])
    script.main()
    assert len(ran) == 2 * (1 + 5) * len(script.MODELS) * len(script.PROBLEMS)
    out = capsys.readouterr().out
    assert out.startswith(f"torch {torch.__version__}, 1 thread, median of 5 steps after 1 warm-up")
    assert out.endswith("| 200.0 | 600.0 | 3.00 |\n")  # medians of (0.1, 0.3, 0.2, 0.1, 0.3) s and (0.5, 0.7, ...)


def test_main_can_time_from_the_first_step_but_not_from_a_negative_one(monkeypatch, capsys):
    script = load_script("decoding_cache")
    fake_variants(monkeypatch, script)
    monkeypatch.setattr(sys, "argv", ["decoding_cache.py", "--warmup", "0", "--steps", "4"])
    script.main()
    assert capsys.readouterr().out.endswith("| 250.0 | 650.0 | 2.60 |\n")  # medians of (9, 0.1, 0.3, 0.2) s, ...
    monkeypatch.setattr(sys, "argv", ["decoding_cache.py", "--warmup", "-1"])
    with pytest.raises(SystemExit):
        script.main()
    assert "--warmup: must be >= 0, got -1" in capsys.readouterr().err
