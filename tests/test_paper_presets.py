"""The paper presets compose to the paper's numbers. Every expected value below is typed from the paper's text
(A.4, Table 4, section 4, Table 2) or NOTES.md (the released MoE scripts' warmup), never read from conf/."""

import math

import pytest
from omegaconf import OmegaConf

from dropup.lit import lr_lambda
from dropup.train import train_settings
from tests.test_configs import compose_with

B = 10**9
# preset: (layers, d_model, d_ff, heads, kv heads, vocab) from Table 4; global batch from A.4
TABLE4 = {
    "paper_8x152m": ((12, 512, 2048, 8, 8, 99574), 512),
    "paper_8x1.5b": ((24, 2048, 7168, 16, 8, 48586), 1024),
    "paper_8x3.7b": ((28, 3072, 8192, 24, 24, 99574), 1024),
}
# the dense seed's cosine horizon (A.4: 1,000B for 1.5B, 2,072B for 152M/3.7B/13B); the seed itself is the
# 1T-token model (section 4: "dense models were trained on 1T tokens"; Table 2 row 1: Dense 3.7B at 1,000B)
SEED_SCHEDULE = {"paper_8x152m": 2072 * B, "paper_8x1.5b": 1000 * B, "paper_8x3.7b": 2072 * B}


@pytest.fixture(scope="module", params=sorted(TABLE4))
def preset(request):
    return request.param, compose_with(f"experiment={request.param}")


def test_shapes_and_vocabulary_are_table4(preset):
    name, cfg = preset
    (layers, d, f, heads, kv, vocab), _ = TABLE4[name]
    m = cfg.model
    assert (m.n_layers, m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.vocab_size) == (layers, d, f, heads, kv, vocab)
    assert cfg.data.vocab_size == vocab
    assert (cfg.moe.enabled, cfg.moe.num_experts, cfg.moe.top_k) == (True, 8, 2)
    assert cfg.moe.lb_coef == 0.02 and cfg.moe.lb_mode == "pooled"  # A.4; pooled over layers (NOTES.md)


@pytest.mark.parametrize("recipe", ["train", "seed_recipe.train"])
def test_shared_optimizer_settings_are_a4(preset, recipe):
    name, cfg = preset
    train = OmegaConf.select(cfg, recipe)
    assert list(train.betas) == [0.9, 0.95] and train.eps == 1e-8
    assert train.weight_decay == 0.1 and train.grad_clip == 1.0
    assert cfg.data.seq_len == 4096
    assert train.batch_size == TABLE4[name][1]


def test_moe_recipe_is_a4(preset):
    _, cfg = preset
    t = cfg.train
    assert t.lr == 2e-4 and t.lr * t.min_lr_ratio == pytest.approx(2e-5)
    assert t.tokens == 500 * B and (t.schedule_tokens or t.tokens) == 500 * B
    assert t.warmup_steps == 2000 and t.final_constant_steps == 0


def test_dense_seed_recipe_is_a4_stopped_at_1t(preset):
    name, cfg = preset
    t = cfg.seed_recipe.train
    assert t.lr == 3e-4 and t.lr * t.min_lr_ratio == pytest.approx(3e-5)
    assert t.final_constant_steps == 2000
    assert t.tokens == 1000 * B
    assert (t.schedule_tokens or t.tokens) == SEED_SCHEDULE[name]


def test_the_152m_and_37b_seeds_stop_mid_cosine(preset):
    """At 1T of 2,072B tokens the seed's lr is where the cosine is at that point (not annealed to 3e-5)."""
    name, cfg = preset
    seed = OmegaConf.create({"train": OmegaConf.to_container(cfg.seed_recipe.train), "data": {"seq_len": 4096},
                             "moe": {"enabled": False}})
    s = train_settings(seed)
    last_lr = 3e-4 * lr_lambda(s["steps"] - 1, s["schedule_steps"], s["warmup_steps"], s["min_lr_ratio"],
                               s["final_constant_steps"])
    tokens_per_step = TABLE4[name][1] * 4096
    horizon, stop = SEED_SCHEDULE[name] // tokens_per_step, 1000 * B // tokens_per_step
    progress = (stop - 1 - 2000) / (horizon - 2000 - 2000)  # after 2000 warmup steps, before the constant tail
    expected = 3e-5 + 0.5 * (3e-4 - 3e-5) * (1 + math.cos(math.pi * min(1.0, progress)))
    assert last_lr == pytest.approx(expected, rel=1e-6)
    if SEED_SCHEDULE[name] > 1000 * B:
        assert 1.6e-4 < last_lr < 1.8e-4  # about half way down the cosine
    else:
        assert last_lr == pytest.approx(3e-5)  # 1.5B: its full schedule, annealed
