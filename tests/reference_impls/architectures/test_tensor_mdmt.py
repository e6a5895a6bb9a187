"""Tensor MDL/MTL: the gated network equals the Tucker tensor contracted with the descriptors."""

import math

import pytest
import torch
from torch import nn

from reference_impls.architectures import registry
from reference_impls.architectures.tensor_mdmt import TensorMDMT, TuckerDescriptorLinear


def layer(device, rank=3, dims=(3, 2)):
    torch.manual_seed(0)
    return TuckerDescriptorLinear(4, 2, dims, rank).to(device)


def test_gated_network_equals_explicit_tensor_contraction(device):
    lin = layer(device)
    s, (u_o, u_i, u_t, u_d) = lin.core, list(lin.factors)
    full = torch.einsum("abcd,ia,jb,kc,ld->ijkl", s, u_o, u_i, u_t, u_d)  # Tucker product by hand
    torch.testing.assert_close(lin.full_tensor(), full)
    z_t, z_d = torch.tensor([0.0, 1.0, 0.0], device=device), torch.tensor([0.3, -2.0], device=device)
    w = torch.einsum("ijkl,k,l->ij", full, z_t, z_d)
    torch.testing.assert_close(lin.weight([z_t, z_d]), w)
    h = torch.randn(5, 4, device=device)
    torch.testing.assert_close(lin(h, [z_t, z_d]), h @ w[:, :4].T + w[:, 4])  # last column = bias
    maps = torch.randn(2, 4, 3, 3, device=device)  # per pixel on feature maps
    expected = torch.einsum("oi,bihw->bohw", w[:, :4], maps) + w[:, 4].view(1, -1, 1, 1)
    torch.testing.assert_close(lin(maps, [z_t, z_d]), expected)


def test_superdiagonal_core_is_elementwise_gating(device):
    lin = layer(device, rank=2, dims=(3, 2))
    with torch.no_grad():
        lin.core.zero_()
        for r in range(2):
            lin.core[r, r, r, r] = 1.0
    u_o, u_i, u_t, u_d = list(lin.factors)
    h, z_t, z_d = torch.randn(5, 4, device=device), torch.randn(3, device=device), torch.randn(2, device=device)
    h1 = torch.cat([h, torch.ones(5, 1, device=device)], 1)
    gated = (h1 @ u_i) * (z_t @ u_t) * (z_d @ u_d)  # CP: descriptors gate the hidden units
    torch.testing.assert_close(lin(h, [z_t, z_d]), gated @ u_o.T)


def test_identity_factors_give_one_free_model_per_pair(device):
    """Full ranks with identity factors: the one-hot pair (t, d) reads slice W[:, :, t, d] alone."""
    lin = layer(device, rank=8)
    with torch.no_grad():
        for u in lin.factors:
            u.copy_(torch.eye(u.shape[0], device=device))
    e = torch.eye(3, device=device), torch.eye(2, device=device)
    torch.testing.assert_close(lin.weight([e[0][2], e[1][1]]), lin.core[:, :, 2, 1])
    lin.weight([e[0][2], e[1][1]]).sum().backward()
    touched = lin.core.grad.abs().sum(dim=(0, 1)) > 0
    assert touched.nonzero().tolist() == [[2, 1]]


def test_multilinear_in_each_descriptor_for_zero_shot_codes(device):
    lin = layer(device)
    z1, z2, d = torch.randn(3, device=device), torch.randn(3, device=device), torch.randn(2, device=device)
    torch.testing.assert_close(lin.weight([0.4 * z1 + 0.6 * z2, d]),
                               0.4 * lin.weight([z1, d]) + 0.6 * lin.weight([z2, d]))
    # ... but a product across modes, not a sum: scaling both codes scales the model by the product.
    torch.testing.assert_close(lin.weight([2 * z1, 3 * d]), 6 * lin.weight([z1, d]))
    d2 = torch.randn(2, device=device)
    assert not torch.allclose(lin.weight([z1 + z2, d + d2]), lin.weight([z1, d]) + lin.weight([z2, d2]))


def test_parameter_count_is_core_plus_factors():
    lin = TuckerDescriptorLinear(6, 3, (4, 5), rank=2)
    shape, ranks = (3, 7, 4, 5), (2, 2, 2, 2)
    assert sum(p.numel() for p in lin.parameters()) == math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks))


def test_core_starts_with_variance_one_over_its_largest_input_rank():
    """Core entries ~ N(0, 1 / max(ranks[1:])), so the reconstructed weights start on a scale that
    does not grow with the ranks (4096 entries here: the sample variance is within a few %)."""
    torch.manual_seed(0)
    lin = TuckerDescriptorLinear(39, 16, (16,), rank=16)  # shape (16, 40, 16), ranks (16, 16, 16)
    assert lin.core.var().item() == pytest.approx(1 / 16, rel=0.1)

