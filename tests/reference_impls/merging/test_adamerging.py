"""AdaMerging: entropy, merging formulas, gradients to λ only, entropy minimisation on a toy."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from reference_impls.merging.adamerging import AdaMerging, entropy
from reference_impls.merging.base import task_vector
from reference_impls.merging.task_arithmetic import TaskArithmetic


def random_setup(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"weight": torch.randn(4, 5, generator=g), "bias": torch.randn(4, generator=g)}
    taus = [{n: torch.randn(v.shape, generator=g) for n, v in pre.items()} for _ in range(k)]
    return pre, taus


def test_entropy_matches_the_formula():
    torch.testing.assert_close(entropy(torch.zeros(2, 4)), torch.full((2,), math.log(4)))
    p = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(entropy(p.log()[None]), -(p * p.log()).sum()[None])
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(entropy(logits), torch.distributions.Categorical(logits=logits).entropy())
    confident = entropy(torch.tensor([[1000.0, -1000.0, 0.0]]))
    assert torch.isfinite(confident).all() and confident.item() < 1e-6


def test_layer_wise_with_equal_coefficients_is_task_arithmetic():
    pre, taus = random_setup()
    for layer_wise in (True, False):
        merged = AdaMerging(pre, taus, layer_wise=layer_wise, init=0.7).merged_parameters()
        expected = TaskArithmetic(scale=0.7)(pre, taus)
        for n in pre:
            torch.testing.assert_close(merged[n], expected[n])


def test_merged_parameters_follow_the_task_wise_and_layer_wise_formulas():
    pre, taus = random_setup(k=2)
    layer = AdaMerging(pre, taus, layer_wise=True)
    assert layer.keys == ["bias", "weight"] and layer.raw.shape == (2, 2)
    with torch.no_grad():
        layer.raw.copy_(torch.tensor([[0.1, 0.9], [0.6, 0.2]]))  # rows: bias, weight
    merged = layer.merged_parameters()
    torch.testing.assert_close(merged["bias"], pre["bias"] + 0.1 * taus[0]["bias"] + 0.9 * taus[1]["bias"])
    torch.testing.assert_close(merged["weight"], pre["weight"] + 0.6 * taus[0]["weight"] + 0.2 * taus[1]["weight"])
    task = AdaMerging(pre, taus, layer_wise=False)
    assert task.raw.shape == (1, 2)
    with torch.no_grad():
        task.raw.copy_(torch.tensor([[0.2, 0.5]]))
    for n, v in task.merged_parameters().items():
        torch.testing.assert_close(v, pre[n] + 0.2 * taus[0][n] + 0.5 * taus[1][n])


def test_coefficients_are_clipped_to_bounds():
    pre, taus = random_setup(k=2)
    ada = AdaMerging(pre, taus, layer_wise=False)
    with torch.no_grad():
        ada.raw.copy_(torch.tensor([[-1.0, 2.0]]))
    torch.testing.assert_close(ada.coefficients(), torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    ada.bounds = None
    torch.testing.assert_close(ada.coefficients()[0], torch.tensor([-1.0, 2.0]))


def test_only_the_coefficients_are_learned_and_all_get_gradients():
    pre, taus = random_setup(k=3)
    model = nn.Linear(5, 4)
    ada = AdaMerging(pre, taus, layer_wise=True)
    assert [n for n, _ in ada.named_parameters()] == ["raw"]
    ada.objective(model, [torch.randn(8, 5), torch.randn(8, 5)]).backward()
    assert ada.raw.grad is not None and (ada.raw.grad != 0).all()
    assert model.weight.grad is None and model.bias.grad is None  # evaluated at θ_m, not its own weights


def fine_tuned_classifiers(seed: int):
    """Two 4-class linear tasks on disjoint halves of a 20-d input, fine-tuned from one init."""
    g = torch.Generator().manual_seed(seed)
    d, half, n = 20, 10, 200

    def sample(offset, w, m):
        x = 0.1 * torch.randn(m, d, generator=g)
        u = torch.randn(m, half, generator=g)
        x[:, offset:offset + half] = u
        return x, (u @ w.T).argmax(1)

    torch.manual_seed(seed)
    model = nn.Linear(d, 4)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    taus, tests = [], []
    for offset in (0, half):
        w = torch.randn(4, half, generator=g)
        x, y = sample(offset, w, n)
        tests.append(sample(offset, w, n))
        ft = nn.Linear(d, 4)
        ft.load_state_dict(pre)
        opt = torch.optim.SGD(ft.parameters(), lr=0.5)
        for _ in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(ft(x), y).backward()
            opt.step()
        taus.append(task_vector(ft.state_dict(), pre))
    return model, pre, taus, tests


def accuracy(model, params, tests):
    hits = [(functional_call(model, params, (x,)).argmax(1) == y).float().mean().item() for x, y in tests]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("layer_wise", (True, False))
def test_entropy_minimisation_lowers_entropy_without_hurting_accuracy(layer_wise):
    model, pre, taus, tests = fine_tuned_classifiers(seed=1)
    unlabelled = [x for x, _ in tests]
    ada = AdaMerging(pre, taus, layer_wise=layer_wise)  # starts at task arithmetic, λ = 0.3
    baseline = accuracy(model, TaskArithmetic(scale=0.3)(pre, taus), tests)
    history = ada.fit(model, unlabelled, steps=50, lr=0.05)
    assert ada.objective(model, unlabelled).item() < 0.6 * history[0]
    learned = accuracy(model, {k: v.detach() for k, v in ada.merged_parameters().items()}, tests)
    assert baseline > 0.6  # the toy is solvable by merging
    assert learned >= baseline


def test_objective_sums_each_batch_mean_entropy_at_the_default_prior():
    """Default λ = 0.3 is task arithmetic at 0.3; the objective adds one mean entropy per batch."""
    pre, taus = random_setup(k=2)
    model = nn.Linear(5, 4)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(3, 5, generator=g), torch.randn(6, 5, generator=g)]
    prior = TaskArithmetic(scale=0.3)(pre, taus)
    expected = sum(entropy(functional_call(model, prior, (x,))).mean() for x in batches)
    torch.testing.assert_close(AdaMerging(pre, taus).objective(model, batches), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"init": float("nan")}, "init must be finite"),
    ({"bounds": (1.0, 0.0)}, "bounds must be"),
    ({"bounds": (float("nan"), 1.0)}, "bounds must be"),
])
def test_bad_arguments_are_refused_when_built(kwargs, message):
    pre, taus = random_setup(k=2)
    with pytest.raises(ValueError, match=message):
        AdaMerging(pre, taus, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps must be at least 0, got -1"),
    ({"steps": 2, "lr": 0.0}, "lr must be above 0, got 0.0"),
    ({"steps": 2, "lr": -1e-3}, "lr must be above 0"),
])
def test_fit_refuses_bad_steps_and_learning_rates(kwargs, message):
    pre, taus = random_setup(k=2)
    with pytest.raises(ValueError, match=message):
        AdaMerging(pre, taus).fit(nn.Linear(5, 4), [torch.randn(3, 5)], **kwargs)


def test_default_is_layer_wise_and_weights_are_fixed_copies():
    pre, taus = random_setup(k=2)
    for tau in taus:
        tau["weight"].requires_grad_(True)
    ada = AdaMerging(pre, taus)
    assert ada.raw.shape == (2, 2)  # one row per parameter tensor
    before = {n: v.clone() for n, v in ada.merged_parameters().items()}
    pre["weight"].add_(1.0)  # the caller's tensors change afterwards: the merge does not
    ada.objective(nn.Linear(5, 4), [torch.randn(3, 5)]).backward()
    assert taus[0]["weight"].grad is None and taus[1]["weight"].grad is None
    for n, v in ada.merged_parameters().items():
        torch.testing.assert_close(v, before[n])


def test_fit_takes_adam_steps_and_records_the_objective_before_each():
    """Adam's first step moves every coefficient by lr against the sign of its gradient."""
    pre, taus = random_setup(k=2)
    model, batches = nn.Linear(5, 4), [torch.randn(6, 5, generator=torch.Generator().manual_seed(5))]
    ada = AdaMerging(pre, taus)
    start = ada.objective(model, batches)
    grad = torch.autograd.grad(start, ada.raw)[0]
    history = ada.fit(model, batches, steps=2, lr=0.01)
    assert history[0] == pytest.approx(start.item())
    after_one = AdaMerging(pre, taus)
    after_one.fit(model, batches, steps=1, lr=0.01)
    torch.testing.assert_close(after_one.raw.detach(), 0.3 - 0.01 * grad.sign(), atol=1e-6, rtol=0)
    assert history[1] == pytest.approx(after_one.objective(model, batches).item())


