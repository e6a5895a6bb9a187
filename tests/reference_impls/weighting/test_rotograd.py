import torch

from reference_impls.toy.regression import make_problem
from reference_impls.weighting.rotograd import RotoGrad


def test_scaling_matches_hand_computation():
    rotograd = RotoGrad(dim=2, num_tasks=2)
    first = rotograd(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    # first call: ratios (1, 1) -> shares (0.5, 0.5); C = 0.5 * 5 + 0.5 * 1 = 3
    assert torch.allclose(first.update, torch.tensor([1.8, 2.4 + 3.0]))
    second = rotograd(torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    # norms (1, 1); ratios (0.2, 1) -> shares (1/6, 5/6); C = 1; update = unit_1 + unit_2
    assert torch.allclose(second.update, torch.tensor([0.6, 1.8]))
    rotograd = RotoGrad(dim=2, num_tasks=2)
    rotograd(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    third = rotograd(torch.tensor([[0.6, 0.8], [0.0, 2.0]]))
    # norms (1, 2); ratios (0.2, 2) -> shares (1/11, 10/11); C = 21/11: the less converged task leads
    assert torch.allclose(third.update, 21 / 11 * torch.tensor([0.6, 1.8]))



def test_a_task_with_zero_gradient_adds_nothing_and_keeps_the_update_finite():
    # norms (5, 0 -> eps): shares (1/2, 1/2), C = 5/2 + eps/2, update = C [3, 4] / 5 = [1.5, 2]
    result = RotoGrad(dim=2, num_tasks=2)(torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(result.update, torch.tensor([1.5, 2.0], dtype=torch.float64))

def test_each_task_pushes_with_the_same_magnitude_at_the_start():
    grads = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.01, 0.0], [0.0, 0.0, 1.0]])
    result = RotoGrad(dim=3, num_tasks=3)(grads)
    contributions = result.weights[:, None] * grads
    assert torch.allclose(contributions.norm(dim=1), contributions.norm(dim=1)[0].expand(3))


def test_rotations_are_orthogonal_and_start_at_identity():
    rotograd = RotoGrad(dim=4, num_tasks=2)
    assert torch.allclose(rotograd.rotations.matrices(), torch.eye(4).expand(2, 4, 4))
    with torch.no_grad():
        rotograd.rotations.generators.normal_(generator=torch.Generator().manual_seed(0))
    rotations = rotograd.rotations.matrices()
    identity = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), identity, atol=1e-5)


