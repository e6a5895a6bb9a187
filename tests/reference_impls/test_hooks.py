"""reference_impls.hooks: what the loop hands each method, and the checks that refuse a misfit.

The end-to-end runs of the hooks are in test_train.py; these pin the smaller promises of the
module one by one, each recomputed by hand or read off the error text.
"""

import copy

import pytest
import torch
from torch import nn

from reference_impls import data as datasets
from reference_impls import hooks, train
from reference_impls.architectures.base import MultiTaskModel
from reference_impls.architectures.registry import Problem, build
from reference_impls.data.synthetic import mse_loss
from reference_impls.metrics import Accuracy, MeanSquaredError
from reference_impls.weighting import registry as method_registry

from .conftest import gradient_rows

PAIR = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
SPECS = {t: datasets.TaskSpec(loss=mse_loss, metric=MeanSquaredError) for t in PAIR.tasks}
CPU = torch.device("cpu")


def _pair(arch: str = "shared_bottom", n: int = 32, **kwargs):
    """A two-task regression model and one batch; task a's targets are 3x larger."""
    torch.manual_seed(0)
    model = build(arch, PAIR, **kwargs)
    x = torch.randn(n, 6)
    return model, x, {"a": 3.0 * torch.randn(n, 1), "b": torch.randn(n, 1)}


def _trainable_shared(model):
    return [p for p in model.shared_parameters() if p.requires_grad]


def _step_at_lr_zero(model, method, x, targets):
    """One harness step that fills .grad and leaves θ where it was."""
    return train.train_step(model, method, torch.optim.SGD(model.parameters(), lr=0.0), x, targets, SPECS, 0, 0)


def _flat_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


class _Encoded(MultiTaskModel):
    """z = encoder(x); each head reads z flattened. A stand-in for shapes no registry model has."""

    def __init__(self, encoder: nn.Module, width: int):
        super().__init__(("a", "b"))
        self.encoder = encoder
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1) for t in self.tasks})

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return {t: self.heads[t](z.flatten(1)) for t in self.tasks}

    def forward(self, x):
        return self.decode(self.encode(x))

    def task_specific_parameters(self, task):
        yield from self.heads[task].parameters()


class _WithIntermediate(_Encoded):
    """Earlier predictions of both kinds a decoder may return: a tensor per task and a per-task pool."""

    def decode_with_intermediate(self, z):
        return self.decode(z), {"a": z.sum(1), "b": z.prod(1), "pool": {t: 2 * z[:, k] for k, t in enumerate(self.tasks)}}


def _frozen_trunk_model():
    """``_pair`` with its first shared weight matrix frozen (and returned)."""
    model, x, targets = _pair()
    frozen = next(p for p in model.shared_parameters() if p.ndim >= 2)
    return model, x, targets, frozen.requires_grad_(False)


def _bench(train_set):
    return datasets.Benchmark(PAIR, train_set, [], SPECS)


