"""Weights and configs between dropup models and transformers' classes of every supported family.

What each family knows (config fields, the MoE family it becomes, its tensor tables) is in `dropup.families`;
the tensors are mapped by the family's declared tables (`dropup.families.mapping`): renames, fused projections
(Phi-3's q|k|v), and for MoEs the expert layout:
- `stacked` (transformers 5 in memory, alias `fused`): the experts stacked, (E, 2F, D) gate|up and (E, D, F)
  down, the same tensors as ours (Mixtral and the Qwen MoEs: `mlp.experts.gate_up_proj`, router `mlp.gate`);
- `per-expert` (what transformers' `save_pretrained` writes, and what v4 readers expect): one (F, D) / (D, F)
  matrix per expert and projection, named by the family (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen
  MoEs `mlp.experts.{e}.gate_proj/up_proj/down_proj`).
Reading accepts both layouts and a dense or an MoE checkpoint; any tensor that cannot be placed is an error,
never silently skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from dropup import families
from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import resolve
from dropup.families.mapping import LAYER, LAYOUT_ALIASES, LAYOUTS, layout_of
from dropup.init.shapes import dense_shapes

__all__ = ["LAYOUTS", "LAYOUT_ALIASES", "from_hf", "to_hf", "to_hf_model", "hf_output_tensors", "hf_config",
           "hf_config_dict", "configs_from_hf", "read_hf_config", "causal_lm_class"]


def _is_moe(state: Mapping, moe: MoEConfig | None) -> bool:
    if moe is not None:
        return moe.enabled
    return any(name.endswith(".ffn.router.weight") for name in state)


def to_hf(state: Mapping[str, torch.Tensor], moe: MoEConfig | None = None, layout: str = "stacked",
          family: str = "llama") -> dict:
    """Our state dict -> a transformers state dict of `family` (dense) or the MoE family it becomes (an MoE state
    when `moe` says so, or, without `moe`, when it has routers)."""
    kind = "moe" if _is_moe(state, moe) else "dense"
    return families.family(family).mapper(kind, layout_of(layout)).to_hf(state)


def hf_output_tensors(name: str, tensor: torch.Tensor, layout: str, model: ModelConfig,
                      moe: MoEConfig | None) -> dict:
    """One of our tensors as the HF tensors it makes, plus what the MoE family needs beyond our tensors, placed
    after each layer's last routed expert tensor (Qwen2-MoE's size-0 shared expert, when `moe` has none): the
    converter plans and writes exactly this sequence. A part of a fused HF tensor is an error here (no MoE family
    fuses projections; `to_hf` writes fused tensors)."""
    adapter = families.family(model.family)
    moe = moe if moe is not None and moe.enabled else None
    out = adapter.mapper("moe" if moe else "dense", layout_of(layout)).hf_tensors(name, tensor)
    match = LAYER.match(name)
    if moe is not None and match and match.group(2) == "ffn.w_down":
        extra = adapter.extra_moe_tensors(int(match.group(1)), model, moe, tensor.dtype)
        out.update({k: v.to(tensor.device) for k, v in extra.items()})
    return out


def to_hf_model(state: Mapping[str, torch.Tensor], model: ModelConfig, moe: MoEConfig | None,
                layout: str = "stacked") -> dict:
    """Our state dict -> everything the family's (or its MoE family's) transformers class holds, the tensors
    beyond ours included (`Family.extra_moe_tensors`); a tied model has no `lm_head.weight` (transformers ties it)."""
    adapter = families.family(model.family)
    moe = moe if moe is not None and moe.enabled else None
    out = adapter.mapper("moe" if moe else "dense", layout_of(layout)).to_hf(state)
    if moe is not None:
        for layer in range(model.n_layers):
            down = state.get(f"layers.{layer}.ffn.w_down")
            if down is not None:
                extra = adapter.extra_moe_tensors(layer, model, moe, down.dtype)
                out.update({k: v.to(down.device) for k, v in extra.items()})
    return out


def causal_lm_class(model_type: str) -> str:
    """transformers' class name for a model_type (what config.json's `architectures` lists)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def from_hf(hf_state: Mapping[str, torch.Tensor], family: str = "llama", tied: bool = False,
            model: ModelConfig | None = None) -> dict:
    """A transformers state dict of `family` or its MoE family (either expert layout) -> ours.

    Unplaceable keys are errors. With tied embeddings a stored `lm_head.weight` must equal the input embedding
    (it is then dropped); the size-0 shared expert a Qwen2-MoE without one carries is dropped, with its gate.
    `model` (its ModelConfig) sizes the parts of fused tensors (Phi-3's qkv_proj, gate_up_proj): a family with
    fused tensors needs it."""
    if tied and "lm_head.weight" in hf_state:
        embed = hf_state.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(embed, hf_state["lm_head.weight"]):
            raise ConfigError("tie_word_embeddings=true but lm_head.weight differs from the input embedding")
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    shapes = dense_shapes(model) if model is not None else None
    return families.family(family).mapper("any").from_hf(hf_state, shapes)


def hf_config_dict(model: ModelConfig, moe: MoEConfig | None = None) -> dict:
    """config.json fields (with model_type) of `model` as its family, or as the MoE family it becomes."""
    adapter = families.family(model.family)
    adapter.check_features(model)
    adapter.check(model)
    moe = moe if moe is not None and moe.enabled else None
    if moe is not None:
        adapter.check_moe(moe)
        adapter.check_moe_window(model)
    return {"model_type": adapter.moe_type if moe else adapter.dense_type, **adapter.write_fields(model, moe)}


def hf_config(model: ModelConfig, moe: MoEConfig | None = None, **extra):
    """A transformers config object (LlamaConfig, Qwen2MoeConfig, ...) describing the same architecture."""
    from transformers import AutoConfig

    fields = {**hf_config_dict(model, moe), **extra}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def configs_from_hf(config: Mapping) -> tuple[ModelConfig, MoEConfig]:
    """Our configs from a `config.json` (as a dict) of a supported family, refusing what we cannot represent."""
    adapter, is_moe = families.of_model_type(config.get("model_type"))
    hf = resolve(config)  # as transformers reads it: the class's defaults, not the raw keys
    fields = adapter.read_fields(hf)
    moe = MoEConfig(enabled=False)
    if is_moe:
        moe = adapter.read_moe(hf)
        fields["d_ff"] = adapter.moe_d_ff(hf)
    model = ModelConfig(name=config.get("_name_or_path") or config["model_type"], family=adapter.dense_type,
                        **fields)
    return model, moe


def read_hf_config(path: Path) -> tuple[dict, ModelConfig, MoEConfig]:
    """config.json of an HF directory, and our configs from it (one clear error for anything unreadable)."""
    try:
        config = json.loads((path / "config.json").read_text())
        model, moe = configs_from_hf(config)
    except json.JSONDecodeError as err:  # (ConfigError is a ValueError too: it passes through as it is)
        raise ConfigError(f"{path / 'config.json'} is not a readable config ({err})") from None
    except KeyError as err:
        raise ConfigError(f"{path / 'config.json'} lacks the field {err}: it is not a complete model config") from None
    return config, model, moe
