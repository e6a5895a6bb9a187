import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom

from .conftest import assert_each_task_owns_exactly, names_under

PROBLEM = Problem(("a", "b"), (6,), {"a": 1, "b": 3})


def test_forward_is_decode_of_encode(device):
    torch.manual_seed(0)
    model = build("shared_bottom", PROBLEM, width=8).to(device)
    x = torch.randn(4, 6, device=device)
    out, via_z = model(x), model.decode(model.encode(x))
    for t in PROBLEM.tasks:
        torch.testing.assert_close(out[t], via_z[t])


def test_parameter_count_and_split(device, n_params):
    model = build("shared_bottom", PROBLEM, width=8, depth=2).to(device)
    # trunk 6->8->8, heads 8->1 and 8->3
    assert n_params(model.encoder) == (6 * 8 + 8) + (8 * 8 + 8)
    assert n_params(model) == n_params(model.encoder) + (8 + 1) + (8 * 3 + 3)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.encoder.parameters()}


def test_task_loss_reaches_trunk_and_own_head_only(device, params_with_grad):
    torch.manual_seed(0)
    model = build("shared_bottom", PROBLEM, width=8).to(device)
    loss = model(torch.randn(16, 6, device=device))["a"].pow(2).sum()
    touched = params_with_grad(model, loss)
    assert not any(n.startswith("heads.b") for n in touched)
    assert any(n.startswith("heads.a") for n in touched)
    assert {n for n, _ in model.encoder.named_parameters(prefix="encoder")} <= touched


def test_requires_one_head_per_task():
    import pytest

    with pytest.raises(ValueError, match="one head per task"):
        SharedBottom(("a", "b"), torch.nn.Identity(), {"a": torch.nn.Identity()})


def test_each_task_reads_its_own_given_head_on_the_shared_encoding(device):
    """y_k = h^k(f(x)): the head passed for task k, applied to the one encoder output."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU())
    heads = {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 3)}
    model = SharedBottom(("a", "b"), encoder, heads).to(device)
    x = torch.randn(5, 6, device=device)
    out = model(x)
    for t in ("a", "b"):
        assert model.heads[t] is heads[t]
        torch.testing.assert_close(out[t], heads[t](encoder(x)))


def test_every_task_loss_trains_the_shared_encoder(device, params_with_grad):
    torch.manual_seed(0)
    model = build("shared_bottom", PROBLEM, width=8).to(device)
    encoder = {n for n, _ in model.encoder.named_parameters(prefix="encoder")}
    for t in PROBLEM.tasks:
        touched = params_with_grad(model, model(torch.randn(16, 6, device=device))[t].pow(2).sum())
        assert encoder <= touched, t


def test_each_task_owns_exactly_its_head(device, split_by_task):
    """Only h^k is task k's: it claims its head, and its head is all that no other task reaches."""
    torch.manual_seed(0)
    model = build("shared_bottom", PROBLEM, width=8).to(device)
    split = split_by_task(model, torch.randn(16, 6, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(model, f"heads.{t}."))


def test_depth_sets_the_number_of_shared_layers(n_params):
    """from_problem(depth=L): an L-layer trunk of the given width (6 -> w, then L - 1 times w -> w)."""
    for depth in (1, 3):
        model = build("shared_bottom", PROBLEM, width=8, depth=depth)
        assert len(model.encoder.blocks) == depth
        assert n_params(model.encoder) == (6 * 8 + 8) + (depth - 1) * (8 * 8 + 8)