# ----------------------------------------------------------------------------------------------
# method_gradient_step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_modo_splits_even_the_smallest_batch_into_two_samples(n):
    """A batch of 2 is already two samples; an odd batch splits at n // 2."""
    from reference_impls.weighting.modo import MoDo
    model, x, targets = _pair(n=n)
    shared = _trainable_shared(model)
    halves = [hooks.Batch(x, targets, SPECS).losses(model, part) for part in (slice(0, n // 2), slice(n // 2, None))]
    expected = MoDo()(*(gradient_rows(h, shared) for h in halves)).update
    _step_at_lr_zero(model, train.make_method("modo", 2, 0), x, targets)
    torch.testing.assert_close(_flat_grad(shared), expected)


def test_a_gradient_method_ignores_frozen_shared_parameters():
    """MGDA's matrix has one column per trainable shared entry; a frozen shared layer gets no gradient."""
    model, x, targets, frozen = _frozen_trunk_model()
    shared = _trainable_shared(model)
    hooks.check_method_fits_model(train.make_method("mgda", 2, 0), "mgda", model)  # some stay trainable
    losses = hooks.task_losses(model(x), targets, SPECS, model.tasks)
    expected = train.make_method("mgda", 2, 0)(gradient_rows(losses, shared)).update
    _step_at_lr_zero(model, train.make_method("mgda", 2, 0), x, targets)
    torch.testing.assert_close(_flat_grad(shared), expected)
    assert frozen.grad is None


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


def _rotograd(model, x):
    method = train.make_method("rotograd", 2, 0, facts={"dim": lambda: model.encode(x).shape[1]})
    with torch.no_grad():  # two different rotations, so that swapping them shows
        method.rotations.generators.copy_(0.5 * torch.randn_like(method.rotations.generators))
    return method


def test_rotograd_task_k_reads_its_own_rotation():
    model, x, _ = _pair()
    method = _rotograd(model, x)
    step = hooks.forward(model, method, x)
    rotations = method.rotations.matrices().detach()
    z = model.encode(x)
    for k, t in enumerate(model.tasks):
        torch.testing.assert_close(step.outputs[t], model.decode(z @ rotations[k].T)[t])
    assert not torch.allclose(step.outputs["a"], model.decode(z @ rotations[1].T)["a"])


def test_rotograd_task_k_intermediate_predictions_read_its_own_rotation():
    """With decode_with_intermediate, task k's final and earlier predictions both read R_k z, and
    the pass still hands RotoGrad z and the R_k z its backward differentiates."""
    torch.manual_seed(0)
    model, x = _WithIntermediate(nn.Linear(6, 3), 3), torch.randn(8, 6)
    method = _rotograd(model, x)
    step = hooks.forward(model, method, x)
    rotations, z = method.rotations.matrices().detach(), model.encode(x)
    torch.testing.assert_close(step.representation, z)
    assert len(step.rotated) == len(model.tasks)
    for k, t in enumerate(model.tasks):
        torch.testing.assert_close(step.rotated[k], z @ rotations[k].T)
        torch.testing.assert_close(step.outputs[t], model.decode(z @ rotations[k].T)[t])
        earlier = model.decode_with_intermediate(z @ rotations[k].T)[1]
        torch.testing.assert_close(step.intermediate[t], earlier[t])
        torch.testing.assert_close(step.intermediate["pool"][t], earlier["pool"][t])
    assert set(step.intermediate) == {"a", "b", "pool"}


class _AttentionDecoded(_Encoded):
    """Self-attention over z's four 2-wide tokens before the heads: Rep-MTL's ∇_z and the
    curvature hook's second derivative both pass through it."""

    def decode(self, z):
        tokens = z.view(len(z), 1, 4, 2)
        return super().decode(torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens))


@pytest.mark.parametrize("name, options", [("rep_mtl", {}), ("continuous_pareto", {"beta": [1.0, -1.0]})])
def test_methods_that_differentiate_twice_train_through_attention(name, options):
    """The fused attention kernels have no second derivative; Rep-MTL and the curvature hook run the math one."""
    torch.manual_seed(0)
    model, (_, x, targets) = _AttentionDecoded(nn.Linear(6, 8), 8), _pair(n=8)
    log = _step_at_lr_zero(model, train.make_method(name, 2, 0, options), x, targets)
    assert torch.isfinite(log.losses).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# The checks that refuse a method
# ----------------------------------------------------------------------------------------------


def test_an_undriven_method_is_refused_as_a_class_or_an_instance_with_the_way_out():
    cls = method_registry.methods()["mt_sgd"]
    message = (f"method 'mt_sgd' needs its MTSGD.{cls.training_hook}() called during training, which this "
               f"generic loop does not do; drive it from your own loop (see the docstring of {cls.__module__}) "
               "or pick another method")
    for method in (cls, cls.__new__(cls)):
        with pytest.raises(hooks.ConfigurationError) as raised:
            hooks.check_method_is_driven(method, "mt_sgd")
        assert str(raised.value) == message


def test_dtp_is_refused_for_any_task_not_scored_in_unit_range():
    method = train.make_method("dtp", 2, 0)
    accuracy = datasets.TaskSpec(loss=mse_loss, metric=Accuracy)
    hooks.check_method_fits_tasks(method, "dtp", {"a": accuracy, "b": accuracy})
    with pytest.raises(hooks.ConfigurationError, match=r"'dtp'.*task 'b' is measured by 'mse'"):
        hooks.check_method_fits_tasks(method, "dtp", {"a": accuracy, "b": SPECS["b"]})


@pytest.mark.parametrize("name", ["rep_mtl", "mgda_ub"])
def test_representation_methods_refuse_a_model_with_an_auxiliary_loss(name):
    """encode/decode skip the auxiliary loss a model computes in forward (GO-MTL's sparsity penalty)."""
    model = build("go_mtl", PAIR)
    assert callable(model.auxiliary_loss) and type(model).encode is not MultiTaskModel.encode
    with pytest.raises(hooks.ConfigurationError, match=rf"'{name}'.*'go_mtl'.*auxiliary loss in forward"):
        hooks.check_method_fits_model(train.make_method(name, 2, 0), name, model)


# ----------------------------------------------------------------------------------------------
# evaluating, representation_size, design_matrices
# ----------------------------------------------------------------------------------------------


def test_evaluating_restores_the_previous_mode_also_after_an_error():
    model = nn.Linear(2, 2)
    model.eval()
    with hooks.evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert not model.training  # eval before, eval after
    model.train()
    with pytest.raises(RuntimeError, match="inside"), hooks.evaluating(model):
        raise RuntimeError("inside")
    assert model.training and torch.is_grad_enabled()


def test_representation_size_reads_z_in_eval_mode_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = _Encoded(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), 5)
    before = copy.deepcopy(model.state_dict())
    assert hooks.representation_size(model, _bench([(torch.randn(6), {})]), CPU) == 5
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # batch-norm statistics too


def test_representation_size_refuses_a_feature_map_and_a_model_without_encode():
    model = _Encoded(nn.Conv2d(1, 3, 1), 3 * 4 * 4)
    with pytest.raises(hooks.ConfigurationError, match=r"vector representations; this model's is \(3, 4, 4\)"):
        hooks.representation_size(model, _bench([(torch.randn(1, 4, 4), {})]), CPU)
    with pytest.raises(hooks.ConfigurationError, match=r"'mmoe' has no single shared representation"):
        hooks.representation_size(build("mmoe", PAIR), _bench([(torch.randn(6), {})]), CPU)


def test_design_matrices_flatten_each_input_into_a_row_and_refuse_vector_labels():
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randn(2, 3, generator=g), {"a": torch.tensor(float(i)), "b": torch.tensor([-i])})
                for i in range(4)]
    x, y = hooks.design_matrices(examples, ("b", "a"))
    torch.testing.assert_close(x, torch.stack([e[0].reshape(-1) for e in examples]))
    torch.testing.assert_close(y, torch.tensor([[-i, i] for i in range(4)], dtype=torch.float64))
    with pytest.raises(hooks.ConfigurationError, match="one scalar label per task and example"):
        hooks.design_matrices([(torch.randn(3), {"a": torch.zeros(1), "b": torch.zeros(2)})], ("a", "b"))


