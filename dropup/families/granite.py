"""Granite 3.x (model_type `granite`) -> GraniteMoE (`granitemoe`).

A Granite is a Llama with four scalars (`ModelConfig` fields of the same names): the embeddings are multiplied by
`embedding_multiplier`, each branch's output by `residual_multiplier` before its residual add, the attention
softmax is scaled by `attention_multiplier` instead of 1/sqrt(head width) (GraniteConfig's default is 1.0, which
is read as 1.0), and the logits are divided by `logits_scaling`. `attention_bias` (q/k/v *and* o) and `mlp_bias`
are refused; no sliding window.
GraniteMoE holds its experts stacked under other names: in memory `block_sparse_moe.experts.gate_up_proj`
(E x 2F x D, gate rows first), `block_sparse_moe.experts.down_proj` and the router `block_sparse_moe.router.weight`;
its checkpoints store the same stacked tensors as `block_sparse_moe.input_linear.weight`, `output_linear.weight`
and `router.layer.weight` (the "per-expert" layout here: what the family's checkpoints hold).
It routes by softmax over the top-k logits, which is the paper's renormalized top-k of the softmax (eq. 3):
softmax is monotone, so both choose the same experts, and renormalizing cancels the softmax's denominator.
"""

from __future__ import annotations

import math

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import Family, T

MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
OPTIONAL = ("tie_embeddings", "rope_scaling", "head_dim", *MULTIPLIERS)


def _moe(router: str, gate_up: str, down: str) -> tuple[T, ...]:
    prefix = "block_sparse_moe."
    return (T(prefix + router, "ffn.router.weight"), T(prefix + gate_up, "ffn.w_gate_up"),
            T(prefix + down, "ffn.w_down"))


class Granite(Family):
    dense_type = "granite"
    moe_type = "granitemoe"
    expert_layouts = {"stacked": _moe("router.weight", "experts.gate_up_proj", "experts.down_proj"),
                      "per-expert": _moe("router.layer.weight", "input_linear.weight", "output_linear.weight")}
    dense_window_rule = "none"  # neither GraniteAttention nor GraniteMoeAttention has a window
    moe_window_rule = "none"
    refused_features = ()  # its own check() names what a Granite may hold

    def read_fields(self, hf) -> dict:
        if hf.attention_bias:
            raise ConfigError(f"config field attention_bias=true: this {hf.model_type} has an o_proj bias, which "
                              "dropup cannot hold")
        if getattr(hf, "mlp_bias", False):  # GraniteMoE has no such field
            raise ConfigError("config field mlp_bias=true: dropup's FFNs and experts have no biases")
        scalars = {k: getattr(hf, k) for k in MULTIPLIERS}
        unset = [k for k, v in scalars.items() if v is None and k != "attention_multiplier"]
        if unset:  # GraniteMoeConfig's fields are Optional, but its model multiplies by them
            raise ConfigError(f"config field {unset[0]}=null: a {hf.model_type} needs a number there")
        # attention_multiplier null: transformers' SDPA attention then scales by 1/sqrt(head width), as ours does
        return {**super().read_fields(hf), **{k: None if v is None else float(v) for k, v in scalars.items()}}

    def read_moe(self, hf) -> MoEConfig:
        return MoEConfig(enabled=True, num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                         lb_coef=hf.router_aux_loss_coef)

    def check(self, model: ModelConfig) -> None:
        features = model.features()
        extra = sorted(set(features) - set(OPTIONAL))
        if extra:
            raise ConfigError(f"model family granite cannot hold model.{extra[0]}={features[extra[0]]!r}: set it "
                              "back to its default")

    def write_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        scale = model.attention_multiplier if model.attention_multiplier is not None else 1 / math.sqrt(model.d_head)
        fields = {**super().write_fields(model, moe), "attention_bias": False,
                  **{k: getattr(model, k) for k in MULTIPLIERS}, "attention_multiplier": scale}
        if moe is None:
            return {**fields, "mlp_bias": False}
        return {**fields, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                "intermediate_size": moe.expert_d_ff(model)}


FAMILY = Granite()
