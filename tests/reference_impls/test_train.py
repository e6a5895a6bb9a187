import copy
import inspect
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reference_impls import data as datasets
from reference_impls import hooks, train
from reference_impls.architectures.registry import Problem, build
from reference_impls.data.synthetic import TensorTasks, mse_loss
from reference_impls.metrics import MeanSquaredError, delta_m
from reference_impls.weighting import registry as method_registry
from reference_impls.weighting.base import LossWeighting

from .conftest import DEVICES, gradient_rows

# two sines (α = 1, 2): a smooth task, so that 32 steps visibly reduce the loss
TINY = ["--data", "synthetic", "--data-kw", "n_train=256", "n_test=128", "dim=20", "num_sines=2",
        "--epochs", "4", "--batch-size", "32", "--lr", "3e-3", "--seed", "0", "--device", "cpu"]


def _table_numbers(table: str) -> tuple[dict[str, tuple[float, float]], float]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[2] not in ("single-task", "---"):
            rows[cells[0]] = (float(cells[2]), float(cells[3]))
    return rows, float(re.search(r"Δm = ([+-][0-9.]+) %", table).group(1))


@pytest.mark.parametrize("device", DEVICES)
def test_end_to_end_table_delta_m_matches_metrics_and_loss_falls(device, capsys):
    result = train.main(["--arch", "mmoe", "--method", "ew", "--no-progress", *TINY, "--device", device])
    printed = capsys.readouterr().out
    assert result["table"] in printed
    rows, shown = _table_numbers(result["table"])
    assert set(rows) == {"y1/mse", "y2/mse"}
    single = {k: v[0] for k, v in rows.items()}
    multi = {k: v[1] for k, v in rows.items()}
    # Δm recomputed from the printed (rounded) numbers agrees with the printed Δm
    assert delta_m(multi, single, result["lower_is_better"]) == pytest.approx(shown, abs=0.05)
    assert result["delta_m"] == pytest.approx(
        delta_m(result["multi_task"], result["single_task"], result["lower_is_better"]))
    losses = result["train_loss"]
    assert losses[-1] < 0.9 * losses[0]


def test_stored_baselines_are_reused(tmp_path):
    path = tmp_path / "baselines.json"
    first = train.main(["--arch", "shared_bottom", "--save-baselines", str(path), "--no-progress", *TINY])
    second = train.main(["--arch", "shared_bottom", "--baselines", str(path), "--no-progress", *TINY])
    assert second["single_task"] == pytest.approx(first["single_task"])
    assert second["delta_m"] == pytest.approx(first["delta_m"])  # same seed, same model
    assert [p.name for p in tmp_path.iterdir()] == ["baselines.json"]  # no partial file left beside it


def test_gradient_method_trains_through_the_harness():
    result = train.main(["--arch", "cgc", "--method", "mgda" if _has("mgda") else "ew",
                         "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


def _has(name: str) -> bool:
    from reference_impls.weighting.registry import methods

    return name in methods()


def test_unknown_method_and_missing_data_root_fail_clearly():
    with pytest.raises(KeyError, match="unknown method.*no_such_method"):  # names what was typed
        train.make_method("no_such_method", 2, 0)
    with pytest.raises(ValueError, match="root"):
        train.main(["--data", "nyuv2", "--no-progress"])


# ----------------------------------------------------------------------------------------------
# Auxiliary losses (model.auxiliary_loss(), added after the method combines the task losses)
# ----------------------------------------------------------------------------------------------

PAIR = Problem(("a", "b"), (5,), {"a": 1, "b": 1})
SPECS = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in PAIR.tasks}


class _FixedWeights(LossWeighting):
    """Task weights 0.25 and 2: the auxiliary loss must not be scaled by either."""

    name = "fixed_for_test"

    def weights(self, losses: torch.Tensor, step: int = 0, epoch: int = 0) -> torch.Tensor:
        return torch.tensor([0.25, 2.0]).to(losses)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g), {t: torch.randn(16, generator=g) for t in PAIR.tasks}


def test_logged_total_is_weighted_task_objective_plus_aux_and_the_step_follows_it():
    torch.manual_seed(0)
    model = build("sluice", PAIR, width=8, orthogonality_weight=0.01)
    x, targets = _batch()
    reference = copy.deepcopy(model)  # recompute by hand at the same parameters
    out = reference(x)
    losses = torch.stack([mse_loss(out[t], targets[t]) for t in PAIR.tasks])
    objective = 0.25 * losses[0] + 2.0 * losses[1]
    aux = 0.01 * reference.forward_with_penalty(x)[1]
    assert aux.item() > 0.01 * objective.item()  # big enough to matter in the comparison
    expected = torch.autograd.grad(objective + aux, list(reference.parameters()), retain_graph=True)
    without_aux = torch.autograd.grad(objective, list(reference.parameters()), allow_unused=True)

    log = train.train_step(model, _FixedWeights(), torch.optim.SGD(model.parameters(), lr=1.0),
                           x, targets, SPECS, step=0, epoch=0)
    assert log.objective == pytest.approx(objective.item(), rel=1e-5)
    assert log.auxiliary == pytest.approx(aux.item(), rel=1e-5)
    assert log.total == pytest.approx(objective.item() + aux.item(), rel=1e-5)
    moved = [p0 - p1 for p0, p1 in zip(reference.parameters(), model.parameters())]  # SGD, lr 1: = grad
    for step, g in zip(moved, expected):
        torch.testing.assert_close(step, g)
    differs = max((g - (0 if h is None else h)).abs().max().item() for g, h in zip(expected, without_aux))
    assert differs > 1e-3  # the aux gradient is really part of the update


class _StepRecorder(LossWeighting):
    """Equal weights; records the step and epoch each combine is given."""

    name = "step_recorder_for_test"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def weights(self, losses: torch.Tensor, step: int = 0, epoch: int = 0) -> torch.Tensor:
        self.seen.append((step, epoch))
        return torch.ones_like(losses)


def test_a_loss_weighting_is_given_each_steps_index_and_epoch():
    """Schedules (DWA's epochs, LBTW's first step) read them: step 7 of epoch 3 must say so."""
    torch.manual_seed(0)
    model, method = build("shared_bottom", PAIR, width=8), _StepRecorder()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    for step, epoch in [(0, 0), (7, 3)]:
        train.train_step(model, method, sgd, *_batch(step), SPECS, step=step, epoch=epoch)
    assert method.seen == [(0, 0), (7, 3)]


