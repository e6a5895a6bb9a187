"""What the training harness reports and how it builds and trains the single-task baselines.

The results table read through its own header, the reasons it gives for an undefined Δm and
for a broken model at evaluation (which metrics, which parameters, how many more), the values
``--baselines`` refuses, the single-task models (the problem's dense maps, ``--seed`` reaching
an architecture's own generator, the memory check with the run's batch), their progress bars,
and a gradient method's update with the deep-supervision gradient added on top of it.
"""

import copy
import re

import pytest
import torch

from reference_impls import data as datasets
from reference_impls import memory, train
from reference_impls.architectures.registry import Problem, build
from reference_impls.hooks import ConfigurationError

from .test_train import SPECS, _batch, _tiny_bench


def _markdown_rows(table: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of the Markdown table at the top of ``table``, each row keyed by the
    header's names; every line of the table must be ``| cell | ... |`` with the header's cell count."""
    lines = table.split("\n\n")[0].splitlines()

    def cells(line: str) -> list[str]:
        assert line.startswith("|") and line.endswith("|"), repr(line)
        return [c.strip() for c in line[1:-1].split("|")]

    header, rule, *rows = [cells(line) for line in lines]
    assert rule == ["---"] * len(header)  # the delimiter row that makes the first line a header
    assert all(len(row) == len(header) for row in rows)
    return header, [dict(zip(header, row)) for row in rows]


def test_the_table_is_markdown_whose_header_names_what_each_column_holds():
    """Read as a reader reads it, by the column names: the direction, both values and the signed
    relative change Δ = ±(multi - single) / single (+ is better), as in the Δm line under it."""
    multi, single = {"a/mse": 0.5, "b/accuracy": 0.6}, {"a/mse": 0.4, "b/accuracy": 0.5}
    lower = {"a/mse": True, "b/accuracy": False}
    header, rows = _markdown_rows(train.results_table(multi, single, lower))
    assert header[0] == "task / metric" and len(rows) == 2
    by_key = {row["task / metric"]: row for row in rows}
    # a: lower is better and it rose from 0.4 to 0.5: 25 % worse; b: 0.5 -> 0.6 is 20 % better
    for key, direction, change in (("a/mse", "yes", -25.0), ("b/accuracy", "no", 20.0)):
        row = by_key[key]
        assert row["lower is better"] == direction
        assert float(row["single-task"]) == single[key] and float(row["multi-task"]) == multi[key]
        assert float(row["Δ (%)"]) == pytest.approx(change)
    assert train.results_table(multi, single, lower).endswith("Δm = -2.50 %")  # the mean of -25 and +20


def _names_in(text: str, pattern: str) -> list[str]:
    """The comma-separated metric or parameter names that ``pattern``'s group captures in ``text``."""
    found = re.search(pattern, text)
    assert found, text
    return found.group(1).split(", ")


def test_an_undefined_delta_m_names_every_metric_at_fault_and_only_those():
    """Two of three metrics unscored (or two zero baselines): the reason lists both, intact."""
    keys = ("a/accuracy", "b/accuracy", "c/accuracy")
    lower = dict.fromkeys(keys, False)
    multi = {"a/accuracy": float("nan"), "b/accuracy": 0.7, "c/accuracy": 0.8}
    single = {"a/accuracy": 0.5, "b/accuracy": 0.6, "c/accuracy": float("nan")}
    table = train.results_table(multi, single, lower)
    assert _names_in(table, r"Δm undefined: (.*) had no valid test entry") == ["a/accuracy", "c/accuracy"]
    table = train.results_table(dict.fromkeys(keys, 0.5), {"a/accuracy": 0.0, "b/accuracy": 0.6, "c/accuracy": 0.0},
                                lower)
    assert _names_in(table, r"Δm undefined: the single-task value of (.*) is 0$") == ["a/accuracy", "c/accuracy"]


@pytest.mark.parametrize("broken", [2, 3, 4, 6])
def test_a_broken_model_s_evaluation_names_its_first_three_non_finite_parameters_and_counts_the_rest(broken):
    """The refusal names which parameters went non-finite: up to three by name, then how many more,
    so that the count of broken parameters is always right and no name is mangled."""
    bench = _tiny_bench()
    torch.manual_seed(0)
    model = build("shared_bottom", bench.problem)
    named = list(model.named_parameters())
    assert len(named) > 6
    with torch.no_grad():
        for _, p in named[:broken]:
            p.view(-1)[0] = float("inf")
    with pytest.raises(train.TrainingDiverged) as caught:
        train.evaluate(model, bench, 4, torch.device("cpu"), "run, evaluation")
    shown = re.search(r"the trained parameters are not finite \((.*)\): the last update diverged", str(caught.value))
    assert shown, str(caught.value)
    names = [name for name, _ in named[:broken]]
    more = re.fullmatch(r"(.*) and (\d+) more", shown.group(1))
    listed, rest = (more.group(1), int(more.group(2))) if more else (shown.group(1), 0)
    assert listed.split(", ") == names[:3] and rest == broken - min(broken, 3)
    assert (more is None) == (broken <= 3)  # no "and 0 more" after a complete list


@pytest.mark.parametrize("value", ["Infinity", "1e999"])
def test_an_infinite_stored_baseline_is_refused_naming_the_file(value, tmp_path):
    """Δm divides by each single-task value: an infinite one would make every change 0 %."""
    path = tmp_path / "baselines.json"
    path.write_text(f'{{"y1/mse": {value}, "y2/mse": 1.0}}')
    with pytest.raises(ConfigurationError, match=rf"^--baselines {re.escape(str(path))}: .*finite and >= 0"):
        train.read_baselines(path)


def test_a_single_task_model_of_a_dense_problem_predicts_that_task_s_maps():
    """The baseline for a per-pixel task must predict maps like the multi-task model, not one
    vector per image: the problem's ``dense`` reaches the single-task problem."""
    problem = Problem(("seg", "depth"), (3, 8, 8), {"seg": 3, "depth": 1}, dense=True)
    bench = datasets.Benchmark(problem, None, None, {})
    args = train.parse_args(["--device", "cpu", "--batch-size", "2"])
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    multi = build("shared_bottom", problem)(x)
    for task in problem.tasks:
        single = train.single_task_model(bench, task, args)(x)
        assert list(single) == [task]
        assert single[task].shape == multi[task].shape == (2, problem.out_dims[task], 8, 8)


def test_the_seed_reaches_a_single_task_architecture_that_draws_its_own_masks():
    """Weight masking draws its masks from a generator of its own: the baseline built for --seed s
    is the architecture built for that task with seed s, whatever the global generator holds."""
    bench = _tiny_bench()
    single = Problem(("y1",), bench.problem.input_shape, {"y1": bench.problem.out_dims["y1"]})

    def state(model):
        return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}

    built = {}
    for seed in (1, 2):
        args = train.parse_args(["--stl-arch", "weight_masking", "--seed", str(seed), "--device", "cpu"])
        torch.manual_seed(0)
        built[seed] = state(train.single_task_model(bench, "y1", args))
        torch.manual_seed(0)
        expected = state(build("weight_masking", single, seed=seed))
        assert built[seed].keys() == expected.keys()
        assert all(torch.equal(built[seed][k], expected[k]) for k in expected)
    assert any(not torch.equal(built[1][k], built[2][k]) for k in built[1])  # the seed matters


