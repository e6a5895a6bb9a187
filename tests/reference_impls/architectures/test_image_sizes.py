"""An image size an architecture cannot handle is refused when the model is built.

Architectures pool, patch or downsample their input; an image too small for that (or with
sides the decoder cannot scale back to) used to fail in the first forward pass with a
pooling or convolution error, or StopIteration while choosing a patch size. Now it is a
ValueError at build time, which the training CLI reports as a problem with the data; an
accepted size must run, and a dense output must have the input's size.
"""

import warnings

import pytest
import torch

from reference_impls.architectures.registry import Problem, available, build

SIZES = [(1, 1), (2, 3), (3, 3), (5, 7)]


@pytest.mark.parametrize("name", available())
def test_an_image_size_is_used_or_refused_when_building(name):
    for size in SIZES:
        for dense in (True, False):
            problem = Problem(("a", "b"), (3, *size), {"a": 2, "b": 1}, dense=dense)
            torch.manual_seed(0)
            try:
                with warnings.catch_warnings():  # zero-size layers warn while they are built
                    warnings.simplefilter("ignore")
                    model = build(name, problem)
            except ValueError:
                continue
            outputs = model(torch.randn(2, 3, *size))
            sum(o.sum() for o in outputs.values()).backward()
            if dense:
                assert all(o.shape[-2:] == size for o in outputs.values()), (name, size)
