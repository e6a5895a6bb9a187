"""reference_impls.hooks: the gradients a step hands MoDo's halves and IMTL's heads, the refusals of a
model without a registry name, and the batches and held-out data the loop draws.

Companion of test_hooks.py; each expectation is worked out here from the documented rule (a hand
formula, a reference computed with plain autograd, or the batches a DataLoader would cut).
"""

import pytest
import torch
from torch import nn

from reference_impls import hooks, train
from reference_impls.architectures.base import MultiTaskModel
from reference_impls.data import office
from reference_impls.weighting.modo import MoDo

from .conftest import gradient_rows
from .test_hooks import SPECS, _batch_norm_net, _Encoded, _pair, _step_at_lr_zero, _trainable_shared


def _head_parameters(model):
    return [p for t in model.tasks for p in model.task_specific_parameters(t)]


def _part_losses(model, x, targets, part):
    return hooks.task_losses(model(x[part]), {t: v[part] for t, v in targets.items()}, SPECS, model.tasks)


# ----------------------------------------------------------------------------------------------
# method_gradient_step: IMTL's heads, MoDo's halves
# ----------------------------------------------------------------------------------------------


def test_imtl_fills_the_heads_and_the_loss_scales_with_the_gradients_of_its_scaled_losses():
    """IMTL trains on Σ_k (e^{s_k} L_k − s_k): head k gets e^{s_k} ∂L_k/∂θ_k (it reaches L_k only),
    and s_k gets e^{s_k} L_k − 1."""
    model, x, targets = _pair()
    method = train.make_method("imtl", 2, 0)
    scales = torch.tensor([0.5, -1.0])
    with torch.no_grad():
        method.loss_scales.log_scales.copy_(scales)
    losses = hooks.task_losses(model(x), targets, SPECS, model.tasks)
    expected = {}
    for k, t in enumerate(model.tasks):
        own = list(model.task_specific_parameters(t))
        expected[t] = [scales[k].exp() * g for g in torch.autograd.grad(losses[k], own, retain_graph=True)]
    _step_at_lr_zero(model, method, x, targets)
    for t in model.tasks:
        for p, g in zip(model.task_specific_parameters(t), expected[t], strict=True):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(method.loss_scales.log_scales.grad, scales.exp() * losses.detach() - 1)


def test_modo_trains_a_model_whose_heads_are_all_frozen():
    """With no trainable task-specific parameter there is no head gradient to average; the shared
    part still gets MoDo's update from the batch's two halves."""
    model, x, targets = _pair(n=6)
    for p in _head_parameters(model):
        p.requires_grad_(False)
    shared = _trainable_shared(model)
    halves = [_part_losses(model, x, targets, part) for part in (slice(0, 3), slice(3, None))]
    expected = MoDo()(*(gradient_rows(h, shared) for h in halves)).update
    _step_at_lr_zero(model, train.make_method("modo", 2, 0), x, targets)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)
    assert all(p.grad is None for p in _head_parameters(model))


class _RoutedOffset(_Encoded):
    """Task a's output adds a head parameter only on a batch whose every input has x₀ > 0: a route
    chosen per batch, as routing networks and sparse experts do, so one pass may not reach it."""

    def __init__(self):
        super().__init__(nn.Linear(6, 4), 4)
        self.offset = nn.Parameter(torch.tensor([0.7]))

    def forward(self, x):
        outputs = super().forward(x)
        if (x[:, 0] > 0).all():
            outputs["a"] = outputs["a"] + self.offset
        return outputs

    def task_specific_parameters(self, task):
        yield from super().task_specific_parameters(task)
        if task == "a":
            yield self.offset


def test_modo_heads_get_the_mean_of_both_halves_gradients_also_for_a_parameter_one_half_skips():
    """Each head parameter gets (g₁ + g₂) / 2, the halves' gradients of Σ_k L_k; a half whose pass does
    not reach the parameter contributes a zero gradient, so that parameter gets g₁ / 2."""
    torch.manual_seed(0)
    model, x = _RoutedOffset(), torch.randn(8, 6)
    x[:4, 0], x[4:, 0] = x[:4, 0].abs() + 0.1, -x[4:, 0].abs() - 0.1  # the offset's route: first half only
    targets = {"a": torch.randn(8, 1), "b": torch.randn(8, 1)}
    heads = _head_parameters(model)
    first, second = (torch.autograd.grad(_part_losses(model, x, targets, part).sum(), heads, allow_unused=True)
                     for part in (slice(0, 4), slice(4, None)))
    k = next(i for i, p in enumerate(heads) if p is model.offset)
    assert first[k] is not None and second[k] is None  # the second half's pass skips the offset
    _step_at_lr_zero(model, train.make_method("modo", 2, 0), x, targets)
    for p, g1, g2 in zip(heads, first, second, strict=True):
        torch.testing.assert_close(p.grad, (g1 + (torch.zeros_like(g1) if g2 is None else g2)) / 2)


# ----------------------------------------------------------------------------------------------
# check_method_fits_model: a model of the user's own, without a registry name
# ----------------------------------------------------------------------------------------------