# ----------------------------------------------------------------------------------------------
# The held-out tenth and the meta step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, fraction, n_val", [(4, 0.1, 1), (2, 0.9, 1), (3, 0.5, 2)])
def test_validation_split_holds_out_at_least_one_and_leaves_at_least_one(size, fraction, n_val):
    rest, val = hooks.validation_split(torch.utils.data.TensorDataset(torch.arange(size)), fraction, seed=0)
    assert (len(val), len(rest)) == (n_val, size - n_val)


def test_held_out_batches_are_endless_seeded_reshuffled_batches_of_the_held_out_tenth(capsys):
    data = torch.utils.data.TensorDataset(torch.arange(100))

    def first_batches(global_seed, n=6):
        torch.manual_seed(global_seed)  # the order must depend on the seed argument alone
        rest, batches = hooks.held_out_batches(data, "autol", batch_size=4, seed=0)
        return rest, [next(batches)[0].tolist() for _ in range(n)]

    rest, batches = first_batches(1)
    held = sorted(set(range(100)) - set(rest.indices))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]  # 10 held out, batches of 4, epoch after epoch
    first, second = (sum(batches[i:i + 3], []) for i in (0, 3))
    assert sorted(first) == sorted(second) == held and first != second  # each pass reshuffled
    assert first_batches(2)[1] == batches
    assert "[train] autol: 10 of 100 training examples held out as validation data for its meta step\n" in (
        capsys.readouterr().err)


