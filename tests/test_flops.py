"""Parameter counts and FLOPs against the paper's Table 4 and Table 2, and against real models."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_py_inline
from dropup.config import ModelConfig, MoEConfig
from dropup.flops import param_counts, train_flops
from dropup.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = MoEConfig(enabled=True, num_experts=8, top_k=2)

# Table 4 rows: layers, d_model, d_ff, heads, KV heads, vocabulary
TABLE4 = {
    "152m": (12, 512, 2048, 8, 8, 99574),
    "1.5b": (24, 2048, 7168, 16, 8, 48586),
    "3.7b": (28, 3072, 8192, 24, 24, 99574),
    "13b": (40, 5120, 13824, 40, 40, 99574),
}
# Table 4's printed (active, total) parameters
PRINTED_DENSE = {"152m": 152e6, "1.5b": 1.5e9, "3.7b": 3.7e9, "13b": 13e9}
PRINTED_MOE = {"152m": (190e6, 417e6), "1.5b": (2.6e9, 8.9e9), "3.7b": (5.9e9, 18e9)}


def table4_count(name, experts=1, active_experts=1):
    """The count Table 4's architecture implies, matrix by matrix."""
    layers, d, f, heads, kv, vocab = TABLE4[name]
    head = d // heads
    matrices = {
        "embed": vocab * d, "lm_head": d * vocab, "final_norm": d,
        "per_layer": d * d + 2 * d * kv * head + d * d + d + d,  # q, k+v, o, two norms
    }
    ffn = 3 * d * f
    router = d * experts if experts > 1 else 0
    total = matrices["embed"] + matrices["lm_head"] + matrices["final_norm"]
    return (total + layers * (matrices["per_layer"] + experts * ffn + router),
            total + layers * (matrices["per_layer"] + active_experts * ffn + router))


def preset(name):
    layers, d, f, heads, kv, vocab = TABLE4[name]
    return ModelConfig(name=name, vocab_size=vocab, n_layers=layers, d_model=d, d_ff=f, n_heads=heads, n_kv_heads=kv)


@pytest.mark.parametrize("name", TABLE4)
def test_dense_counts_match_table4(name):
    counts = param_counts(preset(name))
    total, _ = table4_count(name)
    assert counts["total_params"] == counts["active_params"] == total
    assert abs(total / PRINTED_DENSE[name] - 1) < 0.06


@pytest.mark.parametrize("name", PRINTED_MOE)
def test_moe_counts_match_table4(name):
    counts = param_counts(preset(name), MIXTRAL)
    total, active = table4_count(name, experts=8, active_experts=2)
    assert (counts["total_params"], counts["active_params"]) == (total, active)
    printed_active, printed_total = PRINTED_MOE[name]
    assert abs(active / printed_active - 1) < 0.06
    assert abs(total / printed_total - 1) < 0.06


@pytest.mark.parametrize(
    "moe",
    [None, MIXTRAL, MoEConfig(enabled=True, num_experts=8, top_k=4, granularity=2),
     MoEConfig(enabled=True, num_experts=4, top_k=1)],
    ids=["dense", "mixtral", "fine-grained", "4x-top1"],
)
def test_counts_equal_a_real_model(gqa_model, moe):
    model = Transformer(gqa_model, moe)
    total = sum(p.numel() for p in model.parameters())
    counts = param_counts(gqa_model, moe)
    assert counts["total_params"] == total
    if moe is not None:
        experts = sum(p.numel() for n, p in model.named_parameters() if ".w_gate_up" in n or ".w_down" in n)
        assert counts["active_params"] == total - experts * (moe.num_experts - moe.top_k) // moe.num_experts


FEATURES = {  # ModelConfig features of the HF families: each adds its own parameters, or none
    "qk-norm-per-head": dict(qk_norm=True),
    "qk-norm-full": dict(qk_norm=True, qk_norm_width="full", head_dim=16),
    "post-norm": dict(post_norm=True),
    "olmo2": dict(post_norm=True, qk_norm=True, qk_norm_width="full"),
    "granite": dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                    logits_scaling=8.0),
}


