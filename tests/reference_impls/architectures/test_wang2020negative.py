"""Meta language-specific layers (Wang et al. 2020): the bi-level update checked by hand."""

import copy

import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.wang2020negative import (
    MetaLanguageSpecific,
    meta_step,
    unrolled_heldout_loss,
)

from .conftest import assert_each_task_owns_exactly, names_under
from .procedure_names import unresolved_names

VEC = Problem(("en", "sw"), (3,), {"en": 1, "sw": 1})


def mse(outputs, targets):
    return sum((outputs[t] - targets[t]).square().mean() for t in targets)


def setup(device, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = build("wang2020negative", VEC, width=4, depth=1).to(device, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(3, 2, generator=g, dtype=dtype).to(device)

    def batch(n):
        x = torch.randn(n, 3, generator=g, dtype=dtype).to(device)
        y = torch.tanh(x @ w)
        return x, {"en": y[:, :1], "sw": y[:, 1:] - 0.5 * y[:, :1]}

    return model, batch


def meta_params(model):
    return {n: p for n, p in model.named_parameters() if n in model.meta_parameter_names()}


def test_meta_gradient_is_the_gradient_through_the_virtual_step(device):
    model, batch = setup(device)
    train, heldout = batch(16), batch(16)
    phi = meta_params(model)
    loss = unrolled_heldout_loss(model, phi, train, heldout, mse, inner_lr=0.5)
    grads = dict(zip(phi, torch.autograd.grad(loss, list(phi.values()))))
    name = "language_layers.sw.mix.weight"
    for idx in [(0, 0), (1, 3), (3, 2)]:  # central differences of the unrolled objective in φ
        bumped = []
        for eps in (1e-6, -1e-6):
            shifted = {n: p.detach().clone() for n, p in phi.items()}
            shifted[name][idx] += eps
            bumped.append(unrolled_heldout_loss(model, shifted, train, heldout, mse, 0.5).item())
        assert abs((bumped[0] - bumped[1]) / 2e-6 - grads[name][idx].item()) < 1e-6
    # First order only (θ' treated as a constant) is a different vector: the second-order term matters.
    shared = {n: p for n, p in model.named_parameters() if n not in phi}
    train_grads = torch.autograd.grad(mse(model(train[0]), train[1]), list(shared.values()))
    stepped = {n: (p - 0.5 * g).detach() for (n, p), g in zip(shared.items(), train_grads)}
    first = torch.func.functional_call(model, {**stepped, **phi}, (heldout[0],))
    torch.testing.assert_close(loss, mse(first, heldout[1]))  # θ' = θ − β ∇θ L^train, by hand
    first_grad = torch.autograd.grad(mse(first, heldout[1]), [phi[name]])[0]
    assert (first_grad - grads[name]).abs().max() > 1e-4


def test_no_inner_step_reduces_to_the_plain_held_out_gradient(device):
    model, batch = setup(device)
    train, heldout = batch(8), batch(8)
    phi = meta_params(model)
    unrolled = unrolled_heldout_loss(model, phi, train, heldout, mse, inner_lr=0.0)
    plain = mse(model(heldout[0]), heldout[1])
    torch.testing.assert_close(unrolled, plain)
    for a, b in zip(torch.autograd.grad(unrolled, list(phi.values())), torch.autograd.grad(plain, list(phi.values()))):
        torch.testing.assert_close(a, b)


def test_meta_step_moves_phi_by_the_meta_gradient_then_theta_at_the_new_phi(device):
    model, batch = setup(device)
    train, heldout = batch(8), batch(8)
    reference = copy.deepcopy(model)
    ref_phi = meta_params(reference)
    meta_loss = unrolled_heldout_loss(reference, ref_phi, train, heldout, mse, 0.3)
    meta_grads = torch.autograd.grad(meta_loss, list(ref_phi.values()))
    with torch.no_grad():
        for p, g in zip(ref_phi.values(), meta_grads):
            p -= 0.1 * g  # φ ← φ − α ∇φ
    shared = [p for n, p in reference.named_parameters() if n not in ref_phi]
    train_grads = torch.autograd.grad(mse(reference(train[0]), train[1]), shared)  # at the new φ
    with torch.no_grad():
        for p, g in zip(shared, train_grads):
            p -= 0.2 * g  # θ ← θ − γ ∇θ
    phi = meta_params(model)
    rest = [p for n, p in model.named_parameters() if n not in phi]
    before = copy.deepcopy(model)
    returned = meta_step(model, train, heldout, mse, 0.3, torch.optim.SGD(phi.values(), lr=0.1),
                         torch.optim.SGD(rest, lr=0.2))
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    # (held-out loss after the virtual step, training loss at the new φ before θ moves)
    train_before_theta = mse(torch.func.functional_call(before, {**dict(before.named_parameters()), **ref_phi},
                                                        (train[0],)), train[1])
    assert returned == (meta_loss.item(), train_before_theta.item())
    assert all(p.grad is None for p in phi.values())  # no stale training gradient left on φ


def test_language_layers_are_the_meta_parameters_and_task_specific(device, params_with_grad, n_params):
    model, _ = setup(device, torch.float32)
    assert model.meta_parameter_names() == [f"language_layers.{t}.mix.{k}" for t in VEC.tasks for k in ("weight", "bias")]
    touched = params_with_grad(model, model(torch.randn(4, 3, device=device))["sw"].square().sum())
    assert any(n.startswith("language_layers.sw") for n in touched) and any(n.startswith("trunk") for n in touched)
    assert not any(n.startswith(("language_layers.en", "heads.en")) for n in touched)
    d, w = 3, 4
    assert n_params(model) == (d * w + w) + 2 * (w * w + w) + 2 * (w + 1)


def test_each_task_owns_its_language_layer_and_head(split_by_task):
    model, _ = setup("cpu")
    split = split_by_task(model, torch.randn(4, 3, dtype=torch.float64))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"language_layers.{t}.", f"heads.{t}."))


