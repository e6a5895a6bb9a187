"""The sampler-cost benchmark: it times our gather sampler against F.grid_sample called with the same
arguments, alternating the two in rounds, and leaves every model with our sampler afterwards."""

import itertools
import re
import sys

import pytest
import torch

from reference_impls.architectures import bilinear, demt, mnc, three_d_aware

from .conftest import load_script

cost = load_script("bilinear_cost")


@pytest.mark.parametrize("padding_mode", bilinear.PADDING_MODES)
def test_the_rival_is_f_grid_sample_with_the_arguments_our_sampler_fixes(padding_mode):
    """Same numbers as bilinear.grid_sample, including positions outside the image (padding)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 7, generator=generator, dtype=torch.float64)
    grid = 1.4 * (2 * torch.rand(2, 4, 6, 2, generator=generator, dtype=torch.float64) - 1)  # some outside [-1, 1]
    torch.testing.assert_close(cost.torch_grid_sample(features, grid, padding_mode=padding_mode),
                               bilinear.grid_sample(features, grid, padding_mode=padding_mode))


def test_sampler_cost_prints_both_samplers_and_restores_ours(monkeypatch, capsys):
    """A real run of one step: three rows whose ratio is that of the printed times."""
    monkeypatch.setattr(sys, "argv", ["bilinear_cost.py", "--steps", "1", "--warmup", "0"])
    cost.main()
    rows = re.findall(r"^\| (\w+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["mnc", "demt", "three_d_aware"]
    for _, ours, theirs, ratio in ((r[0], *map(float, r[1:])) for r in rows):  # the printed times' ratio, up to
        assert abs(ratio - ours / theirs) <= ratio * (0.05 / ours + 0.05 / theirs) + 0.005  # their rounding
    assert all(m.grid_sample is bilinear.grid_sample for m in (mnc, demt, three_d_aware))


def fake_steps(monkeypatch, fail_at=None):
    """Replace the models' steps: each records which sampler its model's module holds; with ours a step
    takes 0.2, 0.4, 0.3 s (cycled) after two 9 s warm-ups, with F.grid_sample 0.1, 0.2, 0.15 s."""
    ran = []

    def build(name, problem, batch, device):
        module = cost.USERS[name]
        timed = {True: itertools.cycle([0.2, 0.4, 0.3]), False: itertools.cycle([0.1, 0.2, 0.15])}
        counts = {True: 0, False: 0}

        def step():
            ours = module.grid_sample is bilinear.grid_sample
            ran.append((name, ours, problem.input_shape, batch, device.type))
            if len(ran) == fail_at:
                raise RuntimeError("a step failed")
            counts[ours] += 1
            return 9.0 if counts[ours] <= 2 else next(timed[ours])
        return step, None

    monkeypatch.setattr(cost.arch_step_time, "build", build)
    return ran


def test_main_alternates_the_samplers_per_model_and_prints_medians_after_two_warm_ups(monkeypatch, capsys):
    ran = fake_steps(monkeypatch)
    threads = []
    monkeypatch.setattr(cost.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(sys, "argv", ["bilinear_cost.py"])
    cost.main()
    one_round = [(name, ours, (3, 32, 32), 8, "cpu") for name in cost.USERS for ours in (True, False)]
    assert ran == one_round * (2 + 10) and threads == [1]
    assert capsys.readouterr().out.splitlines() == [
        "| architecture | gather ms/step | F.grid_sample ms/step | ratio |", "|---|---|---|---|",
        *(f"| {name} | 300.0 | 150.0 | 2.00 |" for name in cost.USERS), "",
        f"torch {torch.__version__}, 1 thread, CPU process time, median of 10 steps after 2 warm-up, in rounds"]
    assert all(m.grid_sample is bilinear.grid_sample for m in cost.USERS.values())


def test_a_failing_step_still_leaves_every_model_with_our_sampler(monkeypatch):
    fake_steps(monkeypatch, fail_at=4)  # the second model's step with F.grid_sample patched in
    monkeypatch.setattr(sys, "argv", ["bilinear_cost.py"])
    with pytest.raises(RuntimeError, match="a step failed"):
        cost.main()
    assert all(m.grid_sample is bilinear.grid_sample for m in cost.USERS.values())
