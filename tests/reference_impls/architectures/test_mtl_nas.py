import math

import pytest
import torch

from reference_impls.architectures.mtl_nas import MTLNAS, bernoulli_entropy
from reference_impls.architectures.registry import Problem, build

from .harness_probe import moved_by_auxiliary_step

VEC = Problem(("a", "b"), (5,), {"a": 1, "b": 2})


def test_fusion_by_hand_at_initialisation(device):
    torch.manual_seed(0)
    model = build("mtl_nas", VEC, width=4, depth=2).to(device).eval()
    with torch.no_grad():
        model.edge_logits["a"].copy_(torch.tensor([1.0, -1.0, 1.0]))  # into a: (b,0) on; then (b,0) off, (b,1) on
        model.edge_logits["b"].fill_(-1.0)  # nothing into b
    x = torch.randn(3, 5, device=device)
    ca, cb = model.columns["a"].blocks, model.columns["b"].blocks
    a0, b0 = ca[0](x), cb[0](x)
    fa0 = torch.relu(0.9 * a0 + 0.1 * b0)  # stage 0: one candidate edge, weight 0.1
    b1 = cb[1](torch.relu(0.9 * b0))
    fa1 = torch.relu(0.9 * ca[1](fa0) + 0.05 * b1)  # stage 1: two candidates, 0.1 / 2 each, (b,0) gated off
    torch.testing.assert_close(model(x)["a"], model.heads["a"](fa1))


def test_fusion_by_hand_with_trained_weights(device):
    """ReLU(W [x_t ; c_e x_s,j]) with arbitrary W: the fused feature is rectified."""
    torch.manual_seed(3)
    model = build("mtl_nas", VEC, width=4, depth=1).to(device).eval()
    with torch.no_grad():
        model.fusions["b"][0].weight.normal_()
        model.edge_logits["b"].fill_(1.0)
    x = torch.randn(6, 5, device=device)
    a0, b0 = model.columns["a"].blocks[0](x), model.columns["b"].blocks[0](x)
    fused = torch.relu(torch.cat([b0, a0], dim=1) @ model.fusions["b"][0].weight.T)
    assert (fused == 0).any()
    torch.testing.assert_close(model(x)["b"], model.heads["b"](fused))


