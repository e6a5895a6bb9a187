"""MTG-Net (Song et al. 2022): combination-masked attention over task embeddings, L1 meta-loss, sampling."""

import copy

import pytest
import torch

from reference_impls.affinity.mtg_net import (
    MTGNet,
    all_combinations,
    fit,
    initial_combinations,
    meta_loss,
    next_combination,
    predicted_candidates,
)
from reference_impls.affinity.network_selection import select_networks


def test_a_members_prediction_depends_on_the_members_only():
    torch.manual_seed(0)
    model = MTGNet(num_tasks=5, dim=8, num_layers=2, num_heads=2).double()
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.float64)
    before = model(mask)
    with torch.no_grad():
        model.task_embedding.weight[[0, 3]] += 5.0  # tasks absent from the second combination only
    after = model(mask)
    torch.testing.assert_close(after[1, [1, 2]], before[1, [1, 2]])
    assert not torch.allclose(after[0, [0, 2, 3]], before[0, [0, 2, 3]])  # present in the first: it moves


def test_one_layer_is_the_members_only_attention_with_temperature_written_out():
    torch.manual_seed(1)
    model = MTGNet(num_tasks=4, dim=6, num_layers=1, num_heads=1, temperature=0.2).double()
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    layer, e = model.layers[0], model.task_embedding.weight
    members = [0, 1, 3]
    q, k, v = layer.q(e[members]), layer.k(e[members]), layer.v(e[members])
    attention = torch.softmax(q @ k.T * 6 ** -0.5 / 0.2, dim=-1)  # members attend to members
    h = layer.norm1(e[members] + layer.out(attention @ v))
    h = layer.norm2(h + layer.ff2(torch.relu(layer.ff1(h))))
    torch.testing.assert_close(model(mask)[0, members], model.readout(h).squeeze(-1))


@pytest.mark.parametrize("dim", [4, 5])  # 5: dim // heads is 2, not 2.5
def test_two_heads_split_each_projection_in_order_with_the_code_scale_and_default_temperature(dim):
    torch.manual_seed(4)
    model = MTGNet(num_tasks=3, dim=dim, num_layers=1, num_heads=2).double()  # temperature: default 0.2
    mask = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    layer, e = model.layers[0], model.task_embedding.weight[[0, 2]]
    q, k, v = layer.q(e), layer.k(e), layer.v(e)  # 2 x 2 dim: head 0 reads the first dim columns, head 1 the rest
    heads = []
    for cols in (slice(0, dim), slice(dim, 2 * dim)):
        scores = q[:, cols] @ k[:, cols].T * (dim // 2) ** -0.5 / 0.2  # s = (dim // heads)^(-1/2)
        heads.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    h = layer.norm1(e + layer.out(torch.cat(heads, dim=1)))
    h = layer.norm2(h + layer.ff2(torch.relu(layer.ff1(h))))
    torch.testing.assert_close(model(mask)[0, [0, 2]], model.readout(h).squeeze(-1))


def test_the_default_network_is_64_wide_with_2_layers_of_one_head():
    model = MTGNet(num_tasks=3)
    assert model.task_embedding.weight.shape == (3, 64) and len(model.layers) == 2
    assert model.layers[0].q.out_features == 64 and model.layers[0].temperature == 0.2


def test_the_meta_loss_reads_members_only():
    predicted = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert meta_loss(predicted, torch.tensor([[0.0, 99.0, 3.5]]), mask).item() == pytest.approx((1 + 0.5) / 2)


class TableModel(MTGNet):
    """Predicts a fixed gain table: row i of all_combinations gets gains[i]."""

    def __init__(self, num_tasks, gains):
        super().__init__(num_tasks, dim=4, num_layers=1)
        self.table = {tuple(r.int().tolist()): g for r, g in zip(all_combinations(num_tasks), gains)}

    def forward(self, mask):
        return torch.stack([self.table[tuple(r.int().tolist())] for r in mask])


def test_the_next_sample_has_the_largest_absolute_gain_for_the_round_task():
    combos = all_combinations(3)  # 0, 1, 2, 01, 02, 12, 012
    gains = torch.zeros(7, 3)
    gains[3] = torch.tensor([0.2, -0.9, 0.0])  # {0,1}: task 1 loses a lot
    gains[5] = torch.tensor([0.0, 0.5, 0.7])  # {1,2}
    gains[4] = torch.tensor([-0.4, 9.0, 0.1])  # {0,2}: the 9 is task 1's, but 1 is absent
    model = TableModel(3, gains)
    pool = combos[3:6]
    assert next_combination(model, pool, round_index=1) == 0  # task 1: |−0.9| beats 0.5, the absent 9 ignored
    assert next_combination(model, pool, round_index=3) == 1  # task 0 again (3 mod 3): |−0.4| from {0,2}
    assert next_combination(model, pool, round_index=2) == 2  # task 2: 0.7 from {1,2}
    assert initial_combinations(3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]


def test_predicted_gains_feed_the_budgeted_selection():
    combos = all_combinations(4)
    gains = torch.zeros(len(combos), 4)
    for i, row in enumerate(combos):
        if row.tolist() in ([1, 1, 0, 0], [0, 0, 1, 1]):
            gains[i] = row * 0.3  # the two pairs help both their members
        elif row.sum() > 1:
            gains[i] = -0.1 * row
    selection = select_networks(predicted_candidates(TableModel(4, gains)), 4, budget=2.0)
    candidates = predicted_candidates(TableModel(4, gains))
    assert sorted(candidates[c].tasks for c in selection.networks) == [(0, 1), (2, 3)]
    assert selection.total_loss == pytest.approx(-4 * 0.3)
    cheap = predicted_candidates(TableModel(4, gains), cost=0.5)
    assert all(c.cost == 0.5 for c in cheap)
    assert cheap[combos.tolist().index([1, 1, 0, 0])].losses == pytest.approx((-0.3, -0.3))  # loss = −gain


def test_fit_defaults_are_the_codes_adam_lr_and_weight_decay():
    torch.manual_seed(5)
    combos = all_combinations(3).double()
    gains = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * combos
    model = MTGNet(3, dim=8, num_layers=1).double()
    twin = copy.deepcopy(model)
    fit(model, combos, gains, steps=3)
    optimizer = torch.optim.Adam(twin.parameters(), lr=0.007, weight_decay=5e-4)
    for _ in range(3):  # L1 over the members, written out
        optimizer.zero_grad()
        members = combos.bool()
        (twin(combos)[members] - gains[members]).abs().mean().backward()
        optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_fitting_learns_a_gain_table():
    torch.manual_seed(2)
    combos = all_combinations(3)
    gains = torch.randn(7, 3, generator=torch.Generator().manual_seed(3)) * 0.3 * combos
    model = MTGNet(3, dim=16, num_layers=2)
    history = fit(model, combos, gains, steps=150)
    assert history[-1] < 0.1 * history[0]


@pytest.mark.parametrize("call, message", [
    (lambda: MTGNet(0), "num_tasks"),
    (lambda: MTGNet(3, dim=0), "dim"),
    (lambda: MTGNet(3, num_layers=0), "num_layers"),
    (lambda: MTGNet(3, num_heads=0), "num_heads"),
    (lambda: MTGNet(3, temperature=0.0), "temperature"),
    (lambda: MTGNet(3)(torch.ones(2, 4)), "mask must be B x 3"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
