import copy

import pytest
import torch

from reference_impls.architectures.sluice import Sluice
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.shared_bottom import SharedBottom
from reference_impls.architectures.sluice import alpha_init, subspace_overlap

VEC = Problem(("a", "b"), (5,), {"a": 1, "b": 2})
IMG = Problem(("a", "b"), (2, 5, 5), {"a": 2, "b": 1}, dense=True)


def test_identity_alpha_gives_independent_networks(device):
    for problem in (VEC, IMG):
        torch.manual_seed(2)
        model = build("sluice", problem, width=8).to(device)
        with torch.no_grad():
            for alpha in model.alphas:
                alpha.copy_(torch.eye(alpha.shape[0]))
        x = torch.randn(3, *problem.input_shape, device=device)
        out = model(x)
        for t in problem.tasks:
            alone = torch.nn.Sequential(copy.deepcopy(model.columns[t]), copy.deepcopy(model.heads[t]))
            torch.testing.assert_close(out[t], alone(x))


def _average_over_tasks(model, T: int, M: int) -> None:
    with torch.no_grad():
        for alpha in model.alphas:
            alpha.copy_(torch.kron(torch.full((T, T), 1.0 / T), torch.eye(M)))


def test_task_averaging_alpha_gives_one_shared_representation(device):
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8, num_subspaces=2).to(device)
    _average_over_tasks(model, 2, 2)
    with torch.no_grad():
        for beta in model.betas.values():
            beta.copy_(torch.tensor([0.3, 0.7]))
    reps, _ = model.representations(torch.randn(4, 5, device=device))
    torch.testing.assert_close(reps[0], reps[1])


def test_averaging_alpha_with_tied_columns_is_hard_sharing(device):
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8).to(device)
    _average_over_tasks(model, 2, 2)
    model.columns["b"].load_state_dict(model.columns["a"].state_dict())
    hard = SharedBottom(VEC.tasks, copy.deepcopy(model.columns["a"]), copy.deepcopy(model.heads))
    x = torch.randn(6, 5, device=device)
    out, expected = model(x), hard(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], expected[t])


def test_orthogonality_penalty_by_hand():
    g1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # rows are examples
    g2 = torch.tensor([[3.0, 1.0], [1.0, 0.0]])
    # G1^T G2 = [[3, 1], [2, 0]] -> squared Frobenius norm 9 + 1 + 4 + 0 = 14
    assert subspace_overlap([g1, g2]).item() == 14.0
    assert subspace_overlap([g1, torch.zeros(2, 2)]).item() == 0.0


def test_penalty_is_returned_and_differentiable(device):
    torch.manual_seed(2)
    model = build("sluice", IMG, width=8).to(device)
    _, penalty = model.forward_with_penalty(torch.randn(2, 2, 5, 5, device=device))
    assert penalty.item() > 0
    penalty.backward()
    assert model.columns["a"].blocks[0][0].weight.grad.abs().sum() > 0


def test_beta_is_task_specific(device, params_with_grad):
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8).to(device)
    x = torch.randn(8, 5, device=device)
    for task, other in (("a", "b"), ("b", "a")):  # both, so sharing the first task's beta fails
        touched = params_with_grad(model, model(x)[task].sum())
        assert f"betas.{task}" in touched and f"betas.{other}" not in touched
        assert not any(n.startswith(f"heads.{other}") for n in touched)
    assert {id(p) for p in model.task_specific_parameters("b")} == (
        {id(model.betas["b"])} | {id(p) for p in model.heads["b"].parameters()}
    )


