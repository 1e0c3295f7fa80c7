"""What every family adapter shares: reading a config.json into our configs, writing one back, and the tensor
names, which all four dense families (and the Llama part of their MoE families) spell the same way.

A config.json is read as transformers reads it (`resolve`: the family's own config class, its defaults and
`__post_init__`), and each field the way that family's modeling code reads it, not by raw keys: a key the
class ignores is ignored here too.

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


def resolve(config: Mapping):
    """A config.json as transformers reads it: its model_type's config class, with the class's defaults and its
    `__post_init__` applied (a Mistral without `sliding_window` has 4096, a Qwen2-MoE derives its `layer_types`),
    which is what the modeling code is given. What the strict class rejects is one ConfigError."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    cls = CONFIG_MAPPING[model_type]
    try:
        return cls.from_dict({k: v for k, v in config.items() if k != "model_type"})
    except (StrictDataclassError, KeyError, TypeError, ValueError) as err:
        reason = [line.strip() for line in str(err).strip().splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise ConfigError(f"transformers' {cls.__name__} rejects this {model_type} config: {reason[0].strip(chr(34))}"
                          ) from None


def rope_fields(hf) -> tuple[float, dict | None]:
    """(theta, scaling) from a resolved config's `rope_parameters` (transformers 5 folds the older `rope_theta` +
    `rope_scaling` into it)."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)))
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


# How a model type's attention reads its window, as its transformers modeling code does: `none` (no sliding
# window whatever the config says), `all` (config.sliding_window on every layer; layer_types ignored), or
# `layer_types` (config.sliding_window on the layers whose layer_types entry is sliding_attention).
WINDOW_RULES = ("none", "all", "layer_types")


def window_fields(hf, rule: str) -> dict:
    """Our sliding_window / sliding_window_from_layer from a resolved config, by its model type's rule."""
    n_layers, window = hf.num_hidden_layers, getattr(hf, "sliding_window", None)
    if rule == "none" or not window:  # Qwen2-MoE writes 0 for "no window"
        return {"sliding_window": None}
    if rule == "all":
        return {"sliding_window": int(window), "sliding_window_from_layer": 0}
    sliding = [i for i, t in enumerate(hf.layer_types) if t == "sliding_attention"]
    if not sliding:
        return {"sliding_window": None}
    if sliding != list(range(sliding[0], n_layers)):
        raise ConfigError(f"this {hf.model_type} slides its attention window on layers {sliding} (config field "
                          "layer_types, or as transformers derives it from use_sliding_window and max_window_layers): "
                          "dropup supports a window on every layer from one layer on")
    return {"sliding_window": int(window), "sliding_window_from_layer": sliding[0]}


class Family:
    """One dense family and the MoE family it becomes. Subclasses set the class variables and, where their
    config has fields of its own, extend `read_fields` / `write_fields`."""

    dense_type: ClassVar[str]
    moe_type: ClassVar[str]
    # how the MoE family names one expert when saved per expert (under "model.layers.{L}."), and its router
    expert_names: ClassVar[tuple[str, str, str]]  # (gate, up, down) patterns with {e}
    expert_router: ClassVar[str]
    # whether the MoE family has a (gated) shared expert beside the routed ones
    holds_shared_expert: ClassVar[bool] = False
    # WINDOW_RULES of the dense and the MoE model type, as their attention reads the window
    dense_window_rule: ClassVar[str] = "none"
    moe_window_rule: ClassVar[str] = "all"

    # --- config.json -> ours ---------------------------------------------------------------------------------
    def read_fields(self, hf) -> dict:
        """ModelConfig fields from a resolved config (`resolve`) of this family's dense or MoE type, read as the
        family's modeling code reads them."""
        if hf.hidden_act != "silu":
            raise ConfigError(f"config field hidden_act={hf.hidden_act!r}: SwiGLU needs silu")
        theta, scaling = rope_fields(hf)
        n_heads, d_model = hf.num_attention_heads, hf.hidden_size
        head_dim = getattr(hf, "head_dim", None) or d_model // n_heads  # as every family's attention reads it
        rule = self.moe_window_rule if hf.model_type == self.moe_type else self.dense_window_rule
        return dict(
            vocab_size=hf.vocab_size, n_layers=hf.num_hidden_layers, d_model=d_model,
            d_ff=hf.intermediate_size, n_heads=n_heads, n_kv_heads=hf.num_key_value_heads or n_heads,
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.rms_norm_eps),
            init_std=float(hf.initializer_range), tie_embeddings=bool(hf.tie_word_embeddings),
            head_dim=None if head_dim == d_model // n_heads else int(head_dim), **window_fields(hf, rule),
        )

    def read_moe(self, hf) -> MoEConfig:
        """MoEConfig from a resolved config of this family's MoE type."""
        raise NotImplementedError

    def moe_d_ff(self, hf) -> int:
        """The expert width of a resolved MoE config (Mixtral calls it intermediate_size)."""
        return hf.intermediate_size

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

    def check_moe_window(self, model: ModelConfig) -> None:
        """Refuse a dense model whose attention window the MoE family cannot carry: Mixtral and Qwen3-MoE slide on
        every layer or none, so a window that starts at a later layer would change the function when upcycled."""
        if self.moe_window_rule == "all" and model.sliding_window is not None and model.sliding_window_from_layer:
            raise ConfigError(
                f"this {model.family} model slides its attention window only from layer "
                f"{model.sliding_window_from_layer} on, and a {self.moe_type} slides on every layer or none: "
                f"upcycled into one it would compute another function, so it cannot become a {self.moe_type} "
                "(train or export it as a dense model instead)")

    # --- tensors beyond ours ---------------------------------------------------------------------------------
    def extra_moe_tensors(self, layer: int, model: ModelConfig, moe: MoEConfig, dtype) -> dict:
        """HF tensors the MoE family needs that ours has no counterpart of (written, and skipped on reading)."""
        return {}
