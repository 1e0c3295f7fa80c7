"""The ModelConfig features OLMo-2 and Granite add, each against transformers' own class: post-norm blocks and
full-width q/k norms (Olmo2, FlexOlmo), the embedding / residual / attention / logit multipliers (Granite,
GraniteMoE). Weights are mapped by hand here, independently of dropup.hf, so that these check the model alone;
each feature's plausible wrong variant (switched off, or the per-head norm) must change the logits."""

from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.model import Transformer

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
             pad_token_id=None, bos_token_id=None, eos_token_id=None)  # FlexOlmo's defaults lie outside this vocabulary
GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3, logits_scaling=4.0)
EXPERTS = dict(num_experts_per_tok=2)
# ours -> theirs under model.layers.{i}.; the block's two norms are named by where the family puts them
ATTENTION = {"attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
             "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight"}
DENSE_FFN = {"ffn.w_gate.weight": "mlp.gate_proj.weight", "ffn.w_up.weight": "mlp.up_proj.weight",
             "ffn.w_down.weight": "mlp.down_proj.weight"}
OLMO2_NORMS = {"attn_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "post_feedforward_layernorm.weight",
               "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
LLAMA_NORMS = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
CASES = {  # model_type: (extra config fields, our layer names -> theirs, our features)
    "olmo2": ({}, {**ATTENTION, **DENSE_FFN, **OLMO2_NORMS}, dict(post_norm=True, qk_norm=True, qk_norm_width="full")),
    "granite": (GRANITE, {**ATTENTION, **DENSE_FFN, **LLAMA_NORMS}, GRANITE),
    "flex_olmo": (dict(num_experts=4, norm_topk_prob=True, **EXPERTS),
                  {**ATTENTION, **OLMO2_NORMS, "ffn.router.weight": "mlp.gate.weight",
                   "ffn.w_gate_up": "mlp.experts.gate_up_proj", "ffn.w_down": "mlp.experts.down_proj"},
                  dict(post_norm=True, qk_norm=True, qk_norm_width="full")),
    "granitemoe": (dict(num_local_experts=4, **EXPERTS, **GRANITE),
                   {**ATTENTION, **LLAMA_NORMS, "ffn.router.weight": "block_sparse_moe.router.weight",
                    "ffn.w_gate_up": "block_sparse_moe.experts.gate_up_proj",
                    "ffn.w_down": "block_sparse_moe.experts.down_proj"}, GRANITE),
}
# what switching one feature back to the paper's Llama means (the plausible mistakes)
WRONG = {"post_norm": False, "qk_norm_width": "head", "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
         "attention_multiplier": None, "logits_scaling": 1.0}


def theirs_and_ours(model_type: str):
    extra, names, features = CASES[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SIZES, **extra)
    theirs = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # every parameter random, norm gains too, so that a misplaced one shows
        for name, p in theirs.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    cfg = ModelConfig(vocab_size=61, n_layers=2, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2,
                      rope_theta=config.rope_parameters["rope_theta"], norm_eps=1e-5, **features)
    moe = MoEConfig(enabled=True, num_experts=4, top_k=2, backend="loop") if "num_experts_per_tok" in extra else None
    hf = theirs.state_dict()
    state = {"tok_emb.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["lm_head.weight"]}
    for i in range(cfg.n_layers):
        state.update({f"layers.{i}.{ours}": hf[f"model.layers.{i}.{hf_name}"] for ours, hf_name in names.items()})
    assert len(state) == len(hf), sorted(set(hf) - {f"model.layers.{i}.{n}" for i in range(2) for n in names.values()})
    return theirs, cfg, moe, state


def build(cfg, moe, state):
    model = Transformer(cfg, moe).eval()
    model.load_state_dict(state, strict=True)
    return model


X = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_features_compute_what_transformers_computes(model_type):
    theirs, cfg, moe, state = theirs_and_ours(model_type)
    ours = build(cfg, moe, state)
    with torch.no_grad():
        out = ours(X)
        ref = theirs(X, labels=X, output_router_logits=moe is not None)
    assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    if moe is not None:  # the routing and the balance loss too (GraniteMoE: softmax over the top-k logits)
        losses = ours.losses(type(out)(out.logits[:, :-1], out.router_logits), X[:, 1:])
        assert_close(losses["lb_loss"], ref.aux_loss)
        assert_close(losses["lm_loss"], ref.loss - theirs.config.router_aux_loss_coef * ref.aux_loss)
    # each feature is needed: the paper's variant of it computes something else
    for field in CASES[model_type][2]:
        if field not in WRONG or getattr(cfg, field) == WRONG[field]:
            continue
        wrong_cfg = replace(cfg, **{field: WRONG[field]})
        wrong_state = state
        if field == "qk_norm_width":  # per head: the full gains' first head width, the shape per-head norms hold
            wrong_state = {k: v[:cfg.d_head] if k.endswith(("q_norm.weight", "k_norm.weight")) else v
                           for k, v in state.items()}
        with torch.no_grad():
            wrong = build(wrong_cfg, moe, wrong_state)(X).logits
        assert not torch.allclose(wrong, ref.logits, rtol=1e-3, atol=1e-3), field


def test_granite_topk_softmax_is_the_papers_renormalized_topk():
    """GraniteMoE takes softmax over the top-k logits; the paper (eq. 3) renormalizes the top-k of the softmax.
    softmax is monotone and the renormalization cancels its denominator, so both pick and weigh alike."""
    from dropup.moe import route

    x_TD, w_ED = torch.randn(64, 16), torch.randn(8, 16)
    _, weights_TK, experts_TK = route(x_TD, w_ED, 3)
    top_logits_TK, their_experts_TK = (x_TD @ w_ED.T).topk(3, dim=-1)
    assert torch.equal(experts_TK, their_experts_TK)
    assert_close(weights_TK, torch.softmax(top_logits_TK, dim=-1))
    unnormalized_TK = torch.softmax(x_TD @ w_ED.T, dim=-1).gather(-1, experts_TK)  # FlexOlmo's norm_topk_prob=false
    assert not torch.allclose(weights_TK, unnormalized_TK)


@pytest.mark.parametrize("fields,match", [
    (dict(qk_norm_width="grouped"), "qk_norm_width='grouped' is unknown"),
    (dict(qk_norm_width="full"), "needs model.qk_norm=true"),
    (dict(embedding_multiplier=0.0), "embedding_multiplier must be positive"),
    (dict(residual_multiplier=-1.0), "residual_multiplier must be positive"),
    (dict(logits_scaling=0), "logits_scaling must be positive"),
    (dict(attention_multiplier=0.0), "attention_multiplier must be positive or null"),
])
def test_bad_feature_values_are_one_error_line(fields, match):
    with pytest.raises(ConfigError, match=match) as err:
        ModelConfig(**fields)
    assert "\n" not in str(err.value)


def test_features_off_are_the_defaults():
    """The paper's Llama is ModelConfig() with every feature off (what existing configs and seed keys assume)."""
    cfg = ModelConfig()
    assert (cfg.post_norm, cfg.qk_norm, cfg.qk_norm_width) == (False, False, "head")
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.attention_multiplier, cfg.logits_scaling) == \
        (1.0, 1.0, None, 1.0)
