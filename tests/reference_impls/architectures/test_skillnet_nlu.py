"""SkillNet-NLU: the FFN is the mean of the active skills, inactive skills are inert, one skill = shared."""

import pytest
import torch

from reference_impls.architectures.registry import Problem, build
from reference_impls.architectures.skillnet_nlu import SkillNetNLU

VEC = Problem(("a", "b", "c"), (6,), {"a": 1, "b": 2, "c": 1})
SKILLS = {"a": ("general", "pair"), "b": ("general", "token", "pair"), "c": ("general",)}


def test_block_output_is_mean_of_active_skill_ffns(device):
    torch.manual_seed(0)
    model = build("skillnet_nlu", VEC, width=8, task_skills=SKILLS).to(device)
    block, h = model.blocks[0], torch.randn(3, 4, 8, device=device)
    a = block.norm1(h)
    h1 = h + block.attention(a, a, a, need_weights=False)[0]
    f = block.norm2(h1)
    expected = h1 + (block.skills["general"](f) + block.skills["token"](f) + block.skills["pair"](f)) / 3
    torch.testing.assert_close(block(h, SKILLS["b"]), expected)


def test_inactive_skills_get_no_gradient(device, params_with_grad):
    torch.manual_seed(0)
    model = build("skillnet_nlu", VEC, width=8, task_skills=SKILLS).to(device)
    touched = params_with_grad(model, model(torch.randn(5, 6, device=device))["a"].square().sum())
    for k in range(2):
        assert any(n.startswith(f"blocks.{k}.skills.general.") for n in touched)
        assert any(n.startswith(f"blocks.{k}.skills.pair.") for n in touched)
        assert not any(n.startswith(f"blocks.{k}.skills.token.") for n in touched)  # b's skill only
    assert not any(n.startswith(("heads.b", "heads.c")) for n in touched)


def test_output_depends_only_on_active_skills(device):
    torch.manual_seed(0)
    model = build("skillnet_nlu", VEC, width=8, task_skills=SKILLS).to(device)
    x = torch.randn(4, 6, device=device)
    before = model(x)
    with torch.no_grad():
        for block in model.blocks:
            for p in block.skills["token"].parameters():
                p.add_(torch.randn_like(p))
    after = model(x)
    for t in ("a", "c"):  # neither uses the token skill
        torch.testing.assert_close(after[t], before[t], rtol=0, atol=0)
    assert not torch.allclose(after["b"], before["b"])


def test_same_skill_set_gives_same_features_and_one_skill_is_shared_transformer(device):
    torch.manual_seed(0)
    one = {"a": ("general",), "b": ("general",), "c": ("general",)}
    model = build("skillnet_nlu", VEC, width=8, task_skills=one).to(device)
    x = torch.randn(4, 6, device=device)
    torch.testing.assert_close(model.features(x, "a"), model.features(x, "c"), rtol=0, atol=0)
    assert list(model.blocks[0].skills) == ["general"]
    assert sum(p.numel() for p in model.task_specific_parameters("a")) == 8 + 1  # only its head


def test_parameter_count_and_task_specific_split(n_params):
    w, d, depth, n_tok = 8, 6, 2, 4
    model = build("skillnet_nlu", VEC, width=w, depth=depth, task_skills=SKILLS, num_tokens=n_tok)
    ffn = (w * 2 * w + 2 * w) + (2 * w * w + w)
    attention, norms = 4 * w * w + 4 * w, 2 * 2 * w
    blocks = depth * (attention + norms + 3 * ffn)  # three distinct skills: general, pair, token
    stem = (d * n_tok * w + n_tok * w) + n_tok * w + 2 * w  # tokeniser, positions, final norm
    heads = (w + 1) + (2 * w + 2) + (w + 1)
    assert n_params(model) == stem + blocks + heads
    # token is b's alone; general and pair are used by two or more tasks, hence shared
    assert sum(p.numel() for p in model.task_specific_parameters("b")) == depth * ffn + 2 * w + 2
    assert sum(p.numel() for p in model.shared_parameters()) == stem + depth * (attention + norms + 2 * ffn)


def test_a_skill_listed_twice_counts_once(device):
    """S_t is a set: repeating a skill must not give it twice the weight in the mean."""
    torch.manual_seed(0)
    twice = {"a": ("general", "pair", "pair"), "b": ("general", "pair"), "c": ("general",)}
    model = build("skillnet_nlu", VEC, width=8, task_skills=twice).to(device)
    x = torch.randn(4, 6, device=device)
    torch.testing.assert_close(model.features(x, "a"), model.features(x, "b"), rtol=0, atol=0)


def test_every_task_needs_a_skill():
    with pytest.raises(ValueError, match="at least one skill"):
        build("skillnet_nlu", VEC, task_skills={"a": ("general",), "b": (), "c": ("general",)})


@pytest.mark.parametrize("dense", (True, False))
def test_registry_build_and_short_training(device, dense, short_training, registry_output_shapes):
    registry_output_shapes("skillnet_nlu", device)
    first, last = short_training("skillnet_nlu", dense, device, steps=40)
    assert last < 0.8 * first
    assert type(build("skillnet_nlu", VEC)) is SkillNetNLU


def test_features_are_the_blocks_with_the_tasks_skills_then_the_final_norm(device):
    torch.manual_seed(0)
    model = build("skillnet_nlu", VEC, width=8, task_skills=SKILLS).to(device)
    with torch.no_grad():  # a final norm with non-trivial affine parameters
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x = torch.randn(4, 6, device=device)
    h = model.stem(x)
    for block in model.blocks:
        h = block(h, SKILLS["a"])
    h = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + model.norm.eps).sqrt()
    torch.testing.assert_close(model.features(x, "a"), model.stem.read_out(h * model.norm.weight + model.norm.bias))


def test_default_inventory_is_a_general_skill_plus_one_per_task():
    model = build("skillnet_nlu", VEC, width=8)
    assert model.task_skills == {t: ("general", t) for t in VEC.tasks}
    assert model.skill_names == ("general", "a", "b", "c")
    assert model.users("general") == ["a", "b", "c"] and model.users("b") == ["b"]


def test_every_skill_is_a_two_layer_gelu_ffn_by_hand(device):
    """FFN_s(h) = W2 gelu(W1 h + b1) + b2 with a hidden width of twice the model width."""
    torch.manual_seed(0)
    model = build("skillnet_nlu", VEC, width=8, task_skills=SKILLS).double().to(device)
    h = torch.randn(3, 4, 8, dtype=torch.float64, device=device)
    for block in model.blocks:
        for ffn in block.skills.values():
            first, second = ffn[0], ffn[-1]
            assert first.weight.shape == (16, 8)
            pre = h @ first.weight.T + first.bias
            gelu = 0.5 * pre * (1 + torch.erf(pre / 2**0.5))
            torch.testing.assert_close(ffn(h), gelu @ second.weight.T + second.bias, rtol=0, atol=1e-12)


def test_default_constructor_works_and_token_options_reach_the_stem():
    """The defaults build a working model; ``num_tokens`` (vectors) and ``patch`` (images) reach the
    token stem."""
    torch.manual_seed(0)
    model = SkillNetNLU(VEC.tasks, VEC, SKILLS)
    assert model(torch.randn(2, 6))["b"].shape == (2, 2)
    assert SkillNetNLU(VEC.tasks, VEC, SKILLS, num_tokens=3).stem.num_tokens == 3
    image = Problem(("a", "b", "c"), (3, 16, 16), {"a": 1, "b": 2, "c": 1}, dense=True)
    assert SkillNetNLU(image.tasks, image, SKILLS, patch=2).stem.grid == (8, 8)