def test_each_adam_step_reads_only_that_steps_gradient():
    """Three steps of fit() equal torch's Adam fed each step's fresh gradient by hand."""
    pre, taus = random_setup(k=2)
    model, batches = nn.Linear(5, 4), [torch.randn(6, 5, generator=torch.Generator().manual_seed(5))]
    fitted, by_hand = AdaMerging(pre, taus), AdaMerging(pre, taus)
    fitted.fit(model, batches, steps=3, lr=0.01)
    optimizer = torch.optim.Adam(by_hand.parameters(), lr=0.01)
    for _ in range(3):
        gradients = torch.autograd.grad(by_hand.objective(model, batches), list(by_hand.parameters()))
        for p, g in zip(by_hand.parameters(), gradients):
            p.grad = g
        optimizer.step()
    for a, b in zip(fitted.parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b)


def test_a_whole_state_dict_merges_its_weights_and_leaves_counters_to_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = [{k: v + 0.1 * (i + 1) if v.is_floating_point() else v + 7 for k, v in pre.items()} for i in range(2)]
    merging = AdaMerging(pre, [task_vector(t, pre) for t in tuned], init=0.5)
    merged = merging.merged_parameters()
    assert "1.num_batches_tracked" not in merged and len(merged) == 8  # 2 linear x 2, batch norm x 4
    torch.testing.assert_close(merged["1.running_var"], pre["1.running_var"] + 0.5 * 0.1 + 0.5 * 0.2)
    x = torch.randn(6, 5)
    fixed = {k: v.detach() for k, v in merged.items()}
    torch.testing.assert_close(merging.predict(model.eval(), x), functional_call(model, fixed, (x,)))
    with pytest.raises(ValueError, match=r"task vector 1 must have .* missing \['2.bias'\], not weights there "
                                         r"\['1.num_batches_tracked'\]"):
        broken = {k: v for k, v in tuned[1].items() if k != "2.bias"}
        AdaMerging(pre, [task_vector(tuned[0], pre), {**task_vector(broken, pre),
                                                      "1.num_batches_tracked": torch.tensor(7)}])


