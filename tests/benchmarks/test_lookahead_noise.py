"""benchmarks/lookahead_noise.py: sampling models are listed, with fresh draws far off and common ones not."""

from .conftest import load_script


def test_a_sampling_model_is_far_off_with_fresh_draws_and_a_deterministic_one_is_not_listed(capsys):
    script = load_script("lookahead_noise")
    rows = script.main(["--archs", "gumbel_matrix_routing", "shared_bottom"])
    assert [(kind, name) for kind, name, _, _ in rows] == [("vector", "gumbel_matrix_routing"),
                                                            ("dense", "gumbel_matrix_routing")]
    for _, _, fresh, same in rows:
        assert fresh > 1 and same < 1e-5
    out = capsys.readouterr().out
    assert "vector  gumbel_matrix_routing" in out and "shared_bottom" not in out
    assert "over 2 models" in out