class _Observing(nn.Module):
    """Shared-bottom stand-in that records the losses handed to ``observe_step_losses``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.observed = build("shared_bottom", PAIR, width=8), []
        self.tasks = self.inner.tasks

    def forward(self, x):
        return self.inner(x)

    def observe_step_losses(self, losses):
        self.observed.append(losses)


def test_a_model_that_learns_from_the_step_losses_is_shown_them_once_detached():
    torch.manual_seed(0)
    model = _Observing()
    x, targets = _batch(2)
    out = model(x)
    expected = torch.stack([mse_loss(out[t], targets[t]) for t in PAIR.tasks]).detach()
    train.train_step(model, _FixedWeights(), torch.optim.SGD(model.parameters(), lr=0.0), x, targets, SPECS, 0, 0)
    assert len(model.observed) == 1 and not model.observed[0].requires_grad
    torch.testing.assert_close(model.observed[0], expected)


def test_a_parameter_no_loss_reaches_in_a_step_is_left_as_it_is_by_adam():
    """Gradients are cleared to None, not to 0, before each step: Adam skips a parameter without one
    (an expert no example was routed to), where a zero gradient would still move it by momentum."""
    torch.manual_seed(0)
    model = build("shared_bottom", PAIR, width=8)
    spare = nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([*model.parameters(), spare], lr=0.1)
    x, targets = _batch(3)
    spare.grad = torch.ones(3)  # a step before this one reached it and left momentum behind
    adam.step()
    before = spare.detach().clone()
    train.train_step(model, _FixedWeights(), adam, x, targets, SPECS, step=1, epoch=0)
    assert spare.grad is None and torch.equal(spare.detach(), before)


def test_gradient_methods_get_the_aux_gradient_added_to_their_update():
    from reference_impls.weighting.registry import gradient_methods

    name = "pcgrad" if "pcgrad" in gradient_methods() else next(iter(gradient_methods()))
    x, targets = _batch(1)
    after = {}
    for weight in (0.0, 0.05):
        torch.manual_seed(0)
        model = build("sluice", PAIR, width=8, orthogonality_weight=weight)
        start = copy.deepcopy(model)
        log = train.train_step(model, train.make_method(name, 2, seed=0), torch.optim.SGD(model.parameters(), lr=1.0),
                               x, targets, SPECS, step=0, epoch=0)
        assert log.objective == pytest.approx(log.losses.sum().item())  # no scalar objective: sum logged
        after[weight] = list(model.parameters())
    penalty = start.forward_with_penalty(x)[1]
    grads = torch.autograd.grad(0.05 * penalty, list(start.parameters()), allow_unused=True)
    assert log.auxiliary == pytest.approx(0.05 * penalty.item(), rel=1e-5)
    for p_aux, p_plain, g in zip(after[0.05], after[0.0], grads):
        torch.testing.assert_close(p_plain - p_aux, torch.zeros_like(p_aux) if g is None else g)


def test_harness_history_logs_aux_only_for_models_that_define_it(tmp_path):
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"y1/mse": 1.0, "y2/mse": 1.0}))
    common = ["--method", "ew", "--baselines", str(baselines), "--no-progress", *TINY]
    with_aux = train.main(["--arch", "dselect_k", "--arch-kw", "entropy_weight=0.1", *common])["train_history"]
    plain = train.main(["--arch", "shared_bottom", *common])["train_history"]
    assert all(a > 0 for a in with_aux["auxiliary"]) and plain["auxiliary"] == [0.0] * 4
    for h in (with_aux, plain):
        for total, objective, aux, task in zip(h["total"], h["objective"], h["auxiliary"], h["task_loss"]):
            assert total == pytest.approx(objective + aux)
            assert objective == pytest.approx(task)  # EW: weights 1


def test_training_with_the_entropy_term_makes_dselect_k_gates_sparse():
    bench = datasets.load("synthetic", n_train=256, n_test=128, dim=20, seed=0)
    x = bench.test.x[:1]
    entropy, active = {}, {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = build("dselect_k", bench.problem, num_experts=8, k=2, entropy_weight=weight)
        train.fit(model, bench, "ew", epochs=8, lr=3e-2, batch_size=32, device=torch.device("cpu"),
                  seed=0, label="dselect_k", progress=False)
        with torch.no_grad():
            entropy[weight] = model.entropy(x).item()
            active[weight] = [int((q > 1e-3).sum()) for q in model.gate_probabilities(x).values()]
    assert entropy[0.0] > 1.0 and entropy[1.0] < 1e-6  # binary selectors only with the term
    assert max(active[1.0]) <= 2  # k = 2 of 8 experts per gate
    assert sum(active[1.0]) < sum(active[0.0])


@pytest.mark.parametrize("arch", ["nddr", "mmoe"])
def test_a_last_batch_of_one_example_is_dropped_only_for_batch_norm(arch, monkeypatch):
    """65 examples in batches of 64 crashed NDDR (BatchNorm1d) after its first step."""
    bench = datasets.load("synthetic", n_train=65, n_test=16, dim=8, seed=0)
    sizes, step = [], train.train_step

    def counting_step(model, method, optimizer, x, *rest):
        sizes.append(len(x))
        return step(model, method, optimizer, x, *rest)

    monkeypatch.setattr(train, "train_step", counting_step)
    model = build(arch, bench.problem)
    metrics, _ = train.fit(model, bench, "ew", epochs=2, lr=1e-3, batch_size=64, device=torch.device("cpu"),
                           seed=0, label=arch, progress=False)
    assert all(np.isfinite(v) for v in metrics.values())
    has_batch_norm = any(isinstance(m, hooks.BATCH_NORMS) for m in model.modules())
    assert has_batch_norm == (arch == "nddr")
    assert sizes == ([64, 64] if has_batch_norm else [64, 1, 64, 1])


def test_batches_of_one_are_refused_for_batch_norm_before_training():
    bench = datasets.load("synthetic", n_train=65, n_test=16, dim=8, seed=0)
    with pytest.raises(hooks.ConfigurationError, match="batch norm needs at least 2 examples per training "
                                                      "batch, got --batch-size 1"):
        train.fit(build("nddr", bench.problem), bench, "ew", epochs=1, lr=1e-3, batch_size=1,
                  device=torch.device("cpu"), seed=0, label="nddr+ew", progress=False)


# ----------------------------------------------------------------------------------------------
# Gradient methods need trainable shared parameters
# ----------------------------------------------------------------------------------------------


def test_gradient_method_on_a_frozen_backbone_is_refused_before_training():
    """LoRA freezes its backbone: PCGrad would see a K x 0 matrix, so the run must stop with a
    message naming both and the way out, and the same run with the backbone unfrozen trains."""
    with pytest.raises(ValueError, match=r"'pcgrad'.*'lora'.*freeze_backbone=False"):
        train.main(["--arch", "lora", "--method", "pcgrad", "--no-progress", *TINY])
    result = train.main(["--arch", "lora", "--arch-kw", "freeze_backbone=False", "--method", "pcgrad",
                         "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_loss_weighting_on_a_frozen_backbone_still_trains():
    result = train.main(["--arch", "lora", "--method", "ew", "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


# ----------------------------------------------------------------------------------------------
# Methods that need a per-step hook the loop does not call
# ----------------------------------------------------------------------------------------------

HOOKED = sorted(n for n, cls in method_registry.methods().items()
                if cls.training_hook is not None and cls.training_hook not in hooks.DRIVEN_HOOKS)


def test_known_hooked_methods_declare_their_hook():
    """The methods that silently trained as equal weighting before the hook existed."""
    declared = {n for n, cls in method_registry.methods().items() if cls.training_hook is not None}
    assert {"gradnorm", "moml", "autol", "dtp", "selective_group_updates", "imtl"} <= declared
    assert {"mt_sgd", "pbt_scalarization"} <= set(HOOKED)  # still refused
    for name in declared:
        assert callable(getattr(method_registry.methods()[name], method_registry.methods()[name].training_hook))


@pytest.mark.parametrize("name", HOOKED)
def test_a_method_whose_hook_is_not_driven_is_refused_before_any_step(name, monkeypatch):
    steps = []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1))
    hook = method_registry.methods()[name].training_hook
    with pytest.raises(hooks.ConfigurationError, match=rf"'{name}'.*{hook}\(\)"):
        train.main(["--arch", "shared_bottom", "--method", name, "--no-progress", *TINY])
    assert steps == []


def test_the_update_hook_is_driven_with_the_losses_after_the_step(monkeypatch):
    """FAMO's ``update`` must see the new parameters' losses: lower than the step's own."""
    from reference_impls.weighting.famo import FAMO
    seen = []
    original = FAMO.update
    monkeypatch.setattr(FAMO, "update", lambda self, losses: (seen.append(losses.clone()), original(self, losses))[1])
    torch.manual_seed(0)
    model = build("shared_bottom", Problem(("a",), (4,), {"a": 1}))
    method = train.make_method("famo", 1, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), {"a": torch.randn(16, 1)}
    specs = {"a": datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError)}
    log = train.train_step(model, method, optimizer, x, y, specs, 0, 0)
    assert len(seen) == 1 and seen[0].item() < log.losses.item()


def test_command_line_prints_one_line_error_without_traceback():
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "reference_impls.train", "--method", "pbt_scalarization",
                          "--no-progress",
                          *TINY], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("error: method 'pbt_scalarization' needs its PBTScalarization.exploit_and_explore()")


