"""Every architecture can be deep-copied right after a training pass, and the copy is the model.

Copying a model mid-training is common (a teacher, an exponential average, the best epoch so
far). A model that keeps a term of its last training pass for ``auxiliary_loss`` holds a
tensor with its autograd graph, which ``copy.deepcopy`` refuses; such attributes are named in
``per_pass_attributes`` and copies start with None there (AMTFL, L2M, L2P, SRDML and the
Deep-AMTFL variant failed to copy before they named theirs).
"""

import copy

import pytest
import torch

from reference_impls.architectures.registry import Problem, available

from .conftest import assert_same_outputs, built_in_eval

PROBLEMS = {
    "vector": (Problem(("a", "b"), (12,), {"a": 2, "b": 2}), (3, 12)),
    "dense": (Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True), (3, 3, 8, 8)),
}


@pytest.mark.parametrize("name", available())
def test_a_copy_made_after_a_training_pass_computes_what_the_model_does(name):
    for kind, model, x in built_in_eval(name, PROBLEMS):
        model.train()
        torch.manual_seed(1)
        model(x)  # leaves whatever a training pass leaves behind
        copied = copy.deepcopy(model)
        for attribute in model.per_pass_attributes:
            assert hasattr(model, attribute), f"{attribute} is named but never set"
            assert getattr(copied, attribute) is None
        assert_same_outputs(model.eval(), copied.eval(), x, kind, rtol=0, atol=0)