class _Unnamed(MultiTaskModel):
    """A two-task model written outside the registry: no ``name`` attribute, no encode/decode."""

    def __init__(self):
        super().__init__(("a", "b"))
        self.trunk = nn.Linear(6, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

    def forward(self, x):
        z = self.trunk(x)
        return {t: self.heads[t](z) for t in self.tasks}

    def task_specific_parameters(self, task):
        yield from self.heads[task].parameters()


def test_a_model_without_a_registry_name_is_refused_as_any_other_naming_its_class():
    """Both refusals stay ConfigurationErrors for a model without ``name`` and say which class it is."""
    model = _Unnamed()
    with pytest.raises(hooks.ConfigurationError, match=r"'rep_mtl' acts on the shared representation, "
                                                       r"and architecture '_Unnamed' has no single one"):
        hooks.check_method_fits_model(train.make_method("rep_mtl", 2, 0), "rep_mtl", model)
    model.trunk.requires_grad_(False)
    with pytest.raises(hooks.ConfigurationError, match=r"'mgda' needs trainable shared parameters, "
                                                       r"but architecture '_Unnamed' has none"):
        hooks.check_method_fits_model(train.make_method("mgda", 2, 0), "mgda", model)


# ----------------------------------------------------------------------------------------------
# skips_a_lone_example, held_out_batches
# ----------------------------------------------------------------------------------------------


def test_batch_norm_trains_on_two_examples_so_only_a_last_batch_of_one_is_dropped():
    """Batch norm fails in training on a batch of 1 and works on 2 (torch's own rule, checked first);
    so batches of 2 and sets of 2 examples are accepted, and the last batch is dropped exactly when
    cutting ``examples`` into batches of ``batch_size`` leaves one example at the end."""
    bn = _batch_norm_net()
    bn(torch.randn(2, 1))
    with pytest.raises(ValueError):
        bn(torch.randn(1, 1))
    for examples in range(2, 10):
        for batch_size in range(2, 5):
            cut = [list(range(examples))[i:i + batch_size] for i in range(0, examples, batch_size)]
            assert hooks.skips_a_lone_example(bn, examples, batch_size, "bn") == (len(cut[-1]) == 1)
            assert not hooks.skips_a_lone_example(nn.Linear(1, 2), examples, batch_size, "plain")
    for examples, batch_size in ((1, 4), (4, 1)):
        with pytest.raises(hooks.ConfigurationError, match="needs at least 2 examples per training batch"):
            hooks.skips_a_lone_example(bn, examples, batch_size, "bn")


def test_two_training_examples_are_enough_to_hold_one_out():
    """The documented minimum: of 2 examples one is held out and one left to train on; 1 is refused."""
    rest, batches = hooks.held_out_batches(torch.utils.data.TensorDataset(torch.arange(2)), "autol", 4, seed=0)
    held = next(batches)[0].tolist()
    assert len(rest) == 1 and len(held) == 1 and {rest[0][0].item(), *held} == {0, 1}
    with pytest.raises(hooks.ConfigurationError, match="needs at least 2 training examples; there are 1"):
        hooks.held_out_batches(torch.utils.data.TensorDataset(torch.arange(1)), "autol", 4, seed=0)


# ----------------------------------------------------------------------------------------------
# shuffled_batches of a dataset that draws its own (Office)
# ----------------------------------------------------------------------------------------------


def _two_domains():
    """Office's dataset with two domains of 6 and 4 one-value images; domain b's values are 100 and up."""
    return office.DomainTargets({"a": [(torch.tensor([float(i)]), 0) for i in range(6)],
                                 "b": [(torch.tensor([100.0 + i]), 1) for i in range(4)]})


def test_own_batches_are_the_dataset_s_examples_for_the_model_s_tasks_drawn_by_the_seed_alone():
    data = _two_domains()

    def drawn(seed, global_seed, tasks=None):
        torch.manual_seed(global_seed)  # the batches must depend on the seed argument alone
        return [x.flatten().tolist() for x, _ in hooks.shuffled_batches(data, 2, seed, tasks, None, "office")]

    batches = drawn(0, 1)
    assert batches == drawn(0, 2) and batches != drawn(5, 1)
    assert all(len([v for v in b if v < 100]) == 2 and len([v for v in b if v >= 100]) == 2 for b in batches)
    only_b = drawn(0, 1, ("b",))  # a model of task b is trained on domain b's images alone
    assert sorted(sum(only_b, [])) == [100.0, 101.0, 102.0, 103.0]


def test_own_batches_of_one_image_per_domain_suit_batch_norm_when_there_are_two_domains():
    """Office's batches of 1 image per domain hold 2 images for a two-domain model, which batch norm
    trains on; a one-domain model's batches of 1 are refused."""
    data, bn = _two_domains(), _batch_norm_net()
    loader = hooks.shuffled_batches(data, 1, 0, None, bn, "office")
    for x, _ in loader:
        assert len(x) == 2
        bn(x)
    with pytest.raises(hooks.ConfigurationError, match="2 examples per training batch, got --batch-size 1"):
        hooks.shuffled_batches(data, 1, 0, ("a",), bn, "office")
