import torch
from torch.nn import functional as F

from reference_impls.architectures.asp_mtl import ASPMTL, orthogonality_penalty, reverse_gradient
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward(device):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    upstream = torch.randn(4, 3, device=device)
    y = reverse_gradient(x, 0.7)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * upstream)


def test_orthogonality_penalty_by_hand(device):
    s = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], device=device)
    h = torch.tensor([[1.0, 0.0, 2.0], [2.0, 1.0, 0.0], [0.0, 1.0, 1.0]], device=device)
    # S^T H = [[1, 3, 5], [4, 0, 3]], squared entries sum to 1+9+25+16+0+9
    assert orthogonality_penalty(s, h).item() == 60.0
    # dense maps: every (example, position) is a row
    s_map, h_map = torch.randn(2, 3, 2, 2, device=device), torch.randn(2, 4, 2, 2, device=device)
    rows_s = s_map.permute(0, 2, 3, 1).reshape(8, 3)
    rows_h = h_map.permute(0, 2, 3, 1).reshape(8, 4)
    torch.testing.assert_close(orthogonality_penalty(s_map, h_map), (rows_s.T @ rows_h).pow(2).sum())


def _difference_by_hand(model, x, ids):
    """sum_k ||S^k^T H^k||_F^2 from the encoders directly, task k's rows only."""
    shared = model.shared_encoder(x)
    return sum(orthogonality_penalty(shared[ids == k], model.private_encoders[t](x)[ids == k])
               for k, t in enumerate(VEC.tasks))


def test_auxiliary_loss_is_weighted_adversarial_plus_difference(device):
    torch.manual_seed(0)
    model = build("asp_mtl", VEC, adversarial_weight=0.3, orthogonality_weight=0.2).to(device)
    x, ids = torch.randn(9, 6, device=device), torch.arange(9, device=device) % 3
    model(x, task_ids=ids)
    shared = model.shared_encoder(x)
    adversarial = F.cross_entropy(model.discriminator(shared), ids)
    torch.testing.assert_close(model.auxiliary_loss(), 0.3 * adversarial + 0.2 * _difference_by_hand(model, x, ids))


def test_discriminator_and_encoder_get_opposite_gradients_from_adversarial_term(device):
    torch.manual_seed(0)
    lam = 0.5
    model = build("asp_mtl", VEC, adversarial_weight=1.0, orthogonality_weight=0.0, reversal=lam).to(device)
    x, ids = torch.randn(9, 6, device=device), torch.arange(9, device=device) % 3
    model(x, task_ids=ids)
    aux = model.auxiliary_loss()
    enc = list(model.shared_encoder.parameters())
    disc = list(model.discriminator.parameters())
    got = torch.autograd.grad(aux, enc + disc)
    plain = F.cross_entropy(model.discriminator(model.shared_encoder(x)), ids)  # no reversal
    want = torch.autograd.grad(plain, enc + disc)
    for g, w in zip(got[: len(enc)], want[: len(enc)]):
        torch.testing.assert_close(g, -lam * w)  # encoder ascends the discriminator's loss
    for g, w in zip(got[len(enc):], want[len(enc):]):
        torch.testing.assert_close(g, w)  # discriminator descends it
    assert any(w.abs().sum() > 0 for w in want[: len(enc)])


def test_without_task_ids_adversarial_term_is_zero_and_private_encoders_are_task_specific(device, params_with_grad):
    torch.manual_seed(0)
    model = build("asp_mtl", VEC, orthogonality_weight=0.0).to(device)
    x = torch.randn(5, 6, device=device)
    out = model(x)
    assert model.auxiliary_loss().item() == 0.0
    touched = params_with_grad(model, out["a"].sum())
    assert any(n.startswith("shared_encoder.") for n in touched)
    assert any(n.startswith("private_encoders.a.") for n in touched)
    assert not any(n.startswith(("private_encoders.b", "heads.b", "discriminator")) for n in touched)
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) not in shared for p in model.private_encoders["c"].parameters())


def test_parameter_count(n_params):
    d, w, K = 6, 16, 3
    model = build("asp_mtl", VEC, width=w, depth=1)
    encoders = (1 + K) * (d * w + w)
    heads = (2 * w + 1) + (2 * w * 2 + 2) + (2 * w + 1)
    discriminator = w * K + K
    assert n_params(model) == encoders + heads + discriminator