def test_parameter_count(n_params):
    T, M, L, d, w = 2, 2, 2, 5, 8
    model = build("sluice", VEC, width=w, depth=L, num_subspaces=M)
    column = (d * w + w) + (w * w + w)
    heads = (w + 1) + (2 * w + 2)
    assert n_params(model) == T * column + L * (T * M) ** 2 + T * L + heads


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links this paper to Sluice; the registry name must build exactly it."""
    model = build("sluice", VEC, width=8, num_subspaces=2)
    assert type(model) is Sluice
    assert model.name == "sluice"


def test_auxiliary_loss_is_the_weighted_penalty_of_the_last_forward_pass(device):
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8, orthogonality_weight=0.3).to(device)
    with pytest.raises(RuntimeError, match="forward"):
        model.auxiliary_loss()
    for batch in (4, 9):  # the penalty follows the batch of the last forward pass
        x = torch.randn(batch, 5, device=device)
        model(x)
        _, penalty = model.forward_with_penalty(x)
        assert penalty.item() > 0
        torch.testing.assert_close(model.auxiliary_loss(), 0.3 * penalty)
    unweighted = build("sluice", VEC, width=8)
    unweighted(torch.randn(3, 5))
    assert unweighted.auxiliary_loss().item() == 0.0  # default weight 0: opt-in
    copied = copy.deepcopy(model)  # a cached graph must not break copies
    with pytest.raises(RuntimeError, match="forward"):
        copied.auxiliary_loss()


def test_initialisation_keeps_subspaces_apart_and_reads_the_last_layer():
    """alpha: self_weight on the diagonal, the rest from the same subspace of the other tasks;
    beta: all weight on the last layer (the docstring's stated initialisation)."""
    alpha = alpha_init(3, 2, 0.8)  # index k*M + m
    for a in range(6):
        for b in range(6):
            same_subspace = a % 2 == b % 2
            expected = (0.8 if a == b else 0.1) if same_subspace else 0.0
            assert alpha[a, b].item() == pytest.approx(expected)
    model = build("sluice", VEC, width=8, depth=3)
    two_tasks = torch.tensor([[0.9, 0.0, 0.1, 0.0],  # default self_weight 0.9, the other task's 0.1
                              [0.0, 0.9, 0.0, 0.1],
                              [0.1, 0.0, 0.9, 0.0],
                              [0.0, 0.1, 0.0, 0.9]])
    for alpha in model.alphas:
        torch.testing.assert_close(alpha.detach(), two_tasks)
    for beta in model.betas.values():
        torch.testing.assert_close(beta.detach(), torch.tensor([0.0, 0.0, 1.0]))


def test_penalty_sums_every_task_and_layer_over_the_unmixed_subspaces(device):
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8, depth=2).to(device)
    with torch.no_grad():
        for alpha in model.alphas:
            alpha.add_(0.2 * torch.randn_like(alpha))  # mixed features differ from the layer outputs
    outputs = []  # every layer output G_{k,j} of every task, as the forward pass computes it
    for column in model.columns.values():
        for block in column.blocks:
            block.register_forward_hook(lambda module, args, out: outputs.append(out))
    _, penalty = model.forward_with_penalty(torch.randn(5, 5, device=device))
    assert len(outputs) == 4
    torch.testing.assert_close(penalty, sum(subspace_overlap(h.chunk(2, dim=1)) for h in outputs))


def test_alpha_and_beta_mixing_by_hand(device):
    """Layer j: stack the KM subspaces (index k*M + m), row a of the output is
    sum_b alpha_j[a, b] G_b, the next layer of task k reads its M mixed subspaces; task k's
    representation is sum_j beta_{k,j} times its mixed layer j. Random, non-symmetric alpha
    (a different one per layer) and random beta, so a transposed or shared alpha fails."""
    for problem in (VEC, IMG):
        torch.manual_seed(6)
        model = build("sluice", problem, width=6, depth=2, num_subspaces=3).to(device)
        with torch.no_grad():
            for alpha in model.alphas:
                alpha.copy_(torch.randn_like(alpha))
            for beta in model.betas.values():
                beta.copy_(torch.randn_like(beta))
        x = torch.randn(4, *problem.input_shape, device=device)
        K, M = 2, 3
        inputs, mixed_layers = [x] * K, []
        for j in range(2):
            outputs = [model.columns[t].blocks[j](f) for t, f in zip(problem.tasks, inputs)]
            stacked = torch.stack([g for h in outputs for g in h.chunk(M, dim=1)], dim=-1)
            mixed = stacked @ model.alphas[j].T  # (..., KM): entry a = sum_b alpha[a, b] G_b
            inputs = [torch.cat(mixed[..., k * M:(k + 1) * M].unbind(-1), dim=1) for k in range(K)]
            mixed_layers.append(inputs)
        reps, _ = model.representations(x)
        for k, t in enumerate(problem.tasks):
            beta = model.betas[t]
            torch.testing.assert_close(reps[k], beta[0] * mixed_layers[0][k] + beta[1] * mixed_layers[1][k])