def test_a_diverging_run_stops_at_its_step_with_one_line_error():
    """An Adam step of 1e30 overflows the next loss: the run stops there, names the step, the run
    and the task, on its own line after the progress bar, instead of finishing with NaN tables."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "reference_impls.train", *TINY, "--lr", "1e30"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    error = run.stderr.splitlines()[-1]
    assert re.fullmatch(r"error: \S.*, step \d+ \(epoch 1, lr 1e\+30\): task loss y\d = (inf|nan).*; the run "
                        r"diverged \(try a smaller --lr\)", error), run.stderr[-500:]


@pytest.mark.parametrize("losses, objective, auxiliary, message", [
    ([1.0, float("nan")], 2.0, 0.0, "where: task loss b = nan; the run diverged (try a smaller --lr)"),
    ([1.0, 0.0], float("inf"), 0.0, "where: the method's objective is inf although every task loss is finite "
                                    "(a = 1, b = 0): the method cannot weigh these losses"),
    ([1.0, 2.0], 3.0, float("nan"), "where: the model's auxiliary loss is nan; the run diverged"),
    ([1.0, 2.0], 3.0, 0.0, "where: the method's update is not finite although every task loss is finite "
                           "(a = 1, b = 2): the method cannot combine these gradients"),
])
def test_check_finite_names_what_went_non_finite(losses, objective, auxiliary, message):
    log = train.StepLog(torch.tensor(losses), objective, auxiliary, update_finite="update" not in message)
    with pytest.raises(train.TrainingDiverged) as caught:
        train.check_finite(log, ("a", "b"), "where")
    assert str(caught.value).startswith(message)
    train.check_finite(train.StepLog(torch.tensor([1.0, 0.0]), 1.0, 0.0), ("a", "b"), "where")  # finite: silent


def test_a_gradient_method_that_fails_on_finite_losses_is_named():
    """A non-finite update from finite losses (a solver that breaks down, a log of a negative
    loss) is the method's failure: the step's log says so, so the run does not stop one step
    later blaming the learning rate. An auxiliary term added afterwards does not hide it."""
    from reference_impls.weighting.base import Aggregation, GradientMethod

    class NaNFirstRow(GradientMethod):
        def __call__(self, grads):
            update = grads.sum(0)
            update[0] = float("nan")
            return Aggregation(update=update)

    torch.manual_seed(0)
    model = build("shared_bottom", Problem(("a", "b"), (4,), {"a": 1, "b": 1}))
    x, y = torch.randn(8, 4), {"a": torch.randn(8, 1), "b": torch.randn(8, 1)}
    specs = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in y}
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    assert train.train_step(model, method_registry.make("ew_grad"), sgd, x, y, specs, 0, 0).update_finite
    log = train.train_step(model, NaNFirstRow(), sgd, x, y, specs, 0, 0)
    assert not log.update_finite and math.isfinite(log.objective)
    with pytest.raises(train.TrainingDiverged, match="the method's update is not finite"):
        train.check_finite(log, ("a", "b"), "where")


# ----------------------------------------------------------------------------------------------
# The hooks the loop drives: GradNorm's balance_step and IMTL's step
# ----------------------------------------------------------------------------------------------


def _two_task_step_inputs(scale_a: float = 1.0):
    torch.manual_seed(0)
    model = build("shared_bottom", Problem(("a", "b"), (6,), {"a": 1, "b": 1}))
    x = torch.randn(32, 6)
    targets = {"a": scale_a * torch.randn(32, 1), "b": torch.randn(32, 1)}
    specs = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in ("a", "b")}
    return model, x, targets, specs


def _head_gradients(model, x, targets, specs):
    losses = hooks.task_losses(model(x), targets, specs, model.tasks)
    return {t: torch.autograd.grad(losses[k], list(model.task_specific_parameters(t)))
            for k, t in enumerate(model.tasks)}


def test_gradnorm_layer_is_the_top_of_the_shared_trunk():
    model, x, targets, specs = _two_task_step_inputs()
    losses = hooks.task_losses(model(x), targets, specs, model.tasks)
    weight = hooks.last_shared_weight(model, losses)
    shared_matrices = [p for p in model.shared_parameters() if p.ndim >= 2]
    assert weight is shared_matrices[-1]
    assert all(weight is not p for t in model.tasks for p in model.task_specific_parameters(t))


def test_gradnorm_skips_a_shared_weight_that_only_some_tasks_reach():
    """A shared side layer read by task a alone is registered last; W must be the trunk layer
    both tasks read, although autograd gives task b a (zero) gradient for the side layer too."""
    from torch import nn

    from reference_impls.architectures.base import MultiTaskModel

    class SideBranch(MultiTaskModel):
        def __init__(self):
            super().__init__(("a", "b"))
            self.trunk, self.side = nn.Linear(6, 4), nn.Linear(4, 4)  # both shared by declaration
            self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return {"a": self.heads["a"](self.side(h)), "b": self.heads["b"](h)}

        def task_specific_parameters(self, task):
            yield from self.heads[task].parameters()

    torch.manual_seed(0)
    model = SideBranch()
    _, x, targets, specs = _two_task_step_inputs()
    losses = hooks.task_losses(model(x), targets, specs, model.tasks)
    reached = hooks.parameters_reached(losses)
    assert id(model.side.weight) in reached[0] and id(model.side.weight) not in reached[1]
    assert hooks.last_shared_weight(model, losses) is model.trunk.weight


def test_gradnorm_step_trains_the_network_with_w_t_and_then_updates_w():
    """Algorithm 1 of the paper: the network gradient uses w(t); only then does w move to w(t+1)."""
    model, x, targets, specs = _two_task_step_inputs(scale_a=5.0)
    method = train.make_method("gradnorm", 2, 0)
    method.task_weights.data = torch.tensor([1.5, 0.5])  # w(t), already summing to K
    expected = _head_gradients(model, x, targets, specs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keep θ fixed to compare gradients
    train.train_step(model, method, optimizer, x, targets, specs, 0, 0)
    for k, t in enumerate(model.tasks):
        for p, g in zip(model.task_specific_parameters(t), expected[t]):
            torch.testing.assert_close(p.grad, (1.5, 0.5)[k] * g)
    assert not torch.allclose(method.task_weights.detach(), torch.tensor([1.5, 0.5]))
    assert method.task_weights.sum().item() == pytest.approx(2.0)  # renormalised to K


def test_gradnorm_in_the_loop_lowers_the_weight_of_the_task_with_the_larger_gradients():
    """Task a's targets are 5x larger, so its gradient norm on W is larger: GradNorm shrinks w_a."""
    model, x, targets, specs = _two_task_step_inputs(scale_a=5.0)
    method = train.make_method("gradnorm", 2, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(30):
        train.train_step(model, method, optimizer, x, targets, specs, step, 0)
    w_a, w_b = method.task_weights.tolist()
    assert w_a < 0.8 < 1.2 < w_b


def test_gradnorm_and_imtl_run_from_the_command_line_and_differ_from_equal_weighting():
    ew = train.main(["--arch", "shared_bottom", "--method", "ew", "--no-progress", *TINY])
    for name in ("gradnorm", "imtl"):
        result = train.main(["--arch", "shared_bottom", "--method", name, "--no-progress", *TINY])
        assert result["train_loss"][-1] < result["train_loss"][0]
        assert result["delta_m"] != pytest.approx(ew["delta_m"], abs=1e-6)


def test_gradnorm_follows_a_routing_network_to_the_shared_weight_each_batch_reaches():
    """Routed models use different shared modules on different batches; W is found per step."""
    result = train.main(["--arch", "routing_network", "--method", "gradnorm", "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_gradnorm_refuses_a_model_without_a_trainable_shared_weight():
    with pytest.raises(hooks.ConfigurationError, match=r"'gradnorm'.*'lora'"):
        train.main(["--arch", "lora", "--method", "gradnorm", "--no-progress", *TINY])


def test_imtl_step_gives_the_scales_their_gradient_and_the_trunk_imtl_g():
    from reference_impls.weighting.imtl_g import IMTLG
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    method = train.make_method("imtl", 2, 0)
    assert hooks.method_parameters(method, torch.device("cpu")) == [method.loss_scales.log_scales]
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    losses = hooks.task_losses(model(x), targets, specs, model.tasks)
    rows = gradient_rows(losses, shared)  # s = 0, so e^s L_k = L_k
    expected_update = IMTLG()(rows).update
    optimizer = torch.optim.SGD(list(model.parameters()) + [method.loss_scales.log_scales], lr=0.0)
    train.train_step(model, method, optimizer, x, targets, specs, 0, 0)
    # d/ds (e^s L - s) at s = 0 is L - 1
    torch.testing.assert_close(method.loss_scales.log_scales.grad, losses.detach() - 1)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected_update)


def test_selective_group_updates_take_one_step_per_group_and_learn_an_affinity(monkeypatch):
    """Two tasks start in two groups: two optimizer steps per batch, each on one task's loss,
    and the affinity matrix fills from the losses measured between them."""
    from reference_impls.weighting.selective_group_updates import SelectiveGroupUpdates
    masks, methods = [], []
    original = SelectiveGroupUpdates.weights

    def spy(self, losses, step=0, epoch=0):
        methods.append(self)
        mask = original(self, losses, step, epoch)
        masks.append(mask.tolist())
        return mask

    monkeypatch.setattr(SelectiveGroupUpdates, "weights", spy)
    train.main(["--arch", "shared_bottom", "--method", "selective_group_updates", "--no-progress", *TINY])
    batches = 4 * (256 // 32)  # TINY: 4 epochs of 8 batches
    multi = methods[-2 * batches:]  # the multi-task run comes after the single-task baselines
    assert len({id(m) for m in multi}) == 1
    assert sorted(map(tuple, masks[-2 * batches:])) == [(0.0, 1.0)] * batches + [(1.0, 0.0)] * batches
    affinity = multi[0].affinity
    assert (affinity.diagonal() > 0).all()  # each task's own step lowered its loss on the batch
    assert affinity.abs().sum() > affinity.diagonal().abs().sum()  # and cross-task effects were recorded


def test_fs_mtl_step_gives_the_trunk_the_sum_of_per_task_sharpness_aware_gradients():
    """With its default equal-weighting aggregator, FS-MTL's update is Σ_k ∇L_k(θ + ε_k),
    ε_k = ρ g_k/||g_k||, computed here by hand; the perturbations leave θ exactly as it was."""
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    method = train.make_method("fs_mtl", 2, 0)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    before = [p.detach().clone() for p in shared]
    expected = torch.zeros(sum(p.numel() for p in shared))
    for k in range(2):
        loss = hooks.task_losses(model(x), targets, specs, model.tasks)[k]
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, shared)])
        step = method.rho * g / g.norm()
        with torch.no_grad():
            offset = 0
            for p in shared:
                p += step[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        loss = hooks.task_losses(model(x), targets, specs, model.tasks)[k]
        expected += torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, shared)])
        with torch.no_grad():
            for p, b in zip(shared, before):
                p.copy_(b)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train.train_step(model, method, optimizer, x, targets, specs, 0, 0)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)
    for p, b in zip(shared, before):
        assert torch.equal(p.detach(), b)
    plain = sum(torch.cat([t.reshape(-1) for t in torch.autograd.grad(l, shared, retain_graph=True)])
                for l in hooks.task_losses(model(x), targets, specs, model.tasks))
    assert not torch.allclose(expected, plain)  # ρ > 0 really moves the gradient


def test_fs_mtl_trains_from_the_command_line():
    result = train.main(["--arch", "mmoe", "--method", "fs_mtl", "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_validation_split_is_seeded_disjoint_and_a_tenth():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    rest, val = hooks.validation_split(data, 0.1, seed=3)
    again, val_again = hooks.validation_split(data, 0.1, seed=3)
    assert len(val) == 5 and len(rest) == 45
    assert sorted(rest.indices + val.indices) == list(range(50))
    assert val.indices == val_again.indices
    assert val.indices != hooks.validation_split(data, 0.1, seed=4)[1].indices


@pytest.mark.parametrize("name, state", [("moml", "logits"), ("autol", "task_weights")])
def test_bilevel_meta_update_moves_only_the_task_weights(name, state):
    """The look-ahead is functional: θ is exactly as before, the weights have moved."""
    from reference_impls.weighting.moml import MOML
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    # MOML's default rates (1e-4 look-ahead, 1e-3 meta) move its logits by less than float32 resolves
    method = MOML(2, inner_lr=0.1, meta_lr=1.0) if name == "moml" else train.make_method(name, 2, 0)
    own = hooks.method_parameters(method, torch.device("cpu"))
    meta_optimizer = torch.optim.Adam(own, lr=1e-2) if name == "autol" else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights_before = getattr(method, state).detach().clone()
    val = (torch.randn(32, 6), {"a": 3.0 * torch.randn(32, 1), "b": torch.randn(32, 1)})
    hooks.meta_update(method, model, (x, targets), val, specs, 1e-2, meta_optimizer)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(getattr(method, state).detach(), weights_before)


def test_autol_meta_update_follows_the_validation_hypergradient():
    """AutoL's λ step goes against d L_val(θ − η ∇ Σ λ_k L_k) / dλ, here by finite differences."""
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    model, x, targets = model.double(), x.double(), {t: v.double() for t, v in targets.items()}
    method = train.make_method("autol", 2, 0).double()  # double precision for the finite differences
    val = (torch.randn(32, 6, dtype=torch.float64),
           {"a": 3.0 * torch.randn(32, 1, dtype=torch.float64), "b": torch.randn(32, 1, dtype=torch.float64)})
    params = {n: p for n, p in model.named_parameters()}
    from torch.func import functional_call

    def val_after_lookahead(lam):
        inner = (lam * hooks.task_losses(functional_call(model, params, (x,)), targets, specs, model.tasks)).sum()
        grads = torch.autograd.grad(inner, list(params.values()))
        fast = {n: p - 1e-2 * g for (n, p), g in zip(params.items(), grads)}
        return hooks.task_losses(functional_call(model, fast, (val[0],)), val[1], specs, model.tasks).sum().item()

    lam = method.task_weights.detach().clone()
    numeric = torch.tensor([(val_after_lookahead(lam + e) - val_after_lookahead(lam - e)) / 2e-4
                            for e in 1e-4 * torch.eye(2, dtype=torch.float64)], dtype=torch.float64)
    sgd = torch.optim.SGD(hooks.method_parameters(method, torch.device("cpu")), lr=1.0)
    hooks.meta_update(method, model, (x, targets), val, specs, 1e-2, sgd)
    torch.testing.assert_close(lam - method.task_weights.detach(), numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["moml", "autol"])
def test_bilevel_methods_train_from_the_command_line_with_held_out_data(name, capsys, monkeypatch):
    hook = method_registry.methods()[name].training_hook
    cls, calls = method_registry.methods()[name], []
    original = getattr(cls, hook)
    monkeypatch.setattr(cls, hook, lambda self, params, train_fn, val_fn, *rest: (
        calls.append(len(val_fn(params))), original(self, params, train_fn, val_fn, *rest))[1])
    result = train.main(["--arch", "shared_bottom", "--method", name, "--no-progress", *TINY])
    assert f"[train] {name}: 26 of 256 training examples held out" in capsys.readouterr().err
    assert calls == [2] * (4 * 8)  # one meta step per batch: 4 epochs of ceil(230 / 32) batches
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_bilevel_meta_step_differentiates_twice_through_attention():
    """The fused attention kernels have no double backward; the meta step must use the math one."""
    result = train.main(["--arch", "mtdnn", "--method", "autol", "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


def _binary_benchmark(n: int = 128) -> datasets.Benchmark:
    """Two linearly separable binary tasks scored by accuracy (a KPI in [0, 1], as DTP needs)."""
    from reference_impls.data.celeba import binary_loss
    from reference_impls.metrics import Accuracy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 6, generator=g)
    labels = {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] + x[:, 2] > 0).long()}
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    return datasets.Benchmark(problem, TensorTasks(x[:n], {t: y[:n] for t, y in labels.items()}),
                              TensorTasks(x[n:], {t: y[n:] for t, y in labels.items()}),
                              {t: datasets.TaskSpec(binary_loss, Accuracy) for t in ("a", "b")})


def test_dtp_weights_come_from_the_batch_accuracies():
    """After one step DTP's smoothed KPIs are the batch accuracies (by hand), and the network
    step used the focal weights −(1 − κ)^γ log κ of those KPIs."""
    bench = _binary_benchmark()
    torch.manual_seed(0)
    model = build("shared_bottom", bench.problem)
    x = torch.stack([bench.train[i][0] for i in range(32)])
    targets = {t: torch.stack([bench.train[i][1][t] for i in range(32)]) for t in model.tasks}
    with torch.no_grad():
        outputs = model(x)
    accuracy = torch.tensor([((outputs[t].reshape(-1) > 0).long() == targets[t]).double().mean().item()
                             for t in model.tasks], dtype=torch.float64)
    expected_heads = _head_gradients(model, x, targets, bench.tasks)
    method = train.make_method("dtp", 2, 0)
    train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=0.0), x, targets, bench.tasks, 0, 0)
    torch.testing.assert_close(method.smoothed_kpis.double(), accuracy)
    focal = -(1 - accuracy) * torch.log(accuracy)
    for k, t in enumerate(model.tasks):
        for p, g in zip(model.task_specific_parameters(t), expected_heads[t]):
            torch.testing.assert_close(p.grad, focal[k].float() * g)


