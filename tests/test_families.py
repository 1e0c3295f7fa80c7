"""Every supported family against transformers' own classes: same weights, same logits; upcycled at r = 0, the
MoE family's class computes the dense function. Tiny random models built from transformers' config classes (no
hub); biases, norm gains and q/k norms get non-trivial values so that a dropped one would show."""

import re

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from dropup import families
from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.hf import configs_from_hf, from_hf, hf_config, hf_config_dict, to_hf_model
from dropup.init import build_moe_state
from dropup.init.drop import DropUpcycling
from dropup.init.naive import NaiveUpcycling
from dropup.model import Transformer, rope_inv_freq

BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
# each family with the features its popular checkpoints have, made visible at this size
CASES = {
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}, tie_word_embeddings=True),
    "llama-linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "mistral": dict(sliding_window=5, head_dim=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=True),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 1000000.0}),
    # fused qkv_proj / gate_up_proj; Phi3Config's pad_token_id 32000 would not fit this vocabulary
    "phi3": dict(sliding_window=5, pad_token_id=None),
    # post-norm blocks, full-width q/k norms (the class has them always)
    "olmo2": dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # Granite's four scalars, at values that show at this size; tied like Granite 3.x
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=4.0,
                    tie_word_embeddings=True),
}
MOE = MoEConfig(enabled=True, num_experts=4, top_k=2)


def model_type(case):
    return case.split("-")[0]


def randomized(model):
    """Every parameter random, norms and biases too, so that a dropped or misplaced one changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1 if name.endswith("bias") else 0.05)
    return model


def hf_dense(case, seed=0, **changes):
    """A transformers dense model of the case's family (config fields `changes` on top), every parameter random."""
    config = AutoConfig.for_model(model_type(case), **{**BASE, **CASES[case], **changes})
    torch.manual_seed(seed)
    return randomized(AutoModelForCausalLM.from_config(config).eval())


def ours_from(hf_model):
    model_cfg, moe_cfg = configs_from_hf(hf_model.config.to_dict())
    ours = Transformer(model_cfg, moe_cfg if moe_cfg.enabled else None).eval()
    state = from_hf(hf_model.state_dict(), model_cfg.family, tied=model_cfg.tie_embeddings, model=model_cfg)
    ours.load_state_dict(state, strict=True)
    return ours, model_cfg


