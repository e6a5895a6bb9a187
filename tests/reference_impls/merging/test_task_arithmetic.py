"""Task arithmetic: θ_pre + λ Σ τ_t on flat and dict task vectors."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.merging.base import add, stack, task_vector
from reference_impls.merging.task_arithmetic import TaskArithmetic
from reference_impls.merging.ties import TiesMerging


def test_sum_of_task_vectors_times_scale_on_a_hand_example():
    pre = torch.tensor([1.0, 0.0, -1.0])
    taus = [torch.tensor([0.5, -1.0, 0.0]), torch.tensor([1.5, 2.0, -4.0])]
    merged = TaskArithmetic(scale=0.5)(pre, taus)
    torch.testing.assert_close(merged, torch.tensor([2.0, 0.5, -3.0]))


def test_dict_task_vectors_keep_keys_and_shapes():
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)}
    finetuned = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    taus = [task_vector(f, pre) for f in finetuned]
    merged = TaskArithmetic(scale=0.3)(pre, taus)
    assert set(merged) == {"w", "b"}
    for k in pre:
        torch.testing.assert_close(merged[k], pre[k] + 0.3 * sum(f[k] - pre[k] for f in finetuned))


def test_one_task_at_scale_one_recovers_the_fine_tuned_model():
    g = torch.Generator().manual_seed(1)
    pre = {"w": torch.randn(4, 4, generator=g)}
    finetuned = {"w": torch.randn(4, 4, generator=g)}
    merged = TaskArithmetic(scale=1.0)(pre, [task_vector(finetuned, pre)])
    torch.testing.assert_close(merged["w"], finetuned["w"])
    torch.testing.assert_close(add(pre, task_vector(finetuned, pre))["w"], finetuned["w"])


def test_stack_flattens_dicts_in_sorted_key_order_and_inverts():
    tau = {"z": torch.tensor([[1.0, 2.0]]), "a": torch.tensor([3.0])}
    rows, unflatten = stack([tau])
    torch.testing.assert_close(rows, torch.tensor([[3.0, 1.0, 2.0]]))
    back = unflatten(rows[0])
    assert back["z"].shape == (1, 2) and torch.equal(back["a"], tau["a"])


@pytest.mark.parametrize("task_vectors, reason", [
    ([], "need at least one task vector"),
    ([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], "task vector dicts must all have the same keys"),
    ([torch.zeros(2), torch.zeros(3)], "flat task vectors must all be tensors of one shape"),
    ([torch.zeros(2), {"a": torch.zeros(2)}], "flat task vectors must all be tensors of one shape"),
])
def test_task_vectors_that_cannot_be_stacked_are_refused_with_the_reason(task_vectors, reason):
    with pytest.raises(ValueError, match=reason):
        stack(task_vectors)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_task_vector_is_refused(bad):
    with pytest.raises(ValueError, match="task vectors contain NaN or inf"):
        TaskArithmetic()(torch.zeros(2), [torch.ones(2), torch.tensor([1.0, bad])])


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale_is_refused_but_zero_and_negation_are_kept(scale):
    with pytest.raises(ValueError, match=f"scale must be finite, got {scale}"):
        TaskArithmetic(scale=scale)
    torch.testing.assert_close(TaskArithmetic(scale=-1.0)(torch.zeros(2), [torch.ones(2)]), -torch.ones(2))
    torch.testing.assert_close(TaskArithmetic(scale=0.0)(torch.zeros(2), [torch.ones(2)]), torch.zeros(2))


def test_integer_buffers_keep_their_pre_trained_values_and_dtype():
    """A BatchNorm step counter is not a weight: 0 -> 100 in two tasks at λ = 0.3 gave 60.0."""
    pre = {"bn.weight": torch.ones(2), "bn.num_batches_tracked": torch.tensor(0)}
    tuned = [{"bn.weight": torch.tensor([2.0, 1.0]), "bn.num_batches_tracked": torch.tensor(100)},
             {"bn.weight": torch.tensor([1.0, 3.0]), "bn.num_batches_tracked": torch.tensor(100)}]
    merged = TaskArithmetic(scale=0.3)(pre, [task_vector(t, pre) for t in tuned])
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    assert merged["bn.num_batches_tracked"].item() == 0
    torch.testing.assert_close(merged["bn.weight"], torch.tensor([1.3, 1.6]))


@pytest.mark.parametrize("merging", [TaskArithmetic(), TiesMerging()], ids=["task-arithmetic", "ties"])
def test_a_hand_built_task_vector_with_a_counter_is_refused_by_name(merging):
    """{k: tuned[k] - pre[k] for k in tuned} keeps BatchNorm's step counter; it used to be merged
    like a weight (pre 5, counter differences 5 and 5: task arithmetic gave 15, TIES 10)."""
    pre = {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(5)}
    tuned = [{"w": torch.tensor([2.0, 1.0]), "bn.num_batches_tracked": torch.tensor(10)},
             {"w": torch.tensor([1.0, 3.0]), "bn.num_batches_tracked": torch.tensor(10)}]
    by_hand = [{k: t[k] - pre[k] for k in t} for t in tuned]
    with pytest.raises(ValueError, match=r"entries \['bn.num_batches_tracked'\] are not floating-point weights; "
                                         r"build task vectors with task_vector"):
        merging(pre, by_hand)
    merged = merging(pre, [task_vector(t, pre) for t in tuned])
    assert merged["bn.num_batches_tracked"].item() == 5


def test_a_models_extra_state_is_kept_from_the_pre_trained_state_dict():
    """PathNet keeps its pathways as extra state, a dict in its state_dict: merging two of its
    fine-tuned copies leaves it as pre-trained, merges the weights, and the result loads."""
    problem = Problem(("a", "b"), (6,), {"a": 1, "b": 1})
    model = build("pathnet", problem, num_layers=2, num_modules=3, active=2)
    pre = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    tuned = [{k: v + i + 1 if torch.is_tensor(v) and v.is_floating_point() else v for k, v in pre.items()}
             for i in range(2)]
    vectors = [task_vector(t, pre) for t in tuned]
    assert all("_extra_state" not in v and "frozen" not in v for v in vectors)
    merged = TaskArithmetic(scale=0.5)(pre, vectors)
    assert merged["_extra_state"] is pre["_extra_state"]
    torch.testing.assert_close(merged["heads.a.0.weight"], pre["heads.a.0.weight"] + 1.5)
    model.load_state_dict(merged)


def test_a_task_vector_missing_a_weight_is_refused_by_name():
    pre = {"a": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"no entry for weight\(s\) \['b'\]"):
        add(pre, {"a": torch.ones(2)})


def test_flat_task_vector_is_finetuned_minus_pretrained():
    torch.testing.assert_close(task_vector(torch.tensor([3.0, -1.0]), torch.tensor([1.0, 2.0])),
                               torch.tensor([2.0, -3.0]))


def test_default_scale_is_one_as_in_the_authors_apply_to():
    assert TaskArithmetic().scale == 1.0
    torch.testing.assert_close(TaskArithmetic()(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.ones(2)]),
                               torch.tensor([2.0, 3.0]))


def test_a_non_zero_step_counter_keeps_its_pre_trained_value_at_the_default_scale():
    """Counter 7 before fine-tuning, 100 after: the merge keeps 7 (int64), neither 0·7 nor 7 + 2·93.

    w by hand at the default λ = 1: θ_pre + τ_1 + τ_2 = [1, 1] + [1, 0] + [0, 2] = [2, 3].
    """
    pre = {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(7)}
    tuned = [{"w": torch.tensor([2.0, 1.0]), "bn.num_batches_tracked": torch.tensor(100)},
             {"w": torch.tensor([1.0, 3.0]), "bn.num_batches_tracked": torch.tensor(100)}]
    merged = TaskArithmetic()(pre, [task_vector(t, pre) for t in tuned])
    assert merged["bn.num_batches_tracked"].dtype == torch.int64
    assert merged["bn.num_batches_tracked"].item() == 7
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 3.0]))
