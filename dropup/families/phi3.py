"""Phi-3 (model_type `phi3`: Phi-3-mini, Phi-3-medium) -> Mixtral.

A Phi-3 is a Llama whose attention projections are fused into one `self_attn.qkv_proj` (rows q | k | v, sized
by the head counts) and whose FFN's gate and up projections are one `mlp.gate_up_proj` (rows gate | up); the
tables below split them into ours (and read a fused tensor's part by its rows, never the whole tensor). Mixtral
holds them separately. Its attention slides on every layer when `sliding_window` is set (Phi-3-mini: 2047), as
Mixtral's does, so the window carries over unchanged. Its dropouts (`resid_pdrop`, `embd_pdrop`,
`attention_dropout`) act only in training and are not modelled.

Refused, one line each: `longrope` RoPE scaling (Phi-3-mini-128k, Phi-3.5-mini: dropup's RoPE has no
sequence-length switch between short and long factors and no attention scaling), and a partial rotary
(`partial_rotary_factor` < 1, Phi-4-mini), which `base.rope_fields` refuses for every family.
"""

from __future__ import annotations

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import Family
from dropup.families.llama import Llama
from dropup.families.mapping import T


class Phi3(Llama):
    dense_type = "phi3"
    dense_layer = (
        T("input_layernorm.weight", "attn_norm.weight"),
        T("self_attn.qkv_proj.weight", ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight")),
        T("self_attn.o_proj.weight", "attn.wo.weight"),
        T("post_attention_layernorm.weight", "ffn_norm.weight"),
        T("mlp.gate_up_proj.weight", ("ffn.w_gate.weight", "ffn.w_up.weight")),
        T("mlp.down_proj.weight", "ffn.w_down.weight"),
    )
    dense_window_rule = "all"  # Phi3Model masks every layer with config.sliding_window when it is set

    def read_fields(self, hf) -> dict:
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if rope.get("rope_type", rope.get("type")) == "longrope":
            raise ConfigError("config field rope_scaling type 'longrope' (Phi-3 128k, Phi-3.5) is not supported: "
                              "dropup's RoPE has no switch between short and long factors by sequence length")
        return super().read_fields(hf)

    def write_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        if moe is not None:
            return super().write_fields(model, moe)
        # Phi3Config's default pad_token_id (32000) is outside a smaller vocabulary; the exporter writes the real one
        return {**Family.write_fields(self, model, None), **self.dense_window(model), "pad_token_id": None}

    def dense_window(self, model: ModelConfig) -> dict:
        if model.sliding_window is not None and model.sliding_window_from_layer != 0:
            raise ConfigError("model family phi3 slides on every layer or none: sliding_window_from_layer must be 0")
        return {"sliding_window": model.sliding_window}


FAMILY = Phi3()
