"""Qwen3 (model_type `qwen3`) -> Qwen3-MoE (`qwen3_moe`).

Config: each head's q and k are RMS-normalized before RoPE, `head_dim` is its own field (Qwen3Config's default
is 128 whatever hidden / heads is; Qwen3-MoE's class has no such field, so its attention uses hidden / heads), q/k/v/o have no biases unless `attention_bias` (refused: it would put a bias on o_proj,
which our attention does not have), the window slides as in Qwen2 (Qwen3-MoE: on every layer or none), and small models tie their embeddings.
Qwen3-MoE has no shared expert; it needs `norm_topk_prob: true` to route as the paper does. Expert names as
Qwen2-MoE's.
"""

from __future__ import annotations

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import ATTENTION
from dropup.families.qwen2 import Qwen2


class Qwen3(Qwen2):
    dense_type = "qwen3"
    moe_type = "qwen3_moe"
    moe_window_rule = "all"  # Qwen3-MoE's attention slides on every layer when use_sliding_window

    def read_fields(self, hf) -> dict:
        if hf.attention_bias:
            raise ConfigError("config field attention_bias=true: this Qwen3 has an o_proj bias, which dropup "
                              "cannot hold")
        return {**super().read_fields(hf), "attn_bias": False, "qk_norm": True}

    def check(self, model: ModelConfig) -> None:
        if model.attn_bias or not model.qk_norm:
            raise ConfigError("model family qwen3 has q/k norms and no q/k/v biases: set model.qk_norm=true, "
                              "model.attn_bias=false")

    def own_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        return {"attention_bias": False}

    holds_shared_expert = False
    moe_layer = ATTENTION  # no shared expert

    def extra_moe_tensors(self, layer, model, moe, dtype):
        return {}  # Qwen3-MoE has no shared expert


FAMILY = Qwen3()
