"""Weights and configs between dropup models and transformers' classes of every supported family.

What each family knows (config fields, the MoE family it becomes, its per-expert names) is in `dropup.families`;
this module does what they share. Our names differ from Hugging Face's only by renaming, and for MoEs by the
expert layout:
- `fused` (transformers 5 in memory, every MoE family): `mlp.experts.gate_up_proj` (E, 2F, D) and
  `mlp.experts.down_proj` (E, D, F), router `mlp.gate.weight` -- the same tensors as ours;
- `per-expert` (what transformers' `save_pretrained` writes, and what v4 readers expect): one (F, D) / (D, F)
  matrix per expert and projection, named by the family (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`, Qwen
  MoEs `mlp.experts.{e}.gate_proj/up_proj/down_proj`).
Reading accepts both layouts; any tensor that cannot be placed is an error, never silently skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from dropup import families
from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import HF_LAYER, LAYER, LAYER_NAMES, TOP_NAMES, resolve

LAYOUTS = ("fused", "per-expert")
_FUSED_EXPERTS = ("ffn.w_gate_up", "ffn.w_down")


def to_hf(state: Mapping[str, torch.Tensor], moe: MoEConfig | None = None, layout: str = "fused",
          family: str = "llama") -> dict:
    """Our state dict -> a transformers state dict of `family` (dense) or the MoE family it becomes."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is unknown; choose one of {LAYOUTS}")
    out = {}
    for name, tensor in state.items():
        out.update(hf_tensors(name, tensor, layout, family))
    return out