def test_overlap_rows_are_examples_and_positions():
    """||G_a^T G_b||_F^2 with G's rows the examples (times positions) and columns the
    channels of the subspace: rectangular, non-symmetric inputs, and image maps."""
    torch.manual_seed(7)
    for shape in ((5, 3), (2, 3, 4, 2)):
        g1, g2, g3 = (torch.randn(*shape) for _ in range(3))

        def cross(a, b):
            return torch.einsum("bc...,bd...->cd", a, b).square().sum()

        expected = cross(g1, g2) + cross(g1, g3) + cross(g2, g3)
        torch.testing.assert_close(subspace_overlap([g1, g2, g3]), expected)


def test_auxiliary_loss_trains_the_subspaces_with_the_weighted_penalty_gradient(device):
    """The harness adds auxiliary_loss() to the step: its gradient must be 0.3 x the penalty's, not detached."""
    torch.manual_seed(2)
    model = build("sluice", IMG, width=8, orthogonality_weight=0.3).to(device)
    x = torch.randn(3, 2, 5, 5, device=device)
    # the layers whose outputs the penalty splits into subspaces, in every column
    subspace_weights = [block[0].weight for column in model.columns.values() for block in column.blocks]
    model(x)
    aux_grads = torch.autograd.grad(model.auxiliary_loss(), subspace_weights)
    _, penalty = model.forward_with_penalty(x)
    penalty_grads = torch.autograd.grad(penalty, subspace_weights)
    for aux, pen in zip(aux_grads, penalty_grads):
        assert aux.abs().sum() > 0
        torch.testing.assert_close(aux, 0.3 * pen)


def test_a_single_task_sluice_starts_as_its_own_column():
    """With one task there is no other task to borrow from: alpha starts as the identity, so the
    output is the column followed by the head."""
    one = Problem(("a",), (5,), {"a": 2})
    torch.manual_seed(2)
    model = build("sluice", one, width=8)
    for alpha in model.alphas:
        torch.testing.assert_close(alpha.detach(), torch.eye(2))
    x = torch.randn(3, 5)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](model.columns["a"](x)))


def test_one_subspace_has_nothing_to_keep_apart():
    """M = 1: no pair of subspaces, so the orthogonality penalty is 0."""
    g = torch.randn(4, 3)
    assert subspace_overlap([g]).item() == 0.0
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8, num_subspaces=1)
    _, penalty = model.forward_with_penalty(torch.randn(3, 5))
    assert penalty.item() == 0.0


def test_every_layer_width_counts_for_the_equal_width_rule():
    """A column whose layers differ in width is refused (beta adds the layers up); one layer is fine."""
    from reference_impls.architectures.encoders import MLPEncoder, heads_for

    heads = heads_for(VEC, 8)
    with pytest.raises(ValueError, match="equal layer widths"):
        Sluice(VEC.tasks, lambda: MLPEncoder(5, [6], 8), heads)
    torch.manual_seed(2)
    model = build("sluice", VEC, width=8, depth=1)
    assert model(torch.randn(3, 5))["b"].shape == (3, 2)
