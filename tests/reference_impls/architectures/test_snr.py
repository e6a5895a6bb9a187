import copy
import math

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.snr import SNR, HardConcrete

VEC = Problem(("a", "b"), (6,), {"a": 1, "b": 2})


def test_training_z_is_in_unit_interval_with_exact_zeros_and_ones():
    gate = HardConcrete((4,), torch.Generator().manual_seed(0), init_log_alpha=0.0)
    z = gate.sample(2000)
    assert ((z >= 0) & (z <= 1)).all()
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()


def test_eval_z_is_deterministic_and_training_z_is_seeded(device):
    model = build("snr", VEC, seed=7).to(device)
    model.train()
    first, second = model.coding_variables()["a"], model.coding_variables()["a"]
    assert not torch.equal(first, second)  # a fresh sample each call
    twin = build("snr", VEC, seed=7).to(device)
    torch.testing.assert_close(twin.coding_variables()["a"], first)  # same seed, same draw
    model.eval()
    z = model.coding_variables()["b"]
    torch.testing.assert_close(model.coding_variables()["b"], z)
    expected = (torch.sigmoid(model.codes["b"].log_alpha) * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(z, expected)


def open_every_connection(model: SNR) -> None:
    with torch.no_grad():
        for code in model.codes.values():
            code.log_alpha.fill_(20.0)  # sigmoid(20) * 1.2 - 0.1 > 1: clamped to exactly 1


@pytest.mark.parametrize("transform", (True, False))
def test_all_ones_z_is_a_fixed_dense_connection(device, transform):
    torch.manual_seed(1)
    model = build("snr", VEC, transform=transform, num_subnetworks=3).eval().to(device)
    open_every_connection(model)
    assert all((z == 1).all() for z in model.coding_variables().values())
    x = torch.randn(5, 6, device=device)
    v = torch.cat([s(x) for s in model.subnetworks], -1)  # (B, 3 w)
    for t in VEC.tasks:
        if transform:  # one fixed matrix [W_t1 W_t2 W_t3] on the concatenated sub-networks
            dense = torch.cat([w.weight for w in model.transforms[t]], 1)
        else:  # SNR-Aver: the plain sum of the sub-networks
            dense = torch.eye(16, device=device).repeat(1, 3)
        torch.testing.assert_close(model(x)[t], model.towers[t](v @ dense.T))


def test_a_closed_connection_is_cut_for_its_task_only(device, params_with_grad):
    """Each task routes through its own z: a cuts sub-network 1, b cuts sub-network 0."""
    torch.manual_seed(2)
    model = build("snr", VEC, num_subnetworks=3).eval().to(device)
    with torch.no_grad():
        model.codes["a"].log_alpha.copy_(torch.tensor([20.0, -20.0, 20.0]))  # z_a = (1, 0, 1)
        model.codes["b"].log_alpha.copy_(torch.tensor([-20.0, 20.0, 20.0]))  # z_b = (0, 1, 1)
    x = torch.randn(8, 6, device=device)
    for t, cut, other in (("a", 1, "b"), ("b", 0, "a")):
        touched = params_with_grad(model, model(x)[t].sum())
        subnetworks = {int(n.split(".")[1]) for n in touched if n.startswith("subnetworks.")}
        assert subnetworks == {0, 1, 2} - {cut}
        assert not any(n.startswith((f"codes.{other}", f"transforms.{other}", f"towers.{other}")) for n in touched)


def test_l0_penalty_is_the_expected_number_of_open_connections():
    gate = HardConcrete((3,), torch.Generator().manual_seed(3))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.5]))
    closed_form = torch.sigmoid(gate.log_alpha - (2 / 3) * math.log(0.1 / 1.1)).sum()
    torch.testing.assert_close(gate.l0_penalty(), closed_form)
    monte_carlo = (gate.sample(40000) > 0).float().mean(0).sum()
    assert abs(monte_carlo.item() - closed_form.item()) < 0.03


