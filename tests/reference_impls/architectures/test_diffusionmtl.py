"""DiffusionMTL: closed-form forward process, DDPM posterior, zero steps = initial prediction,
multi-task conditioning, gradient split, training."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference_impls.architectures import registry
from reference_impls.architectures.diffusionmtl import DiffusionMTL, NoiseSchedule

from .conftest import assert_each_task_owns_exactly, assert_mlps_have_a_gelu, names_under

TASKS = ("seg", "depth")
OUT = {"seg": 3, "depth": 1}


def make(device, **kw):
    torch.manual_seed(0)
    return DiffusionMTL(TASKS, 3, OUT, channels=8, **kw).to(device)


def test_schedule_and_closed_form_forward_process_by_hand():
    sched = NoiseSchedule(3, 1e-3, 1e-2)
    betas = [1e-3, ((1e-3**0.5 + 1e-2**0.5) / 2) ** 2, 1e-2]  # linear in sqrt(beta)
    torch.testing.assert_close(sched.betas, torch.tensor(betas))
    abar2 = (1 - betas[0]) * (1 - betas[1]) * (1 - betas[2])
    x0, eps = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    expected = abar2**0.5 * x0 + (1 - abar2) ** 0.5 * eps
    torch.testing.assert_close(sched.q_sample(x0, 2, eps), expected)


def test_closed_form_matches_the_step_by_step_markov_chain():
    sched = NoiseSchedule(3, 1e-2, 0.3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 1.5)
    x = x0
    for beta in sched.betas:  # x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)
    abar = sched.alphas_cumprod[-1]
    assert abs(x.mean() - abar.sqrt() * 1.5) < 0.01
    assert abs(x.var() - (1 - abar)) < 0.01


def test_posterior_is_gaussian_conditioning_of_the_joint_by_hand():
    sched = NoiseSchedule(3, 1e-2, 0.3)
    s = 2
    a_prev, a = sched.alphas_cumprod[s - 1], sched.alphas_cumprod[s]
    x0, xs = torch.tensor(0.7), torch.tensor(-0.4)
    # (x_{s-1}, x_s) | x_0 is jointly Gaussian: condition x_{s-1} on x_s.
    mu_prev, mu_s = a_prev.sqrt() * x0, a.sqrt() * x0
    var_prev, var_s = 1 - a_prev, 1 - a
    cov = (1 - sched.betas[s]).sqrt() * var_prev
    mean, var = sched.posterior(x0, xs, s)
    torch.testing.assert_close(mean, mu_prev + cov / var_s * (xs - mu_s))
    torch.testing.assert_close(var, var_prev - cov**2 / var_s)


def test_reverse_chain_by_hand_noise_to_the_last_step_then_ancestral_steps(device):
    model = make(device)  # S = 2 steps
    x = torch.randn(2, 3, 6, 6, device=device)
    with torch.no_grad():
        initial = model.initial_predictions(x)
        got = model.refine(initial, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        draw = lambda like: torch.randn(like.shape, generator=g).to(like)  # noqa: E731
        condition = model.denoiser.multi_task_condition(initial)
        abar = model.schedule.alphas_cumprod
        for t in TASKS:  # tasks in order, each: one forward draw, one posterior draw
            xs = abar[1].sqrt() * initial[t] + (1 - abar[1]).sqrt() * draw(initial[t])
            mean, var = model.schedule.posterior(model.denoiser(t, xs, condition, 1), xs, 1)
            x_prev = mean + var.sqrt() * draw(mean)
            torch.testing.assert_close(got[t], model.denoiser(t, x_prev, condition, 0))
        time_matters = model.denoiser(t, xs, condition, 0) - model.denoiser(t, xs, condition, 1)
    assert time_matters.abs().max() > 1e-6


def quarter_tokens(m):
    """(B, C, H, W) -> (B, HW/16, C): means over 4 x 4 blocks, the 1/4-resolution tokens, row-major."""
    b, c, h, w = m.shape
    return m.reshape(b, c, h // 4, 4, w // 4, 4).mean((3, 5)).flatten(2).transpose(1, 2)


def blocks_by_hand(den, task, x, condition):
    """At 1/4 resolution the condition tokens query the noisy tokens, whose stream each block updates by
    its own MLP first; the result is upsampled bilinearly, added to x and read by the task's output layer."""
    query, keys = quarter_tokens(condition), quarter_tokens(x)
    for block in den.blocks:
        keys = keys + block.mlp_kv(block.norm_kv(keys))
        query = block.attend(query, keys)
    b, c, h, w = x.shape
    up = F.interpolate(query.transpose(1, 2).reshape(b, c, h // 4, w // 4), size=(h, w), mode="bilinear",
                       align_corners=False)
    return den.outputs[task](up + x)


def test_denoiser_by_hand(device):
    """Sinusoidal time code added to the noisy map; at 1/4 resolution the condition tokens query the
    noisy tokens, whose stream is updated by its own MLP first in every block; full resolution added back."""
    model = make(device)  # channels 8, 16 time frequencies
    den, step = model.denoiser, 1
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 1, 8, 8, generator=g).to(device)
    condition = torch.randn(2, 8, 8, 8, generator=g).to(device)
    with torch.no_grad():
        got = den("depth", noisy, condition, step)
        angles = [step * 10000.0 ** (-k / 16) for k in range(16)]
        code = torch.tensor([math.cos(a) for a in angles] + [math.sin(a) for a in angles], device=device)
        x = den.inputs["depth"](noisy) + den.time.mlp(code)[None, :, None, None]
        torch.testing.assert_close(got, blocks_by_hand(den, "depth", x, condition))


