"""The "own training loop" examples of the implementations page run as written there."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from reference_impls.weighting.gradients import per_task_gradients
from reference_impls.weighting.pcgrad import PCGrad

PAGE = Path(__file__).parents[2] / "site_gen" / "templates" / "site" / "implementations.md.j2"


def own_loop_examples() -> list[str]:
    """The python blocks of the page's "own training loop" section, in order."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("{ #own-loop }", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_a_gradient_method_and_a_loss_weighting_example():
    blocks = own_loop_examples()
    assert len(blocks) == 2
    assert "gradient_step(" in blocks[0] and ".combine(losses)" in blocks[1]


def test_the_gradient_method_example_writes_pcgrads_update_into_the_shared_gradients():
    namespace: dict = {}
    torch.manual_seed(0)
    first = own_loop_examples()[0]
    before_step, step = first.split("optimizer.zero_grad()\n", 1)
    exec(before_step, namespace)  # noqa: S102 - our own documentation
    model, losses, shared = namespace["model"], namespace["losses"], namespace["shared"]
    expected = PCGrad()(per_task_gradients(losses, shared)).update
    start = [p.detach().clone() for p in model.parameters()]
    exec("optimizer.zero_grad()\n" + step, namespace)  # noqa: S102
    written = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(written, expected)
    assert all(p.grad is not None for p in namespace["heads"])
    assert all(not torch.equal(a, p) for a, p in zip(start, model.parameters()))  # the step reached all


def test_the_loss_weighting_example_trains_the_weighting_with_the_model():
    namespace: dict = {}
    torch.manual_seed(0)
    for block in own_loop_examples():
        exec(block, namespace)  # noqa: S102
    log_variances = [p for p in namespace["weighting"].parameters()]
    assert log_variances and all(p.grad is not None and p.grad.abs().sum() > 0 for p in log_variances)
    assert all(not torch.equal(p, torch.zeros_like(p)) for p in log_variances)  # moved from their start of 0
