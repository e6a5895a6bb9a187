"""PTA: D decoders per task on one encoder; the loss sums them; D = 1 is shared-bottom."""

import pytest
import torch
from torch import nn

from reference_impls.architectures import registry
from reference_impls.architectures.pseudo_task import PseudoTaskAugmentation
from reference_impls.architectures.shared_bottom import SharedBottom

from .harness_probe import harness_step

PROBLEM = registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def make(device, num_decoders=3):
    torch.manual_seed(0)
    return PseudoTaskAugmentation.from_problem(PROBLEM, width=8, num_decoders=num_decoders).to(device)


def test_one_decoder_equals_shared_bottom(device):
    pta = make(device, num_decoders=1)
    sb = SharedBottom.from_problem(PROBLEM, width=8).to(device)
    sb.encoder.load_state_dict(pta.encoder.state_dict())
    for t in PROBLEM.tasks:
        sb.heads[t].load_state_dict(pta.decoders[t][0].state_dict())
    x = torch.randn(4, 6, device=device)
    y = {"a": torch.randn(4, 1, device=device), "b": torch.randn(4, 2, device=device)}
    out, ref = pta(x), sb(x)
    for t in PROBLEM.tasks:
        torch.testing.assert_close(out[t], ref[t])
    pta_loss = pta.pseudo_task_loss(x, lambda t, p: (p - y[t]).square().mean())
    torch.testing.assert_close(pta_loss, sum((ref[t] - y[t]).square().mean() for t in y))


def test_decoders_share_the_encoder_and_start_different(device):
    model = make(device)
    x = torch.randn(4, 6, device=device)
    z = model.encode(x)
    outs = model.pseudo_task_outputs(x)
    assert len(outs["a"]) == 3 and len(outs["b"]) == 3
    for d, decoder in enumerate(model.decoders["a"]):
        torch.testing.assert_close(outs["a"][d], decoder(z))  # every pseudo-task reads the same z
    assert not torch.allclose(outs["a"][0], outs["a"][1])  # independently initialised


def test_loss_sums_pseudo_tasks_and_encoder_gets_every_signal(device, params_with_grad):
    model = make(device)
    x, y = torch.randn(4, 6, device=device), torch.randn(4, 1, device=device)
    names = params_with_grad(model, model.pseudo_task_outputs(x)["a"][1].sub(y).square().sum())
    assert "encoder.blocks.0.0.weight" in names and "decoders.a.1.0.weight" in names
    assert not any(n.startswith(("decoders.a.0", "decoders.a.2", "decoders.b")) for n in names)
    enc = model.encoder.blocks[0][0].weight
    grads = []
    for d in range(3):
        model.zero_grad()
        model.pseudo_task_outputs(x)["a"][d].sub(y).square().sum().backward()
        grads.append(enc.grad.clone())
    model.zero_grad()
    model.pseudo_task_loss(x, lambda t, p: p.sub(y).square().sum() if t == "a" else p.sum() * 0).backward()
    torch.testing.assert_close(enc.grad, sum(grads))


def test_select_best_routes_forward_to_that_decoder(device):
    model = make(device)
    model.select_best({"a": torch.tensor([0.5, 0.7, 0.1]), "b": torch.tensor([0.2, 0.9, 0.3])})
    assert model.selected.tolist() == [2, 0]
    x = torch.randn(4, 6, device=device)
    outs, out = model.pseudo_task_outputs(x), model(x)
    torch.testing.assert_close(out["a"], outs["a"][2])
    torch.testing.assert_close(out["b"], outs["b"][0])
    assert list(model.task_specific_parameters("a")) == list(model.decoders["a"].parameters())
    with pytest.raises(ValueError):
        PseudoTaskAugmentation(("a",), nn.Identity(), {"a": []})


def test_pta_training_lowers_every_pseudo_task_loss(device):
    model = make(device)
    x = torch.randn(32, 6, device=device)
    y = {"a": x[:, :1] - x[:, 1:2], "b": x[:, 2:4]}
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    per_decoder = lambda: torch.tensor([(p - y["a"]).square().mean().item() for p in model.pseudo_task_outputs(x)["a"]])
    before = per_decoder()
    for _ in range(30):
        opt.zero_grad()
        model.pseudo_task_loss(x, lambda t, p: (p - y[t]).square().mean()).backward()
        opt.step()
    assert (per_decoder() < 0.5 * before).all()


def test_registry_builds_vector_and_dense_problems(device):
    vec = registry.build("pseudo_task", registry.Problem(("a", "b"), (10,), {"a": 1, "b": 3}), width=8).to(device)
    out = vec(torch.randn(2, 10, device=device))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 3)
    img = registry.Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)
    out = registry.build("pseudo_task", img, width=8).to(device)(torch.randn(2, 3, 8, 8, device=device))
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("dense", (True, False))
def test_short_training_lowers_loss(device, dense, short_training):
    first, last = short_training("pseudo_task", dense, device, steps=15)
    assert last < 0.7 * first


def test_a_training_step_of_the_harness_minimises_the_pta_loss(device):
    """reference_impls.train used to train only the selected decoder (plain shared-bottom):
    now every decoder learns, and with equal weighting the step's loss is the PTA sum."""
    model = make(device)
    with torch.no_grad():
        model.selected[1] = 2  # task b reports decoder 2; its decoders 0 and 1 are intermediate
    x = torch.randn(8, 6, device=device)
    y = {"a": torch.randn(8, 1, device=device), "b": torch.randn(8, 2, device=device)}
    outputs, others = model.forward_with_intermediate(x)
    torch.testing.assert_close(outputs["b"], model.decoders["b"][2](model.encode(x)))
    assert set(others) == {"decoder0", "decoder1", "decoder2"} and set(others["decoder2"]) == {"a"}
    mse = lambda p, t: (p - t).square().mean()  # noqa: E731
    with torch.no_grad():
        pta = model.pseudo_task_loss(x, lambda t, p: mse(p, y[t])).item()  # before the step
    before = [p.detach().clone() for p in model.parameters()]
    log = harness_step(model, x, y)
    assert log.objective + log.auxiliary == pytest.approx(pta, rel=1e-5)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # every decoder learned


@pytest.mark.parametrize("method_name", ["rep_mtl", "mgda_ub", "rotograd"])
def test_the_methods_that_read_the_representation_train_every_decoder_too(method_name):
    """Rep-MTL, MGDA-UB and RotoGrad make the harness call encode/decode instead of
    forward_with_intermediate; it used to drop the other decoders' predictions there, so
    with these methods only the selected decoder of each task learned."""
    model = make("cpu")
    x = torch.randn(8, 6)
    y = {"a": torch.randn(8, 1), "b": torch.randn(8, 2)}
    harness_step(model, x, y, method=method_name, lr=0.0)
    untrained = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untrained == []


def test_the_encoder_depth_is_the_one_asked_for():
    """depth counts the shared encoder's layers (the trunk's blocks)."""
    for depth in (1, 3):
        model = PseudoTaskAugmentation.from_problem(PROBLEM, width=8, depth=depth)
        assert len(model.encoder.blocks) == depth