def _batch_norm_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2))


def test_held_out_batches_run_in_training_mode_drop_a_lone_batch_norm_example():
    """11 of 110 held out, batches of 5: the third batch would hold one example, which batch norm
    cannot normalise in training mode; a look-ahead's batches drop it, other validation keeps it."""
    data = torch.utils.data.TensorDataset(torch.arange(110))
    sizes = {model: [len(next(batches)[0]) for _ in range(6)]
             for model in (None, _batch_norm_net(), nn.Linear(1, 2))
             for _, batches in [hooks.held_out_batches(data, "autol", batch_size=5, seed=0, model=model)]}
    assert list(sizes.values()) == [[5, 5, 1, 5, 5, 1], [5, 5, 5, 5, 5, 5], [5, 5, 1, 5, 5, 1]]


def test_a_single_validation_example_is_refused_for_a_batch_norm_look_ahead():
    data = torch.utils.data.TensorDataset(torch.arange(8))  # a tenth of 8: 1 example held out
    with pytest.raises(hooks.ConfigurationError, match="2 examples per validation batch.* 1 validation examples"):
        hooks.held_out_batches(data, "autol", batch_size=4, seed=0, model=_batch_norm_net())
    hooks.held_out_batches(data, "autol", batch_size=4, seed=0, model=nn.Linear(1, 2))  # no batch norm: fine


def _rnn_model():
    """decaNLP on a 6-d vector problem: its encoder is an nn.LSTM, which cuDNN runs on CUDA."""
    torch.manual_seed(0)
    return build("decanlp", Problem(("a", "b"), (6,), {"a": 1, "b": 1})), torch.randn(3, 6)


def _cudnn_seen_by_each_module(model: nn.Module) -> list[bool]:
    seen = []
    for module in model.modules():  # Rep-MTL calls encode and decode, not the model itself
        module.register_forward_pre_hook(lambda *args: seen.append(torch.backends.cudnn.enabled))
    return seen


@pytest.mark.parametrize("rnn", [True, False])
def test_meta_update_runs_an_rnn_model_without_cudnn_and_restores_it(rnn, monkeypatch):
    """cuDNN's RNN kernels have no second derivative (torch raised NotImplementedError on CUDA);
    other models keep cuDNN, whose convolutions have one and are faster."""
    model = _rnn_model()[0] if rnn else _frozen_trunk_model()[0]
    method, seen = train.make_method("autol", 2, 0), []
    monkeypatch.setattr(type(method), "meta_backward", lambda *args: seen.append(torch.backends.cudnn.enabled))
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    hooks.meta_update(method, model, (None, None), (None, None), SPECS, 0.1,  # meta_backward reads neither
                      torch.optim.SGD(hooks.method_parameters(method, CPU), lr=1.0))
    assert seen == [not rnn] and torch.backends.cudnn.enabled


