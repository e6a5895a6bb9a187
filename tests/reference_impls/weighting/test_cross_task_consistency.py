import torch
from torch import nn

from reference_impls.weighting.cross_task_consistency import CrossTaskConsistency


def linear_map(device: torch.device) -> nn.Linear:
    layer = nn.Linear(2, 1, bias=True).to(device)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.bias.fill_(0.5)
    return layer


def test_terms_by_hand(device):
    loss = CrossTaskConsistency(linear_map(device), perceptual_weight=0.5)
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]], device=device)
    y1 = torch.tensor([[0.0, 0.0], [1.0, 1.0]], device=device)
    terms = loss(pred, y1)
    # direct: |1|+|0|+|-1|+|1| over 4 entries
    assert terms.direct.item() == 0.75
    # f(pred) = [2.5, -1.5], f(y1) = [0.5, 1.5]: |2| and |-3| over 2 entries
    assert terms.perceptual.item() == 2.5
    assert terms.total.item() == 0.75 + 0.5 * 2.5
    # separable: against y2 = [1, -1]: |1.5| and |-0.5|
    assert loss.separable(pred, torch.tensor([[1.0], [-1.0]], device=device)).item() == 1.0


def test_frozen_network_gets_no_gradient_and_prediction_does(device):
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device)
    before = [p.clone() for p in frozen.parameters()]
    loss = CrossTaskConsistency(frozen)
    pred = torch.randn(5, 3, device=device, requires_grad=True)
    terms = loss(pred, torch.randn(5, 3, device=device))
    terms.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    perceptual_only = torch.autograd.grad(loss(pred, torch.zeros(5, 3, device=device)).perceptual, pred)[0]
    assert perceptual_only.abs().sum() > 0  # the consistency term itself reaches the prediction
    opt = torch.optim.SGD([pred], lr=0.1)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))
    loss.train()
    assert not loss.cross_task.training


def test_perceptual_target_is_fixed(device):
    """f(y1) is a constant target: even a y1 that requires grad gets none from the perceptual term."""
    loss = CrossTaskConsistency(linear_map(device))
    pred = torch.randn(4, 2, device=device, requires_grad=True)
    y1 = torch.randn(4, 2, device=device, requires_grad=True)
    perceptual = loss(pred, y1).perceptual
    assert torch.autograd.grad(perceptual, y1, allow_unused=True)[0] is None


def test_identity_cross_task_network_makes_perceptual_equal_direct(device):
    loss = CrossTaskConsistency(nn.Identity())
    pred, y1 = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    terms = loss(pred, y1)
    torch.testing.assert_close(terms.perceptual, terms.direct)


def test_perceptual_target_cancels_errors_of_the_cross_task_network(device):
    """If the frozen map is off by a constant, |f(pred) - y2| stays wrong at the truth; the
    perceptual term is zero there, so the correct prediction remains the minimiser."""
    loss = CrossTaskConsistency(linear_map(device))
    y1 = torch.randn(6, 2, device=device)
    true_y2 = y1 @ torch.tensor([[2.0], [-1.0]], device=device)  # the map without its bias error
    assert loss(y1.clone(), y1).perceptual.item() == 0.0
    assert loss.separable(y1.clone(), true_y2).item() > 0.4


def test_consistency_training_lowers_the_loss(device):
    torch.manual_seed(0)
    net = nn.Linear(4, 2).to(device)
    loss = CrossTaskConsistency(linear_map(device))
    x = torch.randn(32, 4, device=device)
    y1 = x[:, :2] * 0.5 - x[:, 2:]
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = loss(net(x), y1).total.item()
    for _ in range(100):
        opt.zero_grad()
        loss(net(x), y1).total.backward()
        opt.step()
    assert loss(net(x), y1).total.item() < 0.2 * first


def test_frozen_network_is_in_eval_mode_from_the_start(device):
    """Frozen from construction on, buffers included: a batch-norm in f_{Y1->Y2} keeps its running
    statistics through a forward pass made before any call to ``train()``, and normalises with them."""
    frozen = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1)).to(device)
    loss = CrossTaskConsistency(frozen)
    assert not loss.cross_task.training
    pred = torch.tensor([[3.0, -1.0], [5.0, 1.0]], device=device)
    terms = loss(pred, torch.zeros(2, 2, device=device))
    assert torch.equal(frozen[0].running_mean, torch.zeros(2, device=device))
    assert torch.equal(frozen[0].running_var, torch.ones(2, device=device))
    # running stats (0, 1) leave the input as it is (up to eps): |f(pred) - f(0)| = |w . pred|
    expected = (pred @ frozen[1].weight.detach().T).abs().mean()
    torch.testing.assert_close(terms.perceptual, expected, rtol=1e-4, atol=1e-5)


def test_default_total_is_the_unweighted_sum_of_the_two_terms(device):
    """perceptual_weight defaults to 1: total = direct + perceptual (same hand case: 0.75 + 2.5)."""
    terms = CrossTaskConsistency(linear_map(device))(
        torch.tensor([[1.0, 0.0], [0.0, 2.0]], device=device), torch.tensor([[0.0, 0.0], [1.0, 1.0]], device=device))
    assert terms.total.item() == 0.75 + 2.5


def test_train_without_an_argument_switches_to_training_mode(device):
    """``train()`` means ``train(True)``, as for every nn.Module; the frozen network stays in eval."""
    loss = CrossTaskConsistency(linear_map(device)).eval()
    assert not loss.training
    assert loss.train() is loss
    assert loss.training and not loss.cross_task.training
