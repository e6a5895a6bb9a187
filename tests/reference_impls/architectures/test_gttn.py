import pytest
import torch

from reference_impls.architectures.gttn import GTTN, flatten, flattening_subsets, gttn_norm
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.trace_norm import tensor_trace_norm

VEC = Problem(("a", "b"), (4,), {"a": 1, "b": 2})


def _nuclear_by_hand(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(m @ m.T).clamp_min(0).sqrt().sum()  # singular values from m m^T


def _onehot(n: int, i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).double()


def test_every_split_of_the_modes_appears_once():
    assert flattening_subsets(3) == [(0,), (1,), (2,)]
    four = flattening_subsets(4)
    assert len(four) == 2**3 - 1 and len(flattening_subsets(5)) == 2**4 - 1
    assert (0, 1) in four and (2, 3) not in four  # a half-split and its complement: one flattening
    w = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(_nuclear_by_hand(flatten(w, (0, 1))), _nuclear_by_hand(flatten(w, (2, 3))))


def test_norm_by_hand_with_svds():
    w = torch.randn(3, 2, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha = torch.softmax(torch.randn(7, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 0)
    by_hand = {  # rows: these modes, in this order
        (0,): w.reshape(3, 16), (1,): w.permute(1, 0, 2, 3).reshape(2, 24),
        (2,): w.permute(2, 0, 1, 3).reshape(2, 24), (3,): w.permute(3, 0, 1, 2).reshape(4, 12),
        (0, 1): w.reshape(6, 8), (0, 2): w.permute(0, 2, 1, 3).reshape(6, 8), (0, 3): w.permute(0, 3, 1, 2).reshape(12, 4),
    }
    expected = sum(a * _nuclear_by_hand(by_hand[s]) for a, s in zip(alpha, flattening_subsets(4)))
    torch.testing.assert_close(gttn_norm(w, alpha), expected)


def test_fixed_coefficients_give_the_earlier_tensor_trace_norms():
    w = torch.randn(3, 2, 2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    subsets = flattening_subsets(4)
    singles = torch.tensor([float(len(s) == 1) for s in subsets], dtype=torch.float64)
    torch.testing.assert_close(gttn_norm(w, singles / 4), tensor_trace_norm(w, "tucker") / 4)  # Tucker
    torch.testing.assert_close(gttn_norm(w, _onehot(7, subsets.index((3,)))), tensor_trace_norm(w, "laf"))  # task mode
    prefixes = [subsets.index(s) for s in ((0,), (0, 1), (3,))]  # splits after mode 1, 2, 3 (the last as its complement)
    tt = torch.zeros(7, dtype=torch.float64)
    tt[prefixes] = 1 / 3
    torch.testing.assert_close(gttn_norm(w, tt), tensor_trace_norm(w, "tt") / 3)


def test_learned_coefficients_move_to_the_most_low_rank_split():
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    w = torch.stack([v, 2 * v], dim=-1)  # two tasks, proportional: the task unfolding has rank 1
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        gttn_norm(w, torch.softmax(logits, 0)).backward()
        opt.step()
    norms = [_nuclear_by_hand(flatten(w, s)) for s in flattening_subsets(3)]
    alpha = torch.softmax(logits.detach(), 0)
    assert int(torch.stack(norms).argmin()) == 2 and alpha[2] > 0.9
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_auxiliary_loss_and_which_parameters_it_touches(params_with_grad):
    torch.manual_seed(0)
    model = build("gttn", VEC, width=6, gttn_weight=0.5)
    layers = [torch.stack([model.columns[t].blocks[j][0].weight for t in "ab"], -1) for j in (0, 1)]
    uniform = torch.full((3,), 1 / 3)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * sum(gttn_norm(w, uniform) for w in layers))
    touched = params_with_grad(model, model.auxiliary_loss())
    assert {"columns.a.blocks.0.0.weight", "columns.b.blocks.1.0.weight", "coefficient_logits.0"} <= touched
    assert not any(n.startswith("heads") or n.endswith("bias") for n in touched)
    frozen = build("gttn", VEC, width=6, learn_coefficients=False)
    assert not any(p.requires_grad for p in frozen.coefficient_logits)


def test_tasks_are_coupled_only_by_the_penalty(device, params_with_grad):
    torch.manual_seed(0)
    model = build("gttn", VEC, width=6).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 4, device=device))["a"].sum())
    assert touched and all(n.startswith(("columns.a", "heads.a")) for n in touched)


def test_image_layers_use_all_fifteen_flattenings(device):
    model = build("gttn", Problem(("a", "b"), (2, 4, 4), {"a": 1, "b": 1}, dense=True), width=4).to(device)
    assert [len(c) for c in model.coefficients()] == [15, 15]  # conv weight (out, in, kh, kw) + tasks: 5 modes
    assert torch.isfinite(model.auxiliary_loss())


@pytest.mark.parametrize("dense", (True, False))
def test_training_lowers_loss_and_registry_shapes(device, dense, short_training, registry_output_shapes):
    if dense:
        registry_output_shapes("gttn", device)
    before, after = short_training("gttn", dense, device, 30)
    assert after < 0.5 * before


def test_registry_name_builds_the_catalogued_class():
    model = build("gttn", VEC)
    assert type(model) is GTTN and model.name == "gttn"


def test_each_layer_mixes_its_flattenings_by_the_softmax_of_its_own_logits():
    # Layer j's tensor is (in, out, task); its three flattenings (rows: in, out, task) are weighed by
    # exp(l_j) / sum exp(l_j) with layer j's own logits, which start at zero and then differ.
    torch.manual_seed(0)
    model = build("gttn", VEC, width=6, gttn_weight=0.5).double()
    with torch.no_grad():
        model.coefficient_logits[0].copy_(torch.tensor([2.0, -1.0, 0.5]))
        model.coefficient_logits[1].copy_(torch.tensor([-3.0, 0.0, 1.5]))
    expected = 0
    for j, logits in enumerate(model.coefficient_logits):
        w = torch.stack([model.columns[t].blocks[j][0].weight.T for t in "ab"], -1)
        d_in, d_out, n_tasks = w.shape
        flattenings = (w.reshape(d_in, -1), w.permute(1, 0, 2).reshape(d_out, -1), w.permute(2, 0, 1).reshape(n_tasks, -1))
        alpha = logits.detach().exp() / logits.detach().exp().sum()
        expected = expected + sum(a * _nuclear_by_hand(m) for a, m in zip(alpha, flattenings))
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * expected)


def test_default_penalty_weight_is_1e_3():
    """The docstring's default gttn_weight: the auxiliary loss is 1e-3 x the summed GTTN norms."""
    torch.manual_seed(0)
    model = build("gttn", VEC, width=6)
    layers = [torch.stack([model.columns[t].blocks[j][0].weight for t in "ab"], -1) for j in (0, 1)]
    uniform = torch.full((3,), 1 / 3)
    torch.testing.assert_close(model.auxiliary_loss(), 1e-3 * sum(gttn_norm(w, uniform) for w in layers))
