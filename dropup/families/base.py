"""What every family adapter shares: reading a config.json into our configs, writing one back, and the tensor
names, which all four dense families (and the Llama part of their MoE families) spell the same way.

An adapter (one file per family) states only what its family adds: the HF config fields it reads and writes, the
MoE family it becomes (`moe_type`), and how that MoE family names its experts when saved per expert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from dropup.config import ConfigError, ModelConfig, MoEConfig

# ours -> HF under "model.layers.{L}." (biases and q/k norms exist only where the config switches them on)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
    # MoE, transformers 5's fused in-memory layout (the same tensors as ours, for every MoE family)
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.w_gate_up": "mlp.experts.gate_up_proj",
    "ffn.w_down": "mlp.experts.down_proj",
    # the shared expert (Qwen2-MoE only) and its sigmoid gate
    "ffn.shared_expert.w_gate.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn.shared_expert.w_up.weight": "mlp.shared_expert.up_proj.weight",
    "ffn.shared_expert.w_down.weight": "mlp.shared_expert.down_proj.weight",
    "ffn.shared_expert_gate.weight": "mlp.shared_expert_gate.weight",
}
TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def rope_fields(config: Mapping) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    rope = dict(config.get("rope_parameters") or {})
    rope.update(config.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"config field rope_scaling type {kind!r} is not supported: plain RoPE, linear or llama3")
    keep = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keep if k not in rope]
    if missing:
        raise ConfigError(f"config field rope_scaling ({kind}) lacks {', '.join(missing)}")
    return theta, {"rope_type": kind, **{k: rope[k] for k in keep}}


def window_fields(config: Mapping, n_layers: int) -> dict:
    """Our sliding_window / sliding_window_from_layer from HF's (`layer_types` where given)."""
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window") is False:
        return {"sliding_window": None}
    types = config.get("layer_types")
    if not types:
        first = int(config.get("max_window_layers", 0)) if "use_sliding_window" in config else 0
        return {"sliding_window": int(window), "sliding_window_from_layer": first}
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding:
        return {"sliding_window": None}
    if sliding != list(range(sliding[0], n_layers)):
        raise ConfigError(f"config field layer_types slides on layers {sliding}: dropup supports a window on every "
                          "layer from one layer on")
    return {"sliding_window": int(window), "sliding_window_from_layer": sliding[0]}


class Family:
    """One dense family and the MoE family it becomes. Subclasses set the class variables and, where their
    config has fields of its own, extend `read_fields` / `write_fields`."""

    dense_type: ClassVar[str]
    moe_type: ClassVar[str]
    # how the MoE family names one expert when saved per expert (under "model.layers.{L}."), and its router
    expert_names: ClassVar[tuple[str, str, str]]  # (gate, up, down) patterns with {e}
    expert_router: ClassVar[str]
    # the head width a config.json without `head_dim` has in transformers (None: hidden / heads)
    default_head_dim: ClassVar[int | None] = None
    # whether the MoE family has a (gated) shared expert beside the routed ones
    holds_shared_expert: ClassVar[bool] = False

    # --- config.json -> ours ---------------------------------------------------------------------------------
    def read_fields(self, config: Mapping) -> dict:
        """ModelConfig fields from a config.json of this family (dense or MoE)."""
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field hidden_act={config['hidden_act']!r}: SwiGLU needs silu")
        if config.get("mlp_bias"):
            raise ConfigError("config field mlp_bias=true: Mixtral-style experts have no biases")
        theta, scaling = rope_fields(config)
        n_heads, d_model = config["num_attention_heads"], config["hidden_size"]
        head_dim = config.get("head_dim", self.default_head_dim)
        return dict(
            vocab_size=config["vocab_size"], n_layers=config["num_hidden_layers"], d_model=d_model,
            d_ff=config["intermediate_size"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads, rope_theta=theta, rope_scaling=scaling,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), init_std=float(config.get("initializer_range", 0.02)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=None if head_dim in (None, d_model // n_heads) else int(head_dim),
            **window_fields(config, config["num_hidden_layers"]),
        )

    def read_moe(self, config: Mapping) -> MoEConfig:
        """MoEConfig from a config.json of this family's MoE type."""
        raise NotImplementedError

    def moe_d_ff(self, config: Mapping) -> int:
        """The expert width of an MoE config.json (Mixtral calls it intermediate_size)."""
        return config["intermediate_size"]

    # --- ours -> config.json ---------------------------------------------------------------------------------
    def write_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        """config.json fields (beyond the class defaults) describing `model` (and `moe`) in this family."""
        rope = {"rope_type": "default", "rope_theta": model.rope_theta}
        if model.rope_scaling:
            rope.update(model.rope_scaling)
        fields = dict(
            vocab_size=model.vocab_size, hidden_size=model.d_model, intermediate_size=model.d_ff,
            num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
            num_key_value_heads=model.n_kv_heads, head_dim=model.d_head, rms_norm_eps=model.norm_eps,
            rope_parameters=rope, initializer_range=model.init_std, tie_word_embeddings=model.tie_embeddings,
            hidden_act="silu",
        )
        if model.rope_scaling and model.rope_scaling.get("original_max_position_embeddings"):
            fields["max_position_embeddings"] = max(
                4 * int(model.rope_scaling["original_max_position_embeddings"]), 2048)
        if moe is not None:
            # aux_free trained no balance loss (its bias balanced the load): a fine-tune of the export must not
            # start training one the run never used
            coef = 0.0 if moe.lb_mode == "aux_free" else moe.lb_coef
            fields.update(router_aux_loss_coef=coef, output_router_logits=True)
        return fields

    def check(self, model: ModelConfig) -> None:
        """Refuse what this family cannot hold (a Llama has no q/k norms, ...)."""

    def check_moe(self, moe: MoEConfig) -> None:
        """Refuse an MoE layout the MoE family cannot hold (a shared expert outside Qwen2-MoE, ...)."""
        if moe.shared_expert_d_ff and not self.holds_shared_expert:
            raise ConfigError(
                f"a {self.moe_type} has no shared expert, so a {self.dense_type} cannot be upcycled with one: only "
                "qwen2 -> qwen2_moe holds a shared expert (drop the shared expert, or use a Qwen2 model / "
                "model.family=qwen2)")
        if moe.shared_expert_d_ff and not moe.shared_expert_gate:
            raise ConfigError(f"a {self.moe_type}'s shared expert always has a sigmoid gate: set "
                              "moe.shared_expert_gate=true to write this MoE as a Hugging Face model")

    # --- tensors beyond ours ---------------------------------------------------------------------------------
    def extra_moe_tensors(self, layer: int, model: ModelConfig, moe: MoEConfig, dtype) -> dict:
        """HF tensors the MoE family needs that ours has no counterpart of (written, and skipped on reading)."""
        return {}