def test_a_single_task_model_whose_pass_on_a_batch_would_not_fit_is_refused_naming_the_batch(monkeypatch):
    """The baseline is checked with the run's --batch-size: its weights fit, but what a forward
    pass on a batch of 4096 keeps for backward does not, and a smaller batch would."""
    bench = _tiny_bench()
    single = Problem(("y1",), bench.problem.input_shape, {"y1": 1})
    size = memory.meta_size(lambda: build("shared_bottom", single), (4096, *single.input_shape))
    assert size.at_step < size.persistent + size.saved.total  # the activations are what does not fit
    monkeypatch.setattr(memory, "device_memory", lambda device: size.persistent + size.saved.total - 1)
    args = train.parse_args(["--batch-size", "4096", "--device", "cpu"])
    with pytest.raises(ConfigurationError, match=r"^--stl-arch shared_bottom: .* a forward pass on a batch of 4096 "
                                                 r".*or a smaller --batch-size$"):
        train.single_task_model(bench, "y1", args)
    train.single_task_model(bench, "y1", train.parse_args(["--batch-size", "4", "--device", "cpu"]))


@pytest.mark.parametrize("progress", [True, False])
def test_each_single_task_baseline_shows_its_own_progress_bar_unless_no_progress(progress, capsys):
    """A bar per baseline, labelled with its task, so the user sees which one is training; with
    --no-progress the baselines draw nothing, like the multi-task run."""
    flags = ["--epochs", "1", "--batch-size", "4", "--device", "cpu"] + ([] if progress else ["--no-progress"])
    args = train.parse_args(flags)
    train.single_task_baselines(_tiny_bench(), args, torch.device("cpu"))
    err = capsys.readouterr().err
    if not progress:
        assert err == ""
        return
    labels = [re.match(r"(.*?) \|", frame).group(1) for frame in err.split("\r")[1:]]
    assert labels and labels == sorted(labels)  # one task's bar, then the next one's
    assert set(labels) == {"single-task y1", "single-task y2"}


def test_a_gradient_method_s_update_gets_the_deep_supervision_gradient_on_top(monkeypatch):
    """MGDA-UB writes the encoder's and the heads' gradients; the pseudo-task decoders only learn
    from deep supervision. Each parameter's step is the method's gradient (none for those decoders)
    plus d aux / dθ: neither replaced by the other, nor dropped where the method wrote nothing."""
    problem = Problem(("a", "b"), (5,), {"a": 1, "b": 1})
    torch.manual_seed(0)
    model = build("pseudo_task", problem)
    x, targets = _batch(2)
    reference = copy.deepcopy(model)
    outputs, intermediate = reference.forward_with_intermediate(x)
    aux = train.deep_supervision(intermediate, outputs, targets, SPECS)
    aux_grads = torch.autograd.grad(aux, list(reference.parameters()), allow_unused=True)

    methods_grads = []
    real = train.method_gradient_step

    def recording(method, losses, model_, batch):
        real(method, losses, model_, batch)
        methods_grads.extend(None if p.grad is None else p.grad.clone() for p in model_.parameters())

    monkeypatch.setattr(train, "method_gradient_step", recording)
    log = train.train_step(model, train.make_method("mgda_ub", 2, seed=0), torch.optim.SGD(model.parameters(), lr=1.0),
                           x, targets, SPECS, step=0, epoch=0)
    assert log.update_finite and log.auxiliary == pytest.approx(aux.item(), rel=1e-5)
    pairs = list(zip(methods_grads, aux_grads))
    assert any(m is None and a is not None for m, a in pairs)  # learnt from deep supervision alone
    assert any(m is not None and a is not None and m.abs().max() > 0 and a.abs().max() > 0 for m, a in pairs)
    for p0, p1, (m, a) in zip(reference.parameters(), model.parameters(), pairs):  # SGD, lr 1: the move is .grad
        expected = (torch.zeros_like(p0) if m is None else m) + (torch.zeros_like(p0) if a is None else a)
        torch.testing.assert_close(p0 - p1, expected)
