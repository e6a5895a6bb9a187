import pytest
import torch

from reference_impls.architectures import whom_to_share as wts
from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.whom_to_share import WhomToShare

from .procedure_names import unresolved_names

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})


def _nuclear(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m).sum()


def test_one_group_is_the_squared_trace_norm_of_feature_learning():
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one_group = torch.ones(1, 6, dtype=torch.float64)
    torch.testing.assert_close(wts.group_penalty(w, one_group, 1e-14), _nuclear(w) ** 2)
    q = torch.tensor([[1, 1, 0, 0, 0.5, 0.25], [0, 0, 1, 1, 0.5, 0.75]], dtype=torch.float64)
    expected = sum(_nuclear(w * row.sqrt()) ** 2 for row in q)  # ||W Q_g^{1/2}||_*^2 per group
    torch.testing.assert_close(wts.group_penalty(w, q, 1e-14), expected)


def test_feature_covariance_step_attains_the_variational_form():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    q = torch.rand(5, generator=g, dtype=torch.float64)
    d = wts.feature_covariance_step(w, q)
    assert torch.linalg.eigvalsh(d).min() > 0 and abs(torch.trace(d).item() - 1) < 1e-12
    cost = lambda m: torch.trace((w * q) @ w.T @ torch.linalg.inv(m))  # noqa: E731
    torch.testing.assert_close(cost(d), _nuclear(w * q.sqrt()) ** 2)
    for _ in range(10):
        m = torch.randn(3, 3, generator=g, dtype=torch.float64)
        other = m @ m.T + 0.1 * torch.eye(3, dtype=torch.float64)
        assert cost(other / torch.trace(other)) > cost(d)


def _smoothed_penalty(w: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """sum_g tr((W Q_g W^T + eps I)^{1/2})^2 as nuclear norms of [W Q_g^{1/2}, sqrt(eps) I]."""
    root_eps = eps**0.5 * torch.eye(w.shape[0], dtype=w.dtype)
    return sum(_nuclear(torch.cat([w * row.sqrt(), root_eps], dim=1)) ** 2 for row in q)


def test_group_step_is_plain_descent_from_the_given_logits():
    """Three fixed-step gradient steps on the softmax-over-groups logits, starting where told."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    start = torch.randn(2, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(wts.group_step(w, start, eps=1e-2, steps=0), start, rtol=0, atol=0)
    logits = start.clone()
    for _ in range(3):
        logits.requires_grad_()
        (grad,) = torch.autograd.grad(_smoothed_penalty(w, logits.softmax(0), 1e-2), logits)
        logits = (logits - 0.3 * grad).detach()
    torch.testing.assert_close(wts.group_step(w, start, eps=1e-2, steps=3, lr=0.3), logits)
    assert (logits - start).abs().max() > 1e-3  # the steps moved it


def test_group_step_puts_tasks_sharing_features_together():
    """Tasks 0 and 2 use feature directions e1, e2; tasks 1 and 3 use e3, e4: two groups."""
    w = torch.zeros(5, 4, dtype=torch.float64)
    w[0, 0], w[1, 0], w[0, 2], w[1, 2] = 1.0, 0.5, 0.8, 0.6
    w[2, 1], w[3, 1], w[2, 3], w[3, 3] = 1.2, -0.4, 0.9, -0.5
    logits = 0.01 * torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    start = wts.group_penalty(w, logits.softmax(0), 1e-4)
    logits = wts.group_step(w, logits, eps=1e-4, steps=300, lr=2.0)
    q = logits.softmax(0)
    group = q.argmax(0)
    assert group[0] == group[2] and group[1] == group[3] and group[0] != group[1]
    assert q.max(0).values.min() > 0.9  # nearly hard assignments
    # all in one group costs (a + b)^2 (as does an even split, the start), two groups a^2 + b^2
    a, b = _nuclear(w[:, [0, 2]]), _nuclear(w[:, [1, 3]])
    together = wts.group_penalty(w, torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64), 1e-4)
    torch.testing.assert_close(together, (a + b) ** 2, atol=0.1, rtol=0)
    torch.testing.assert_close(start, together, atol=0.1, rtol=0)
    torch.testing.assert_close(wts.group_penalty(w, q, 1e-4), a**2 + b**2, atol=0.3, rtol=0)


def test_auxiliary_loss_by_hand_and_gradients(params_with_grad):
    torch.manual_seed(0)
    model = build("whom_to_share", VEC, width=4, depth=1, num_groups=2, gamma=0.5, eps=1e-3)
    q = model.memberships()
    assert q.shape == (2, 3)
    torch.testing.assert_close(q.sum(0), torch.ones(3))
    columns = torch.stack([q[:, 0], q[:, 1], q[:, 1], q[:, 2]], dim=1)  # task b has two output columns
    w = torch.cat([model.heads[t].weight.T for t in "abc"], dim=1)
    eye = torch.eye(4)
    expected = 0.5 * sum(torch.linalg.eigvalsh((w * c) @ w.T + 1e-3 * eye).sqrt().sum() ** 2 for c in columns)
    torch.testing.assert_close(model.auxiliary_loss(), expected)
    assert params_with_grad(model, model.auxiliary_loss()) == {f"heads.{t}.weight" for t in "abc"} | {"group_logits"}


def test_training_lowers_loss_and_registry_shapes(device, short_training, registry_output_shapes):
    for dense in (True, False):
        before, after = short_training("whom_to_share", dense, device, 30)
        assert after < 0.5 * before
    registry_output_shapes("whom_to_share", device)


def test_registry_name_and_task_specific_parameters(split_by_task):
    torch.manual_seed(0)
    model = build("whom_to_share", VEC, width=4)
    assert type(model) is WhomToShare and model.name == "whom_to_share"
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    for t, (own, reached) in split_by_task(model, torch.randn(5, 6)).items():
        assert own == {f"heads.{t}.weight", f"heads.{t}.bias"}
        assert reached == own | trunk
    assert unresolved_names(WhomToShare) == []


def test_feature_covariance_step_with_eps_smooths_before_the_root():
    """D_g = (W Q_g W^T + eps I)^{1/2} / tr(...): for W = diag(3, 4) and q = 1 that is diag(sqrt(9+eps), sqrt(16+eps))
    over their sum."""
    w = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
    root = torch.tensor([(9.0 + 0.5) ** 0.5, (16.0 + 0.5) ** 0.5], dtype=torch.float64)
    d = wts.feature_covariance_step(w, torch.ones(2, dtype=torch.float64), eps=0.5)
    torch.testing.assert_close(d, torch.diag(root / root.sum()))


def test_documented_defaults_eps_must_be_positive_and_groups_start_undecided():
    """Defaults num_groups 2, gamma 1e-3, eps 1e-4 (docstring); small logits: memberships near uniform."""
    model = build("whom_to_share", VEC, width=4)
    assert model.group_logits.shape == (2, 3) and model.gamma == 1e-3 and model.eps == 1e-4
    for bad in (0.0, -1e-3):
        with pytest.raises(ValueError, match="eps"):
            build("whom_to_share", VEC, width=4, eps=bad)
    torch.manual_seed(0)
    many = Problem(tuple("abcdefghijklmnop"), (6,), {})
    q = build("whom_to_share", many, width=4, num_groups=4).memberships()
    assert (q - 0.25).abs().max() < 0.15
    assert "column_task" not in model.state_dict()  # derived from out_dims, not a learnt or saved state