@pytest.mark.parametrize("name, rnn, cudnn", [("continuous_pareto", True, False), ("ew", True, True),
                                              ("continuous_pareto", False, True), ("rep_mtl", False, True)])
def test_the_forward_pass_of_a_second_order_method_runs_an_rnn_without_cudnn(name, rnn, cudnn, monkeypatch):
    """Continuous Pareto's Hessian-vector products differentiate this pass twice; cuDNN's RNN
    kernels cannot be (decaNLP's LSTM raised on CUDA), so such a pass of an RNN runs without it.
    (Rep-MTL reads a shared representation, which decaNLP does not have.)"""
    model, x = _rnn_model() if rnn else _frozen_trunk_model()[:2]
    seen = _cudnn_seen_by_each_module(model)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    options = {"beta": [1.0, -1.0]} if name == "continuous_pareto" else {}
    hooks.forward(model, train.make_method(name, 2, 0, options), x)
    assert seen and set(seen) == {cudnn} and torch.backends.cudnn.enabled


def test_meta_update_passes_the_trainable_parameters_and_the_network_rate(monkeypatch):
    model, x, targets, _ = _frozen_trunk_model()
    method, seen = train.make_method("autol", 2, 0), []
    monkeypatch.setattr(type(method), "meta_backward", lambda self, params, train_fn, val_fn, lr: seen.append(
        (sorted(params), lr)))
    optimizer = torch.optim.SGD(hooks.method_parameters(method, CPU), lr=1.0)
    hooks.meta_update(method, model, (x, targets), (x, targets), SPECS, 0.37, optimizer)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) < len(list(model.parameters()))
    assert seen == [(trainable, 0.37)]


def test_method_parameters_are_the_method_s_own_moved_to_the_device():
    for name in ("uw", "imtl"):
        method = train.make_method(name, 2, 0)
        own = hooks.method_parameters(method, torch.device("meta"))
        assert own and all(p.is_meta for p in own)


def test_switching_cudnn_off_for_an_rnn_restores_it_as_it_was_even_when_it_was_off(monkeypatch):
    """A user who turned cuDNN off keeps it off after a second-order pass."""
    model = _rnn_model()[0]
    for before in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "enabled", before)
        with hooks.twice_differentiable(model):
            assert not torch.backends.cudnn.enabled
        assert torch.backends.cudnn.enabled is before