def test_dtp_trains_on_accuracy_tasks_and_is_refused_on_regression():
    bench = _binary_benchmark()
    torch.manual_seed(0)
    metrics, history = train.fit(build("shared_bottom", bench.problem), bench, "dtp", epochs=5, lr=1e-2,
                                 batch_size=32, device=torch.device("cpu"), seed=0, label="dtp", progress=False)
    assert history["task_loss"][-1] < history["task_loss"][0]
    assert min(metrics.values()) > 0.8  # both separable tasks learned
    with pytest.raises(hooks.ConfigurationError, match=r"'dtp'.*KPIs in \[0, 1\].*'y1'.*'mse'"):
        train.main(["--arch", "shared_bottom", "--method", "dtp", "--no-progress", *TINY])


def _shared_and_heads(model):
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    return shared, [p for t in model.tasks for p in model.task_specific_parameters(t)]


@pytest.mark.parametrize("name, options", [("epo", {"preference": [1.0, 3.0]}),
                                           ("pareto_mtl", {"preferences": [[1.0, 0.0], [0.0, 1.0]], "index": 1})])
def test_loss_aware_gradient_methods_see_the_batch_losses(name, options):
    """EPO and Pareto MTL weigh gradients by where the losses are; the loop hands them over."""
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    shared, _ = _shared_and_heads(model)
    losses = hooks.task_losses(model(x), targets, specs, model.tasks)
    expected = train.make_method(name, 2, 0, options)(gradient_rows(losses, shared), losses.detach()).update
    method = train.make_method(name, 2, 0, options)
    train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=0.0), x, targets, specs, 0, 0)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)


def test_modo_uses_the_two_halves_of_the_batch_as_independent_samples():
    from reference_impls.weighting.modo import MoDo
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    shared, heads = _shared_and_heads(model)
    halves = [hooks.Batch(x, targets, specs).losses(model, part) for part in (slice(0, 16), slice(16, None))]
    g1, g2 = (gradient_rows(h, shared) for h in halves)
    expected = MoDo()(g1, g2).update  # λ from G₁G₂ᵀ, update λ (G₁ + G₂)/2
    head_mean = [(a + b) / 2 for a, b in zip(torch.autograd.grad(halves[0].sum(), heads, retain_graph=True),
                                             torch.autograd.grad(halves[1].sum(), heads))]
    method = train.make_method("modo", 2, 0)
    train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=0.0), x, targets, specs, 0, 0)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), expected)
    for p, g in zip(heads, head_mean):
        torch.testing.assert_close(p.grad, g)
    single = MoDo()(gradient_rows(hooks.task_losses(model(x), targets, specs, model.tasks), shared)).update
    assert not torch.allclose(expected, single)  # double sampling really differs from one sample


def test_method_options_reach_the_constructor_and_bad_ones_are_named():
    result = train.main(["--arch", "shared_bottom", "--method", "epo", "--method-kw", "preference=[1,3]",
                         "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]
    with pytest.raises(hooks.ConfigurationError, match=r"'epo' needs .*\['preference'\]; pass them with --method-kw"):
        train.main(["--arch", "shared_bottom", "--method", "epo", "--no-progress", *TINY])
    with pytest.raises(hooks.ConfigurationError, match=r"'epo' has no option\(s\) \['pref'\]; its options are \['preference'"):
        train.main(["--arch", "shared_bottom", "--method", "epo", "--method-kw", "pref=1", "--no-progress", *TINY])


@pytest.mark.parametrize("method, option, message", [
    # no constructor of their own: object's/Module's (*args, **kwargs) used to swallow options
    ("ew", "bogus=1", r"'ew' has no option\(s\) \['bogus'\]; it takes none"),
    ("mgda", "normalization=loss+", r"'mgda' has no option\(s\) \['normalization'\]; it takes none"),
    ("upgrad", "reg_eps=0.1", r"'upgrad' has no option\(s\) \['reg_eps'\]; it takes none"),
    # values the constructor refuses: named, not a traceback
    ("cagrad", "c=-1", r"'cagrad' --method-kw c=-1: c must be non-negative"),
    ("dwa", "temperature=0", r"'dwa' --method-kw temperature=0: .*temperature must be > 0"),
    ("epo", "preference=[1,-2]", r"'epo' --method-kw preference=\[1, -2\]: preference must be positive"),
    # refused only when the method first meets the two tasks, at the first step
    ("epo", "preference=[1,2,3]", r"'epo' --method-kw preference=\[1, 2, 3\]: .*3 preferences"),
])
def test_bad_method_options_are_refused_with_their_name(method, option, message, tmp_path):
    baselines = tmp_path / "baselines.json"
    baselines.write_text(json.dumps({"y1/mse": 1.0, "y2/mse": 1.0}))
    with pytest.raises(hooks.ConfigurationError, match=message):
        train.main(["--method", method, "--method-kw", option, "--baselines", str(baselines), "--no-progress", *TINY])


def test_every_method_without_a_constructor_of_its_own_takes_no_options():
    for name, cls in method_registry.methods().items():
        if cls.__init__ in (object.__init__, torch.nn.Module.__init__):
            with pytest.raises(hooks.ConfigurationError, match="it takes none"):
                train.make_method(name, 2, 0, {"anything": 1})


def test_a_method_failing_its_first_step_without_options_keeps_its_traceback(monkeypatch):
    # Only options can be blamed: with none given, a ValueError is the method's own bug.
    from reference_impls.weighting.dwa import DWA

    def broken(self, losses, step=0, epoch=0):
        raise ValueError("a bug inside the method")

    monkeypatch.setattr(DWA, "weights", broken)
    with pytest.raises(ValueError, match="a bug inside the method") as caught:
        train.main(["--method", "dwa", "--no-progress", *TINY])
    assert not isinstance(caught.value, hooks.ConfigurationError)


def test_rep_mtl_is_trained_on_its_regularised_objective_of_the_shared_representation():
    from reference_impls.weighting.rep_mtl import RepMTL
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    z = model.encode(x)
    losses = hooks.task_losses(model.decode(z), targets, specs, model.tasks)
    objective = RepMTL().combine(losses, representation=z)
    assert objective.item() != pytest.approx(losses.sum().item())  # the penalties are not zero
    expected = torch.autograd.grad(objective, list(model.parameters()))
    log = train.train_step(model, train.make_method("rep_mtl", 2, 0), torch.optim.SGD(model.parameters(), lr=0.0),
                           x, targets, specs, 0, 0)
    assert log.objective == pytest.approx(objective.item())
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(hooks.ConfigurationError, match=r"'rep_mtl'.*'mmoe' has no single one"):
        train.main(["--arch", "mmoe", "--method", "rep_mtl", "--no-progress", *TINY])


def test_continuous_pareto_gets_the_batch_curvature():
    from reference_impls.weighting.continuous_pareto import weighted_hessian_vector_product
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    shared, _ = _shared_and_heads(model)
    losses = hooks.task_losses(model(x), targets, specs, model.tasks)
    options = {"beta": [1.0, -1.0]}
    expected = train.make_method("continuous_pareto", 2, 0, options)(
        gradient_rows(losses, shared), weighted_hessian_vector_product(losses, shared)).update
    method = train.make_method("continuous_pareto", 2, 0, options)
    train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=0.0), x, targets, specs, 0, 0)
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(update, expected)
    assert update.norm().item() == pytest.approx(1.0)  # a unit tangent direction


