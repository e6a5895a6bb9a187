import copy

import pytest
import torch

from reference_impls.architectures.dselect_k import DSelectKGate, smooth_step
from reference_impls.architectures.dselect_k import DSelectK
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_smooth_step_is_c1_and_saturates(device):
    gamma = 2.0
    t = torch.linspace(-2, 2, 401, device=device, dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, gamma)
    assert s[t <= -1].abs().max() == 0 and (s[t >= 1] - 1).abs().max() == 0
    assert (s.diff() >= 0).all()  # monotone
    (grad,) = torch.autograd.grad(s.sum(), t)
    edges = torch.tensor([-1.0, 1.0], device=device, dtype=torch.float64, requires_grad=True)
    (edge_grad,) = torch.autograd.grad(smooth_step(edges, gamma).sum(), edges)
    assert edge_grad.abs().max() < 1e-12  # derivative vanishes where S meets 0 and 1
    torch.testing.assert_close(grad.max(), torch.tensor(0.75, dtype=torch.float64, device=device))


@pytest.mark.parametrize("per_example", [False, True])
def test_gate_is_a_distribution(device, per_example):
    torch.manual_seed(8)
    gate = DSelectKGate(8, k=3, gamma=1.0, in_features=6 if per_example else None).to(device)
    q = gate(torch.randn(11, 6, device=device))
    assert q.shape == (11, 8) and (q >= 0).all()
    torch.testing.assert_close(q.sum(-1), torch.ones(11, device=device))


def test_binary_selectors_pick_at_most_k_experts(device):
    torch.manual_seed(8)
    gate = DSelectKGate(16, k=3, gamma=1.0).to(device)
    with torch.no_grad():  # every |z| >= gamma/2: each selector is a one-hot code
        gate.z.copy_(torch.randn(3, 4).sign() * 0.6)
        gate.alpha.copy_(torch.tensor([0.1, -0.4, 1.2]))
    q = gate(torch.zeros(2, 1, device=device))
    assert (q > 0).sum(-1).max() <= 3
    chosen = [int(sum(int(b > 0) << j for j, b in enumerate(z))) for z in gate.z.cpu()]
    expected = torch.zeros(16, device=device)
    for weight, i in zip(torch.softmax(gate.alpha, 0), chosen):
        expected[i] += weight
    torch.testing.assert_close(q[0], expected)
    assert gate.entropy(torch.zeros(1, 1, device=device)).item() == 0.0


