"""Typed architecture configs: the schema behind `conf/model/` and `conf/moe/`.

A preset YAML states only the dimensions; every other field takes the default here, so a typo in a key or a
wrong type fails when Hydra composes the config, and impossible shapes fail in `__post_init__` with a message
that names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dropup import balancing

BACKENDS = ("grouped", "loop", "sliced", "padded", "megablocks")
LB_MODES = balancing.NAMES  # one entry per mode, with what it does: dropup.balancing


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model or init; the message says what to change."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


ROPE_SCALINGS = ("linear", "llama3")
QK_NORM_WIDTHS = ("head", "full")


@dataclass
class ModelConfig:
    """A Llama-style decoder (Table 4 columns), shared by the dense model and the MoE built from it.

    The fields after `init_std` switch on what the Hugging Face families add to the paper's Llama (all off by
    default, which is the paper's model): tied input/output embeddings (Llama 3.2, small Qwens), RoPE scaling
    (`{"rope_type": "linear", "factor": f}` or Llama 3.1's `"llama3"` with `factor`, `low_freq_factor`,
    `high_freq_factor`, `original_max_position_embeddings`), q/k/v biases (Qwen2), RMSNorm of each head's q and k
    (Qwen3), a head width other than d_model / n_heads (Qwen3), and a sliding attention window of
    `sliding_window` tokens (the query's own included) on layers >= `sliding_window_from_layer` (Mistral v0.1: all
    layers; Qwen2: from `max_window_layers`).

    OLMo-2 and Granite add (`dropup.model.Block` states the math):
    - `post_norm`: each branch's output is RMS-normalized before its residual add, h = x + norm(f(x)), and the
      branch input is not normalized (OLMo-2); the two norms keep the names attn_norm / ffn_norm;
    - `qk_norm_width`: with `qk_norm`, `head` normalizes each head's q and k (Qwen3), `full` the whole q
      projection (H*K wide) and k projection (G*K) before they are split into heads (OLMo-2);
    - Granite's multipliers: `embedding_multiplier` scales the embeddings, `residual_multiplier` each branch's
      output before its residual add, `attention_multiplier` is the softmax scale (null: 1/sqrt(head width)),
      and the logits are divided by `logits_scaling`.
    """

    name: str = "custom"
    # the Hugging Face family this architecture is written as (`python -m dropup.families` lists them); an MoE is
    # written as the MoE family it becomes (Mixtral, Qwen2-MoE, ...)
    family: str = "llama"
    vocab_size: int = 8192
    n_layers: int = 4
    d_model: int = 128
    d_ff: int = 512
    n_heads: int = 4
    n_kv_heads: int = 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    rope_scaling: Optional[dict[str, Any]] = None
    attn_bias: bool = False
    qk_norm: bool = False
    head_dim: Optional[int] = None  # null: d_model / n_heads
    sliding_window: Optional[int] = None
    sliding_window_from_layer: int = 0
    post_norm: bool = False
    qk_norm_width: str = "head"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: Optional[float] = None  # null: 1 / sqrt(d_head)
    logits_scaling: float = 1.0

    def __post_init__(self) -> None:
        for field in ("vocab_size", "n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads"):
            _require(getattr(self, field) > 0, f"model.{field} must be positive, got {getattr(self, field)}")
        if self.head_dim is None:
            _require(
                self.d_model % self.n_heads == 0,
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: pick heads that "
                "divide it, or set model.head_dim",
            )
        else:
            _require(self.head_dim > 0 and self.head_dim % 2 == 0,
                     f"model.head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            _require(kind in ROPE_SCALINGS, f"model.rope_scaling.rope_type={kind!r} is not supported; choose one "
                     f"of {ROPE_SCALINGS} or set model.rope_scaling=null")
        if self.sliding_window is not None:
            _require(self.sliding_window > 0, f"model.sliding_window={self.sliding_window} must be positive or null")
        _require(self.qk_norm_width in QK_NORM_WIDTHS, f"model.qk_norm_width={self.qk_norm_width!r} is unknown; "
                 f"choose one of {QK_NORM_WIDTHS}")
        _require(self.qk_norm or self.qk_norm_width == "head", f"model.qk_norm_width={self.qk_norm_width!r} needs "
                 "model.qk_norm=true (or leave qk_norm_width at 'head')")
        for field in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            _require(getattr(self, field) > 0, f"model.{field} must be positive (1: none), got {getattr(self, field)}")
        _require(self.attention_multiplier is None or self.attention_multiplier > 0,
                 f"model.attention_multiplier must be positive or null (1/sqrt(head width)), got "
                 f"{self.attention_multiplier}")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads} (grouped-query "
            "attention shares each KV head among a whole number of query heads)",
        )

    @property
    def d_head(self) -> int:
        """Width of one attention head (K in shape names)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def window_of(self, layer: int) -> int | None:
        """The sliding window in effect on `layer`, or None for full causal attention."""
        return self.sliding_window if layer >= self.sliding_window_from_layer else None

    def features(self) -> dict[str, Any]:
        """The HF families' features this model switches on: the FEATURES fields away from their defaults."""
        defaults = ModelConfig()
        return {f: getattr(self, f) for f in FEATURES if getattr(self, f) != getattr(defaults, f)}