def tokens(vocab, seq=16):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_logits_equal_transformers(case):
    theirs = hf_dense(case)
    ours, cfg = ours_from(theirs)
    x = tokens(cfg.vocab_size)
    assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
    # the config says what the family has: nothing dropped, nothing invented
    assert cfg.family == model_type(case)
    assert cfg.tie_embeddings == bool(CASES[case].get("tie_word_embeddings"))
    assert cfg.attn_bias == (case == "qwen2") and cfg.qk_norm == (case in ("qwen3", "olmo2"))
    assert cfg.post_norm == (cfg.qk_norm_width == "full") == (case == "olmo2")
    multipliers = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    assert {k: getattr(cfg, k) for k in multipliers} == {k: CASES[case][k] for k in multipliers} if case == "granite" \
        else not set(cfg.features()) & set(multipliers)
    assert cfg.sliding_window == CASES[case].get("sliding_window")
    # and back: exactly the tensors of transformers' model (fused ones concatenated again)
    written = to_hf_model(ours.state_dict(), cfg, None)
    held = {k: v for k, v in theirs.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert written.keys() == held.keys() and all(torch.equal(written[k], held[k]) for k in held)


@pytest.mark.parametrize("case", ["llama", "llama-linear"])
def test_rope_inverse_frequencies_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.for_model("llama", **BASE, **CASES[case])
    theirs, factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")
    model_cfg, _ = configs_from_hf(config.to_dict())
    assert factor == 1.0
    assert_close(rope_inv_freq(model_cfg), theirs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", [NaiveUpcycling(), DropUpcycling(ratio=0.0)], ids=["naive", "drop-r0"])
def test_upcycled_at_r0_the_moe_family_computes_the_dense_function(case, strategy, tmp_path):
    dense = hf_dense(case)
    ours, cfg = ours_from(dense)
    moe_state = build_moe_state(strategy, [ours.state_dict()], cfg, MOE, seed=0)
    config = hf_config(cfg, MOE)
    assert config.model_type == families.family(cfg.family).moe_type
    theirs = AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_model(moe_state, cfg, MOE), strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    x = tokens(cfg.vocab_size)
    assert_close(theirs(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    # what save_pretrained writes (per expert) reads back into the same model, and loads again
    theirs.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(loaded(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    from safetensors.torch import load_file

    reread, moe = configs_from_hf(loaded.config.to_dict())
    back = Transformer(reread, moe).eval()
    back.load_state_dict(from_hf(load_file(tmp_path / "model.safetensors"), reread.family, reread.tie_embeddings))
    assert_close(back(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_moe_matches_its_family_logits_and_aux_loss(case):
    cfg, _ = configs_from_hf(AutoConfig.for_model(model_type(case), **BASE, **CASES[case]).to_dict())
    torch.manual_seed(3)
    ours = Transformer(cfg, MOE).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    theirs = AutoModelForCausalLM.from_config(hf_config(cfg, MOE)).eval()
    theirs.load_state_dict(to_hf_model(ours.state_dict(), cfg, MOE), strict=False)
    x = tokens(cfg.vocab_size)
    out = ours(x)
    ref = theirs(x, labels=x, output_router_logits=True)
    assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    losses = ours.losses(type(out)(out.logits[:, :-1], out.router_logits), x[:, 1:])
    assert_close(losses["lb_loss"], ref.aux_loss)
    assert theirs.config.router_aux_loss_coef == pytest.approx(0.02)


@pytest.mark.parametrize("model_type", ["gemma", "phi", "olmo"])
def test_other_families_are_one_error_naming_the_supported_ones(model_type):
    with pytest.raises(ConfigError, match="llama -> mixtral, mistral -> mixtral, qwen2 -> qwen2_moe, qwen3 -> qwen3_moe"):
        configs_from_hf({**BASE, "model_type": model_type})
    with pytest.raises(ConfigError, match=re.escape(families.supported())) as err:
        configs_from_hf({**BASE, "model_type": model_type})
    assert "\n" not in str(err.value)


def test_gemma_is_refused_saying_why():
    with pytest.raises(ConfigError) as err:
        configs_from_hf({**BASE, "model_type": "gemma"})
    assert all(why in str(err.value) for why in ("GeGLU", "(1 + w)", "scaled", "no MoE class"))


def test_docs_list_the_registered_families():
    """docs/converter.md's table of families is `python -m dropup.families`, between its markers."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "converter.md").read_text()
    block = text.split("<!-- families:start -->\n", 1)[1].split("<!-- families:end -->", 1)[0]
    assert block.strip() == families.table()
    assert [row.split("|")[1].strip() for row in families.table().splitlines()[2:]] == list(families.ADAPTERS)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("field, value", [("post_norm", True), ("embedding_multiplier", 12.0),
                                          ("logits_scaling", 8.0)])
def test_a_family_refuses_the_block_features_of_others_on_export(family, field, value):
    """A Llama with OLMo-2's post-norms or Granite's multipliers would load into LlamaForCausalLM and compute
    another function: writing its config is one error naming the field."""
    plain = ModelConfig(family=family, qk_norm=family == "qwen3")
    hf_config_dict(plain)  # the family's own model is written
    with pytest.raises(ConfigError, match=f"cannot hold model.{field}="):
        hf_config_dict(ModelConfig(family=family, qk_norm=family == "qwen3", **{field: value}))


def test_qwen_moe_that_would_not_route_like_the_paper_is_refused():
    config = hf_config(configs_from_hf({**BASE, "model_type": "qwen2"})[0], MOE).to_dict()
    configs_from_hf(config)  # what we write reads back
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        configs_from_hf({**config, "norm_topk_prob": False})
    assert configs_from_hf({**config, "shared_expert_intermediate_size": 64})[1].shared_expert_d_ff == 64


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_counts_are_the_real_models(case):
    """flops.param_counts counts biases, q/k norms, the head width and tied embeddings (once) as the models hold
    them: ours and transformers' (whose parameters() lists a tied matrix once)."""
    from dropup.flops import param_counts

    dense = hf_dense(case)
    ours, cfg = ours_from(dense)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert param_counts(cfg)["total_params"] == numel(ours) == numel(dense)
    with torch.device("meta"):
        moe_model = Transformer(cfg, MOE)
    counts = param_counts(cfg, MOE)
    assert counts["total_params"] == numel(moe_model)
    expert = 3 * cfg.d_model * cfg.d_ff
    assert counts["total_params"] - counts["active_params"] == cfg.n_layers * (MOE.num_experts - MOE.top_k) * expert


@pytest.mark.parametrize("case", sorted(CASES))
def test_converter_upcycles_every_family(case, tmp_path, capsys):
    """dropup-upcycle on a saved checkpoint of each family: the MoE family's directory loads with
    AutoModelForCausalLM, keeps the dense config's fields that still apply, computes the dense function at r = 0
    (--verify says so too), and at r = 0.5 holds exactly what run.py's init builds."""
    import json

    from dropup import upcycle

    dense = hf_dense(case)
    dense.config.bos_token_id, dense.config.eos_token_id = 1, 2
    dense.save_pretrained(tmp_path / "dense", max_shard_size="40KB")  # sharded, through the index
    ours, cfg = ours_from(dense)
    x = tokens(cfg.vocab_size)
    init = ["--init", "naive"] if case in ("llama", "qwen2", "llama-linear") else ["--init", "drop", "--ratio", "0"]
    code = upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *init,
                         "--experts", "4", "--verify"])
    out = capsys.readouterr().out
    assert code == 0 and "OK: logits of the MoE equal the dense model's" in out
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert written["model_type"] == families.family(cfg.family).moe_type
    assert written["router_aux_loss_coef"] == 0.02 and (written["bos_token_id"], written["eos_token_id"]) == (1, 2)
    assert written["tie_word_embeddings"] == cfg.tie_embeddings
    rope = dense.config.to_dict()["rope_parameters"]  # (Phi-3 spells out a partial_rotary_factor of 1)
    assert written["rope_parameters"] == {k: v for k, v in rope.items() if (k, v) != ("partial_rotary_factor", 1.0)}
    assert written.get("sliding_window") == dense.config.to_dict().get("sliding_window")
    if cfg.family.startswith("qwen") or cfg.family == "olmo2":
        assert written["norm_topk_prob"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert_close(loaded(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)

    assert upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "drop"), "--init", "drop",
                         "--ratio", "0.5", "--experts", "4", "--seed", "3"]) == 0
    from safetensors.torch import load_file

    files = sorted((tmp_path / "drop").glob("model-*.safetensors"))
    converted = from_hf({k: v for f in files for k, v in load_file(f).items()}, cfg.family)
    expected = build_moe_state(DropUpcycling(ratio=0.5), [ours.state_dict()], cfg, MOE, seed=3)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_a_fused_tensor_is_read_by_its_rows_from_a_sharded_checkpoint(tmp_path, monkeypatch):
    """The converter's reader takes Phi-3's q, k, v (gate, up) from their rows of qkv_proj (gate_up_proj) with
    safetensors' get_slice, never reading a whole fused tensor, and gets transformers' own values."""
    from dropup import shards
    from dropup.upcycle.inputs import open_dense

    dense = hf_dense("phi3")
    dense.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) >= 2
    source = open_dense(tmp_path)
    cfg = source.model
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    assert [(r.stored.name, r.start, r.stop) for r in source.tensors["layers.1.attn.wk.weight"].pieces] == \
        [("model.layers.1.self_attn.qkv_proj.weight", q, q + kv)]
    whole = []
    real_open = shards._open

    class Spy:
        def __init__(self, path):
            self.opened = real_open(path)

        def __enter__(self):
            self.f = self.opened.__enter__()
            return self

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)

        def get_slice(self, name):
            return self.f.get_slice(name)

        def get_tensor(self, name):
            whole.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(shards, "_open", Spy)
    reader = source.reader()
    state = {name: reader[name] for name in reader}
    assert "model.layers.0.self_attn.o_proj.weight" in whole  # renamed tensors are read whole
    assert not [n for n in whole if "qkv_proj" in n or "gate_up_proj" in n]
    expected = from_hf(dense.state_dict(), "phi3", model=cfg)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def test_phi3_longrope_and_partial_rotary_are_one_error_line():
    """Mixtral computes Phi-3's longrope as Phi-3 does (so only dropup's RoPE lacks it); both are refused."""
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
            "long_factor": [2.0, 2.5, 3.0, 4.0], "original_max_position_embeddings": 16}
    small = {**BASE, "max_position_embeddings": 64, "pad_token_id": None, "hidden_size": 32, "num_attention_heads": 4}
    phi = AutoConfig.for_model("phi3", rope_parameters=dict(rope), original_max_position_embeddings=16, **small)
    mixtral = AutoConfig.for_model("mixtral", rope_parameters=dict(rope), head_dim=8, **small)
    for n in (8, 40):  # below and above the original context: short, then long factors
        x, pos = torch.zeros(1, n, 32), torch.arange(n)[None]
        for theirs, ref in zip(MixtralRotaryEmbedding(mixtral)(x, pos), Phi3RotaryEmbedding(phi)(x, pos)):
            assert_close(theirs, ref, rtol=0, atol=0)
    for config, message in ((phi, "'longrope' .* dropup's RoPE has no switch"),
                            (AutoConfig.for_model("phi3", partial_rotary_factor=0.75, **small),
                             "partial_rotary_factor=0.75")):
        with pytest.raises(ConfigError, match=message) as err:
            configs_from_hf(config.to_dict())
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_a_config_without_head_dim_gets_the_width_transformers_gives_it(model_type):
    config = AutoConfig.for_model(model_type, **BASE)
    saved = {k: v for k, v in config.to_dict().items() if k != "head_dim"}
    expected = AutoConfig.for_model(model_type, **{k: v for k, v in saved.items() if k != "model_type"}).head_dim
    assert configs_from_hf(saved)[0].d_head == (expected or BASE["hidden_size"] // BASE["num_attention_heads"])


# --- config.json read as transformers reads it ------------------------------------------------------------------
# Each case is a config.json (raw keys) whose raw reading differs from transformers' class: the reference model is
# built by transformers from the same keys, ours from configs_from_hf, and the logits must agree.
SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5)
QWEN_MOE = dict(moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
RAW_CASES = {
    # MistralConfig defaults sliding_window to 4096: a config.json without the key slides at 4096 tokens
    "mistral-without-sliding_window": ("mistral", dict(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                                       num_key_value_heads=1, intermediate_size=16), 4160),
    # LlamaAttention has no window: a stray sliding_window key is ignored
    "llama-with-stray-sliding_window": ("llama", dict(num_hidden_layers=2, sliding_window=4), 24),
    # Mistral ignores layer_types (with a warning) and slides on every layer
    "mistral-with-layer_types": ("mistral", dict(num_hidden_layers=2, sliding_window=5,
                                                 layer_types=["full_attention", "sliding_attention"]), 24),
    # Qwen2-MoE derives layer_types from use_sliding_window its own way (even layers below max_window_layers)
    "qwen2_moe-derived-layer_types": ("qwen2_moe", dict(num_hidden_layers=1, use_sliding_window=True,
                                                        sliding_window=5, max_window_layers=1,
                                                        shared_expert_intermediate_size=16, **QWEN_MOE), 24),
    # Qwen3MoeConfig holds no head_dim: Qwen3MoeAttention uses hidden / heads, not Qwen3's 128
    "qwen3_moe-without-head_dim": ("qwen3_moe", dict(num_hidden_layers=2, **QWEN_MOE), 16),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_a_config_json_is_read_as_transformers_reads_it(case):
    kind, raw, seq = RAW_CASES[case]
    config = {"model_type": kind, **SMALL, **raw}
    torch.manual_seed(0)
    theirs = randomized(AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**SMALL, **raw})).eval())
    model_cfg, moe_cfg = configs_from_hf(config)
    ours = Transformer(model_cfg, moe_cfg if moe_cfg.enabled else None).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), model_cfg.family), strict=True)
    x = tokens(model_cfg.vocab_size, seq)[:1]
    with torch.no_grad():
        assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_windows_transformers_derives_and_dropup_cannot_hold_are_one_error():
    """Two Qwen2-MoE layers with use_sliding_window derive [sliding, full]: not a window from one layer on."""
    config = {"model_type": "qwen2_moe", **SMALL, **QWEN_MOE, "num_hidden_layers": 2, "use_sliding_window": True,
              "sliding_window": 5, "max_window_layers": 2, "shared_expert_intermediate_size": 16}
    with pytest.raises(ConfigError, match=r"slides its attention window on layers \[0\]"):
        configs_from_hf(config)