def test_entropy_positive_before_binary_and_training_it_makes_the_gate_sparse(device):
    torch.manual_seed(8)
    gate = DSelectKGate(8, k=2, gamma=1.0).to(device)
    x = torch.zeros(1, 1, device=device)
    assert gate.entropy(x).item() > 0
    opt = torch.optim.SGD(gate.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        gate.entropy(x).backward()
        opt.step()
    assert gate.entropy(x).item() < 1e-6
    assert (gate(x) > 1e-6).sum().item() <= 2


def test_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        DSelectKGate(6, k=2)


def test_gates_are_task_specific(device, params_with_grad):
    torch.manual_seed(8)
    model = build("dselect_k", VEC, num_experts=4, k=2, per_example=True).to(device)
    x = torch.randn(8, 6, device=device)
    for task, other in (("a", "b"), ("b", "a")):  # both, so sharing the first task's gate fails
        touched = params_with_grad(model, model(x)[task].sum())
        assert not any(n.startswith((f"gates.{other}", f"towers.{other}")) for n in touched)
        assert any(n.startswith(f"gates.{task}") for n in touched)


def test_parameter_count(n_params):
    d, w, n, k = 6, 16, 4, 2
    static = build("dselect_k", VEC, width=w, depth=1, num_experts=n, k=k)
    experts = n * (d * w + w)
    towers = (w + 1) + (2 * w + 2)
    m = 2  # log2(n)
    assert n_params(static) == experts + 2 * (k + k * m) + towers
    dynamic = build("dselect_k", VEC, width=w, depth=1, num_experts=n, k=k, per_example=True)
    assert n_params(dynamic) == experts + 2 * ((d * k + k) + (d * k * m + k * m)) + towers


def test_registry_name_builds_the_catalogued_class():
    """catalog/papers.yaml links this paper to DSelectK; the registry name must build exactly it."""
    model = build("dselect_k", VEC, num_experts=4, k=2, per_example=True)
    assert type(model) is DSelectK
    assert model.name == "dselect_k"


def test_auxiliary_loss_is_the_weighted_entropy_of_the_last_forward_pass(device):
    torch.manual_seed(8)
    model = build("dselect_k", VEC, num_experts=4, k=2, per_example=True, entropy_weight=0.2).to(device)
    with pytest.raises(RuntimeError, match="forward"):
        model.auxiliary_loss()
    for batch in (3, 7):
        x = torch.randn(batch, 6, device=device)
        model(x)
        entropy = model.entropy(x)
        assert entropy.item() > 0
        torch.testing.assert_close(model.auxiliary_loss(), 0.2 * entropy)
    (grad,) = torch.autograd.grad(model.auxiliary_loss(), model.gates["a"].z_net[1].weight)
    assert grad.abs().sum() > 0  # it trains the gates
    unweighted = build("dselect_k", VEC, num_experts=4, k=2)
    unweighted(torch.randn(3, 6))
    assert unweighted.auxiliary_loss().item() == 0.0  # default weight 0: opt-in
    copied = copy.deepcopy(model)  # a cached graph must not break copies
    with pytest.raises(RuntimeError, match="forward"):
        copied.auxiliary_loss()


def selector_by_hand(z, gamma):
    """r(z) for one selector z in R^m, expert i read as the bits of i (bit j = i >> j & 1)."""
    s = smooth_step(z, gamma)
    return torch.stack([
        torch.stack([s[j] if (i >> j) & 1 else 1 - s[j] for j in range(len(z))]).prod()
        for i in range(2 ** len(z))
    ])


def per_example_by_hand(gate, x):
    """alpha_b = A x_b + a and Z_b = W x_b + w (rows: selectors), one sample at a time."""
    lin_a, lin_z = gate.alpha_net[1], gate.z_net[1]
    for xb in x.flatten(1):
        yield lin_a.weight @ xb + lin_a.bias, (lin_z.weight @ xb + lin_z.bias).view(gate.k, gate.m)


def test_per_example_gate_is_q_of_linear_functions_of_each_input_by_hand(device):
    torch.manual_seed(8)
    gate = DSelectKGate(8, k=3, gamma=2.0, in_features=6).to(device)
    x = torch.randn(4, 6, device=device)
    expected = [sum(w * selector_by_hand(z_i, 2.0) for w, z_i in zip(torch.softmax(alpha, 0), z))
                for alpha, z in per_example_by_hand(gate, x)]
    q = gate(x)
    torch.testing.assert_close(q, torch.stack(expected))
    assert not torch.allclose(q[0], q[1])  # the gate depends on the example


def test_entropy_is_batch_mean_of_summed_selector_entropies_by_hand(device):
    torch.manual_seed(8)
    gate = DSelectKGate(8, k=3, gamma=2.0, in_features=6).to(device)
    x = torch.randn(5, 6, device=device)
    per_sample = []
    for _, z in per_example_by_hand(gate, x):
        rs = [selector_by_hand(z_i, 2.0) for z_i in z]
        per_sample.append(sum(-(r * r.clamp_min(1e-12).log()).sum() for r in rs))
    assert len(set(round(h.item(), 4) for h in per_sample)) > 1  # samples differ, so mean != any one
    torch.testing.assert_close(gate.entropy(x), torch.stack(per_sample).mean())


def test_class_default_entropy_weight_is_zero():
    towers = {"a": torch.nn.Linear(3, 1), "b": torch.nn.Linear(3, 2)}
    model = DSelectK(("a", "b"), lambda: torch.nn.Linear(6, 3), num_experts=4, k=2, towers=towers)
    assert model.entropy_weight == 0.0
    model(torch.randn(2, 6))
    assert model.auxiliary_loss().item() == 0.0


def test_fresh_static_selectors_start_inside_the_smooth_region():
    """|z| < gamma/2 at init: S is not saturated, so every selector coordinate gets a gradient."""
    torch.manual_seed(8)
    gate = DSelectKGate(16, k=4, gamma=3.0)
    assert gate.z.abs().max() < 1.5
    (grad,) = torch.autograd.grad(gate.entropy(torch.zeros(1, 1)), gate.z)
    assert (grad != 0).all()


def test_fresh_per_example_selectors_start_inside_the_smooth_region():
    """The official initialisers: Z's weights and biases from U(-gamma/100, gamma/100), alpha's
    from U(-0.05, 0.05), so on standard-normal inputs hardly any selector starts where S is flat
    (with nn.Linear's default initialisation about 40 % did, and got no gradient)."""
    torch.manual_seed(0)
    gate = DSelectKGate(8, k=2, gamma=1.0, in_features=784)
    w, b = gate.z_net[1].weight, gate.z_net[1].bias
    assert w.abs().max() <= 0.01 and b.abs().max() <= 0.01 and w.std() > 0.004  # U(-0.01, 0.01), not zero
    # 4704 draws reach within 0.5 % of both ends of U(-gamma/100, gamma/100): the range is the symmetric one
    assert w.min() < -0.995 * 0.01 and w.max() > 0.995 * 0.01
    a = gate.alpha_net[1].weight
    assert a.abs().max() <= 0.05 and a.std() > 0.02
    x = torch.randn(256, 784)
    _, z = gate.parameters_for(x)
    (grad,) = torch.autograd.grad(smooth_step(z, 1.0).sum(), z)
    assert ((z.abs() >= 0.5) == (grad == 0)).all()  # flat exactly where saturated
    assert (z.abs() >= 0.5).float().mean() < 0.01


def test_fresh_static_selectors_fill_the_whole_smooth_region():
    """The static gate draws Z from U(-gamma/2, gamma/2): inside the smooth region, and filling it
    on both sides (4000 draws come within 2 % of each end), so no selector starts biased to one code."""
    torch.manual_seed(8)
    gamma = 2.0
    z = DSelectKGate(2, k=4000, gamma=gamma).z
    assert z.shape == (4000, 1)
    assert z.abs().max() < gamma / 2
    assert z.min() < -0.98 * gamma / 2 and z.max() > 0.98 * gamma / 2
    assert z.mean().abs() < 0.05


def test_two_experts_is_the_smallest_gate_and_reads_one_bit():
    """n = 2 is a power of two (m = 1): expert 1 gets S(z), expert 0 gets 1 - S(z). n < 2 and
    n that are not powers of two are refused."""
    gate = DSelectKGate(2, k=1, gamma=1.0)
    with torch.no_grad():
        gate.z.fill_(0.25)
    s = -2.0 * 0.25**3 + 1.5 * 0.25 + 0.5  # the cubic at t = 0.25 with gamma = 1: 0.84375
    torch.testing.assert_close(gate(torch.zeros(3, 1)), torch.tensor([[1 - s, s]] * 3))
    for bad in (0, 1, 3, 6, 12):
        with pytest.raises(ValueError, match="power-of-two"):
            DSelectKGate(bad, k=1)


def test_default_gamma_is_one_as_in_the_official_code():
    """gamma = 1 by default (the official DSelectKGate's default), for the gate and for the model."""
    assert DSelectKGate(4, k=2).gamma == 1.0
    model = build("dselect_k", VEC, num_experts=4, k=2)
    assert {model.gates[t].gamma for t in VEC.tasks} == {1.0}
    towers = {"a": torch.nn.Linear(3, 1), "b": torch.nn.Linear(3, 2)}
    direct = DSelectK(("a", "b"), lambda: torch.nn.Linear(6, 3), num_experts=4, k=2, towers=towers)
    assert {direct.gates[t].gamma for t in ("a", "b")} == {1.0}


def test_binary_codes_are_derived_not_saved():
    """The expert codes l(i) follow from num_experts, so a checkpoint holds only the learned
    parameters and loads into a freshly built gate with strict key matching."""
    for in_features in (None, 6):
        gate = DSelectKGate(8, k=2, in_features=in_features)
        assert set(gate.state_dict()) == {n for n, _ in gate.named_parameters()}
        DSelectKGate(8, k=2, in_features=in_features).load_state_dict(gate.state_dict())