class _OwnBatches(torch.utils.data.Dataset):
    """A dataset that draws its own batches of ``batch_size`` examples, as Office draws one per domain."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(2)

    def batch_sampler(self, tasks, batch_size, generator):
        class Sampler(list):
            batch_examples = batch_size
        return Sampler([[i] for i in range(batch_size)])


def test_own_batches_of_one_example_are_refused_for_a_batch_norm_model_and_kept_for_others():
    with pytest.raises(hooks.ConfigurationError, match="batch norm needs at least 2 examples per training batch"):
        hooks.shuffled_batches(_OwnBatches(), 1, 0, None, nn.BatchNorm1d(2), "bn")
    assert len(hooks.shuffled_batches(_OwnBatches(), 1, 0, None, nn.Linear(2, 2), "plain")) == 1


# ----------------------------------------------------------------------------------------------
# forward for the methods that read z; the graph walk; refusals that name what they refuse
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rep_mtl", "mgda_ub"])
def test_a_representation_method_keeps_the_intermediate_predictions_of_decode_with_intermediate(name):
    """Rep-MTL and MGDA-UB decode z themselves; a model's earlier predictions must still reach deep
    supervision, and the outputs must be computed from the very z the method differentiates."""
    torch.manual_seed(0)
    model, x = _WithIntermediate(nn.Linear(6, 3), 3), torch.randn(8, 6)
    step = hooks.forward(model, train.make_method(name, 2, 0), x)
    z = model.encode(x)
    final, earlier = model.decode_with_intermediate(z)
    torch.testing.assert_close(step.representation, z)
    assert set(step.outputs) == set(model.tasks)
    for t in model.tasks:
        torch.testing.assert_close(step.outputs[t], final[t])
        torch.testing.assert_close(step.intermediate[t], earlier[t])
        torch.testing.assert_close(step.intermediate["pool"][t], earlier["pool"][t])
    (grad_z,) = torch.autograd.grad(step.outputs["a"].sum(), step.representation)
    torch.testing.assert_close(grad_z, model.heads["a"].weight.detach().expand(8, 3))  # d(w·z + b)/dz = w


class _Node:
    """A stand-in autograd node whose inputs can be read once only: a second read means the walk
    went through the node again, along another path."""

    def __init__(self, inputs=(), variable=None):
        self.inputs, self.variable, self.expanded = inputs, variable, False

    @property
    def next_functions(self):
        assert not self.expanded, "a node was walked twice"
        self.expanded = True
        return tuple((node, 0) for node in self.inputs)


def test_parameters_reached_walks_each_node_of_a_graph_once():
    """A residual net's graph has two paths into every block, so 2^depth paths in all; the walk
    (GradNorm looks the weight up at every step) must expand each node once, not each path."""
    w, v = object(), object()
    h = _Node([_Node(variable=w)])
    for _ in range(40):
        h = _Node([h, _Node([h])])  # a residual block: the sum reads h directly and through tanh
    stack = _Node([h, _Node([_Node(variable=v)])])
    assert hooks.parameters_reached(type("Losses", (), {"grad_fn": stack})()) == [{id(w)}, {id(v)}]


class _OnlyForward(MultiTaskModel):
    """An architecture outside the registry, with no ``name`` and no encode/decode."""

    def __init__(self):
        super().__init__(("a", "b"))
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in self.tasks})

    def forward(self, x):
        return {t: self.heads[t](x) for t in self.tasks}

    def task_specific_parameters(self, task):
        yield from self.heads[task].parameters()


def test_last_shared_weight_refuses_a_model_without_one_naming_it_by_registry_name_or_class():
    """The loop reports a ConfigurationError as a misfit; a model of one's own (no registry name)
    must get that refusal too, under its class name, not an AttributeError."""
    x, targets = _pair()[1:]
    for model, label in ((_OnlyForward(), "_OnlyForward"), (build("shared_bottom", PAIR), "shared_bottom")):
        for p in model.shared_parameters():
            p.requires_grad_(False)  # no trainable shared weight: none for GradNorm's W
        losses = hooks.task_losses(model(x), targets, SPECS, model.tasks)
        with pytest.raises(hooks.ConfigurationError, match=rf"architecture '{label}' has none"):
            hooks.last_shared_weight(model, losses)


def test_representation_size_refuses_a_model_of_one_s_own_without_encode_by_its_class_name():
    with pytest.raises(hooks.ConfigurationError, match=r"architecture '_OnlyForward' has no single shared"):
        hooks.representation_size(_OnlyForward(), _bench([(torch.randn(6), {})]), CPU)


class _Unregistered:
    """A method of one's own that reads z, with no registry ``name``."""

    training_hook = "backward"


@pytest.mark.parametrize("method, label", [("rep_mtl", "rep_mtl"), ("mgda_ub", "mgda_ub"),
                                           (_Unregistered(), "_Unregistered")])
def test_a_frozen_encoder_is_refused_naming_the_method_and_the_model(method, label):
    """z with no gradient is refused before any step, by the names the user gave (the registry's),
    or by class name for a method or model of one's own, and always as a ConfigurationError."""
    method = train.make_method(method, 2, 0) if isinstance(method, str) else method
    model = _Encoded(nn.Linear(6, 3).requires_grad_(False), 3)
    with pytest.raises(hooks.ConfigurationError,
                       match=rf"method '{label}' weighs .* architecture '_Encoded' computes z with no trainable"):
        hooks.forward(model, method, torch.randn(4, 6))
