"""Llama 2 / 3.x (model_type `llama`) -> Mixtral.

Config: the shared Llama fields, plus RoPE scaling (Llama 3.1/3.2's `llama3`, or `linear`) and tied embeddings
(Llama 3.2 1B/3B). `attention_bias` (a bias on q/k/v *and* o) and `mlp_bias` are refused: Mixtral has neither.
Mixtral saves each expert as `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down) with the router at
`block_sparse_moe.gate`; in memory transformers 5 stacks them (`mlp.experts.gate_up_proj`, `down_proj`).
"""

from __future__ import annotations

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import STACKED, Family, per_expert


class Llama(Family):
    dense_type = "llama"
    moe_type = "mixtral"
    expert_layouts = {"stacked": STACKED,
                      "per-expert": per_expert("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                                               "block_sparse_moe.experts.{e}.w3.weight",
                                               "block_sparse_moe.experts.{e}.w2.weight")}
    dense_window_rule = "none"  # LlamaAttention has no window: a stray sliding_window key is ignored
    moe_window_rule = "all"  # Mixtral: config.sliding_window on every layer

    def read_fields(self, hf) -> dict:
        if hf.model_type == "llama" and hf.attention_bias:  # LlamaAttention's q/k/v/o biases
            raise ConfigError("config field attention_bias=true: this Llama has an o_proj bias, which Mixtral "
                              "cannot hold, so it cannot be upcycled")
        if hf.model_type == "llama" and hf.mlp_bias:
            raise ConfigError("config field mlp_bias=true: Mixtral-style experts have no biases")
        return super().read_fields(hf)

    def read_moe(self, hf) -> MoEConfig:
        return MoEConfig(enabled=True, num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         lb_coef=hf.router_aux_loss_coef)

    def check(self, model: ModelConfig) -> None:
        if model.attn_bias or model.qk_norm:
            raise ConfigError(f"model family {self.dense_type} has no q/k/v biases or q/k norms: use qwen2 / qwen3")

    def write_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        fields = super().write_fields(model, moe)
        if moe is None:
            return {**fields, "attention_bias": False, "mlp_bias": False, **self.dense_window(model)}
        return {**fields, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                "intermediate_size": moe.expert_d_ff(model), "sliding_window": model.sliding_window}

    def dense_window(self, model: ModelConfig) -> dict:
        if model.sliding_window is not None:
            raise ConfigError("model family llama has no sliding window: use mistral")
        return {}


FAMILY = Llama()
