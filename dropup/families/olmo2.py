"""OLMo-2 (model_type `olmo2`) -> FlexOlmo (`flex_olmo`).

An OLMo-2 block normalizes each branch's output instead of its input, h = x + norm(attn(x)),
out = h + norm(mlp(h)): `post_attention_layernorm` and `post_feedforward_layernorm` are our attn_norm and ffn_norm
with `post_norm` (Llama's `post_attention_layernorm` is another norm: the tables below name them). Its q and k are
RMS-normalized over the whole projection before RoPE (`self_attn.q_norm` of H*K gains, `k_norm` of G*K:
`qk_norm_width: full`). No sliding window; `attention_bias` (a bias on q/k/v *and* o) is refused.
FlexOlmo is the same block with an MoE FFN: router `mlp.gate`, experts stacked in memory (`mlp.experts.gate_up_proj`
E x 2F x D, gate rows first, `down_proj`) and saved per expert as `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
It routes like the paper (eq. 3) only with `norm_topk_prob: true`; its default, false, keeps the top-k softmax
weights unrenormalized: written true, and false refused on reading.
OLMo-2's RMSNorm multiplies by its gain in fp32 and rounds after (ours rounds first, as Llama): the same in fp32,
equal up to one rounding in bf16.
"""

from __future__ import annotations

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import MLP, STACKED, Family, T, per_expert

ATTENTION = (
    T("self_attn.q_proj.weight", "attn.wq.weight"),
    T("self_attn.k_proj.weight", "attn.wk.weight"),
    T("self_attn.v_proj.weight", "attn.wv.weight"),
    T("self_attn.o_proj.weight", "attn.wo.weight"),
    T("self_attn.q_norm.weight", "attn.q_norm.weight"),
    T("self_attn.k_norm.weight", "attn.k_norm.weight"),
    T("post_attention_layernorm.weight", "attn_norm.weight"),  # after attention (post_norm)
    T("post_feedforward_layernorm.weight", "ffn_norm.weight"),  # after the FFN / MoE
)
# what an OLMo-2 is, beyond the paper's Llama; and what it may have besides
FEATURES = {"post_norm": True, "qk_norm": True, "qk_norm_width": "full"}
OPTIONAL = ("tie_embeddings", "rope_scaling", "head_dim")


class Olmo2(Family):
    dense_type = "olmo2"
    moe_type = "flex_olmo"
    dense_layer = ATTENTION + MLP
    moe_layer = ATTENTION
    expert_layouts = {"stacked": STACKED,
                      "per-expert": per_expert("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight",
                                               "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")}
    dense_window_rule = "none"  # neither Olmo2Attention nor FlexOlmoAttention has a window
    moe_window_rule = "none"
    refused_features = ()  # its own check() names what an OLMo-2 must and may hold

    def read_fields(self, hf) -> dict:
        if hf.attention_bias:
            raise ConfigError(f"config field attention_bias=true: this {hf.model_type} has an o_proj bias, which "
                              "dropup cannot hold")
        return {**super().read_fields(hf), **FEATURES}

    def read_moe(self, hf) -> MoEConfig:
        if not hf.norm_topk_prob:
            raise ConfigError("config field norm_topk_prob=false: this flex_olmo does not renormalize its top-k "
                              "weights, and dropup's router does (paper eq. 3)")
        return MoEConfig(enabled=True, num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         lb_coef=hf.router_aux_loss_coef)

    def check(self, model: ModelConfig) -> None:
        features = model.features()
        if any(features.get(k) != v for k, v in FEATURES.items()):
            raise ConfigError("model family olmo2 has post-norm blocks and full-width q/k norms: set "
                              "model.post_norm=true, model.qk_norm=true, model.qk_norm_width=full")
        extra = sorted(set(features) - set(FEATURES) - set(OPTIONAL))
        if extra:
            raise ConfigError(f"model family olmo2 cannot hold model.{extra[0]}={features[extra[0]]!r}: set it back "
                              "to its default")

    def write_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        fields = {**super().write_fields(model, moe), "attention_bias": False}
        if moe is None:
            return fields
        # FlexOlmoConfig's default pad/eos ids (100277, 100257) lie outside smaller vocabularies (an nn.Embedding
        # refuses such a padding index); the converter and the exporter write the real ones
        return {**fields, "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                "intermediate_size": moe.expert_d_ff(model), "norm_topk_prob": True, "pad_token_id": None,
                "eos_token_id": None}


FAMILY = Olmo2()
