"""Every optimization method follows its input's dtype and device, step after step.

Losses or gradients in float32 give a float32 result, float64 a float64 one, and no torch call
inside mixes the two (``tests/reference_impls/mixing.py``): PyTorch would promote a float64
constant silently, doubling memory and time on GPU, or lose precision the other way. Three
steps, so methods with state (running means, previous gradients) use it too. The device
half runs on PyTorch's meta device, a second device every machine has (see the
architectures' test of the same name); methods that read values to solve a small problem
cannot run there and are listed with what stops them.
"""

import inspect

import pytest
import torch

from reference_impls.weighting.base import GradientMethod, LossWeighting
from reference_impls.weighting.registry import methods

from ..mixing import OneDeviceOneDtype

K, D = 3, 10
_data = torch.Generator().manual_seed(0)
# Constructor arguments that no default can stand for.
ARGUMENTS = {
    "continuous_pareto": {"beta": [1.0, 0.5, 0.2]},
    "epo": {"preference": [1.0, 2.0, 3.0]},
    "pareto_mtl": {"preferences": torch.eye(K), "index": 0},
    "pinns_ntk": {"num_terms": K},
    "rotograd": {"dim": D},
    "svd_reweighting": {"inputs": torch.randn(20, 4, generator=_data), "labels": torch.randn(20, K, generator=_data)},
}


def make(name: str) -> LossWeighting | GradientMethod:
    cls = methods()[name]
    offered = {"num_tasks": K, "generator": torch.Generator().manual_seed(0), **ARGUMENTS.get(name, {})}
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in offered.items() if k in accepted})


def losses_and_inputs(name: str, dtype: torch.dtype, g: torch.Generator, device: str) -> tuple[torch.Tensor, dict]:
    """This step's K losses, and what the method takes beside the losses or gradients: EPO's and
    Pareto MTL's losses, FS-MTL's SAM gradients, continuous Pareto's Hessian-vector product
    (here the identity), Rep-MTL's representation Z, from which the losses are computed."""
    z = torch.randn(8, K, generator=g, dtype=dtype).to(device).requires_grad_()  # a leaf on the device
    losses = z.square().mean(0)
    extra = {"epo": {"losses": losses.detach()}, "pareto_mtl": {"losses": losses.detach()},
             "fs_mtl": {"perturbed_grads": torch.randn(K, D, generator=g, dtype=dtype).to(device)},
             "continuous_pareto": {"hvp": lambda alpha, v: v.clone()},
             "rep_mtl": {"representation": z}}
    return losses, extra.get(name, {})


def run_steps(name: str, dtype: torch.dtype, device: str = "cpu") -> None:
    method, g = make(name), torch.Generator().manual_seed(1)
    if isinstance(method, torch.nn.Module):
        method.to(device)
    for step in range(3):
        with OneDeviceOneDtype():
            losses, extra = losses_and_inputs(name, dtype, g, device)
            if isinstance(method, LossWeighting):
                total = method.combine(losses, step=step, epoch=step, **extra)
                total.backward()
                results = [total, method.weights(losses.detach(), step, step)]
            else:
                aggregation = method(torch.randn(K, D, generator=g, dtype=dtype).to(device), **extra)
                results = [aggregation.update] + ([] if aggregation.weights is None else [aggregation.weights])
        assert all(r.dtype == dtype and r.device.type == device for r in results), name


# Methods that read values (.item(), nonzero(), copies to Python) to solve a small problem
# (a QP, a linear system, a projection): meta tensors hold no values.
READS_VALUES = {
    "aligned_mtl", "attittud", "auxinash", "cagrad", "config", "continuous_pareto", "epo", "fairgrad",
    "gls", "go4align", "gradvac", "great", "imgrad", "imtl", "imtl_g", "inverse_dirichlet", "lbtw",
    "mgda", "mgda_ub", "moco", "modo", "mt_sgd", "mtadam", "nash_mtl", "pareto_mtl", "sdmgrad",
    "selective_group_updates", "upgrad",
}
META_REFUSALS = r"Tensor.item\(\) cannot be called on meta|Cannot copy out of meta tensor|torch.nonzero\(\)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(methods()))
def test_results_keep_the_input_dtype_and_nothing_inside_mixes_dtypes(name, dtype):
    run_steps(name, dtype)


@pytest.mark.parametrize("name", sorted(methods()))
def test_results_stay_on_the_input_device(name):
    if name not in READS_VALUES:
        run_steps(name, torch.float32, device="meta")
    else:  # and the list stays honest: a method that stops reading values must leave it
        with pytest.raises((RuntimeError, NotImplementedError), match=META_REFUSALS):
            run_steps(name, torch.float32, device="meta")