def test_mgda_ub_weighs_the_representation_gradients_not_the_parameter_gradients():
    from reference_impls.weighting.gradients import min_norm_weights
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    shared, heads = _shared_and_heads(model)
    z = model.encode(x)
    losses = hooks.task_losses(model.decode(z), targets, specs, model.tasks)
    rows = gradient_rows(losses, [z])
    alpha = min_norm_weights(rows @ rows.T).to(losses)
    expected = torch.autograd.grad((alpha * losses).sum(), shared, retain_graph=True)
    expected_heads = torch.autograd.grad(losses.sum(), heads, retain_graph=True)
    on_parameters = gradient_rows(losses, shared)
    plain_mgda = min_norm_weights(on_parameters @ on_parameters.T).to(losses)
    assert not torch.allclose(alpha, plain_mgda, atol=1e-3)  # the two MGDAs really differ here
    train.train_step(model, train.make_method("mgda_ub", 2, 0), torch.optim.SGD(model.parameters(), lr=0.0),
                     x, targets, specs, 0, 0)
    for p, g in zip([*shared, *heads], [*expected, *expected_heads]):
        torch.testing.assert_close(p.grad, g)


def test_rotograd_gets_the_representation_width_and_trains_its_rotations():
    model, x, targets, specs = _two_task_step_inputs(scale_a=3.0)
    bench = datasets.Benchmark(Problem(("a", "b"), (6,), {"a": 1, "b": 1}),
                               [(x[i], {t: targets[t][i] for t in targets}) for i in range(32)], [], specs)
    width = model.encode(x).shape[1]
    method = train.make_method("rotograd", 2, 0, facts={"dim": lambda: hooks.representation_size(
        model, bench, torch.device("cpu"))})
    rotations = hooks.method_parameters(method, torch.device("cpu"))
    assert [tuple(p.shape) for p in rotations] == [(2, width, width)]
    plain = hooks.task_losses(model(x), targets, specs, model.tasks)
    log = train.train_step(model, method, torch.optim.SGD(list(model.parameters()) + rotations, lr=0.0),
                           x, targets, specs, 0, 0)
    torch.testing.assert_close(log.losses, plain.detach())  # rotations start at the identity
    assert rotations[0].grad is not None and rotations[0].grad.abs().sum() > 0
    result = train.main(["--arch", "shared_bottom", "--method", "rotograd", "--no-progress", *TINY])
    assert result["train_loss"][-1] < result["train_loss"][0]


def test_svd_reweighting_is_built_from_the_training_set():
    from reference_impls.weighting.svd_reweighting import svd_task_weights
    bench = datasets.load("synthetic", n_train=64, n_test=8, dim=5, num_sines=2, seed=0)
    x, y = hooks.design_matrices(bench.train, ("y1", "y2"))
    assert x.shape == (64, 5) and y.shape == (64, 2)
    assert torch.equal(y[:, 1], torch.stack([bench.train[i][1]["y2"].reshape(()) for i in range(64)]).double())
    method = train.make_method("svd_reweighting", 2, 0, facts={"inputs": lambda: x, "labels": lambda: y})
    torch.testing.assert_close(method.alpha, svd_task_weights(x, y, 1).to(method.alpha))


OPTIONS = {"epo": ["preference=[1,2]"], "pareto_mtl": ["preferences=[[1,0],[0,1]]", "index=0"],
           "continuous_pareto": ["beta=[1,-1]"]}
REFUSED = {"auxinash", "dtp", "mt_sgd", "pbt_scalarization", "pinns_ntk",  # on regression tasks
           "evolutionary_selective_backprop",  # a population searched by evolve(), which the loop does not call
           "connection_strength",  # no task-specific batch norm to read its priority from
           "tcdcn"}  # needs per-epoch training and validation errors, which the loop does not compute


@pytest.mark.parametrize("name", sorted(method_registry.methods()))
def test_every_method_trains_through_the_harness_or_is_refused_with_a_reason(name, tmp_path):
    """No method may crash mid-run or train as something else: it trains, or it is refused up front."""
    baselines = tmp_path / "single.json"
    baselines.write_text('{"y1/mse": 1.0, "y2/mse": 1.0}')
    argv = ["--arch", "shared_bottom", "--method", name, "--no-progress", "--baselines", str(baselines),
            "--data", "synthetic", "--data-kw", "n_train=64", "n_test=32", "dim=8", "num_sines=2",
            "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--seed", "0", "--device", "cpu"]
    if name in OPTIONS:
        argv += ["--method-kw", *OPTIONS[name]]
    if name in REFUSED:
        with pytest.raises(hooks.ConfigurationError):
            train.main(argv)
    else:
        result = train.main(argv)
        assert all(torch.isfinite(torch.tensor(result["train_loss"])))


def _documented_commands() -> list[str]:
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    texts = [(root / "README.md").read_text(), (root / "site_gen/templates/site/implementations.md.j2").read_text()]
    return [m.group(1) for text in texts for m in re.finditer(r"(python -m reference_impls\.train[^`\n]*)", text)]


def test_the_documented_training_commands_name_real_architectures_methods_and_data(monkeypatch):
    import shlex
    from reference_impls.architectures import registry as arch_registry
    commands = _documented_commands()
    assert len(commands) >= 4
    for command in commands:
        with monkeypatch.context() as gpu:  # a documented --device cuda must parse on a CPU machine too
            gpu.setattr(torch.cuda, "is_available", lambda: True)
            gpu.setattr(torch.cuda, "device_count", lambda: 1)
            args = train.parse_args(shlex.split(command)[3:])
        assert args.arch in arch_registry.available() and args.method in method_registry.methods()
        datasets.loader(args.data)  # a registered benchmark
        taken = {n for f in datasets.option_functions(args.data) for n in inspect.signature(f).parameters}
        assert {option.split("=")[0] for option in args.data_kw} <= taken, command  # options it takes
        if args.data == "synthetic":  # run it, smaller
            result = train.main([*shlex.split(command)[3:], "--no-progress", *TINY])
            assert result["train_loss"][-1] < result["train_loss"][0]