@pytest.mark.parametrize("bad,message", [({"hidden_size": "big"}, "expected int, got str"),
                                         ({"num_hidden_layers": 2, "layer_types": ["x", "y"]}, "layer_types")])
def test_a_config_transformers_rejects_is_one_error_line(bad, message):
    with pytest.raises(ConfigError, match="LlamaConfig rejects this llama config") as err:
        configs_from_hf({"model_type": "llama", **SMALL, **bad})
    assert message in str(err.value) and "\n" not in str(err.value)


QWEN3_LATE_WINDOW = dict(use_sliding_window=True, sliding_window=5, max_window_layers=1, head_dim=8)


def test_a_window_its_moe_family_cannot_carry_is_refused_by_the_converter(tmp_path, capsys):
    """A Qwen3 sliding from layer 1 on would become a Qwen3-MoE sliding on every layer: another function. The
    converter refuses it in one line, exit 2, and writes nothing; the dense model itself reads fine."""
    from dropup import upcycle
    from dropup.hf import hf_config_dict

    dense = hf_dense("qwen3", **QWEN3_LATE_WINDOW)
    dense.save_pretrained(tmp_path / "dense")
    cfg, _ = configs_from_hf(dense.config.to_dict())
    assert (cfg.sliding_window, cfg.sliding_window_from_layer) == (5, 1)
    capsys.readouterr()
    code = upcycle.main(["--dense", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--init", "naive",
                         "--experts", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "slides its attention window only from layer 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob("moe*"))
    with pytest.raises(ConfigError, match="cannot become a qwen3_moe"):  # and every export path
        hf_config_dict(cfg, MOE)
    mixtral_late = configs_from_hf({"model_type": "qwen2", **SMALL, "num_hidden_layers": 2,
                                    "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1})[0]
    hf_config_dict(mixtral_late, MOE)  # Qwen2-MoE writes layer_types and honours them: fine
    from dataclasses import replace

    with pytest.raises(ConfigError, match="cannot become a mixtral"):
        hf_config_dict(replace(mixtral_late, family="llama", attn_bias=False), MOE)