def test_training_gates_are_sigmoid_or_relaxed_bernoulli_samples():
    model = build("mtl_nas", VEC, width=4, depth=2, hard=False).train()
    with torch.no_grad():
        model.edge_logits["a"].copy_(torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(model.gates("a"), torch.sigmoid(model.edge_logits["a"]))
    model.hard = True
    draws = torch.stack([model.gates("a") for _ in range(2000)])
    assert ((draws > 0) & (draws < 1)).all() and draws.std(0).min() > 0.1  # random, relaxed
    # P(gate > 1/2) is sigmoid(logit) for a Gumbel-sigmoid sample at any temperature
    torch.testing.assert_close((draws > 0.5).float().mean(0), torch.sigmoid(model.edge_logits["a"]).detach(),
                               atol=0.04, rtol=0)


def test_soft_gates_are_the_plain_sigmoid_whatever_the_temperature():
    model = build("mtl_nas", VEC, width=4, depth=2, hard=False, tau=0.25).train()
    with torch.no_grad():
        model.edge_logits["a"].copy_(torch.tensor([1.0, -2.0, 0.5]))
    torch.testing.assert_close(model.gates("a"), torch.sigmoid(torch.tensor([1.0, -2.0, 0.5])))


def test_relaxed_samples_sharpen_as_the_temperature_falls():
    """Gumbel-sigmoid at temperature tau: near tau -> 0 a sample is almost exactly 0 or 1."""
    share_near_0_or_1 = {}
    for tau in (0.02, 1.0):
        model = build("mtl_nas", VEC, width=4, depth=2, tau=tau).train()
        draws = torch.stack([model.gates("a") for _ in range(500)])
        share_near_0_or_1[tau] = ((draws < 0.01) | (draws > 0.99)).float().mean().item()
    assert share_near_0_or_1[0.02] > 0.9 and share_near_0_or_1[1.0] < 0.2


def test_evaluation_gate_is_on_only_for_a_strictly_positive_logit():
    """c_e = 1[logit > 0]: the edges of a freshly built model (logits 0) are all off at evaluation."""
    model = build("mtl_nas", VEC, width=4, depth=2).eval()
    assert model.gates("a").tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        model.edge_logits["a"].copy_(torch.tensor([1e-6, -1e-6, 0.0]))
    assert model.gates("a").tolist() == [1.0, 0.0, 0.0]


def test_the_last_fusion_of_a_column_is_its_tasks_own(params_with_grad):
    """Nothing reads a column after its last fusion but its head, whatever the gates."""
    torch.manual_seed(4)
    model = build("mtl_nas", VEC, width=4, depth=2)
    with torch.no_grad():
        for p in model.edge_logits.values():
            p.fill_(3.0)
    x = torch.randn(6, 5)
    for t, other in (("a", "b"), ("b", "a")):
        own = {id(p) for p in model.task_specific_parameters(t)}
        assert {id(p) for p in model.fusions[t][-1].parameters()} <= own
        assert not own & {id(p) for p in model.task_specific_parameters(other)}
        touched = params_with_grad(model, model(x)[other].square().sum())
        named = dict(model.named_parameters())
        assert not any(id(named[n]) in own for n in touched)
        assert "fusions.%s.0.weight" % t in touched  # earlier fusions feed the other column: shared


def test_all_edges_off_gives_independent_single_task_columns(device, params_with_grad):
    torch.manual_seed(1)
    model = build("mtl_nas", VEC, width=4, depth=2).to(device).eval()
    with torch.no_grad():
        for p in model.edge_logits.values():
            p.fill_(-3.0)
    touched = params_with_grad(model, model(torch.randn(6, 5, device=device))["a"].square().sum())
    assert any(n.startswith("columns.a.") for n in touched)
    assert not any(n.startswith(("columns.b.", "fusions.b.", "heads.b")) for n in touched)


def test_an_open_edge_lets_the_other_column_learn_from_this_task(device, params_with_grad):
    torch.manual_seed(2)
    model = build("mtl_nas", VEC, width=4, depth=2).to(device).eval()
    with torch.no_grad():
        model.edge_logits["a"].fill_(3.0)
    touched = params_with_grad(model, model(torch.randn(6, 5, device=device))["a"].square().sum())
    assert any(n.startswith("columns.b.") for n in touched)


def test_entropy_regulariser_values():
    torch.testing.assert_close(bernoulli_entropy(torch.zeros(3)), torch.tensor(math.log(2.0)))
    assert bernoulli_entropy(torch.tensor([30.0, -30.0])) < 1e-10
    p = torch.sigmoid(torch.tensor(0.7))
    torch.testing.assert_close(bernoulli_entropy(torch.tensor([0.7])), -(p * p.log() + (1 - p) * (1 - p).log()))
    assert torch.isfinite(bernoulli_entropy(torch.tensor([1e4, -1e4])))


def test_a_single_task_has_no_edges_and_no_entropy():
    # One task: no other column, so no candidate edges; the regulariser is 0, not the NaN mean of nothing.
    model = build("mtl_nas", Problem(("a",), (5,), {"a": 2}), width=4)
    assert model.edge_logits["a"].numel() == 0
    aux = model.auxiliary_loss()
    assert aux.item() == 0.0
    (model(torch.randn(3, 5))["a"].sum() + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_entropy_gradient_pushes_gates_to_zero_or_one():
    model = build("mtl_nas", VEC, width=4, depth=2)
    with torch.no_grad():
        model.edge_logits["a"].copy_(torch.tensor([0.5, -0.5, 2.0]))
    model.entropy_loss().backward()
    g = model.edge_logits["a"].grad
    assert g[0] < 0 and g[1] > 0 and g[2] < 0  # descent moves each logit away from 0


def test_candidate_edges_and_parameter_count(n_params):
    w, d = 4, 5
    model = build("mtl_nas", VEC, width=w, depth=2)
    assert model.sources("a", 1) == [("b", 0), ("b", 1)]
    columns = 2 * ((d * w + w) + (w * w + w))
    fusions = 2 * ((2 * w) * w + (3 * w) * w)
    assert n_params(model) == columns + fusions + 2 * 3 + (w + 1) + (2 * w + 2)


def test_short_training_lowers_the_loss(device, short_training):
    before, after = short_training("mtl_nas", True, device, 30)
    assert after < 0.7 * before


def test_registry_name_builds_the_catalogued_class():
    assert type(build("mtl_nas", VEC)) is MTLNAS


def test_auxiliary_loss_is_the_weighted_entropy_and_a_harness_step_moves_only_the_edge_logits():
    torch.manual_seed(0)
    model = build("mtl_nas", VEC, width=4, hard=False, entropy_weight=0.5)  # sigmoid gates: deterministic
    with torch.no_grad():
        for logits in model.edge_logits.values():
            logits.normal_()  # away from 1/2, where the entropy's gradient vanishes
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * model.entropy_loss())
    assert build("mtl_nas", VEC, entropy_weight=0.0).auxiliary_loss().item() == 0.0
    default = build("mtl_nas", VEC)  # the default weight is 0.1; logits 0 give entropy log 2
    torch.testing.assert_close(default.auxiliary_loss(), torch.tensor(0.1 * math.log(2.0)))
    with pytest.raises(ValueError, match="entropy_weight"):
        build("mtl_nas", VEC, entropy_weight=-1.0)
    before = {t: l.detach().clone() for t, l in model.edge_logits.items()}
    moved, auxiliary = moved_by_auxiliary_step(model, torch.randn(6, 5))
    assert auxiliary > 0 and moved == {f"edge_logits.{t}" for t in model.tasks}
    for t, logits in model.edge_logits.items():  # every gate moved away from 1/2
        assert bool((logits.abs() > before[t].abs()).all())


def test_three_tasks_edges_are_ordered_stage_by_stage_then_by_task(device):
    """With three tasks the logits (and the fusion's input blocks) of stage l list the sources
    (b, 0), (c, 0), (b, 1), (c, 1), ...: the source stage j is the outer loop, the task the inner."""
    torch.manual_seed(4)
    w = 4
    problem = Problem(("a", "b", "c"), (5,), {"a": 1, "b": 1, "c": 2})
    model = build("mtl_nas", problem, width=w, depth=2).to(device).double().eval()
    assert model.sources("a", 1) == [("b", 0), ("c", 0), ("b", 1), ("c", 1)]
    with torch.no_grad():
        for fusion in (*model.fusions["a"], *model.fusions["b"], *model.fusions["c"]):
            fusion.weight.normal_()
        for t in problem.tasks:
            model.edge_logits[t].fill_(-1.0)
        model.edge_logits["a"][3] = 1.0  # the 2 stage-0 edges, then stage 1's second: (c, 0)
    x = torch.randn(3, 5, device=device, dtype=torch.float64)
    cols = {t: model.columns[t].blocks for t in problem.tasks}
    w0, w1 = model.fusions["a"][0].weight, model.fusions["a"][1].weight  # (w, 3w) and (w, 5w)
    a0, c0 = cols["a"][0](x), cols["c"][0](x)
    fa0 = torch.relu(a0 @ w0[:, :w].T)  # both stage-0 edges closed
    fa1 = torch.relu(cols["a"][1](fa0) @ w1[:, :w].T + c0 @ w1[:, 2 * w:3 * w].T)
    torch.testing.assert_close(model(x)["a"], model.heads["a"](fa1), rtol=1e-12, atol=1e-12)


def test_three_stages_read_their_own_slices_of_the_edge_logits(device):
    """Depth 3, two tasks: a's logits are stage 0 (b,0); stage 1 (b,0), (b,1); stage 2 (b,0), (b,1), (b,2).
    Only stage 1's (b,1) edge is open; the last fusion of a column is its task's own."""
    torch.manual_seed(0)
    model = build("mtl_nas", VEC, width=4, depth=3).to(device).eval()
    with torch.no_grad():
        model.edge_logits["a"].copy_(torch.tensor([-1.0, -1.0, 1.0, -1.0, -1.0, -1.0]))
        model.edge_logits["b"].fill_(-1.0)
    x = torch.randn(3, 5, device=device)
    ca, cb = model.columns["a"].blocks, model.columns["b"].blocks
    b0 = cb[0](x)
    b1 = cb[1](torch.relu(0.9 * b0))
    fa0 = torch.relu(0.9 * ca[0](x))
    fa1 = torch.relu(0.9 * ca[1](fa0) + 0.1 / 2 * b1)
    fa2 = torch.relu(0.9 * ca[2](fa1))  # every stage-2 edge closed
    torch.testing.assert_close(model(x)["a"], model.heads["a"](fa2))
    own = {id(p) for p in model.task_specific_parameters("a")}
    assert id(model.fusions["a"][2].weight) in own and id(model.fusions["a"][1].weight) not in own


def test_relaxed_gates_are_drawn_from_the_model_s_own_generator():
    draws = []
    for global_seed in (1, 2):
        model = build("mtl_nas", VEC, width=4, depth=2, seed=3).train()
        torch.manual_seed(global_seed)
        draws.append(model.gates("a"))
    torch.testing.assert_close(draws[0], draws[1])
