import numpy as np
import pytest
import torch

from reference_impls.architectures import registry
from reference_impls.architectures.base import MultiTaskModel

from ..discovery import ClaimsToBeAType, add_package_module

MINE = ["shared_bottom", "cross_stitch", "sluice", "nddr", "mtan", "mmoe", "cgc", "ple", "dselect_k"]


def test_discovers_architectures_by_name():
    names = registry.available()
    assert set(MINE) <= set(names)
    for name in MINE:
        cls = registry.get(name)
        assert issubclass(cls, MultiTaskModel) and cls.name == name


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(KeyError, match="shared_bottom"):
        registry.get("no_such_architecture")


@pytest.mark.parametrize("name", MINE)
def test_builds_for_vectors_and_dense_images(name):
    for problem in (
        registry.Problem(("a", "b"), (4,), {"a": 1, "b": 3}),
        registry.Problem(("a", "b"), (2, 4, 4), {"a": 2, "b": 1}, dense=True),
    ):
        model = registry.build(name, problem)
        out = model(torch.randn(2, *problem.input_shape))
        assert set(out) == {"a", "b"}
        assert out["a"].shape[:2] == (2, problem.out_dims["a"])
        if problem.dense:
            assert out["b"].shape[-2:] == (4, 4)


def test_builds_by_constructor_names_when_no_from_problem():
    class Plain(MultiTaskModel):
        def __init__(self, tasks, in_dim, out_dims, scale=2.0):
            super().__init__(tasks)
            self.lin = torch.nn.ModuleDict({t: torch.nn.Linear(in_dim, out_dims[t]) for t in tasks})

        def forward(self, x):
            return {t: m(x) for t, m in self.lin.items()}

        def task_specific_parameters(self, task):
            return self.lin[task].parameters()

    problem = registry.Problem(("a",), (3,), {"a": 2})
    kwargs = registry._constructor_kwargs(Plain, problem)
    assert kwargs == {"tasks": ("a",), "in_dim": 3, "out_dims": {"a": 2}}


PARTIAL = {
    "vector": registry.Problem(("a", "b"), (12,), {"a": 2}),
    "dense": registry.Problem(("a", "b"), (3, 8, 8), {"a": 2}, dense=True),
    "pooled": registry.Problem(("a", "b"), (3, 8, 8), {"a": 2}),
}


@pytest.mark.parametrize("name", registry.available())
def test_a_task_without_a_width_gets_one_output(name):
    """Every architecture sees every task: ``b``, left out of ``out_dims``, has width 1."""
    for problem in PARTIAL.values():
        try:
            torch.manual_seed(0)
            model = registry.build(name, problem)
        except ValueError:
            continue  # the architecture refuses this kind of problem (its own tests say so)
        out = model(torch.randn(3, *problem.input_shape))
        assert out["a"].shape[:2] == (3, 2) and out["b"].shape[:2] == (3, 1), name


def test_the_problem_fills_in_missing_widths_and_refuses_bad_ones():
    assert registry.Problem(("a", "b"), (4,), {"a": 3}).out_dims == {"a": 3, "b": 1}
    assert registry.Problem(("a",), (4,), {"a": np.int64(2)}).out_dims == {"a": 2}
    for out_dims, message in (({"c": 1}, r"not in the problem: \['c'\]"), ({"a": 0}, r"out_dims\['a'\] must be"),
                              ({"a": 1.5}, "positive integer, got 1.5"), ({"a": True}, "got True")):
        with pytest.raises(ValueError, match=message):
            registry.Problem(("a", "b"), (4,), out_dims)


def test_an_argument_the_small_default_sets_itself_is_refused_by_name():
    """``--arch-kw channels=8`` used to surface as Python's 'got multiple values' TypeError."""
    problem = registry.Problem(("a", "b"), (3, 8, 8), {"a": 2, "b": 1}, dense=True)
    with pytest.raises(ValueError, match="ltb sets channels itself, from the problem and width"):
        registry.build("ltb", problem, channels=8)
    registry.build("ltb", problem, width=8)  # the way to set it
    with pytest.raises(TypeError, match="unexpected keyword argument 'heads'"):
        registry.build("mmoe", problem, heads={})  # not an argument of this route: unchanged


def _with_module(monkeypatch, short, *classes, imported=()):
    add_package_module(monkeypatch, registry.__package__, short, *classes, imported=imported)


class Plain(MultiTaskModel):
    """Built from constructor argument names: no from_problem."""

    def __init__(self, tasks, in_dim, out_dims, scale=2.0):
        super().__init__(tasks)
        self.scale = scale
        self.lin = torch.nn.ModuleDict({t: torch.nn.Linear(in_dim, out_dims[t]) for t in tasks})

    def forward(self, x):
        return {t: m(x) for t, m in self.lin.items()}

    def task_specific_parameters(self, task):
        return self.lin[task].parameters()


