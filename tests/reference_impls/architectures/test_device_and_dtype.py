"""Every architecture follows its input's device and dtype: a CPU stand-in for the CUDA runs.

No GPU is lent to most sessions, so device bugs (a ``torch.zeros(n)`` or a constant made on
the CPU inside ``forward`` and mixed with GPU activations) would only show on the device
machine. The meta device is a second device every machine has: the model and input move
there, and a TorchFunctionMode fails any torch call whose non-scalar tensor arguments sit on
two devices, as CUDA would (``tests/reference_impls/mixing.py``; meta kernels alone miss
some of these: a meta tensor times a CPU matrix does not raise). The model runs in float64,
and the same mode fails a call that mixes floating dtypes: PyTorch would promote silently,
so a float32 constant made inside ``forward`` would otherwise go unnoticed until a
half-precision run.
"""

import re

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build

from ..mixing import OneDeviceOneDtype

PROBLEMS = {"vector": Problem(("a", "b"), (6,), {"a": 2, "b": 2}),
            "image": Problem(("a", "b"), (3, 16, 16), {"a": 2, "b": 2}, dense=True),
            "image, pooled": Problem(("a", "b"), (3, 16, 16), {"a": 2, "b": 2})}
# Models whose forward pass reads data (Python numbers, unique values, nonzero indices): meta
# tensors hold none, so they cannot run there. Their CPU tests still run on CUDA unchanged.
DATA_DEPENDENT = {
    "four_m": "Tensor.item()", "four_m_21": "Tensor.item()", "pseudo_task": "Tensor.item()",
    "l2m": "aten::_unique2", "m3vit": "torch.nonzero()", "routing_network": "Cannot copy out of meta tensor",
}


def forward_and_backward_on_meta(name: str, problem: Problem, device: str = "meta") -> None:
    torch.manual_seed(0)
    run_on(build(name, problem), problem, device)


def run_on(model: torch.nn.Module, problem: Problem, device: str) -> None:
    """Forward and backward in float64 on ``device``, under the mixing check."""
    model = model.to(device, torch.float64)
    x = torch.randn(2, *problem.input_shape, device=device, dtype=torch.float64)
    with OneDeviceOneDtype():
        outputs = model(x)
        sum(out.sum() for out in outputs.values()).backward()
    assert all(out.device.type == device for out in outputs.values())
    assert all(out.dtype == torch.float64 for out in outputs.values() if out.is_floating_point())


@pytest.mark.parametrize("name", sorted(set(available()) - set(DATA_DEPENDENT)))
def test_forward_and_backward_stay_on_the_input_device_and_dtype(name):
    ran = []
    for kind, problem in PROBLEMS.items():
        torch.manual_seed(0)
        try:
            model = build(name, problem)
        except ValueError:  # a model refusing a kind of problem when built (image-only, tokens only, ...)
            continue
        run_on(model, problem, "meta")  # any error here fails the test, a ValueError too
        ran.append(kind)
    assert ran, f"{name} ran on neither problem"


@pytest.mark.parametrize("name", sorted(DATA_DEPENDENT))
def test_data_dependent_models_fail_on_meta_for_the_stated_reason_only(name):
    """Keeps the exclusion list honest (a model that stops reading data must leave it); their
    dtype is still checked, on the CPU."""
    with pytest.raises((RuntimeError, NotImplementedError), match=re.escape(DATA_DEPENDENT[name])):
        forward_and_backward_on_meta(name, PROBLEMS["vector"])
    forward_and_backward_on_meta(name, PROBLEMS["vector"], device="cpu")


def test_the_check_catches_a_tensor_made_on_the_cpu_inside_forward():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x) @ torch.eye(3)  # eye() on the CPU: fails on CUDA; meta alone lets it pass

    model, x = Leaky().to("meta"), torch.randn(2, 3, device="meta")
    model(x)  # plain meta kernels do not notice
    with pytest.raises(AssertionError, match="mixes devices"), OneDeviceOneDtype():
        model(x)


def test_the_check_catches_a_float32_constant_in_a_float64_model():
    linear, x = torch.nn.Linear(3, 3).double(), torch.randn(2, 3, dtype=torch.float64)
    (linear(x) * torch.ones(3)).sum()  # PyTorch promotes without a word
    with pytest.raises(AssertionError, match="mixes dtypes"), OneDeviceOneDtype():
        linear(x) * torch.ones(3)


@pytest.mark.parametrize("name, setter", [("painter", "set_prompt"), ("vtm", "set_support")])
def test_examples_given_after_moving_the_model_are_stored_where_the_model_is(name, setter):
    """A prompt or support set made on the CPU in float32 must follow a model already moved
    (to a GPU, here meta) and cast (to float64); forward would otherwise mix devices."""
    problem = PROBLEMS["image"]
    model = build(name, problem).to("meta", torch.float64)
    stored = dict(model.named_buffers())
    images = torch.randn(2, *problem.input_shape)  # CPU, float32
    if setter == "set_prompt":
        model.set_prompt("a", images[0], torch.randn(2, *problem.input_shape[1:]))
    else:
        model.set_support("a", images, torch.randn(2, 2, *problem.input_shape[1:]))
    changed = {n: b for n, b in model.named_buffers() if n in stored}
    assert all(b.device.type == "meta" and b.dtype == torch.float64 for b in changed.values())
    with OneDeviceOneDtype():
        model(torch.randn(2, *problem.input_shape, device="meta", dtype=torch.float64))
