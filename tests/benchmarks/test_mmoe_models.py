"""The three models of the MMoE synthetic study: sizes from the paper's Sec. 5.1."""

import pytest
import torch

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
    (["--seeds", "0"], "argument --seeds: must be > 0, got 0"),
    (["--correlations", "1", "1.5"], "argument --correlations: must be >= -1 and <= 1, got 1.5"),
    (["--n-train", "-5"], "argument --n-train: must be >= 0, got -5"),
    (["--lrs", "0.01", "nan?"], "argument --lrs: 'nan?' is not a number"),
])
def test_out_of_range_flags_are_usage_errors_before_any_training(mmoe_script, monkeypatch, capsys, argv, message):
    import sys

    monkeypatch.setattr(sys, "argv", ["mmoe_correlation.py", *argv, "--no-plot"])
    with pytest.raises(SystemExit) as stopped:
        mmoe_script.main()
    assert stopped.value.code == 2 and message in capsys.readouterr().err