def test_time_embedding_by_hand_linear_silu_linear_of_cosines_and_sines(device):
    """emb(t) = W2 silu(W1 [cos(t f_k); sin(t f_k)] + b1) + b2, f_k = 10000^(-k/16), from the weights."""
    time = make(device).double().denoiser.time
    t = torch.tensor([0.0, 1.0, 3.5], device=device, dtype=torch.float64)
    freqs = 10000.0 ** (-torch.arange(16, device=device, dtype=torch.float64) / 16)
    code = torch.cat([(t[:, None] * freqs).cos(), (t[:, None] * freqs).sin()], dim=1)
    first, last = time.mlp[0], time.mlp[-1]
    want = F.linear(F.silu(F.linear(code, first.weight, first.bias)), last.weight, last.bias)
    torch.testing.assert_close(time(t), want, rtol=0, atol=1e-12)  # the sinusoids in the model's float64 too


def test_noisy_token_mlps_have_a_gelu(device):
    """Each block's noisy-stream MLP is W2 gelu(W1 t + b1) + b2."""
    assert_mlps_have_a_gelu(block.mlp_kv.cpu() for block in make(device).denoiser.blocks)


def test_zero_steps_returns_the_initial_prediction(device):
    model = make(device, num_steps=0)
    x = torch.randn(2, 3, 6, 6, device=device)
    final, initial = model.forward_with_intermediate(x)
    for t in TASKS:
        assert torch.equal(final[t], initial[t])
    model = make(device)
    initial = model.initial_predictions(x)
    assert all(torch.equal(model.refine(initial, steps=0)[t], initial[t]) for t in TASKS)
    assert not torch.allclose(model.refine(initial)["seg"], initial["seg"])


