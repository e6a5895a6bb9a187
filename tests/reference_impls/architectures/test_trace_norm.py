import copy

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.trace_norm import TraceNormMTL, tensor_trace_norm

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})


def _nuclear_by_hand(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(m @ m.T).clamp_min(0).sqrt().sum()  # singular values from m m^T


def test_penalties_match_singular_values_computed_by_hand():
    w = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tucker = sum(_nuclear_by_hand(w.permute(*order).reshape(w.shape[order[0]], -1))
                 for order in ((0, 1, 2), (1, 0, 2), (2, 0, 1)))
    tt = _nuclear_by_hand(w.reshape(3, 8)) + _nuclear_by_hand(w.reshape(6, 4))
    laf = _nuclear_by_hand(w.permute(2, 0, 1).reshape(4, 6))
    torch.testing.assert_close(tensor_trace_norm(w, "tucker"), tucker)
    torch.testing.assert_close(tensor_trace_norm(w, "tt"), tt)
    torch.testing.assert_close(tensor_trace_norm(w, "laf"), laf)


def test_identical_tasks_have_a_rank_one_task_unfolding():
    v = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # ||v||_F = 5
    w = torch.stack([v, v, v], dim=-1)  # three tasks, the same weights
    # the 3 x 4 task unfolding is ones(3) v^T: one singular value, sqrt(3) * 5
    torch.testing.assert_close(tensor_trace_norm(w, "laf"), torch.tensor(5 * 3**0.5))


def test_penalty_gradient_pulls_task_weights_toward_low_rank():
    w = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    start = torch.linalg.svdvals(w.detach().permute(2, 0, 1).reshape(3, -1))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        tensor_trace_norm(w, "laf").backward()
        opt.step()
    end = torch.linalg.svdvals(w.detach().permute(2, 0, 1).reshape(3, -1))
    torch.testing.assert_close(start - end, torch.full_like(start, 3.0))  # U V^T: each shrinks by lr
    assert end[-1] / end[0] < 0.5 * start[-1] / start[0]  # relatively, the task stack is closer to rank 1


@pytest.mark.parametrize("variant", ("tucker", "tt", "laf"))
def test_auxiliary_loss_is_the_weighted_penalty_over_layers(variant):
    torch.manual_seed(0)
    model = build("trace_norm", VEC, width=6, depth=2, variant=variant, trace_norm_weight=0.2)
    layers = [torch.stack([model.columns[t].blocks[j][0].weight.T for t in "ab"], -1) for j in (0, 1)]
    assert layers[0].shape == (4, 6, 2) and layers[1].shape == (6, 6, 2)
    expected = 0.2 * sum(tensor_trace_norm(w, variant) for w in layers)
    torch.testing.assert_close(model.auxiliary_loss(), expected)


def test_task_weights_are_stacked_in_the_authors_layout():
    """Authors' TF layout: (in, out, tasks), (kh, kw, in, out, tasks); the TT norm depends on it."""
    torch.manual_seed(0)
    model = build("trace_norm", VEC, width=6, depth=2, variant="tt", trace_norm_weight=1.0)
    layers = [torch.stack([model.columns[t].blocks[j][0].weight.T for t in "ab"], -1) for j in (0, 1)]
    assert [tuple(w.shape) for w in model.stacked_weights()] == [(4, 6, 2), (6, 6, 2)]
    torch.testing.assert_close(model.auxiliary_loss(), sum(tensor_trace_norm(w, "tt") for w in layers))
    image = build("trace_norm", Problem(("a", "b"), (3, 8, 8), {"a": 1, "b": 2}), width=4, depth=1)
    conv = image.columns["a"].blocks[0][0].weight  # (out, in, kh, kw)
    torch.testing.assert_close(image.stacked_weights()[0][..., 0], conv.permute(2, 3, 1, 0))


def test_zero_weight_gives_independent_networks(device, params_with_grad):
    torch.manual_seed(0)
    model = build("trace_norm", VEC, width=6, trace_norm_weight=0.0).to(device)
    x = torch.randn(5, 4, device=device)
    out = model(x)
    alone = torch.nn.Sequential(copy.deepcopy(model.columns["b"]), copy.deepcopy(model.heads["b"]))
    torch.testing.assert_close(out["b"], alone(x))
    touched = params_with_grad(model, out["a"].sum())
    assert touched and all(n.startswith(("columns.a", "heads.a")) for n in touched)
    assert model.auxiliary_loss().item() == 0.0


def test_penalty_couples_the_columns(params_with_grad):
    torch.manual_seed(0)
    model = build("trace_norm", VEC, width=6)
    touched = params_with_grad(model, model.auxiliary_loss())
    assert {"columns.a.blocks.0.0.weight", "columns.b.blocks.1.0.weight"} <= touched
    assert not any(n.startswith("heads") or n.endswith("bias") for n in touched)


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    registry_output_shapes("trace_norm", device)
    for dense in (True, False):
        before, after = short_training("trace_norm", dense, device, 30)
        assert after < 0.5 * before


def test_registry_name_builds_the_catalogued_class():
    model = build("trace_norm", VEC)
    assert type(model) is TraceNormMTL and model.name == "trace_norm"


def test_task_specific_parameters_are_what_only_that_task_reaches(params_with_grad):
    """Nothing is tied: task t's output reaches exactly its column and head, all of which it claims."""
    torch.manual_seed(0)
    model = build("trace_norm", VEC, width=6)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in VEC.tasks:
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert own == {n for n in names.values() if n.startswith((f"columns.{t}.", f"heads.{t}."))}
        assert params_with_grad(model, model(torch.randn(5, 4))[t].sum()) == own


def test_defaults_are_the_tucker_norm_weighted_as_in_the_authors_demo():
    """By default: the Tucker variant, weighted 0.001 (the authors' released demo)."""
    torch.manual_seed(0)
    model = build("trace_norm", VEC, width=6, depth=2)
    by_hand = sum(_nuclear_by_hand(w.movedim(n, 0).reshape(w.shape[n], -1))
                  for w in model.stacked_weights() for n in range(3))
    torch.testing.assert_close(model.auxiliary_loss(), 1e-3 * by_hand)


def test_tucker_is_the_default_variant_and_depth_reaches_the_columns():
    """The docstring's default is the Tucker norm, for the function as for the model; the registry's
    depth sets how many layers every column (and so the stacked weights) has."""
    w = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tensor_trace_norm(w), tensor_trace_norm(w, "tucker"))
    model = build("trace_norm", VEC, width=5, depth=3)
    assert model.variant == "tucker" and len(model.stacked_weights()) == 3