def test_only_named_concrete_classes_of_public_package_modules_are_registered(monkeypatch):
    before = registry.available()
    assert before == sorted(before)
    abstract = type("Abstract", (MultiTaskModel,), {"name": "zz_abstract"})
    child = type("Child", (registry.get("mmoe"),), {})  # inherits name "mmoe" but sets none
    foreign = type("Foreign", (Plain,), {"name": "zz_foreign"})
    alias = ClaimsToBeAType()
    assert isinstance(alias, type)  # the trap: a check by isinstance takes it for a class
    _with_module(monkeypatch, "zz_extra", abstract, child, alias, imported=[foreign])
    _with_module(monkeypatch, "_zz_private", type("Private", (Plain,), {"name": "zz_private"}))
    assert registry.available() == before


def test_two_classes_with_one_name_are_refused_naming_both(monkeypatch):
    _with_module(monkeypatch, "zz_twin", type("Twin", (Plain,), {"name": "mmoe"}))
    with pytest.raises(RuntimeError, match=r"'mmoe' is used by both reference_impls\.architectures\.mmoe\.\w+ "
                                           r"and reference_impls\.architectures\.zz_twin\.Twin"):
        registry.available()


def test_build_without_from_problem_passes_the_problem_and_lets_overrides_win(monkeypatch):
    _with_module(monkeypatch, "zz_plain", type("Named", (Plain,), {"name": "zz_plain"}))
    problem = registry.Problem(("a", "b"), (3,), {"a": 2})
    model = registry.build("zz_plain", problem, out_dims={"a": 5, "b": 1}, scale=0.5)
    assert (model.lin["a"].in_features, model.lin["a"].out_features, model.scale) == (3, 5, 0.5)
    assert registry.takes_option("zz_plain", "scale") and not registry.takes_option("zz_plain", "seed")


def test_constructor_names_for_images_and_for_the_input_dim_spelling():
    class Image(Plain):
        def __init__(self, tasks, in_channels, output_dims):
            MultiTaskModel.__init__(self, tasks)

    class Spelled(Plain):
        def __init__(self, tasks, input_dim, out_dims):
            MultiTaskModel.__init__(self, tasks)

    image = registry.Problem(("a",), (3, 8, 5), {"a": 2})
    assert registry._constructor_kwargs(Image, image) == {"tasks": ("a",), "in_channels": 3, "output_dims": {"a": 2}}
    vector = registry.Problem(("a",), (7,))
    assert registry._constructor_kwargs(Spelled, vector) == {"tasks": ("a",), "input_dim": 7, "out_dims": {"a": 1}}


def test_keyword_only_arguments_after_star_args_are_still_filled():
    """A constructor that forwards *args keeps its keyword-only arguments; the scan must read past *args."""
    class Forwarding(Plain):
        def __init__(self, tasks, *args, out_dims, in_dim, **kwargs):
            MultiTaskModel.__init__(self, tasks)

    vector = registry.Problem(("a",), (7,), {"a": 2})
    assert registry._constructor_kwargs(Forwarding, vector) == {"tasks": ("a",), "in_dim": 7, "out_dims": {"a": 2}}


def test_a_required_constructor_argument_the_problem_cannot_give_is_named():
    class Needs(Plain):
        def __init__(self, tasks, depth, scale=1.0):
            MultiTaskModel.__init__(self, tasks)

    with pytest.raises(TypeError, match="constructor argument 'depth' has no default and the class defines no from_problem"):
        registry._constructor_kwargs(Needs, registry.Problem(("a",), (3,)))


def test_takes_option_reads_from_problem_and_what_its_keywords_forward(monkeypatch):
    class Forwards(Plain):
        name = "zz_forwards"

        @classmethod
        def from_problem(cls, problem, width=32, **kwargs):
            return cls(problem.tasks, problem.input_shape[0], problem.out_dims, **kwargs)

    class Closed(Plain):
        name = "zz_closed"

        @classmethod
        def from_problem(cls, problem, seed=0):
            return cls(problem.tasks, problem.input_shape[0], problem.out_dims)

    _with_module(monkeypatch, "zz_options", Forwards, Closed)
    assert registry.takes_option("zz_forwards", "scale") and registry.takes_option("zz_forwards", "width")
    assert registry.takes_option("zz_closed", "seed") and not registry.takes_option("zz_closed", "scale")


@pytest.mark.parametrize("width", [0, -1])
def test_a_width_below_one_is_refused_before_building(width):
    with pytest.raises(ValueError, match="width"):
        registry.build("mmoe", registry.Problem(("a", "b"), (4,)), width=width)


def test_task_out_dims_is_a_copy_of_the_complete_widths():
    problem = registry.Problem(("a", "b"), (4,), {"a": 3})
    widths = problem.task_out_dims
    widths["a"] = 9
    assert widths is not problem.out_dims and problem.out_dims == {"a": 3, "b": 1}