def hf_tensors(name: str, tensor: torch.Tensor, layout: str = "fused", family: str = "llama") -> dict:
    """One of our tensors as the HF tensor(s) it becomes (a fused expert tensor splits per expert)."""
    if name in TOP_NAMES:
        return {TOP_NAMES[name]: tensor}
    match = LAYER.match(name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise ConfigError(f"tensor {name!r} has no Hugging Face counterpart")
    layer, rest = match.groups()
    prefix = f"model.layers.{layer}."
    adapter = families.family(family)
    if layout == "fused" or rest not in (*_FUSED_EXPERTS, "ffn.router.weight"):
        return {prefix + LAYER_NAMES[rest]: tensor}
    if rest == "ffn.router.weight":
        return {prefix + adapter.expert_router: tensor}
    gate_name, up_name, down_name = adapter.expert_names
    out = {}
    for e in range(tensor.shape[0]):
        if rest == "ffn.w_gate_up":
            gate, up = tensor[e].chunk(2, dim=0)
            out[prefix + gate_name.format(e=e)], out[prefix + up_name.format(e=e)] = gate.contiguous(), up.contiguous()
        else:
            out[prefix + down_name.format(e=e)] = tensor[e]
    return out


def hf_output_tensors(name: str, tensor: torch.Tensor, layout: str, model: ModelConfig,
                      moe: MoEConfig | None) -> dict:
    """`hf_tensors` plus what the MoE family needs beyond our tensors, placed after each layer's last routed
    expert tensor (Qwen2-MoE's size-0 shared expert, when `moe` has none): the converter plans and writes exactly
    this sequence."""
    out = hf_tensors(name, tensor, layout, model.family)
    match = LAYER.match(name)
    if match and match.group(2) == "ffn.w_down":
        extra = families.family(model.family).extra_moe_tensors(int(match.group(1)), model, moe, tensor.dtype)
        out.update({k: v.to(tensor.device) for k, v in extra.items()})
    return out


def to_hf_model(state: Mapping[str, torch.Tensor], model: ModelConfig, moe: MoEConfig | None,
                layout: str = "fused") -> dict:
    """Our state dict -> everything the family's (or its MoE family's) transformers class holds, the tensors
    beyond ours included (`hf_output_tensors`); a tied model has no `lm_head.weight` (transformers ties it)."""
    out = {}
    for name, tensor in state.items():
        out.update(hf_output_tensors(name, tensor, layout, model, moe))
    return out


def causal_lm_class(model_type: str) -> str:
    """transformers' class name for a model_type (what config.json's `architectures` lists)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


_INVERSE_TOP = {v: k for k, v in TOP_NAMES.items()}
_INVERSE_LAYER = {v: k for k, v in LAYER_NAMES.items()}


def renamed_from_hf(name: str, family: str = "llama") -> str | None:
    """Our name of an HF tensor that maps one to one (every dense tensor; for MoEs all but the per-expert
    matrices, which `from_hf` stacks), or None when it has no such counterpart."""
    if name in _INVERSE_TOP:
        return _INVERSE_TOP[name]
    match = HF_LAYER.match(name)
    if match is None:
        return None
    rest = match.group(2)
    adapter = families.family(family)
    if rest.startswith("mlp.shared_expert") and not adapter.holds_shared_expert:
        return None  # a Mixtral or Qwen3-MoE has no place for one
    if rest == adapter.expert_router:
        return f"layers.{match.group(1)}.ffn.router.weight"
    return f"layers.{match.group(1)}.{_INVERSE_LAYER[rest]}" if rest in _INVERSE_LAYER else None


def _per_expert_pattern(family: str) -> re.Pattern:
    names = families.family(family).expert_names
    alternatives = "|".join(re.escape(n).replace(re.escape("{e}"), r"(?P<e%d>\d+)" % i) for i, n in enumerate(names))
    return re.compile(f"^(?:{alternatives})$")


def from_hf(hf_state: Mapping[str, torch.Tensor], family: str = "llama", tied: bool = False) -> dict:
    """A transformers state dict of `family` or its MoE family (either expert layout) -> ours.

    Unplaceable keys are errors. With tied embeddings a stored `lm_head.weight` must equal the input embedding
    (it is then dropped); the size-0 shared expert a Qwen2-MoE without one carries is dropped, with its gate."""
    out: dict[str, torch.Tensor] = {}
    empty_shared: set[str] = set()  # layers whose shared expert is size 0: their gates are dropped at the end
    per_expert: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    pattern = _per_expert_pattern(family)
    for name, tensor in hf_state.items():
        if tied and name == "lm_head.weight":
            embed = hf_state.get("model.embed_tokens.weight")
            if embed is not None and not torch.equal(embed, tensor):
                raise ConfigError("tie_word_embeddings=true but lm_head.weight differs from the input embedding")
            continue
        ours = renamed_from_hf(name, family)
        if ours is not None and ".shared_expert." in ours and tensor.numel() == 0:
            empty_shared.add(ours.split(".ffn.", 1)[0])
            continue
        if ours is not None:
            out[ours] = tensor
            continue
        match = HF_LAYER.match(name)
        expert = pattern.match(match.group(2)) if match else None
        if expert is None:
            raise ConfigError(f"Hugging Face tensor {name!r} is not part of a {family} model or its MoE")
        which = next(i for i in range(3) if expert.group(f"e{i}") is not None)
        per_expert.setdefault((match.group(1), which), {})[int(expert.group(f"e{which}"))] = tensor
    for layer in sorted({layer for layer, _ in per_expert}, key=int):
        parts = [per_expert.get((layer, w), {}) for w in range(3)]
        n = len(parts[0])
        if any(sorted(p) != list(range(n)) for p in parts):
            raise ConfigError(f"layer {layer}: per-expert gate/up/down tensors do not cover the same experts "
                              f"0..{n - 1}")
        out[f"layers.{layer}.ffn.w_gate_up"] = torch.stack([torch.cat([parts[0][e], parts[1][e]]) for e in range(n)])
        out[f"layers.{layer}.ffn.w_down"] = torch.stack([parts[2][e] for e in range(n)])
    for layer in empty_shared:
        out.pop(f"{layer}.ffn.shared_expert_gate.weight", None)
    return out


def hf_config_dict(model: ModelConfig, moe: MoEConfig | None = None) -> dict:
    """config.json fields (with model_type) of `model` as its family, or as the MoE family it becomes."""
    adapter = families.family(model.family)
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