def test_backward_sends_the_scaled_rotated_back_gradients_into_the_backbone():
    """z.grad = Σ_k C ĝ_k with g_k = R_kᵀ ∇_{r_k} L_k, here in float64 with non-trivial rotations."""
    rotograd = RotoGrad(dim=3, num_tasks=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rotograd.rotations.generators.normal_(generator=generator)
    z = torch.randn(4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    heads = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    reps = rotograd.rotate(z)
    rotograd.backward(torch.stack([(r @ h).square().mean() for r, h in zip(reps, heads)]), z, reps)
    rotations = rotograd.rotations.matrices().detach().double()
    plain = z.detach().requires_grad_()
    task_grads = torch.stack([torch.autograd.grad((plain @ r.T @ h).square().mean(), plain)[0]
                              for r, h in zip(rotations, heads)]).flatten(1)
    norms = task_grads.norm(dim=1)  # first step: shares 1/2 each, C = mean norm
    expected = (norms.mean() * task_grads / norms[:, None]).sum(0).view(4, 3)
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert rotograd.rotations.generators.grad.abs().sum() > 0


def test_rotation_training_aligns_task_gradients():
    # two tasks whose gradients w.r.t. z point in opposite directions: rotations can align them
    rotograd = RotoGrad(dim=2, num_tasks=2)
    optimizer = torch.optim.SGD(rotograd.rotation_parameters(), lr=0.05)
    directions = torch.tensor([[1.0, 0.0], [-0.2, 1.0]])
    cosines = [torch.cosine_similarity(directions[0], directions[1], dim=0).item()]
    for _ in range(300):
        z = torch.ones(1, 2, requires_grad=True)
        reps = rotograd.rotate(z)
        losses = torch.stack([(rep * d).sum() for rep, d in zip(reps, directions)])
        optimizer.zero_grad()
        rotograd.backward(losses, z, reps)
        optimizer.step()
        rotated_back = [d @ r for d, r in zip(directions, rotograd.rotations.matrices().detach())]
        cosines.append(torch.cosine_similarity(rotated_back[0], rotated_back[1], dim=0).item())
    assert cosines[0] < 0 and cosines[-1] > 0.99


def test_training_reduces_total_loss():
    problem = make_problem(0)
    model = problem.model
    rotograd = RotoGrad(dim=8, num_tasks=2)
    parameters = list(model.parameters()) + rotograd.rotation_parameters()
    optimizer = torch.optim.Adam(parameters, lr=0.05)

    def rotated_losses() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        z = model(problem.inputs)
        reps = rotograd.rotate(z)
        predictions = torch.stack([head(r).squeeze(-1) for head, r in zip(model.heads, reps)], 1)
        return ((predictions - problem.targets) ** 2).mean(dim=0), z, reps

    initial = rotated_losses()[0].sum().item()
    for _ in range(120):
        losses, z, reps = rotated_losses()
        optimizer.zero_grad()
        rotograd.backward(losses, z, reps)
        optimizer.step()
    assert rotated_losses()[0].sum().item() < 0.2 * initial


def cayley(generators: torch.Tensor) -> torch.Tensor:
    """R_k = (I - S_k)⁻¹ (I + S_k), S_k = A_k - A_kᵀ, written out from the docstring."""
    skew = generators - generators.transpose(1, 2)
    identity = torch.eye(generators.shape[-1], dtype=generators.dtype)
    return torch.inverse(identity - skew) @ (identity + skew)


def test_cayley_map_by_hand():
    # A = [[0, a], [0, 0]]: S = [[0, a], [-a, 0]], R = [[1 - a², 2a], [-2a, 1 - a²]] / (1 + a²);
    # a = 1/2 gives [[0.6, 0.8], [-0.8, 0.6]] (its transpose is the other orientation of the map)
    rotograd = RotoGrad(dim=2, num_tasks=1)
    with torch.no_grad():
        rotograd.rotations.generators.copy_(torch.tensor([[[0.0, 0.5], [0.0, 0.0]]]))
    assert torch.allclose(rotograd.rotations.matrices()[0], torch.tensor([[0.6, 0.8], [-0.8, 0.6]]))


def rotation_loss_gradient(generators, z, heads):
    """d/dA of Σ_k mean_b ||R_k v_b - ∇_{r_k} L_k||² for L_k = mean_b (r_kb · h_k)², with
    ∇_{r_k} L_k and v held fixed: v = mean_k (g_k / ||g_k||) · mean_k ||g_k||, g_k = R_kᵀ ∇_{r_k} L_k."""
    generators = generators.detach().clone().requires_grad_()
    rotations = cayley(generators)
    batch = len(z)
    rep_grads, task_grads = [], []
    for rotation, head in zip(rotations.detach(), heads):
        rep = z @ rotation.T
        rep_grad = 2 * (rep @ head)[:, None] * head[None, :] / batch  # ∇_r mean_b (r_b · h)²
        rep_grads.append(rep_grad)
        task_grads.append(rep_grad @ rotation)  # rows R_kᵀ ∇_{r_kb}
    norms = torch.stack([g.norm() for g in task_grads])
    consensus = sum(g / n for g, n in zip(task_grads, norms)) / len(heads) * norms.mean()
    loss = sum(((consensus @ rotation.T - rep_grad) ** 2).sum(1).mean()
               for rotation, rep_grad in zip(rotations, rep_grads))
    return torch.autograd.grad(loss, generators)[0]


def test_rotation_gradient_is_that_of_the_alignment_loss_with_a_fixed_consensus():
    rotograd = RotoGrad(dim=3, num_tasks=3)
    rotograd.rotations.double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        rotograd.rotations.generators.normal_(generator=generator)
    z = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    heads = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    heads = heads * torch.tensor([[1.0], [0.1], [3.0]], dtype=torch.float64)  # unequal task norms
    reps = rotograd.rotate(z)
    rotograd.backward(torch.stack([(r @ h).square().mean() for r, h in zip(reps, heads)]), z, reps)
    expected = rotation_loss_gradient(rotograd.rotations.generators, z.detach(), heads)
    assert torch.allclose(rotograd.rotations.generators.grad, expected, rtol=1e-9, atol=1e-12)