def test_auxiliary_loss_is_weighted_l0_and_trains_log_alpha():
    model = build("snr", VEC, l0_weight=0.5)
    torch.testing.assert_close(model.auxiliary_loss(), 0.5 * model.l0_penalty())
    (grad,) = torch.autograd.grad(model.auxiliary_loss(), model.codes["a"].log_alpha)
    assert (grad > 0).all()  # descending it closes connections
    assert build("snr", VEC).auxiliary_loss().item() == 0.0  # opt-in
    copy.deepcopy(model)(torch.randn(2, 6))  # the noise generator survives copies


def test_connections_start_mostly_open_and_the_penalty_counts_every_task_and_connection():
    model = build("snr", VEC, num_subnetworks=3).eval()
    z0 = 1.2 / (1 + math.exp(-2.0)) - 0.1  # log alpha = 2: sigmoid(2) (zeta - gamma) + gamma
    assert z0 == pytest.approx(0.957, abs=1e-3)
    for z in model.coding_variables().values():
        torch.testing.assert_close(z, torch.full((3,), z0))
    p_open = 1 / (1 + math.exp(-(2.0 - (2 / 3) * math.log(0.1 / 1.1))))
    assert model.l0_penalty().item() == pytest.approx(2 * 3 * p_open)  # summed over 2 tasks x 3 connections
    with torch.no_grad():
        model.codes["b"].log_alpha.fill_(-1e4)  # b's connections surely closed: only a's count
    assert model.l0_penalty().item() == pytest.approx(3 * p_open)


def test_every_connection_of_every_task_draws_its_own_noise():
    # z_ij are independent variables: over many training draws no two of the 2 x 3 are correlated.
    model = build("snr", VEC, num_subnetworks=3, seed=4).train()
    with torch.no_grad():
        for code in model.codes.values():
            code.log_alpha.zero_()  # the same distribution everywhere, z often strictly inside (0, 1)
    draws = torch.stack([torch.cat(list(model.coding_variables().values())) for _ in range(400)])
    corr = torch.corrcoef(draws.T)
    assert (corr - torch.eye(6)).abs().max() < 0.25


def test_parameter_count(n_params):
    d, w, K, T = 6, 16, 3, 2
    trans = build("snr", VEC, width=w, depth=1, num_subnetworks=K)
    subnetworks = K * (d * w + w)
    towers = 2 * (w * w + w) + (w + 1) + (2 * w + 2)
    assert n_params(trans) == subnetworks + T * K * w * w + T * K + towers
    aver = build("snr", VEC, width=w, depth=1, num_subnetworks=K, transform=False)
    assert n_params(aver) == subnetworks + T * K + towers


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("snr", device)
    first, last = short_training("snr", dense, device, steps=20)
    assert last < 0.7 * first


def test_registry_name_builds_the_catalogued_class():
    model = build("snr", VEC)
    assert type(model) is SNR and model.name == "snr"


@pytest.mark.parametrize("transform", (True, False))
def test_each_task_claims_its_codes_transforms_and_tower_which_no_other_task_reaches(split_by_task, transform):
    """Task t's z, its W_tj (SNR-Trans only) and its tower; the sub-networks serve every task."""
    torch.manual_seed(0)
    model = build("snr", VEC, transform=transform, num_subnetworks=2).eval()
    split = split_by_task(model, torch.randn(4, 6))
    names = {n for n, _ in model.named_parameters()}
    for t, (claimed, reached) in split.items():
        other = next(o for o in VEC.tasks if o != t)
        own = {n for n in names if n.startswith((f"codes.{t}.", f"transforms.{t}.", f"towers.{t}."))}
        assert claimed == own == reached - split[other][1]
        assert any(n.startswith("transforms.") for n in own) == transform


def test_direct_construction_defaults_to_snr_trans_without_l0_penalty():
    """SNR-Trans is the default and the L0 weight defaults to 0 (module docstring)."""
    torch.manual_seed(0)
    model = SNR(("a", "b"), lambda: torch.nn.Linear(6, 4), 2, 4, {t: torch.nn.Linear(4, 1) for t in ("a", "b")})
    assert model.transform and model.transforms is not None
    assert model.auxiliary_loss().item() == 0.0 and model.l0_penalty().item() > 0
