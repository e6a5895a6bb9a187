"""``--seed`` reaches every random choice an architecture makes, not only its initial weights.

Twenty architectures draw masks, routes or noise from a ``torch.Generator`` of their own,
seeded by a ``seed`` argument (TRL's fixed masks, Gumbel-softmax samples, PathNet's genotypes).
The training loop used to leave it at its default, so runs with ``--seed 0`` and ``--seed 1``
shared those draws and a spread over seeds measured the initialisation only. ``train.seeded``
now passes the run's seed; here every such architecture, built under the same global seed,
must differ in some buffer, generator state or training-mode output between two run seeds.
"""

from __future__ import annotations

import pytest
import torch

from reference_impls import train
from reference_impls.architectures.registry import Problem, available, build, takes_option

PROBLEMS = [(Problem(("a", "b"), (12,), {"a": 2, "b": 1}), (4, 12)),
            (Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), (4, 3, 8, 8))]
SEEDED = [n for n in available() if takes_option(n, "seed")]


def draws(name: str, run_seed: int) -> list[torch.Tensor]:
    """Everything random the model holds or produces, on each problem it accepts, with the
    global seed fixed (4M's and Unified-IO's seed draws their frozen codebook, which only
    dense problems have)."""
    found = []
    for problem, shape in PROBLEMS:
        torch.manual_seed(0)
        try:
            model = build(name, problem, **train.seeded(name, {}, run_seed))
        except ValueError:
            continue
        found += [value.get_state() for module in model.modules() for value in vars(module).values()
                  if isinstance(value, torch.Generator)]
        torch.manual_seed(0)
        outputs = model(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
        found += [*(b.detach().clone() for b in model.buffers()), *(o.detach() for o in outputs.values())]
    assert found, f"{name} builds for no test problem"
    return found


def test_the_architectures_with_a_generator_of_their_own_take_a_seed():
    """Every architecture whose model holds a torch.Generator, on any test problem, takes a seed
    (the named subset alone would not catch a new generator that --seed cannot reach)."""
    assert {"trl", "pathnet", "routing_network", "gumbel_matrix_routing", "feature_partitioning", "ecmt"} <= set(SEEDED)
    with_generator = set()
    for name in available():
        for problem, _ in PROBLEMS + [(Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}), None)]:
            try:
                model = build(name, problem)
            except ValueError:
                continue
            if any(isinstance(v, torch.Generator) for module in model.modules() for v in vars(module).values()):
                with_generator.add(name)
    assert with_generator - set(SEEDED) == set()


@pytest.mark.parametrize("name", SEEDED)
def test_two_run_seeds_give_different_draws(name):
    first, second = draws(name, 0), draws(name, 1)
    assert len(first) == len(second)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, second))


def test_a_seed_given_as_an_architecture_option_wins_and_others_get_none():
    assert train.seeded("trl", {"seed": 5}, 0) == {"seed": 5}
    assert train.seeded("trl", {}, 3) == {"seed": 3}
    assert train.seeded("shared_bottom", {"width": 8}, 3) == {"width": 8}
