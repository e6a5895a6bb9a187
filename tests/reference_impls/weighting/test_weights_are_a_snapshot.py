"""The weights a loss weighting returns are a snapshot, not a window on its state.

Methods update their state in place after the step (GradNorm's balance_step, moving averages,
loss histories). A returned tensor sharing storage with a parameter or buffer would change
under the caller's hands, so a loss formed before the update would be weighted after it:
GradNorm trained with w(t+1) instead of w(t) this way until its weights() returned a copy.
"""

import pytest
import torch

from reference_impls.weighting.base import LossWeighting

from .test_checkpoint import EPOCHS, LOSS_WEIGHTINGS
from .test_device_and_dtype import losses_and_inputs, make


def storages(method: LossWeighting) -> set[int]:
    tensors = [*method.parameters(), *method.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32: .to() returns the buffer itself
@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_returned_weights_share_no_storage_with_the_method_state(name, dtype):
    method = make(name).to(dtype)
    for index in range(3):
        losses, extra = losses_and_inputs(name, dtype, torch.Generator().manual_seed(index), "cpu")
        method.combine(losses, step=index, epoch=EPOCHS[index], **extra).backward()
        weights = method.weights(losses.detach(), index, EPOCHS[index])
        shared = storages(method) & {weights.untyped_storage().data_ptr()}
        assert not shared, f"{name}: weights() at step {index} is a view of the method's own state"


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_the_method_keeps_no_reference_to_the_callers_losses(name):
    """A training loop may write each step's losses into one tensor: a method that stored that
    tensor instead of a copy (LBTW's epoch reference, FAMO's previous losses) would see its
    history rewritten. Weights from one reused tensor must equal weights from fresh ones."""
    reused_method, fresh_method = make(name), make(name)
    reused = None
    for index, epoch in enumerate(EPOCHS):
        losses, _ = losses_and_inputs(name, torch.float64, torch.Generator().manual_seed(index), "cpu")
        losses = losses.detach()
        reused = losses.clone() if reused is None else reused.copy_(losses)
        torch.testing.assert_close(reused_method.weights(reused, index, epoch),
                                   fresh_method.weights(losses.clone(), index, epoch), msg=f"{name}, step {index}")
