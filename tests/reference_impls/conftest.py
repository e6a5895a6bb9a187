"""Shared settings for the reference-implementation tests."""

import torch

# The models here are tiny: one intra-op thread is fastest, and several test processes
# (or a shared 2-core CI machine) would otherwise oversubscribe the CPU many times over.
torch.set_num_threads(1)

# Tests that take a device run on the CPU everywhere and on CUDA too where a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The tests compare layers with their formulas at float32 tolerance. On Ampere and later GPUs
# PyTorch runs convolutions in TF32 by default (10 mantissa bits), 1e-4-sized differences that
# say nothing about the formula; the tests ask for full float32 arithmetic instead.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def gradient_rows(losses, params) -> torch.Tensor:
    """The K x d matrix of per-task gradients of ``params``, by autograd, one loss at a time."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                        for loss in losses])
