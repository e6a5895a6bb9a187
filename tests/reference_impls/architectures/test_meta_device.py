"""Every architecture computes on the device of its input, even where no GPU is present.

A tensor made inside ``forward`` without ``device=`` lands on the CPU; on a GPU the first
operation mixing it with the input fails. The CI machine has no GPU, so each model is also run
on PyTorch's ``meta`` device, where tensors have shapes but no data: an element-wise operation
or a concatenation with a CPU tensor raises there too ("Tensor on device cpu is not on the
expected device meta"). A matrix product does not, so this is a proxy for a CUDA run, not a
replacement. A few models read data in ``forward`` (``.item()``, ``nonzero``, ``unique``),
which the meta device cannot do: those are skipped, by name, with the operator that stopped them.
"""

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build

PROBLEMS = {
    "vector": (Problem(("a", "b"), (9,), {"a": 2, "b": 2}), (4, 9)),  # equal widths: ESMM, HMoE
    "dense": (Problem(("s", "d"), (3, 16, 16), {"s": 3, "d": 1}, dense=True), (2, 3, 16, 16)),
}
#: Models whose forward pass reads tensor values, which meta tensors do not have.
READS_DATA = {"four_m": "item", "four_m_21": "item", "pseudo_task": "item", "l2m": "unique",
              "m3vit": "nonzero", "routing_network": "copy out"}


@pytest.mark.parametrize("name", available())
def test_forward_and_backward_stay_on_the_input_device(name):
    ran = 0
    for problem, shape in PROBLEMS.values():
        try:
            torch.manual_seed(0)
            model = build(name, problem).to("meta")
        except ValueError:
            continue  # the architecture refuses this kind of problem
        x = torch.randn(shape, device="meta")
        try:
            outputs = model(x)
            sum(o.sum() for o in outputs.values()).backward()
        except (RuntimeError, NotImplementedError) as error:
            if name in READS_DATA and READS_DATA[name] in str(error):
                pytest.skip(f"{name} reads tensor values in forward ({READS_DATA[name]}); meta tensors have none")
            raise
        assert all(o.device.type == "meta" for o in outputs.values())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.device.type == "meta" for g in grads)
        ran += 1
    assert ran, f"{name} built for neither problem"
    assert name not in READS_DATA, f"{name} now runs on the meta device: take it off READS_DATA"