@pytest.mark.parametrize("moe", [None, MIXTRAL], ids=["dense", "mixtral"])
@pytest.mark.parametrize("features", sorted(FEATURES))
def test_feature_counts_equal_a_real_model(gqa_model, features, moe):
    from dataclasses import replace

    cfg = replace(gqa_model, **FEATURES[features])
    with torch.device("meta"):
        model = Transformer(cfg, moe)
    counts = param_counts(cfg, moe)
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    base = replace(gqa_model, head_dim=cfg.head_dim)
    norms = {"qk-norm-per-head": 2 * cfg.d_head, "qk-norm-full": (cfg.n_heads + cfg.n_kv_heads) * cfg.d_head,
             "olmo2": (cfg.n_heads + cfg.n_kv_heads) * cfg.d_head}.get(features, 0)
    assert counts["total_params"] - param_counts(base, moe)["total_params"] == cfg.n_layers * norms
    # norms and multipliers are no matrix products: Table 3's FLOPs whatever the features
    assert train_flops(cfg, moe, 4096, 64) == train_flops(base, moe, 4096, 64)


# Table 2: (preset, MoE?, tokens, FLOPs x 1e22), sequence length 4096
TABLE2 = [("3.7b", False, 1000e9, 2.70), ("3.7b", True, 500e9, 1.98), ("13b", False, 805e9, 7.43),
          ("3.7b", False, 2072e9, 5.58)]


@pytest.mark.parametrize("name,is_moe,tokens,flops", TABLE2)
def test_training_flops_match_table2(name, is_moe, tokens, flops):
    got = train_flops(preset(name), MIXTRAL if is_moe else None, int(tokens), 4096)
    assert abs(got / (flops * 1e22) - 1) < 0.01


@pytest.mark.parametrize("model,moe", [("13b", "none"), ("3.7b", "mixtral"), ("tiny", "fine_grained")])
def test_info_stage_prints_json_last(model, moe, tmp_path):
    # in this process, through Hydra's own entry point (tests/test_configs.py runs run.py in a new interpreter)
    args = ["stage=info", f"model={model}", f"moe={moe}", f"hydra.run.dir={tmp_path}"]
    code, stdout, stderr = run_py_inline(*args)
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert isinstance(report["total_params"], int) and isinstance(report["active_params"], int)
    assert isinstance(report["train_flops"], float) and report["train_flops"] > 0
    assert (report["model"], report["moe"]) == (model, moe)
    assert report["features"] == {}  # the paper's presets: its Llama
    if moe == "none":
        assert report["total_params"] == report["active_params"]
    else:
        assert report["total_params"] > report["active_params"]


def test_info_counts_the_features_it_reports(tmp_path):
    code, stdout, stderr = run_py_inline("stage=info", "model=tiny", "moe=none", "model.post_norm=true",
                                         "model.qk_norm=true", "model.qk_norm_width=full", f"hydra.run.dir={tmp_path}")
    assert code == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["features"] == {"post_norm": True, "qk_norm": True, "qk_norm_width": "full"}
    cfg = ModelConfig(**yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text()), **report["features"])
    with torch.device("meta"):
        assert report["total_params"] == sum(p.numel() for p in Transformer(cfg).parameters())


def test_info_reports_the_dense_seed_of_an_upcycled_run(tmp_path):
    """8x3.7B upcycled: the seed is Table 2's row 1 (Dense 3.7B, 1,000B tokens, 2.70e22 FLOPs), stopped on its
    2,072B-token schedule; a scratch MoE has no seed to report."""
    def info(*overrides):
        code, stdout, stderr = run_py_inline("stage=info", "experiment=paper_8x3.7b", *overrides,
                                             f"hydra.run.dir={tmp_path}")
        assert code == 0, stderr
        return json.loads(stdout.strip().splitlines()[-1])

    report = info("init=drop")
    assert (report["seed_tokens"], report["seed_schedule_tokens"]) == (1000 * 10**9, 2072 * 10**9)
    assert abs(report["seed_train_flops"] / 2.70e22 - 1) < 0.01
    assert abs(report["train_flops"] / 1.98e22 - 1) < 0.01 and report["schedule_tokens"] == 500 * 10**9
    assert "seed_tokens" not in info("init=scratch")


def test_info_allocates_no_weights(monkeypatch):
    """Counting the 13B preset must not build it: fail if any parameter-sized tensor is created."""
    calls = []
    real = torch.empty

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", spy)
    param_counts(preset("13b"), MIXTRAL)
    train_flops(preset("13b"), MIXTRAL, 10**9, 4096)
    assert calls == []
