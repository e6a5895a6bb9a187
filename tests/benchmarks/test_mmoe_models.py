"""The three models of the MMoE synthetic study (sizes from the paper's Sec. 5.1) and the runs built on them."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from .conftest import TINY

D, EXPERTS, EXPERT_UNITS, TOWER_UNITS, BOTTOM_UNITS = 100, 8, 16, 8, 113


def towers(width: int) -> int:  # per task: width -> 8 -> 1, weights only
    return 2 * (width * TOWER_UNITS + TOWER_UNITS)


EXPECTED_WEIGHTS = {
    "shared_bottom": D * BOTTOM_UNITS + towers(BOTTOM_UNITS),
    "omoe": D * EXPERT_UNITS * EXPERTS + D * EXPERTS + towers(EXPERT_UNITS),  # one gate
    "mmoe": D * EXPERT_UNITS * EXPERTS + 2 * D * EXPERTS + towers(EXPERT_UNITS),  # a gate per task
}
BIASES = {  # bottom or experts, then each tower's two layers; the gates have none (Eq. 8)
    "shared_bottom": BOTTOM_UNITS + 2 * (TOWER_UNITS + 1),
    "omoe": EXPERTS * EXPERT_UNITS + 2 * (TOWER_UNITS + 1),
    "mmoe": EXPERTS * EXPERT_UNITS + 2 * (TOWER_UNITS + 1),
}


@pytest.mark.parametrize("kind", EXPECTED_WEIGHTS)
def test_weight_counts_follow_the_paper(mmoe_script, kind):
    assert mmoe_script.count_parameters(mmoe_script.make_model(kind, D, bias=False)) == EXPECTED_WEIGHTS[kind]
    assert mmoe_script.count_parameters(mmoe_script.make_model(kind, D)) == EXPECTED_WEIGHTS[kind] + BIASES[kind]


def test_paper_count_of_expert_and_tower_weights(mmoe_script):
    """Sec. 5.1 counts 100 x 16 x 8 + 16 x 8 x 2 = 13056 weights in experts and tower hidden layers."""
    model = mmoe_script.make_model("mmoe", D, bias=False)
    counted = sum(p.numel() for name, p in model.named_parameters()
                  if not name.startswith("gates") and not name.endswith("1.weight"))
    assert counted == 13056


@pytest.mark.parametrize("kind", EXPECTED_WEIGHTS)
def test_bias_free_models_are_positively_homogeneous_in_their_mixing(mmoe_script, kind):
    """Without biases a ReLU layer commutes with positive scaling; only a gate's softmax breaks that."""
    torch.manual_seed(0)
    model = mmoe_script.make_model(kind, D, bias=False)
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]
    x = torch.randn(5, D)
    out, scaled = model(x), model(3 * x)
    homogeneous = all(torch.allclose(scaled[t], 3 * out[t], atol=1e-5) for t in out)
    assert homogeneous == (kind == "shared_bottom")  # the gates' softmax is not scale-free


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "argument --seeds: must be >= 2, got 0"),
    (["--correlations", "1", "1.5"], "argument --correlations: must be >= -1 and <= 1, got 1.5"),
    (["--n-train", "-5"], "argument --n-train: must be >= 0, got -5"),
    (["--lrs", "0.01", "nan?"], "argument --lrs: 'nan?' is not a number"),
    (["--models", "omoe", "mmoe", "--seeds", "2", "--steps", "1", "--dim", "4", "--n-eval", "8"],
     "--models must include shared_bottom and mmoe"),
])
def test_out_of_range_flags_are_usage_errors_before_any_training(mmoe_script, monkeypatch, capsys, argv, message):
    import sys

    monkeypatch.setattr(sys, "argv", ["mmoe_correlation.py", *argv, "--no-plot"])
    with pytest.raises(SystemExit) as stopped:
        mmoe_script.main()
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def tiny_runs(mmoe_script, **settings):
    """Runs at p = 1 and 0.5 for seeds 0 and 1: settings (1, 0), (1, 1), (0.5, 0), (0.5, 1)."""
    return mmoe_script.Runs("mmoe", [1.0, 0.5], [0, 1], argparse.Namespace(**{**TINY, **settings}))


def test_each_run_starts_from_its_seeds_model_and_scores_the_mean_of_the_task_mses(mmoe_script):
    runs = tiny_runs(mmoe_script)
    x, y = runs.valid
    losses = runs.loss(x, y)
    for r, (_, seed) in enumerate(runs.settings):
        torch.manual_seed(seed)
        out = mmoe_script.make_model("mmoe", TINY["dim"])(x[r])
        by_hand = sum(F.mse_loss(out[t].squeeze(1), y[r, :, k]) for k, t in enumerate(mmoe_script.TASKS)) / 2
        assert losses[r].item() == pytest.approx(by_hand.item(), rel=1e-5), runs.settings[r]


def test_runs_of_one_seed_share_the_task_pair_and_sines_but_not_the_examples(mmoe_script):
    runs = tiny_runs(mmoe_script, sines="normal")
    u1 = runs.weights[:, 0]  # w1 = u1 at every p
    assert torch.equal(u1[0], u1[2]) and not torch.equal(u1[0], u1[1])
    assert torch.equal(runs.alphas[0], runs.alphas[2]) and not torch.equal(runs.alphas[0], runs.alphas[1])
    assert torch.equal(tiny_runs(mmoe_script).alphas[1], mmoe_script.sine_parameters(TINY["num_sines"])[0])
    valid, test = runs.valid[0], runs.test[0]
    assert not torch.equal(valid[0], test[0])  # validation and test sets are different draws
    assert not torch.equal(valid[0], valid[2])  # and so are the examples of one seed at another p


def test_label_noise_has_the_given_standard_deviation(mmoe_script):
    quiet, noisy = (tiny_runs(mmoe_script, noise_std=std, n_eval=4000).valid for std in (0.0, 0.5))
    assert torch.equal(quiet[0], noisy[0])  # the same inputs
    assert (noisy[1] - quiet[1]).std().item() == pytest.approx(0.5, rel=0.03)