class TwoTaskModel(nn.Module):
    """{task: logits} with the classes on dimension 1: a vector task and a per-pixel task."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Conv2d(3, 4, 1)
        self.vector = nn.Linear(4, 5)
        self.pixels = nn.Conv2d(4, 6, 1)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return {"label": self.vector(h.mean((2, 3))), "segment": self.pixels(h)}


def test_a_multi_task_model_reads_each_tasks_entropy_from_its_own_output_over_dimension_one():
    torch.manual_seed(1)
    model = TwoTaskModel()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    taus = [{k: torch.randn_like(v) for k, v in pre.items()} for _ in range(2)]
    merging = AdaMerging(pre, taus)
    batches = {"label": torch.randn(3, 3, 4, 4), "segment": torch.randn(2, 3, 5, 5)}
    prior = TaskArithmetic(scale=0.3)(pre, taus)
    label = functional_call(model, prior, (batches["label"],))["label"]
    segment = functional_call(model, prior, (batches["segment"],))["segment"]  # (2, 6, 5, 5)
    per_pixel = torch.distributions.Categorical(logits=segment.permute(0, 2, 3, 1)).entropy()
    expected = torch.distributions.Categorical(logits=label).entropy().mean() + per_pixel.mean()
    torch.testing.assert_close(merging.objective(model, batches), expected)
    history = merging.fit(model, batches, steps=30, lr=0.05)
    assert history[-1] < history[0]
    with pytest.raises(ValueError, match=r"outputs for tasks \['label', 'segment'\]: name one"):
        merging.objective(model, [batches["label"]])


def test_merged_running_statistics_follow_the_coefficients_in_both_modes_without_gradient():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    tau = {k: torch.randn_like(v) for k, v in pre.items() if v.is_floating_point()}
    tau["1.running_var"] = tau["1.running_var"].abs()
    merging = AdaMerging(pre, [tau], init=0.25)
    x = torch.randn(6, 5)
    merged = {k: v.detach() for k, v in merging.merged_parameters().items()}
    torch.testing.assert_close(merging.predict(model.eval(), x), functional_call(model, merged, (x,)))
    merging.objective(model.train(), [x]).backward()  # training mode: batch statistics, buffers updated on copies
    assert merging.raw.grad.abs().sum() > 0
    for key, value in merging.merged_parameters().items():
        torch.testing.assert_close(value, merged[key])
    assert torch.equal(model.state_dict()["1.running_mean"], pre["1.running_mean"])


@pytest.mark.parametrize("change, named", [("drop", r"missing \['bias'\], not weights there \[\]"),
                                           ("add", r"missing \[\], not weights there \['extra'\]")])
def test_a_task_vector_missing_one_weight_or_with_one_too_many_is_refused(change, named):
    pre, taus = random_setup(k=2)
    odd = {k: v for k, v in taus[1].items() if k != "bias"} if change == "drop" else {**taus[1], "extra": pre["bias"]}
    with pytest.raises(ValueError, match=r"task vector 1 must have exactly the floating-point keys.*" + named):
        AdaMerging(pre, [taus[0], odd])


@pytest.mark.parametrize("task", [None, "depth"])
def test_predicting_from_a_multi_task_model_needs_one_of_its_task_names(task):
    torch.manual_seed(3)
    model = TwoTaskModel()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    merging = AdaMerging(pre, [{k: torch.zeros_like(v) for k, v in pre.items()}])
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=rf"outputs for tasks \['label', 'segment'\].*got task {task!r}"):
        merging.predict(model, x, task=task)
    torch.testing.assert_close(merging.predict(model, x, task="label"), model(x)["label"])


def test_merging_nothing_is_refused():
    pre, _ = random_setup()
    with pytest.raises(ValueError, match="need at least one task vector"):
        AdaMerging(pre, [])