def test_language_layer_is_residual_by_hand(device):
    """z_i = z + ReLU(A_i z + b_i), then task i's head."""
    model, _ = setup(device)
    z = model.encode(torch.randn(5, 3, device=device, dtype=torch.float64))
    out = model.decode(z)
    for t in VEC.tasks:
        mix = model.language_layers[t].mix
        torch.testing.assert_close(out[t], model.heads[t](z + torch.relu(z @ mix.weight.T + mix.bias)))


def test_meta_training_lowers_the_held_out_loss(device):
    model, batch = setup(device, torch.float32, seed=3)
    phi = meta_params(model)
    rest = [p for n, p in model.named_parameters() if n not in phi]
    meta_opt, shared_opt = torch.optim.Adam(phi.values(), lr=3e-2), torch.optim.Adam(rest, lr=3e-2)
    probe = batch(64)
    before = mse(model(probe[0]), probe[1]).item()
    for _ in range(40):
        meta_step(model, batch(32), batch(32), mse, 0.1, meta_opt, shared_opt)
    assert mse(model(probe[0]), probe[1]).item() < 0.5 * before


def test_registry_builds_it_for_vectors_and_dense_images(device, registry_output_shapes):
    registry_output_shapes("wang2020negative", device)
    model = build("wang2020negative", Problem(("a", "b"), (100,), {"a": 1, "b": 1}))
    assert type(model) is MetaLanguageSpecific
    x = torch.randn(2, 100)
    torch.testing.assert_close(model.decode(model.encode(x))["a"], model(x)["a"])  # one shared trunk


def test_the_procedure_line_names_methods_of_the_class_and_functions_of_the_module():
    """A bare name() in the printed line is a method of the class, a module-level function is
    written module.name() (the line used to name meta_step() as if it were a method of
    MetaLanguageSpecific)."""
    assert unresolved_names(MetaLanguageSpecific) == []
    assert "wang2020negative.meta_step()" in MetaLanguageSpecific.training_procedure