# the ModelConfig fields that switch on what the HF families add to the paper's Llama (all off by default)
FEATURES = ("tie_embeddings", "rope_scaling", "attn_bias", "qk_norm", "head_dim", "sliding_window",
            "sliding_window_from_layer", "post_norm", "qk_norm_width", "embedding_multiplier", "residual_multiplier",
            "attention_multiplier", "logits_scaling")


@dataclass
class MoEConfig:
    """How each FFN becomes a Mixture of Experts. `enabled: false` is the dense (Llama) model.

    `granularity` G splits the dense FFN along d_ff into G parts (fine-grained experts, paper footnote 3): each
    expert is d_ff / G wide, and expert e upcycles from part e mod G of its source FFN.

    `shared_expert_d_ff` > 0 adds a shared expert (Qwen2-MoE, DeepSeekMoE): one SwiGLU of that width that every
    token passes through beside the routed ones, y = sum_k w_k E_k(x) + g(x) S(x), where g(x) = sigmoid(w_g . x)
    with `shared_expert_gate` (Qwen2-MoE's gate) and g = 1 without it.
    """

    enabled: bool = False
    num_experts: int = 8
    top_k: int = 2
    granularity: int = 1
    backend: str = "grouped"
    lb_coef: float = 0.02
    lb_mode: str = "pooled"
    bias_update_rate: float = 0.001
    z_coef: float = 0.0
    shared_expert_d_ff: int = 0
    shared_expert_gate: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        _require(self.shared_expert_d_ff >= 0,
                 f"moe.shared_expert_d_ff must be >= 0 (0: no shared expert), got {self.shared_expert_d_ff}")
        _require(self.num_experts >= 1, f"moe.num_experts must be >= 1, got {self.num_experts}")
        _require(
            1 <= self.top_k <= self.num_experts,
            f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}",
        )
        _require(self.granularity >= 1, f"moe.granularity must be >= 1, got {self.granularity}")
        _require(
            self.num_experts % self.granularity == 0,
            f"moe.num_experts={self.num_experts} is not a multiple of moe.granularity={self.granularity}: each "
            "dense FFN is split into `granularity` experts, so use num_experts = copies x granularity",
        )
        _require(self.backend in BACKENDS, f"moe.backend={self.backend!r} is unknown; choose one of {BACKENDS}")
        _require(self.lb_mode in LB_MODES, f"moe.lb_mode={self.lb_mode!r} is unknown; choose one of {LB_MODES}")
        _require(self.bias_update_rate >= 0,
                 f"moe.bias_update_rate must be >= 0 (aux_free's bias step), got {self.bias_update_rate}")

    def expert_d_ff(self, model: ModelConfig) -> int:
        _require(
            model.d_ff % self.granularity == 0,
            f"moe.granularity={self.granularity} does not divide model.d_ff={model.d_ff}: pick a divisor of d_ff",
        )
        return model.d_ff // self.granularity


def check_pair(model: ModelConfig, moe: MoEConfig | None) -> None:
    """Validate the combination (fields that depend on both configs)."""
    if moe is not None and moe.enabled:
        moe.expert_d_ff(model)


def architecture(cfg) -> tuple[ModelConfig, MoEConfig | None]:
    """Typed, validated model and MoE configs from a composed config's `model` and `moe` nodes."""
    from omegaconf import OmegaConf

    model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    moe = MoEConfig(**OmegaConf.to_container(cfg.moe, resolve=True))
    check_pair(model, moe)
    return model, (moe if moe.enabled else None)