@pytest.mark.parametrize("device, cuda, message", [
    ("cuda", (False, 0), "cuda is not available on this machine"),
    ("cuda:2", (True, 2), "cuda:2 does not exist: this machine has 2 cuda device(s)"),
    ("gpu0", (False, 0), "'gpu0' is not a torch device"),
    ("meta", (False, 0), "the meta device holds no data"),
])
def test_an_unavailable_device_is_a_one_line_usage_error(device, cuda, message, monkeypatch, capsys):
    """Asked for a device it lacks, the harness stops at argument parsing, not deep in .to()."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda[1])
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(["--arch", "mmoe", "--data", "synthetic", "--device", device])
    assert stopped.value.code == 2
    assert f"argument --device: {message}" in capsys.readouterr().err


def test_an_available_device_parses_to_a_torch_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert train.parse_args(["--arch", "mmoe", "--device", "cuda:1"]).device == torch.device("cuda", 1)
    assert train.parse_args(["--arch", "mmoe", "--device", "cpu"]).device == torch.device("cpu")


@pytest.mark.parametrize("argv, message", [
    (["--arch", "bim"], "--arch bim: BIM scans 2-D feature maps of every task; it needs image inputs"),
    (["--stl-arch", "bim"], "--stl-arch bim: BIM scans 2-D feature maps"),
    (["--arch", "mmoe", "--arch-kw", "bogus=1"], "--arch mmoe --arch-kw bogus=1: no option 'bogus'; its options are"),
    (["--arch", "mtdnn", "--arch-kw", "width=7"], "--arch mtdnn --arch-kw width=7: width 7 does not split into 4 attention heads"),
    (["--arch", "sluice", "--arch-kw", "num_subspaces=0"], "--arch sluice --arch-kw num_subspaces=0: num_subspaces must be at least 1, got 0"),
    (["--arch", "adapterfusion", "--arch-kw", "num_tokens=0"], "--arch adapterfusion --arch-kw num_tokens=0: num_tokens must be at least 1"),
    (["--arch", "muir", "--arch-kw", "block_size=0"], "--arch muir --arch-kw block_size=0: block_size must be at least 1, got 0"),
    (["--arch", "ia3", "--arch-kw", "depth=0"], "--arch ia3 --arch-kw depth=0: depth must be at least 1, got 0"),
    (["--arch", "camtl", "--arch-kw", "d_model=8"], "--arch camtl --arch-kw d_model=8: camtl sets d_model itself"),
    (["--stl-kw", "width=-3"], "--stl-arch shared_bottom --stl-kw width=-3: width must be at least 1, got -3"),
    (["--data", "nyuv2"], "--data nyuv2: data 'nyuv2' is read from disk: pass its root directory"),
    (["--data", "nyuv2", "--root", "{tmp}/absent"], "--data nyuv2: missing {tmp}/absent/train/image\nexpected layout:\n"),
    (["--data-kw", "n_train=abc"], "--data synthetic --data-kw n_train='abc': "),
    (["--method", "pcgrad", "--method-kw", "random_order=maybe"],
     "method 'pcgrad': --method-kw random_order must be bool (as pcgrad.PCGrad.__init__ declares it)"),
    (["--baselines", "{tmp}/absent.json"], "--baselines {tmp}/absent.json: [Errno 2] No such file"),
    (["--baselines", "{tmp}/list.json"], "--baselines {tmp}/list.json: expected a JSON object {task/metric: value}, got list"),
    (["--save-baselines", "{tmp}/absent/b.json"], "--save-baselines {tmp}/absent/b.json: no directory {tmp}/absent"),
    (["--baselines", "{tmp}/other.json"], "--baselines {tmp}/other.json: has ['y1/mae'], but --data synthetic reports ['y1/mse', 'y2/mse']"),
])
def test_a_bad_flag_is_reported_as_that_flags_error(argv, message, tmp_path):
    """Each error names the flag that caused it, whatever layer raised it underneath."""
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"y1/mae": 0.5}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    extra = [] if {"--data", "--data-kw"} & set(argv) else ["--data-kw", "n_train=64", "n_test=32", "dim=8"]
    args = train.parse_args([*argv, *extra, "--epochs", "1", "--no-progress"])
    with pytest.raises(hooks.ConfigurationError) as raised:
        train.run(args)
    assert str(raised.value).startswith(message.replace("{tmp}", str(tmp_path)))


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), IndexError("index 0 is out of range"),
                                   RuntimeError("negative dimension -1")])
def test_an_unguarded_failure_while_building_is_the_options_error_only_when_options_were_given(error):
    """No registered architecture fails this way any more (test_size_arguments); a new one
    might, and then the user who passed options still gets a one-line flag error, while the
    same error with no options is a bug and keeps its traceback."""
    def make():
        raise error

    with pytest.raises(hooks.ConfigurationError, match=rf"^--arch x --arch-kw k=0: {error}$"):
        train.built_from_flags("--arch x", "--arch-kw", {"k": 0}, make)
    with pytest.raises(type(error)):
        train.built_from_flags("--arch x", "--arch-kw", {}, make)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
    (["--batch-size", "-4"], "argument --batch-size: must be > 0, got -4"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),  # was accepted, and diverged
    (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["--lr", "1e400"], "argument --lr: must be a finite number, got 1e400 (too large: read as inf)"),
    (["--method-lr", "inf"], "argument --method-lr: must be a finite number, got inf"),  # was blamed on the method
    (["--epochs", "2.5"], "argument --epochs: '2.5' is not an integer"),
    (["--arch-kw", "num_experts"], "argument --arch-kw: expected KEY=VALUE, got 'num_experts'"),
    (["--method-kw", "=1"], "argument --method-kw: expected KEY=VALUE, got '=1'"),
    (["--arch-kw", "k=1", "k=2"], "argument --arch-kw: k is given twice"),
    (["--data-kw", "dim=4", "--data-kw", "dim=8"], "argument --data-kw: dim is given twice"),
    (["--seed", "-1"], "argument --seed: must be >= 0 and <= 9223372036854775807, got -1"),
    (["--seed", str(2**63)], "argument --seed: must be >= 0 and <= 9223372036854775807, got 9223372036854775808"),
])
def test_malformed_numbers_and_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_an_options_flag_given_twice_adds_to_the_first_instead_of_replacing_it():
    """argparse's default for nargs='*' keeps only the last --data-kw: the correlation of the
    first one was silently dropped."""
    args = train.parse_args(["--data-kw", "correlation=0.9", "--arch", "mmoe", "--data-kw", "n_train=64",
                             "--method-kw", "random_order=no", "--method-kw", "x=1"])
    assert args.data_kw == {"correlation": 0.9, "n_train": 64}
    assert args.method_kw == {"random_order": "no", "x": 1}
    assert train.parse_args(["--seed", str(2**63 - 1)]).seed == 2**63 - 1


def test_a_bug_inside_a_model_keeps_its_traceback(monkeypatch):
    """Only errors a flag can cause are rewritten: with no options given, a TypeError is a bug."""
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")
    monkeypatch.setattr(train.registry, "build", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        train.run(train.parse_args(["--arch", "mmoe", *TINY]))


def test_in_range_accepts_its_bounds_and_refuses_what_lies_outside():
    import argparse
    unit, strictly_positive = train.in_range(float, -1, 1), train.positive(int)
    assert (unit("-1"), unit("1"), strictly_positive("1")) == (-1.0, 1.0, 1)
    for parse, text in ((unit, "1.0001"), (unit, "-2"), (strictly_positive, "0"), (strictly_positive, "1.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("argv", [["--stl-arch", "bim"], ["--baselines", "/absent/baselines.json"],
                                  ["--save-baselines", "/absent/baselines.json"]])
def test_flags_used_after_training_are_checked_before_it(argv, monkeypatch):
    """A bad single-task architecture or baselines path must not cost a multi-task run first."""
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking the flags"))
    with pytest.raises(hooks.ConfigurationError):
        train.run(train.parse_args([*argv, *TINY]))


@pytest.mark.parametrize("case, message", [
    ("baselines_negative", r"single-task values must be finite and >= 0, got \{'y1/mse': -0.1\}"),
    ("baselines_nan", r"single-task values must be finite and >= 0, got \{'y2/mse': nan\}"),
    ("save_to_a_directory", r"--save-baselines .*: is a directory; give a file name"),
    ("stl_arch_with_baselines", r"with --baselines none are trained"),
    ("no_training_examples", r"--data synthetic: the training set is empty \(0 examples\)"),
    ("no_test_examples", r"--data synthetic: the test set is empty \(0 examples\)"),
])
def test_what_would_fail_after_training_is_refused_before_it(case, message, tmp_path, monkeypatch):
    """Found by a user's session: each of these used to train first and then crash (or, for an
    empty test set, print a table of zeros), losing the run."""
    baselines = tmp_path / "baselines.json"
    values = {"baselines_negative": {"y1/mse": -0.1, "y2/mse": 1.0}, "baselines_nan": {"y1/mse": 1.0, "y2/mse": math.nan}}
    baselines.write_text(json.dumps(values.get(case, {"y1/mse": 1.0, "y2/mse": 1.0})))
    argv = {"baselines_negative": ["--baselines", str(baselines)], "baselines_nan": ["--baselines", str(baselines)],
            "save_to_a_directory": ["--save-baselines", str(tmp_path)],
            "stl_arch_with_baselines": ["--baselines", str(baselines), "--stl-arch", "mmoe"],
            "no_training_examples": ["--data-kw", "n_train=0"], "no_test_examples": ["--data-kw", "n_test=0"]}[case]
    tiny = [a for a in TINY if not a.startswith(("n_train=", "n_test="))]
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises((hooks.ConfigurationError, datasets.DataError), match=message):
        train.run(train.parse_args([*tiny, *argv]))


def test_save_baselines_where_nothing_can_be_written_is_refused_before_training(monkeypatch):
    """/proc is a directory in which nobody, root included, can create a file."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(hooks.ConfigurationError, match=r"--save-baselines /proc/baselines.json: cannot write there"):
        train.run(train.parse_args(["--save-baselines", "/proc/baselines.json", *TINY]))


@pytest.mark.parametrize("method", ["aw", "autol"])
def test_methods_holding_data_out_need_two_training_examples(method):
    with pytest.raises(hooks.ConfigurationError, match=rf"{method} holds out .* at least 2 training examples; there are 1"):
        train.main(["--method", method, "--no-progress", *[a for a in TINY if not a.startswith("n_train=")],
                    "--data-kw", "n_train=1"])


def test_fit_refuses_an_empty_test_set_before_its_first_step(monkeypatch):
    """Called directly (as the architecture sweep does), fit checks both splits itself."""
    bench = datasets.load("synthetic", None, n_train=16, n_test=0, dim=6, seed=0)
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(datasets.DataError, match=r"^mmoe: the test set is empty \(0 examples\)$"):
        train.fit(build("mmoe", bench.problem), bench, "ew", epochs=1, lr=1e-3, batch_size=4,
                  device=torch.device("cpu"), seed=0, label="mmoe", progress=False)


def test_a_task_with_no_valid_test_entry_has_no_score_and_delta_m_says_why():
    """Every target ignored (Office: a domain with no test image) used to score 0.0000, which
    read as a real accuracy of 0 and then blamed a zero baseline for the undefined Δm."""
    from reference_impls.metrics import Accuracy
    x = torch.randn(6, 4)
    labels = {"a": torch.tensor([0, 1, 0, 1, 0, 1]), "b": torch.full((6,), -1)}
    problem = Problem(("a", "b"), (4,), {"a": 2, "b": 2})
    specs = {t: datasets.TaskSpec(loss=torch.nn.functional.cross_entropy, metric=lambda: Accuracy(ignore_index=-1))
             for t in labels}
    bench = datasets.Benchmark(problem, TensorTasks(x, labels), TensorTasks(x, labels), specs)
    model = build("shared_bottom", problem)
    scores = train.evaluate(model, bench, 4, torch.device("cpu"))
    assert 0 <= scores["a/accuracy"] <= 1 and math.isnan(scores["b/accuracy"])
    table = train.results_table(scores, {"a/accuracy": 0.5, "b/accuracy": 0.5}, {"a/accuracy": False, "b/accuracy": False})
    assert "Δm undefined: b/accuracy had no valid test entry (every target ignored), so no score" in table
    table = train.results_table({"a/accuracy": 0.5}, {"a/accuracy": 0.0}, {"a/accuracy": False})
    assert "Δm undefined: the single-task value of a/accuracy is 0" in table


def test_help_names_every_architecture_and_method_and_the_defaults(capsys):
    from reference_impls.architectures import registry as arch_registry
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(f" {name}," in text or f" {name} (default" in text for name in arch_registry.available())
    assert all(f" {name}," in text or f" {name} (default" in text for name in method_registry.methods())
    assert "(default: ew)" in text and "(default: shared_bottom)" in text and "(default: 3)" in text


# ----------------------------------------------------------------------------------------------
# Deep supervision of intermediate predictions
# ----------------------------------------------------------------------------------------------


def test_deep_supervision_scores_each_intermediate_prediction_in_the_output_form():
    outputs = {"seg": torch.zeros(2, 3, 4, 4), "cls": torch.zeros(2, 5)}
    targets = {"seg": torch.randn(2, 3, 4, 4), "cls": torch.randn(2, 5)}
    specs = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in targets}
    half, pooled, same = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 4, 4), torch.randn(2, 3, 4, 4)
    intermediate = {"coarse": {"seg": half, "cls": pooled}, "seg": same, "edges": torch.randn(2, 1, 4, 4)}
    expected = (mse_loss(torch.nn.functional.interpolate(half, size=(4, 4), mode="bilinear"), targets["seg"])
                + mse_loss(pooled.mean(dim=(2, 3)), targets["cls"]) + mse_loss(same, targets["seg"]))
    got = train.deep_supervision(intermediate, outputs, targets, specs)  # "edges" has no target: skipped
    torch.testing.assert_close(got, expected)
    assert train.deep_supervision(None, outputs, targets, specs) is None
    assert train.deep_supervision({"edges": torch.randn(2, 1, 4, 4)}, outputs, targets, specs) is None


@pytest.mark.parametrize("name", ["padnet", "mtinet", "atrc", "invpt", "diffusionmtl"])
def test_the_harness_step_follows_the_final_and_the_intermediate_losses(name):
    """Equal weighting's step is the gradient of sum(final losses) + deep supervision; without
    the second term PAD-Net's, MTI-Net's and ATRC's intermediate predictors never learn."""
    problem = Problem(("seg", "depth"), (3, 8, 8), {"seg": 3, "depth": 1}, dense=True)
    torch.manual_seed(0)
    model = build(name, problem)
    x = torch.randn(2, 3, 8, 8)
    targets = {"seg": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)}
    specs = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in problem.tasks}

    def gradients(with_intermediate: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # DiffusionMTL draws noise
        final, intermediate = model.forward_with_intermediate(x)
        loss = train.task_losses(final, targets, specs, problem.tasks).sum()
        if with_intermediate:
            loss = loss + train.deep_supervision(intermediate, final, targets, specs)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, final_only = gradients(True), gradients(False)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    train.train_step(model, train.make_method("ew", 2, seed=0), torch.optim.SGD(model.parameters(), lr=0.0),
                     x, targets, specs, 0, 0)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[n], expected[n], atol=1e-6) for n in got)
    differs = [n for n in got if n not in final_only or not torch.allclose(got[n], final_only[n], atol=1e-6)]
    assert differs  # the intermediate losses change the step
    if name in ("padnet", "mtinet", "atrc"):  # predictors read by nothing downstream
        assert any(n not in final_only for n in got)