def test_denoising_of_one_task_is_conditioned_on_every_tasks_initial_map(device):
    model = make(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    with torch.no_grad():
        initial = model.initial_predictions(x)
        before = model.refine(initial, generator=torch.Generator().manual_seed(0))
        again = model.refine(initial, generator=torch.Generator().manual_seed(0))
        moved = dict(initial, depth=initial["depth"] + 1.0)  # only the *other* task changes
        after = model.refine(moved, generator=torch.Generator().manual_seed(0))
    assert torch.equal(before["seg"], again["seg"])  # deterministic given the generator
    assert (after["seg"] - before["seg"]).abs().max() > 1e-4


def test_gradients_reach_shared_denoiser_but_not_other_tasks_decoders(device, params_with_grad):
    model = make(device)
    out = model(torch.randn(2, 3, 6, 6, device=device))
    names = params_with_grad(model, out["seg"].square().mean())
    assert any(n.startswith("denoiser.blocks.") for n in names)
    assert any(n.startswith("denoiser.condition.") for n in names)
    assert any(n.startswith("preliminary.seg.") for n in names)  # through x_0 of the chain
    assert not any(".depth." in n for n in names)  # the condition is detached
    specific = {id(p) for p in model.task_specific_parameters("depth")}
    assert all(id(p) not in specific for n, p in model.named_parameters() if n in names)


def test_each_task_owns_its_decoder_head_and_denoiser_input_and_output(device, split_by_task):
    """Preliminary decoder and head, denoiser input and output layers: claimed, and reached by no other task."""
    model = make(device)
    split = split_by_task(model, torch.randn(2, 3, 6, 6, device=device))
    assert_each_task_owns_exactly(split, lambda t: names_under(
        model, f"preliminary.{t}.", f"preliminary_heads.{t}.", f"denoiser.inputs.{t}.", f"denoiser.outputs.{t}."))


@pytest.mark.parametrize("dense", [True, False])
def test_intermediate_outputs_are_the_initial_predictions(device, dense):
    """The harness scores the initial maps next to the denoised ones (pooled for non-dense problems)."""
    model = make(device, dense=dense)
    x = torch.randn(2, 3, 6, 6, device=device)
    g = torch.Generator().manual_seed(2)
    final, intermediate = model.forward_with_intermediate(x, generator=g)
    initial = model.initial_predictions(x)
    refined = model.refine(initial, generator=torch.Generator().manual_seed(2))
    shape = (lambda m: m) if dense else (lambda m: m.mean((2, 3)))  # noqa: E731
    for t in TASKS:
        torch.testing.assert_close(intermediate[t], shape(initial[t]))
        torch.testing.assert_close(final[t], shape(refined[t]))
        assert not torch.allclose(final[t], intermediate[t])


def test_registry_shapes_training_and_vector_error(device, registry_output_shapes, short_training):
    registry_output_shapes("diffusionmtl", device)
    for dense, steps in ((True, 60), (False, 30)):
        first, last = short_training("diffusionmtl", dense, device, steps=steps)
        assert last < 0.7 * first, dense
    with pytest.raises(ValueError, match="image"):
        registry.build("diffusionmtl", registry.Problem(("a", "b"), (100,), {"a": 1, "b": 1}))


def test_attention_runs_at_a_quarter_of_a_non_square_map(device):
    """On a 20 x 24 map the condition tokens and the noisy tokens are the means of 4 x 4 blocks,
    a 5 x 6 grid (rows and columns each divided by 4), upsampled back to 20 x 24."""
    model = make(device)
    den = model.denoiser
    g = torch.Generator().manual_seed(2)
    noisy = torch.randn(2, 3, 20, 24, generator=g).to(device)
    condition = torch.randn(2, 8, 20, 24, generator=g).to(device)

    with torch.no_grad():
        x = den.inputs["seg"](noisy) + den.time(torch.tensor([0.0], device=device))[:, :, None, None]
        assert quarter_tokens(x).shape[1] == 5 * 6
        torch.testing.assert_close(den("seg", noisy, condition, 0), blocks_by_hand(den, "seg", x, condition))


def test_the_condition_map_keeps_the_resolution_of_the_initial_maps(device):
    """Multi-task conditioning: a 3 x 3 'same' convolution over all tasks' initial maps, concatenated."""
    model = make(device)
    g = torch.Generator().manual_seed(3)
    initial = {"seg": torch.randn(2, 3, 6, 10, generator=g).to(device),
               "depth": torch.randn(2, 1, 6, 10, generator=g).to(device)}
    conv = model.denoiser.condition
    expected = F.conv2d(torch.cat([initial["seg"], initial["depth"]], 1), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(model.denoiser.multi_task_condition(initial), expected)


def test_depth_heads_and_keywords_reach_the_denoiser():
    """depth cross-attention blocks with num_heads heads each; from_problem passes keywords on."""
    torch.manual_seed(0)
    model = DiffusionMTL(TASKS, 3, OUT, channels=8, depth=3, num_heads=4)
    assert len(model.denoiser.blocks) == 3
    assert all(block.attend.num_heads == 4 for block in model.denoiser.blocks)
    problem = registry.Problem(TASKS, (3, 8, 8), OUT, dense=True)
    assert DiffusionMTL.from_problem(problem, num_steps=1).schedule.num_steps == 1


def test_forward_draws_its_noise_from_the_given_generator(device):
    """forward(x, generator) is reproducible from the generator alone, whatever the global RNG."""
    model = make(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    torch.manual_seed(1)
    first = model(x, torch.Generator(device=device).manual_seed(7))
    torch.manual_seed(2)
    second = model(x, torch.Generator(device=device).manual_seed(7))
    for t in TASKS:
        torch.testing.assert_close(first[t], second[t])
