import pytest
import torch
from torch.nn import functional as F

from reference_impls.architectures.esmm import ESMM, entire_space_loss
from reference_impls.architectures.registry import Problem, build

VEC = Problem(("click", "buy"), (6,), {"click": 1, "buy": 1})


def test_ctcvr_is_ctr_times_cvr(device):
    torch.manual_seed(0)
    model = build("esmm", VEC).to(device)
    x = torch.randn(9, 6, device=device)
    out = model(x)
    e = x @ model.embedding.weight.T  # bias-free "lookup" of dense features
    p_ctr = torch.sigmoid(model.ctr_tower(e))
    p_cvr = torch.sigmoid(model.cvr_tower(e))
    torch.testing.assert_close(torch.sigmoid(out["click"]), p_ctr)
    torch.testing.assert_close(torch.sigmoid(out["buy"]), p_ctr * p_cvr)  # Eq. (1)
    probs = model.probabilities(x)
    torch.testing.assert_close(probs["cvr"], p_cvr)
    torch.testing.assert_close(probs["ctcvr"], torch.sigmoid(out["buy"]))


def test_outputs_are_finite_logits_and_ctcvr_never_exceeds_ctr(device):
    """Logits, as the loop's binary loss and accuracy expect (they were probabilities, which the
    accuracy's threshold at 0 read as 'positive' for every example), finite when saturated."""
    torch.manual_seed(1)
    model = build("esmm", VEC).to(device).double()
    x = torch.randn(64, 6, device=device, dtype=torch.float64) * 50  # saturate the sigmoids
    out = model(x)
    assert all(torch.isfinite(o).all() for o in out.values())
    assert (out["buy"] <= out["click"] + 1e-9).all()  # a conversion needs a click
    assert (out["click"] < 0).any() and (out["buy"] < 0).any()  # not all read as positive
    probs = model.probabilities(x)
    torch.testing.assert_close(out["buy"], torch.logit(probs["ctcvr"]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("a, b", [(30.0, 30.0), (-40.0, 3.0), (0.0, 0.0), (5.0, -60.0)])
def test_logit_of_the_product_by_hand(a, b):
    from reference_impls.architectures.esmm import logit_of_product
    got = logit_of_product(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    p = torch.sigmoid(torch.tensor(a, dtype=torch.float64)) * torch.sigmoid(torch.tensor(b, dtype=torch.float64))
    want = torch.log(p) - torch.log1p(-p)  # fine in float64 away from p = 1
    if a < 20 or b < 20:
        torch.testing.assert_close(got, want)
    else:  # p = 1 - (e^-a + e^-b) to first order: logit ~ -log(e^-a + e^-b)
        torch.testing.assert_close(got, -torch.log(torch.tensor(2 * torch.e ** -30.0, dtype=torch.float64)), rtol=1e-9, atol=1e-9)


def test_shared_embedding_learns_from_both_tasks(device, params_with_grad):
    torch.manual_seed(2)
    model = build("esmm", VEC).to(device)
    x = torch.randn(8, 6, device=device)
    from_ctr = params_with_grad(model, model(x)["click"].sum())
    from_ctcvr = params_with_grad(model, model(x)["buy"].sum())
    assert "embedding.weight" in from_ctr and "embedding.weight" in from_ctcvr
    assert not any(n.startswith("cvr_tower") for n in from_ctr)  # pCVR only enters pCTCVR
    assert any(n.startswith("cvr_tower") for n in from_ctcvr)
    assert any(n.startswith("ctr_tower") for n in from_ctcvr)  # pCTR enters both
    specific = {id(p) for p in model.task_specific_parameters("buy")}
    assert specific == {id(p) for p in model.cvr_tower.parameters()}
    assert list(model.task_specific_parameters("click")) == []


def test_entire_space_loss_is_eq3():
    out = {"click": torch.logit(torch.tensor([[0.8], [0.3]])), "buy": torch.logit(torch.tensor([[0.2], [0.1]]))}
    y = torch.tensor([[1.0], [0.0]])
    yz = torch.tensor([[1.0], [0.0]])
    expected = -(torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.7))
                 + torch.log(torch.tensor(0.2)) + torch.log(torch.tensor(0.9)))
    torch.testing.assert_close(entire_space_loss(out, "click", "buy", y, yz), expected)


def test_cvr_is_learned_without_conversion_labels(device):
    """Fit pCTR and pCTCVR on all impressions (Eq. (3)); pCVR, never supervised, recovers CVR."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 6, generator=g)
    true_ctr = torch.sigmoid(x[:, :1] * 2 - 1)
    true_cvr = torch.sigmoid(2 * x[:, 1:2] - x[:, 2:3])  # unrelated to the click direction
    x, true_ctr, true_cvr = x.to(device), true_ctr.to(device), true_cvr.to(device)
    torch.manual_seed(3)
    model = build("esmm", VEC).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(80):  # soft labels: expected click and click-and-convert
        loss = entire_space_loss(model(x), "click", "buy", true_ctr, true_ctr * true_cvr) / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    learned = model.probabilities(x)["cvr"].detach()
    assert (learned - true_cvr).abs().mean() < 0.05  # 0.31 before training
    assert torch.corrcoef(torch.stack([learned.flatten(), true_cvr.flatten()]))[0, 1] > 0.95


def test_rejects_other_task_layouts():
    with pytest.raises(ValueError, match="two"):
        build("esmm", Problem(("a", "b", "c"), (4,), {}))
    with pytest.raises(ValueError, match="two"):  # built directly, the constructor refuses it too
        ESMM(("a", "b", "c"), torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(ValueError, match="equal output widths"):
        build("esmm", Problem(("seg", "depth"), (3, 8, 8), {"seg": 5, "depth": 1}, dense=True))


@pytest.mark.parametrize("dense", (True, False))
def test_images_give_per_channel_logits(device, dense):
    torch.manual_seed(4)
    problem = Problem(("a", "b"), (2, 4, 4), {"a": 3, "b": 3}, dense=dense)
    model = build("esmm", problem).to(device)
    out = model(torch.randn(2, 2, 4, 4, device=device))
    shape = (2, 3, 4, 4) if dense else (2, 3)
    assert out["a"].shape == out["b"].shape == shape
    assert (out["b"] <= out["a"] + 1e-6).all()
    z = model.encode(torch.randn(2, 2, 4, 4, device=device))
    assert set(model.decode(z)) == {"a", "b"}


def test_parameter_count(n_params):
    d, w = 6, 16
    model = build("esmm", VEC, width=w)
    tower = (w * w + w) + (w + 1)
    assert n_params(model) == d * w + 2 * tower


def test_registry_name_builds_the_catalogued_class():
    model = build("esmm", VEC)
    assert type(model) is ESMM and model.name == "esmm"


def test_the_loop_s_accuracy_reads_the_outputs_as_the_probabilities_say(device):
    """The binary accuracy thresholds an output at 0: for logits that is probability 0.5."""
    from reference_impls.metrics import Accuracy
    torch.manual_seed(5)
    model = build("esmm", VEC).to(device)
    x = torch.randn(200, 6, device=device)
    y = (torch.rand(200, device=device) < 0.5).long()
    out, probs = model(x), model.probabilities(x)
    for task, key in (("click", "ctr"), ("buy", "ctcvr")):
        metric = Accuracy()
        metric.update(out[task], y)
        expected = ((probs[key].reshape(-1) > 0.5).long() == y).float().mean().item()
        assert metric.compute() == pytest.approx(expected)


@pytest.mark.parametrize("a, b", [(200.0, 200.0), (100.0, 60.0), (-200.0, 200.0), (200.0, -200.0)])
def test_logit_of_the_product_stays_finite_in_float32_when_both_factors_round_to_one(a, b):
    """In float32 sigmoid(200) rounds to 1, and l - log(1 - e^l) with l = 0 was +inf (its
    cross-entropy NaN); logit(p) must be about -log(e^-a + e^-b) there, and so trainable."""
    from reference_impls.architectures.esmm import logit_of_product
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    got = logit_of_product(ta, tb)
    want = logit_of_product(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    loss = F.binary_cross_entropy_with_logits(got, torch.tensor(1.0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(ta.grad) and torch.isfinite(tb.grad)
    if a > 0 and b > 0:
        torch.testing.assert_close(got, -torch.logaddexp(torch.tensor(-a), torch.tensor(-b)))


@pytest.mark.parametrize("dense", (True, False))
def test_image_towers_have_one_hidden_layer_each(n_params, dense):
    """Both towers share one structure with one hidden layer: a 3x3 conv of the width, then the
    output layer (a 1x1 conv per pixel, or a linear map of the pooled features)."""
    c, w, out = 2, 8, 3
    model = build("esmm", Problem(("a", "b"), (c, 4, 4), {"a": out, "b": out}, dense=dense), width=w)
    tower = (9 * w * w + w) + (w * out + out)
    assert n_params(model.ctr_tower) == n_params(model.cvr_tower) == tower
    assert n_params(model) == c * w + 2 * tower  # bias-free embedding
