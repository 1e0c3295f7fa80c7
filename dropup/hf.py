"""Weight and config mapping between dropup models and transformers' Llama / Mixtral.

Our names (see `dropup.model`) differ from Hugging Face's only by renaming, and for Mixtral by the expert layout:
- `fused` (transformers 5 in memory): `mlp.experts.gate_up_proj` (E, 2F, D) and `mlp.experts.down_proj` (E, D, F),
  router `mlp.gate.weight` -- the same tensors as ours;
- `per-expert` (what transformers' `save_pretrained` writes, and what v4 readers expect):
  `block_sparse_moe.experts.{e}.w1/w2/w3.weight` = gate (F, D) / down (D, F) / up (F, D),
  router `block_sparse_moe.gate.weight`.
Reading accepts both layouts; any tensor that cannot be placed is an error, never silently skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig

LAYOUTS = ("fused", "per-expert")

_COMMON = {  # ours -> HF, per layer
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_DENSE_FFN = {
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_MOE_FUSED = {
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.w_gate_up": "mlp.experts.gate_up_proj",
    "ffn.w_down": "mlp.experts.down_proj",
}
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PER_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def to_hf(state: Mapping[str, torch.Tensor], moe: MoEConfig | None = None, layout: str = "fused") -> dict:
    """Our state dict -> a transformers Llama (dense) or Mixtral (MoE) state dict."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is unknown; choose one of {LAYOUTS}")
    out = {}
    for name, tensor in state.items():
        out.update(hf_tensors(name, tensor, layout))
    return out


def hf_tensors(name: str, tensor: torch.Tensor, layout: str = "fused") -> dict[str, torch.Tensor]:
    """One of our tensors as the HF tensor(s) it becomes (a fused expert tensor splits per expert)."""
    if name in _TOP:
        return {_TOP[name]: tensor}
    match = _LAYER.match(name)
    if match is None:
        raise ConfigError(f"tensor {name!r} has no Hugging Face counterpart")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    for table in (_COMMON, _DENSE_FFN):
        if rest in table:
            return {prefix + table[rest]: tensor}
    if rest not in _MOE_FUSED:
        raise ConfigError(f"tensor {name!r} has no Hugging Face counterpart")
    if layout == "fused":
        return {prefix + _MOE_FUSED[rest]: tensor}
    moe_prefix = prefix + "block_sparse_moe."
    if rest == "ffn.router.weight":
        return {moe_prefix + "gate.weight": tensor}
    out = {}
    for e in range(tensor.shape[0]):
        expert = f"{moe_prefix}experts.{e}."
        if rest == "ffn.w_gate_up":
            gate, up = tensor[e].chunk(2, dim=0)
            out[expert + "w1.weight"], out[expert + "w3.weight"] = gate.contiguous(), up.contiguous()
        else:
            out[expert + "w2.weight"] = tensor[e]
    return out


_INVERSE_TOP = {v: k for k, v in _TOP.items()}
_INVERSE_LAYER = {v: k for table in (_COMMON, _DENSE_FFN, _MOE_FUSED) for k, v in table.items()}
_INVERSE_LAYER["block_sparse_moe.gate.weight"] = "ffn.router.weight"


def renamed_from_hf(name: str) -> str | None:
    """Our name of an HF tensor that maps one to one (every Llama tensor; for Mixtral all but the per-expert
    `w1/w2/w3`, which `from_hf` stacks), or None when it has no such counterpart."""
    if name in _INVERSE_TOP:
        return _INVERSE_TOP[name]
    match = _HF_LAYER.match(name)
    if match is None or match.group(2) not in _INVERSE_LAYER:
        return None
    return f"layers.{match.group(1)}.{_INVERSE_LAYER[match.group(2)]}"


def from_hf(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Llama or Mixtral state dict (either expert layout) -> ours. Unplaceable keys are errors."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in hf_state.items():
        ours = renamed_from_hf(name)
        if ours is not None:
            out[ours] = tensor
            continue
        match = _HF_LAYER.match(name)
        expert = _PER_EXPERT.match(match.group(2)) if match else None
        if expert is None:
            raise ConfigError(f"Hugging Face tensor {name!r} is not part of a Llama/Mixtral model")
        per_expert.setdefault((match.group(1), expert.group(2)), {})[int(expert.group(1))] = tensor
    layers = sorted({layer for layer, _ in per_expert})
    for layer in layers:
        parts = {w: per_expert.get((layer, w), {}) for w in ("w1", "w2", "w3")}
        n = len(parts["w1"])
        if any(sorted(p) != list(range(n)) for p in parts.values()):
            raise ConfigError(f"layer {layer}: per-expert tensors w1/w2/w3 do not cover the same experts 0..{n - 1}")
        out[f"layers.{layer}.ffn.w_gate_up"] = torch.stack(
            [torch.cat([parts["w1"][e], parts["w3"][e]], dim=0) for e in range(n)]
        )
        out[f"layers.{layer}.ffn.w_down"] = torch.stack([parts["w2"][e] for e in range(n)])
    return out


def hf_config(model: ModelConfig, moe: MoEConfig | None = None, **extra):
    """A transformers LlamaConfig (dense) or MixtralConfig (MoE) describing the same architecture."""
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=model.vocab_size,
        hidden_size=model.d_model,
        intermediate_size=model.d_ff,
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_kv_heads,
        head_dim=model.head_dim,
        rms_norm_eps=model.norm_eps,
        rope_theta=model.rope_theta,
        initializer_range=model.init_std,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    if moe is None or not moe.enabled:
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common, **extra)
    common["intermediate_size"] = moe.expert_d_ff(model)
    return MixtralConfig(
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.lb_coef,
        output_router_logits=True,
        **common,
        **extra,
    )


def configs_from_hf(config: Mapping) -> tuple[ModelConfig, MoEConfig]:
    """Read a Llama or Mixtral `config.json` (as a dict), refusing what our architecture cannot represent."""
    kind = config.get("model_type")
    if kind not in ("llama", "mixtral"):
        raise ConfigError(f"model_type={kind!r} is not supported: only Llama (dense) and Mixtral (MoE) checkpoints")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"config field {flag}=true: Mixtral has no biases, so this model cannot be upcycled")
    if config.get("tie_word_embeddings"):
        raise ConfigError("config field tie_word_embeddings=true: dropup models keep untied embeddings")
    rope = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"config field rope_scaling type {rope_type!r} is not supported: only plain RoPE")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config field hidden_act={config['hidden_act']!r}: SwiGLU needs silu")
    n_heads = config["num_attention_heads"]
    d_model = config["hidden_size"]
    if config.get("head_dim") not in (None, d_model // n_heads):
        raise ConfigError(f"config field head_dim={config['head_dim']} differs from hidden_size / heads")
    moe = MoEConfig(enabled=False)
    d_ff = config["intermediate_size"]
    if kind == "mixtral":
        moe = MoEConfig(
            enabled=True,
            num_experts=config["num_local_experts"],
            top_k=config["num_experts_per_tok"],
            lb_coef=config.get("router_aux_loss_coef", 0.02),
        )
    model = ModelConfig(
        name=config.get("_name_or_path") or kind,
        vocab_size=config["vocab_size"],
        n_layers=config["num_hidden_layers"],
        d_model=d_model,
        d_ff=d_ff,
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
    return model, moe
