"""The optimization-method contracts (base.py) and the registry that finds methods by name.

The helpers here are tiny methods with known weights, so each test can say by hand what
``combine``, a Gramian method's update, the epoch history or discovery must produce.
"""

import pytest
import torch

from reference_impls.weighting import registry
from reference_impls.weighting.base import (
    EpochLossMeans, GradientMethod, GramianWeighting, LossWeighting, check_gradient_matrix,
)

from ..discovery import ClaimsToBeAType, add_package_module


class StepWeights(LossWeighting):
    """Weights that say which step and epoch they were asked for: ``[step, epoch, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("initial", torch.empty(0))

    def weights(self, losses, step=0, epoch=0):
        return torch.tensor([float(step), float(epoch), 1.0])


class FixedGramian(GramianWeighting):
    """Weights ``[-1, 2]`` whatever the Gramian, which it keeps to be inspected."""

    def weights_from_gramian(self, gramian):
        self.gramian = gramian
        return torch.tensor([-1.0, 2.0], dtype=gramian.dtype)


def test_combine_is_the_weighted_sum_of_the_losses_at_the_given_step_and_epoch():
    losses = torch.tensor([2.0, 3.0, 5.0])
    assert StepWeights().combine(losses, step=4, epoch=7).item() == 4 * 2 + 7 * 3 + 5


def test_a_fresh_method_loads_state_sized_on_first_use():
    trained = StepWeights()
    trained.initial = torch.tensor([1.5, 2.5])
    fresh = StepWeights()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.initial, trained.initial)


def test_a_gramian_method_sees_g_gt_and_combines_the_rows_with_its_weights():
    grads = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0]], dtype=torch.float64)
    method = FixedGramian()
    result = method(grads)
    assert torch.equal(method.gramian, torch.tensor([[5.0, -2.0], [-2.0, 10.0]], dtype=torch.float64))
    assert torch.equal(result.update, torch.tensor([-1.0, 6.0, -4.0], dtype=torch.float64))
    assert torch.equal(result.weights, torch.tensor([-1.0, 2.0], dtype=torch.float64))


def test_epoch_means_average_each_epoch_and_keep_the_last_three():
    means = EpochLossMeans()
    for epoch, steps in enumerate(([1.0, 3.0], [2.0], [4.0, 6.0, 8.0], [5.0])):
        for value in steps:
            means.record(torch.tensor([value, 10 * value], requires_grad=True), epoch)
    assert means.mean(0) is None  # epoch 3 drops epoch 0
    assert torch.equal(means.mean(1), torch.tensor([2.0, 20.0]))
    assert torch.equal(means.mean(2), torch.tensor([6.0, 60.0]))
    assert not means.mean(3).requires_grad  # the history holds no autograd graph
    assert means.mean(4) is None


def test_epoch_means_travel_in_the_state_dict_and_with_to():
    means = EpochLossMeans()
    means.record(torch.tensor([1.0, 2.0]), epoch=0)
    means.record(torch.tensor([3.0, 6.0]), epoch=0)
    state = means.state_dict()
    means.record(torch.tensor([5.0, 5.0]), epoch=0)  # after the snapshot: not in it
    restored = EpochLossMeans()
    restored.load_state_dict(state)
    assert torch.equal(restored.mean(0), torch.tensor([2.0, 4.0]))
    assert restored.to(torch.float64).mean(0).dtype == torch.float64


@pytest.mark.parametrize("grads, error, message", [
    (torch.zeros(2, 3, 1), ValueError, r"^expected a K x d gradient matrix, got shape \(2, 3, 1\)$"),
    (torch.zeros(3), ValueError, r"^expected a K x d gradient matrix, got shape \(3,\)$"),
    (torch.zeros(2, 3, dtype=torch.int64), TypeError, "^expected a floating-point gradient matrix, got torch.int64$"),
])
def test_a_gradient_matrix_that_is_not_k_by_d_floats_is_named(grads, error, message):
    with pytest.raises(error, match=message):
        check_gradient_matrix(grads)
    check_gradient_matrix(torch.zeros(2, 3, dtype=torch.float16))


def _with_module(monkeypatch, short, *classes, imported=()):
    add_package_module(monkeypatch, registry.package.__name__, short, *classes, imported=imported)


def test_only_named_concrete_methods_of_public_package_modules_are_registered(monkeypatch):
    before = registry.methods()
    assert list(before) == sorted(before)
    _with_module(monkeypatch, "zz_extra",
                 type("Abstract", (GradientMethod,), {"name": "zz_abstract"}),
                 type("Unnamed", (StepWeights,), {"name": 3}), ClaimsToBeAType(),
                 imported=[type("Foreign", (StepWeights,), {"name": "zz_foreign"})])
    _with_module(monkeypatch, "_zz_private", type("Private", (StepWeights,), {"name": "zz_private"}))
    assert registry.methods() == before


def test_a_name_used_twice_is_refused_and_make_passes_keywords(monkeypatch):
    class Scaled(StepWeights):
        name = "a_scaled"  # sorts first, found last

        def __init__(self, scale=1.0):
            super().__init__()
            self.scale = scale

    _with_module(monkeypatch, "zz_scaled", Scaled)
    assert list(registry.methods()) == sorted(registry.methods()) and "a_scaled" in registry.methods()
    made = registry.make("a_scaled", scale=3.0)
    assert type(made) is Scaled and made.scale == 3.0
    assert registry.loss_weightings()["a_scaled"] is Scaled and "a_scaled" not in registry.gradient_methods()
    _with_module(monkeypatch, "zz_twin", type("Twin", (StepWeights,), {"name": "a_scaled"}))
    with pytest.raises(ValueError, match="method name 'a_scaled' used by .*Scaled.* and .*Twin"):
        registry.methods()


def test_an_unknown_name_lists_every_known_one():
    with pytest.raises(KeyError) as raised:
        registry.make("no-such-method")
    assert str(raised.value).endswith(f"known: {', '.join(registry.methods())}\"")


def test_combine_defaults_to_step_0_and_epoch_0_like_weights():
    # ``combine(losses)`` must ask for the same step and epoch as ``weights(losses)``: 0 and 0.
    losses = torch.tensor([2.0, 3.0, 5.0])
    assert StepWeights().combine(losses).item() == 0 * 2 + 0 * 3 + 5