@pytest.mark.parametrize("name", ["l2p", "l2m"])
def test_the_harness_trains_the_keys_of_keyed_pools(name):
    """The hard top-N / argmax choice keeps the task loss off the keys; only the model's
    auxiliary key loss moves them, so a harness step must change them."""
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    torch.manual_seed(0)
    model = build(name, problem)
    keys = model.pool.keys.detach().clone()
    x, targets = torch.randn(16, 6), {"a": torch.randn(16), "b": torch.randn(16)}
    method = train.make_method("ew", 2, seed=0)
    log = train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=0.5), x, targets, SPECS, 0, 0)
    assert log.auxiliary != 0.0 and not torch.allclose(model.pool.keys, keys)


PROCEDURES = {"adamv_moe", "adapterfusion", "adaptive_amtrl", "adashare", "amtfl", "amtl", "asp_mtl", "astmt",
              "atrc", "bmtas", "bmtn", "cmtr", "ctn", "decanlp", "den", "dmtg", "ecmt", "fafs",
              "feature_partitioning", "florence_2", "four_m", "four_m_21", "go_mtl", "gpv", "hgnn", "hipro",
              "knowledge_factorization", "lorpman", "ltb", "mad_x", "mnc", "mocha", "mpt", "msmtfl", "mtil",
              "mtlface", "muir", "multimae", "omninet", "packnet", "painter", "palora", "pamal", "pathnet",
              "peresdasilva2020task", "popart", "progressive_nets", "sak", "sparse_sharing", "splitnet",
              "stablemtl", "taskdiffusion", "uniad", "unified_io", "unified_io_2", "vtagml", "vtm",
              "wang2020negative", "whom_to_share"}


def test_architectures_trained_by_more_than_a_loop_say_so():
    from reference_impls.architectures import registry as arch_registry
    flagged = {n for n in arch_registry.available() if arch_registry.get(n).training_procedure}
    assert flagged == PROCEDURES


def test_the_run_and_its_table_say_when_the_paper_s_procedure_is_not_run(capsys):
    result = train.main(["--arch", "splitnet", "--no-progress", *TINY])
    out, err = capsys.readouterr()
    assert result["note"].startswith("splitnet: in the paper, the group assignment is learned with regularisers()")
    assert f"[train] {result['note']}" in err and f"Note: {result['note']}" in out
    plain = train.main(["--arch", "shared_bottom", "--no-progress", *TINY])
    assert plain["note"] is None and "Note:" not in capsys.readouterr().out


def test_the_procedure_note_names_the_auxiliary_loss_when_the_run_trains_one():
    """A flagged model with its own auxiliary loss (LORPMAN's orthogonal penalty) is trained on
    more than the task losses; the note used to say 'task losses only' for every model."""
    from reference_impls.architectures import registry as arch_registry
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    with_aux, without = arch_registry.build("lorpman", problem), arch_registry.build("splitnet", problem)
    assert train.procedure_note("lorpman", with_aux).endswith("on the task losses and its auxiliary loss only")
    assert train.procedure_note("splitnet", without).endswith("on the task losses only")
    assert train.procedure_note("shared_bottom", arch_registry.build("shared_bottom", problem)) is None


@pytest.mark.parametrize("method_name", ["mgda_ub", "rep_mtl"])
def test_representation_methods_refuse_a_representation_without_gradient(method_name):
    """VTAGML's z = encode(x) is its frozen encoder's output: MGDA-UB and Rep-MTL crashed in
    autograd at the first step (found by running every architecture with every method)."""
    with pytest.raises(train.ConfigurationError, match="'vtagml' computes z with no trainable parameter"):
        train.main(["--arch", "vtagml", "--method", method_name, "--no-progress", *TINY])


@pytest.mark.parametrize("name", ["uw", "autol"])
@pytest.mark.parametrize("method_lr", [None, 0.05])
def test_the_method_parameters_take_their_own_learning_rate(name, method_lr, monkeypatch):
    """Adam's first step moves every parameter by about its learning rate (|m̂ / √v̂| = 1), so after
    one step the method's parameters (UW's log variances, Auto-λ's λ) moved by --method-lr
    and the network's by at most --lr."""
    made, make = [], train.make_method

    def recording(*args, **kwargs):
        method = make(*args, **kwargs)
        made.append((method, [p.detach().clone() for p in method.parameters()]))
        return method

    monkeypatch.setattr(train, "make_method", recording)
    n_train = 71 if name == "autol" else 64  # Auto-λ holds a tenth out for its meta step: one batch left
    bench = datasets.load("synthetic", n_train=n_train, n_test=16, dim=8, seed=0)
    torch.manual_seed(0)
    model = build("shared_bottom", bench.problem)
    before = [p.detach().clone() for p in model.parameters()]
    lr = 1e-3
    train.fit(model, bench, name, epochs=1, lr=lr, batch_size=64, device=torch.device("cpu"), seed=0,
              label=name, progress=False, method_lr=method_lr)
    method, initial = made[0]
    own = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(method.parameters(), initial)])
    torch.testing.assert_close(own.abs(), torch.full_like(own, method_lr or lr), rtol=1e-3, atol=0)
    moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(model.parameters(), before))
    assert lr * 0.5 < moved <= lr * (1 + 1e-4)


def test_method_lr_flag_defaults_to_none_and_parses():
    base = ["--arch", "shared_bottom", "--method", "uw", "--data", "synthetic"]
    assert train.parse_args(base).method_lr is None
    assert train.parse_args(base + ["--method-lr", "0.05"]).method_lr == 0.05
    with pytest.raises(SystemExit):
        train.parse_args(base + ["--method-lr", "0"])


# ----------------------------------------------------------------------------------------------
# The loop's bookkeeping, the single-task baselines, the table and the saved files, by hand
# ----------------------------------------------------------------------------------------------

_TRAIN_STEP = train.train_step  # the real step, for the wrappers below


def _tiny_bench() -> datasets.Benchmark:
    return datasets.load("synthetic", n_train=8, n_test=12, dim=4, num_sines=2, seed=0)


def _fit_recording_steps(monkeypatch, bench, method="ew", seed=0, epochs=2, step=None):
    """``fit`` in batches of 4 with ``train_step`` wrapped (``step`` replaces it if given): each
    call's (step, epoch, first input feature of each example, log, model.training)."""
    calls = []

    def recording(model, method_, optimizer, x, targets, specs, step_, epoch):
        log = (step or _TRAIN_STEP)(model, method_, optimizer, x, targets, specs, step_, epoch)
        calls.append((step_, epoch, x[:, 0].tolist(), log, model.training))
        return log

    monkeypatch.setattr(train, "train_step", recording)
    torch.manual_seed(0)
    model = build("shared_bottom", bench.problem).eval()  # fit must switch it to training mode
    _, history = train.fit(model, bench, method, epochs=epochs, lr=1e-2, batch_size=4, device=torch.device("cpu"),
                           seed=seed, label="run", progress=False)
    return calls, history


def test_the_loop_counts_steps_and_epochs_and_reshuffles_every_epoch_from_the_seed(monkeypatch):
    bench = _tiny_bench()
    calls, _ = _fit_recording_steps(monkeypatch, bench, epochs=3)
    assert [(c[0], c[1]) for c in calls] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert all(c[4] for c in calls)
    orders = [tuple(calls[i][2] + calls[i + 1][2]) for i in (0, 2, 4)]
    stored = tuple(bench.train[i][0][0].item() for i in range(8))
    assert all(sorted(order) == sorted(stored) for order in orders)  # every example once an epoch
    assert len(set(orders)) == 3 and stored not in orders  # in a new order each epoch
    assert _fit_recording_steps(monkeypatch, bench, epochs=1)[0][0][2] == calls[0][2]  # same seed, same order
    assert _fit_recording_steps(monkeypatch, bench, seed=1, epochs=1)[0][0][2] != calls[0][2]


def test_history_is_the_epoch_mean_of_each_batch_s_log_before_its_first_update(monkeypatch):
    """Selective group updates take one update per task group on a batch (two here)."""
    calls, history = _fit_recording_steps(monkeypatch, _tiny_bench(), method="selective_group_updates")
    first = {}
    for step, epoch, _, log, _ in calls:
        first.setdefault(step, (epoch, log))
    assert len(calls) == 2 * len(first) == 8
    logged = {"task_loss": lambda log: log.losses.sum().item(), "objective": lambda log: log.objective,
              "auxiliary": lambda log: log.auxiliary, "total": lambda log: log.total}
    for key, value in logged.items():
        expected = [np.mean([value(log) for e, log in first.values() if e == epoch]) for epoch in (0, 1)]
        assert history[key] == pytest.approx(expected), key


def test_a_non_finite_second_update_of_a_batch_stops_the_run_too(monkeypatch):
    updates = []

    def second_update_diverges(*args):
        log = _TRAIN_STEP(*args)
        updates.append(log)
        return train.StepLog(log.losses * float("nan"), log.objective, log.auxiliary) if len(updates) == 2 else log

    with pytest.raises(train.TrainingDiverged, match=r"^run, step 1 \(epoch 1, lr 0.01\): task loss y1 = nan"):
        _fit_recording_steps(monkeypatch, _tiny_bench(), method="selective_group_updates",
                             step=second_update_diverges)


def test_evaluation_scores_the_test_set():
    bench = _tiny_bench()
    torch.manual_seed(0)
    model = build("shared_bottom", bench.problem)
    x = torch.stack([bench.test[i][0] for i in range(12)])
    with torch.no_grad():
        out = model.eval()(x)
    expected = {f"{t}/mse": ((out[t].reshape(-1) - torch.stack([bench.test[i][1][t] for i in range(12)])) ** 2)
                .mean().item() for t in model.tasks}
    assert train.evaluate(model, bench, 5, torch.device("cpu")) == pytest.approx(expected)