def test_reversal_keeps_the_discriminator_from_winning():
    """Task b's inputs are shifted. With the reversal the encoder fights the discriminator and its
    loss stays high; with the sign flipped (encoder helps it) the same training drives it to zero."""
    problem = Problem(("a", "b"), (4,), {"a": 1, "b": 1})
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(64) % 2
    x[ids == 1] += 3.0
    final = {}
    for reversal in (1.0, -1.0):
        torch.manual_seed(0)
        model = build("asp_mtl", problem, width=8, depth=1, adversarial_weight=1.0,
                      orthogonality_weight=0.0, reversal=reversal)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(150):
            opt.zero_grad()
            model(x, task_ids=ids)
            model.auxiliary_loss().backward()
            opt.step()
        model(x, task_ids=ids)
        final[reversal] = model.auxiliary_loss().item()
    assert final[-1.0] < 0.05
    assert final[1.0] > 0.5  # near or above log 2: the discriminator cannot tell the tasks apart


def test_short_training_lowers_the_loss(device, short_training):
    first, last = short_training("asp_mtl", True, device, 30)
    assert last < 0.5 * first


def test_registry_name_builds_the_catalogued_class(device, registry_output_shapes):
    assert type(build("asp_mtl", VEC)) is ASPMTL
    registry_output_shapes("asp_mtl", device)


def test_each_head_reads_shared_then_its_own_private_features(device):
    torch.manual_seed(0)
    model = build("asp_mtl", VEC).to(device)
    x = torch.randn(5, 6, device=device)
    out = model(x)
    shared = model.shared_encoder(x)
    for t in VEC.tasks:
        torch.testing.assert_close(out[t], model.heads[t](torch.cat([shared, model.private_encoders[t](x)], dim=1)))


def test_task_specific_parameters_are_what_only_that_task_reaches(params_with_grad):
    """Task t's output reaches the shared encoder plus exactly the private encoder and head it claims."""
    torch.manual_seed(0)
    model = build("asp_mtl", VEC)
    names = {id(p): n for n, p in model.named_parameters()}
    encoder = {n for n in names.values() if n.startswith("shared_encoder.")}
    for t in VEC.tasks:
        own = {names[id(p)] for p in model.task_specific_parameters(t)}
        assert own == {n for n in names.values() if n.startswith((f"private_encoders.{t}.", f"heads.{t}."))}
        assert params_with_grad(model, model(torch.randn(5, 6))[t].sum()) == own | encoder


def test_difference_term_trains_both_the_shared_and_the_private_encoders():
    """Eq. 14 is a loss on both spaces: its gradient reaches the shared encoder as well as the
    private ones, the same gradient as the hand-computed penalty's."""
    torch.manual_seed(1)
    model = build("asp_mtl", VEC, adversarial_weight=0.0, orthogonality_weight=0.2).double()
    x, ids = torch.randn(9, 6, dtype=torch.float64), torch.arange(9) % 3
    model(x, task_ids=ids)
    encoders = [*model.shared_encoder.parameters(), *model.private_encoders.parameters()]
    got = torch.autograd.grad(model.auxiliary_loss(), encoders)
    want = torch.autograd.grad(0.2 * _difference_by_hand(model, x, ids), encoders)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert all(w.abs().sum() > 0 for w in want[:2])  # the shared encoder's first layer moves


def test_default_weights_are_the_documented_ones():
    model = build("asp_mtl", VEC)
    assert (model.adversarial_weight, model.orthogonality_weight) == (0.05, 0.01)


def test_the_default_reversal_flips_the_gradient_unscaled():
    """Ganin & Lempitsky's plain reversal layer (lambda = 1) unless asked otherwise, in the model too."""
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    (reverse_gradient(x) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, -upstream)
    assert build("asp_mtl", VEC).reversal == 1.0


def test_auxiliary_loss_before_any_forward_pass_is_refused():
    import pytest

    with pytest.raises(RuntimeError, match="forward"):
        build("asp_mtl", VEC).auxiliary_loss()
