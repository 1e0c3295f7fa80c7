"""What every family adapter shares: reading a config.json into our configs, writing one back, and the tensor
tables of the Llama layout, which most families (and the Llama part of their MoE families) spell the same way.

A config.json is read as transformers reads it (`resolve`: the family's own config class, its defaults and
`__post_init__`), and each field the way that family's modeling code reads it, not by raw keys: a key the
class ignores is ignored here too.

An adapter (one file per family, registered in `dropup/families/__init__.py`) states only what its family adds:
the HF config fields it reads and writes, the MoE family it becomes (`moe_type`), and its tensors where they
differ from the Llama layout below. Tensors are declared as tables of `T(hf, ours)` entries (the rules are in
`dropup.families.mapping`): `top_tensors`; per layer `dense_layer` (the dense checkpoint), `moe_layer` (the MoE
family's tensors beside its experts) and `expert_layouts` (its experts and router, "stacked" as transformers 5
holds them in memory and "per-expert" as its checkpoints store them). For example (Phi-3, fused projections):

    dense_layer = (T("input_layernorm.weight", "attn_norm.weight"),
                   T("self_attn.qkv_proj.weight", ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight")),
                   T("self_attn.o_proj.weight", "attn.wo.weight"),
                   T("post_attention_layernorm.weight", "ffn_norm.weight"),
                   T("mlp.gate_up_proj.weight", ("ffn.w_gate.weight", "ffn.w_up.weight")),
                   T("mlp.down_proj.weight", "ffn.w_down.weight"))

`Family.mapper(kind, layout)` serves them to `dropup.hf` (state dicts both ways) and to the streaming readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import ClassVar

from dropup import balancing
from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.mapping import KINDS, Mapper, T, layout_of

# ours <-> HF, the Llama layout (biases and q/k norms exist only where the config switches them on)
TOP = (T("model.embed_tokens.weight", "tok_emb.weight"), T("model.norm.weight", "norm.weight"),
       T("lm_head.weight", "lm_head.weight"))
ATTENTION = (
    T("input_layernorm.weight", "attn_norm.weight"),
    T("self_attn.q_proj.weight", "attn.wq.weight"),
    T("self_attn.k_proj.weight", "attn.wk.weight"),
    T("self_attn.v_proj.weight", "attn.wv.weight"),
    T("self_attn.q_proj.bias", "attn.wq.bias"),
    T("self_attn.k_proj.bias", "attn.wk.bias"),
    T("self_attn.v_proj.bias", "attn.wv.bias"),
    T("self_attn.o_proj.weight", "attn.wo.weight"),
    T("self_attn.q_norm.weight", "attn.q_norm.weight"),
    T("self_attn.k_norm.weight", "attn.k_norm.weight"),
    # Llama's post_attention_layernorm is the pre-FFN norm (OLMo-2's of the same name is another norm)
    T("post_attention_layernorm.weight", "ffn_norm.weight"),
)
MLP = (T("mlp.gate_proj.weight", "ffn.w_gate.weight"), T("mlp.up_proj.weight", "ffn.w_up.weight"),
       T("mlp.down_proj.weight", "ffn.w_down.weight"))
# transformers 5's in-memory MoE layout, the same tensors as ours (Mixtral and the Qwen MoEs)
STACKED = (T("mlp.gate.weight", "ffn.router.weight"), T("mlp.experts.gate_up_proj", "ffn.w_gate_up"),
           T("mlp.experts.down_proj", "ffn.w_down"))
# the shared expert (Qwen2-MoE only) and its sigmoid gate
SHARED_EXPERT = (T("mlp.shared_expert.gate_proj.weight", "ffn.shared_expert.w_gate.weight"),
                 T("mlp.shared_expert.up_proj.weight", "ffn.shared_expert.w_up.weight"),
                 T("mlp.shared_expert.down_proj.weight", "ffn.shared_expert.w_down.weight"),
                 T("mlp.shared_expert_gate.weight", "ffn.shared_expert_gate.weight"))


def per_expert(router: str, gate: str, up: str, down: str) -> tuple[T, ...]:
    """The experts saved one matrix per expert and projection ({e} in the names) and the router."""
    return (T(router, "ffn.router.weight"), T((gate, up), "ffn.w_gate_up"), T(down, "ffn.w_down"))


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
    partial = rope.pop("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
    if float(partial) != 1.0:
        raise ConfigError(f"config field partial_rotary_factor={partial} (e.g. Phi-4-mini) is not supported: dropup "
                          "rotates every dimension of each head")
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
    # tensor tables (see the module docstring and dropup.families.mapping)
    top_tensors: ClassVar[tuple[T, ...]] = TOP
    dense_layer: ClassVar[tuple[T, ...]] = ATTENTION + MLP
    moe_layer: ClassVar[tuple[T, ...]] = ATTENTION
    expert_layouts: ClassVar[dict[str, tuple[T, ...]]]  # {"stacked": ..., "per-expert": ...}
    # whether the MoE family has a (gated) shared expert beside the routed ones
    holds_shared_expert: ClassVar[bool] = False
    # WINDOW_RULES of the dense and the MoE model type, as their attention reads the window
    dense_window_rule: ClassVar[str] = "none"
    moe_window_rule: ClassVar[str] = "all"
    # ModelConfig features (dropup.config.FEATURES) of other families' blocks this family refuses on export
    refused_features: ClassVar[tuple[str, ...]] = ("post_norm", "qk_norm_width", "embedding_multiplier",
                                                   "residual_multiplier", "attention_multiplier", "logits_scaling")

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
            # a mode that trained no balance loss (aux_free's bias balanced the load): a fine-tune of the export
            # must not start training one the run never used
            coef = balancing.mode(moe.lb_mode).exported_aux_coef(moe.lb_coef)
            fields.update(router_aux_loss_coef=coef, output_router_logits=True)
        return fields

    def check(self, model: ModelConfig) -> None:
        """Refuse what this family cannot hold (a Llama has no q/k norms, ...)."""

    def check_features(self, model: ModelConfig) -> None:
        """Refuse a feature of OLMo-2's or Granite's blocks that this family's modeling code has no place for: its
        checkpoint would load and compute another function."""
        features = model.features()
        foreign = [f for f in self.refused_features if f in features]
        if foreign:
            raise ConfigError(f"model family {self.dense_type} cannot hold model.{foreign[0]}="
                              f"{features[foreign[0]]!r} (post-norm blocks and full-width q/k norms are olmo2's, "
                              "the multipliers granite's): set model.family to the family that has it, or the field "
                              "back to its default")

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

    # --- tensors ----------------------------------------------------------------------------------------------
    def mapper(self, kind: str, layout: str = "stacked") -> Mapper:
        """The tensor mapping of this family's dense checkpoints (kind "dense"), of its MoE family's in `layout`
        ("moe"), or of either in any layout (reading: "any")."""
        return _mapper(self, kind, layout_of(layout) if kind == "moe" else "stacked")

    def extra_moe_tensors(self, layer: int, model: ModelConfig, moe: MoEConfig, dtype) -> dict:
        """HF tensors the MoE family needs that ours has no counterpart of (written; `unused_on_read` drops them)."""
        return {}

    def unused_on_read(self, shapes: dict[str, tuple[int, ...]]) -> set[str]:
        """Our names, among tensors read from a checkpoint (name -> shape), that a model of ours does not hold."""
        return set()


@cache
def _mapper(family: Family, kind: str, layout: str) -> Mapper:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: one of {KINDS}")
    experts = family.expert_layouts
    if kind == "dense":
        layer = family.dense_layer
    elif kind == "moe":
        layer = family.moe_layer + experts[layout]
    else:
        layer = family.dense_layer + family.moe_layer + tuple(t for table in experts.values() for t in table)
    return Mapper(family.dense_type, kind, family.top_tensors, layer, family.unused_on_read)