def test_factors_start_with_variance_one_over_their_row_count():
    """Each factor U (n x r) is drawn from N(0, 1 / n), so U^T z of a unit code starts at unit scale."""
    torch.manual_seed(0)
    lin = TuckerDescriptorLinear(199, 64, (64,), rank=16)  # factors 64 x 16, 200 x 16, 64 x 16
    for factor, n in zip(lin.factors, (64, 200, 64)):
        assert factor.var().item() == pytest.approx(1 / n, rel=0.2)

def test_task_domain_grid_serves_an_unseen_pair(device):
    torch.manual_seed(0)
    model = TensorMDMT.task_domain_grid(["cls", "reg"], ["cam1", "cam2"], nn.Identity(), 4, 1, rank=4).to(device)
    assert model.tasks == ("cls@cam1", "cls@cam2", "reg@cam1", "reg@cam2")
    x = torch.randn(3, 4, device=device)
    out = model(x)
    codes = model.task_descriptors("reg@cam2")
    assert codes[0].tolist() == [0, 1] and codes[1].tolist() == [0, 1]
    task_code, domain_code = model.task_descriptors("cls@cam2")  # task mode first, then domain
    assert task_code.tolist() == [1, 0] and domain_code.tolist() == [0, 1]
    torch.testing.assert_close(out["reg@cam2"], model.decode_with_descriptors(x, codes))
    assert all(list(model.task_specific_parameters(t)) == [] for t in model.tasks)
    with pytest.raises(ValueError):
        TensorMDMT(("a", "b"), nn.Identity(), 4, {"a": 1, "b": 1}, [torch.eye(3)])


def test_registry_builds_vector_and_dense_problems(device):
    vec = registry.build("tensor_mdmt", registry.Problem(("a", "b"), (10,), {"a": 1, "b": 3}), width=8)
    out = vec.to(device)(torch.randn(2, 10, device=device))
    assert out["a"].shape == (2, 1) and out["b"].shape == (2, 3)
    img = registry.Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True)
    out = registry.build("tensor_mdmt", img, width=8).to(device)(torch.randn(2, 3, 8, 8, device=device))
    assert out["seg"].shape == (2, 5, 8, 8) and out["depth"].shape == (2, 1, 8, 8)


@pytest.mark.parametrize("dense", (True, False))
def test_short_training_lowers_loss(device, dense, short_training):
    first, last = short_training("tensor_mdmt", dense, device, steps=15)
    assert last < 0.7 * first


def test_pooled_image_tasks_read_the_spatial_mean_of_the_trunk():
    torch.manual_seed(0)
    problem = registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=False)
    model = registry.build("tensor_mdmt", problem, width=6)
    x = torch.randn(3, 2, 4, 4)
    h = model.encoder[0](x).mean(dim=(2, 3))
    out = model(x)
    for k, t in enumerate(problem.tasks):  # default descriptors: task k's one-hot code
        expected = model.decode_with_descriptors(h, [torch.eye(2)[k]])[:, : problem.out_dims[t]]
        torch.testing.assert_close(out[t], expected)


def test_core_variance_uses_the_largest_rank_after_the_output_mode():
    """ranks (32, 32, 4): the input mode's 32 sets the variance 1 / 32, not the descriptor's 4."""
    torch.manual_seed(0)
    lin = TuckerDescriptorLinear(39, 32, (4,), rank=32)
    assert lin.core.shape == (32, 32, 4)
    assert lin.core.var().item() == pytest.approx(1 / 32, rel=0.1)


def test_rank_and_depth_reach_the_model_from_every_constructor():
    vec = registry.Problem(("a", "b"), (6,), {"a": 1, "b": 2})
    model = TensorMDMT.from_problem(vec, width=8, depth=3, rank=2)
    assert model.generator.core.shape == (2, 2, 2)  # every mode capped at rank 2
    assert len([m for m in model.encoder.modules() if isinstance(m, nn.Linear)]) == 3
    direct = TensorMDMT(("a", "b"), nn.Identity(), 6, {"a": 1, "b": 1}, rank=1)
    assert direct.generator.core.shape == (1, 1, 1)
    grid = TensorMDMT.task_domain_grid(["t"], ["d1", "d2"], nn.Identity(), 6, 3, rank=2)
    assert grid.generator.core.shape == (2, 2, 1, 2)  # out 3, in 7, one task, two domains: capped at 2


def test_zero_shot_codes_of_another_dtype_are_cast_to_the_model_s():
    torch.manual_seed(0)
    lin = TuckerDescriptorLinear(4, 2, (3, 2), rank=3).double()
    h = torch.randn(5, 4, dtype=torch.float64)
    codes32 = [torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.4])]
    codes64 = [c.double() for c in codes32]
    torch.testing.assert_close(lin(h, codes32), lin(h, codes64))
    torch.testing.assert_close(lin.weight(codes32), lin.weight(codes64))
