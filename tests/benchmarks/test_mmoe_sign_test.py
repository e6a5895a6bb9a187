"""The exact sign test that benchmarks/mmoe_correlation.py reports next to its win counts."""

import itertools

import pytest


@pytest.fixture(scope="module")
def sign_test(mmoe_script):
    return mmoe_script.sign_test


def brute_force(wins: int, n: int) -> float:
    """Enumerate all 2^n fair-coin outcomes: the share at least as far from n/2 as ``wins``."""
    distance = abs(wins - n / 2)
    outcomes = list(itertools.product((0, 1), repeat=n))
    return sum(abs(sum(o) - n / 2) >= distance for o in outcomes) / len(outcomes)


def test_matches_enumeration_of_fair_coins(sign_test):
    for n in (1, 2, 5, 10, 12):
        for wins in range(n + 1):
            assert sign_test(wins, n) == pytest.approx(brute_force(wins, n), abs=1e-15), (wins, n)


def test_known_values(sign_test):
    assert sign_test(10, 20) == 1.0  # an even split is no evidence at all
    assert sign_test(13, 20) == pytest.approx(0.26317596435546875, abs=1e-15)
    assert sign_test(20, 20) == sign_test(0, 20) == pytest.approx(2 / 2**20)
