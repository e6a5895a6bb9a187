"""Shared settings for the reference-implementation tests."""

import torch

# The models here are tiny: one intra-op thread is fastest, and several test processes
# (or a shared 2-core CI machine) would otherwise oversubscribe the CPU many times over.
torch.set_num_threads(1)


def gradient_rows(losses, params) -> torch.Tensor:
    """The K x d matrix of per-task gradients of ``params``, by autograd, one loss at a time."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
                        for loss in losses])