def test_evaluation_refuses_non_finite_predictions_and_names_the_parameters():
    """A model that the last update broke (no later step to see a NaN loss) must not score:
    argmax of NaN logits is a class, so an accuracy would look real."""
    bench = _tiny_bench()
    torch.manual_seed(0)
    model = build("shared_bottom", bench.problem)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(train.TrainingDiverged, match=rf"^run, evaluation: task y1's predictions on the test set are "
                                                     rf"not finite; the trained parameters are not finite "
                                                     rf"\({re.escape(name)}\)"):
        train.evaluate(model, bench, 5, torch.device("cpu"), "run, evaluation")
    model = build("shared_bottom", bench.problem)
    huge = datasets.Benchmark(bench.problem, bench.train, TensorTasks(bench.test.x * 1e38, bench.test.labels),
                              bench.tasks)
    with pytest.raises(train.TrainingDiverged, match="every parameter is finite, so the test inputs make the model"):
        train.evaluate(model, huge, 5, torch.device("cpu"))


def test_the_method_s_generator_follows_the_seed():
    def draw(seed):
        return train.make_method("rlw", 3, seed).weights(torch.ones(3))

    assert torch.equal(draw(4), draw(4)) and not torch.equal(draw(4), draw(5))


def test_single_task_baselines_get_the_run_s_epochs_batch_size_learning_rate_and_seed(monkeypatch):
    seen = []

    def fake_fit(model, bench, method_name, **kw):
        seen.append((tuple(model.tasks), method_name, kw["epochs"], kw["lr"], kw["batch_size"], kw["seed"]))
        return {f"{model.tasks[0]}/mse": float(len(seen))}, {}

    monkeypatch.setattr(train, "fit", fake_fit)
    args = train.parse_args(["--epochs", "2", "--batch-size", "5", "--lr", "0.02", "--seed", "7", "--device", "cpu"])
    assert train.single_task_baselines(_tiny_bench(), args, torch.device("cpu")) == {"y1/mse": 1.0, "y2/mse": 2.0}
    assert seen == [(("y1",), "ew", 2, 0.02, 5, 7), (("y2",), "ew", 2, 0.02, 5, 7)]


def test_single_task_baselines_do_not_depend_on_what_ran_before_them():
    """Each baseline model is seeded by --seed, whatever the multi-task run drew before."""
    args = train.parse_args(["--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"])
    results = []
    for state in (1, 2):
        torch.manual_seed(state)
        results.append(train.single_task_baselines(_tiny_bench(), args, torch.device("cpu")))
    assert results[0] == results[1]


def test_each_table_row_gives_its_metric_s_direction_and_signed_change():
    table = train.results_table({"a/mse": 0.9, "b/accuracy": 0.8}, {"a/mse": 1.0, "b/accuracy": 1.0},
                                {"a/mse": True, "b/accuracy": False})
    assert table.splitlines()[2:] == ["| a/mse | yes | 1.0000 | 0.9000 | +10.00 |",
                                      "| b/accuracy | no | 1.0000 | 0.8000 | -20.00 |", "", "Δm = -5.00 %"]


def test_lower_is_better_follows_each_task_s_metric():
    assert train.lower_is_better(_tiny_bench()) == {"y1/mse": True, "y2/mse": True}
    assert train.lower_is_better(_binary_benchmark()) == {"a/accuracy": False, "b/accuracy": False}


def _fit_without_training(inputs: list):
    """Stands in for ``fit``: records the first training input, returns metrics 1, 2, ... by task."""
    def fit(model, bench, method_name, **kw):
        inputs.append(bench.train[0][0].clone())
        return {f"{t}/mse": 1.0 + k for k, t in enumerate(model.tasks)}, {"task_loss": [1.0]}
    return fit


def _run_tiny(*flags, data_kw=()):
    return train.run(train.parse_args(["--data-kw", "n_train=8", "n_test=4", "dim=4", *data_kw, *flags,
                                       "--device", "cpu", "--no-progress"]))


def test_the_synthetic_data_follows_seed_unless_data_kw_sets_its_own(monkeypatch):
    inputs = []
    monkeypatch.setattr(train, "fit", _fit_without_training(inputs))

    def first_input(seed, data_kw=()):
        inputs.clear()
        _run_tiny("--seed", seed, data_kw=data_kw)
        return inputs[0]

    zero, one = first_input("0"), first_input("1")
    assert not torch.equal(zero, one) and torch.equal(first_input("1"), one)
    assert torch.equal(first_input("1", data_kw=["seed=0"]), zero)


def test_a_failed_write_of_saved_baselines_leaves_the_old_file_whole(monkeypatch, tmp_path):
    from pathlib import Path
    path = tmp_path / "baselines.json"
    path.write_text('{"y1/mse": 3.0, "y2/mse": 4.0}\n')
    monkeypatch.setattr(train, "fit", _fit_without_training([]))
    write = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        write(self, text[: len(text) // 2])
        raise OSError("No space left on device")

    with monkeypatch.context() as full:
        full.setattr(Path, "write_text", half_then_full_disk)
        with pytest.raises(OSError, match="No space left"):
            _run_tiny("--save-baselines", str(path))
    assert path.read_text() == '{"y1/mse": 3.0, "y2/mse": 4.0}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["baselines.json"]  # no half-written .partial left beside it
    assert json.loads(path.read_text()) != (saved := _run_tiny("--save-baselines", str(path))["single_task"])
    assert json.loads(path.read_text()) == saved == {"y1/mse": 1.0, "y2/mse": 1.0}


def test_baseline_values_must_be_numbers_and_a_bad_one_names_the_file(tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text('{"y1/mse": 1, "y2/mse": "0.5"}')
    values = train.read_baselines(path)
    assert values == {"y1/mse": 1.0, "y2/mse": 0.5} and all(type(v) is float for v in values.values())
    path.write_text('{"y1/mse": "low"}')
    with pytest.raises(hooks.ConfigurationError, match=rf"^--baselines {re.escape(str(path))}: could not convert"):
        train.read_baselines(path)


def test_a_stored_baseline_of_zero_is_read_and_reported_not_refused(tmp_path):
    """0 is a real single-task score (an accuracy of 0): the run goes ahead and says Δm is undefined."""
    path = tmp_path / "baselines.json"
    path.write_text('{"y1/mse": 0, "y2/mse": 1.0}')
    assert train.read_baselines(path) == {"y1/mse": 0.0, "y2/mse": 1.0}
    path.write_text('{"y1/mse": -0.5}')
    with pytest.raises(hooks.ConfigurationError, match="finite and >= 0"):
        train.read_baselines(path)


def test_baselines_with_a_metric_the_data_does_not_report_are_refused(tmp_path):
    path = tmp_path / "baselines.json"
    path.write_text('{"y1/mse": 1.0, "y2/mse": 1.0, "y3/mse": 1.0}')
    with pytest.raises(hooks.ConfigurationError, match=r"has \['y1/mse', 'y2/mse', 'y3/mse'\], but --data synthetic"):
        _run_tiny("--baselines", str(path))


def _recorded_learning_rates(monkeypatch) -> list[list[float]]:
    """Filled with each Adam's learning rates per parameter group, as the harness creates them."""
    rates = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            rates.append([group["lr"] for group in self.param_groups])

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    return rates


def test_the_method_parameters_default_to_the_network_s_learning_rate(monkeypatch):
    rates = _recorded_learning_rates(monkeypatch)
    bench = _tiny_bench()
    torch.manual_seed(0)
    train.fit(build("shared_bottom", bench.problem), bench, "uw", epochs=1, lr=0.02, batch_size=4,
              device=torch.device("cpu"), seed=0, label="uw", progress=False)
    assert rates == [[0.02, 0.02]]  # the network's group, then UW's log variances


def test_a_single_task_value_of_zero_leaves_the_table_and_says_which_makes_delta_m_undefined():
    """An accuracy of 0 on a small test set used to end a finished run with a ZeroDivisionError."""
    multi = {"a/accuracy": 0.5, "b/accuracy": 0.9}
    single = {"a/accuracy": 0.0, "b/accuracy": 0.6}
    lower = {"a/accuracy": False, "b/accuracy": False}
    table = train.results_table(multi, single, lower)
    assert "| a/accuracy | no | 0.0000 | 0.5000 | undefined |" in table
    assert "| b/accuracy | no | 0.6000 | 0.9000 | +50.00 |" in table
    assert table.endswith("Δm undefined: the single-task value of a/accuracy is 0")
    assert train.delta_m_if_defined(multi, single, lower) is None
    assert train.delta_m_if_defined(multi, {**single, "a/accuracy": 0.25}, lower) == pytest.approx(75.0)  # (100 + 50) / 2


@pytest.mark.parametrize("flags, message", [
    (["--data-kw", "rho=2"], "--data synthetic --data-kw rho=2: no option 'rho'; its options are ['correlation', "
                             "'n_train', 'n_test', 'dim', 'seed', 'scale', 'num_sines', 'noise_std', 'alphas', 'betas']"),
    (["--arch", "mmoe", "--arch-kw", "experts=3"],
     "--arch mmoe --arch-kw experts=3: no option 'experts'; its options are ['width', 'depth', 'num_experts']"),
    (["--stl-kw", "widht=8"], "--stl-arch shared_bottom --stl-kw widht=8: no option 'widht'; its options are "
                              "['width', 'depth']"),
])
def test_an_unknown_option_is_named_with_the_options_there_are(flags, message):
    """Like --method-kw: the error used to be Python's 'correlated_regression() got an unexpected
    keyword argument', naming a function the user never called and no alternative."""
    with pytest.raises(train.ConfigurationError) as caught:
        train.main(["--no-progress", "--epochs", "1", *flags])
    assert str(caught.value) == message


def test_synthetic_generator_options_are_typed_like_the_loaders():
    """num_sines reaches the generator through the loader's **kwargs; it is now checked as the
    generator declares it instead of failing inside it."""
    with pytest.raises(train.ConfigurationError, match=r"num_sines must be int \(as synthetic\.correlated_regression "
                                                       r"declares it\)"):
        train.main(["--no-progress", "--epochs", "1", "--data-kw", "num_sines=x"])
