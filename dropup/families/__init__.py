"""Hugging Face model families: one adapter per dense family, each naming the MoE family it becomes.

| dense (model_type) | MoE it becomes | adapter |
|---|---|---|
| llama (Llama 2, 3.x) | mixtral | `llama.py` |
| mistral | mixtral | `mistral.py` |
| qwen2 (Qwen2, Qwen2.5) | qwen2_moe | `qwen2.py` |
| qwen3 | qwen3_moe | `qwen3.py` |

Adding a family is one adapter file here (a `Family` subclass and its `FAMILY`), its line in `ADAPTERS`, and a
case in `tests/test_families.py`.
"""

from __future__ import annotations

from dropup.config import ConfigError
from dropup.families import llama, mistral, qwen2, qwen3
from dropup.families.base import Family

ADAPTERS: dict[str, Family] = {m.FAMILY.dense_type: m.FAMILY for m in (llama, mistral, qwen2, qwen3)}
# an MoE checkpoint is read by the first adapter that becomes it (Mixtral: the Llama adapter)
MOE_ADAPTERS: dict[str, Family] = {}
for _adapter in ADAPTERS.values():
    MOE_ADAPTERS.setdefault(_adapter.moe_type, _adapter)


def supported() -> str:
    return ", ".join(f"{d} -> {f.moe_type}" for d, f in ADAPTERS.items())


def family(name: str) -> Family:
    """The adapter of a dense family name (ModelConfig.family)."""
    if name not in ADAPTERS:
        raise ConfigError(f"model.family={name!r} is not supported; families: {supported()}")
    return ADAPTERS[name]


def of_model_type(model_type: str | None) -> tuple[Family, bool]:
    """(adapter, is_moe) for a config.json's model_type; anything else is one error naming what is supported."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type], False
    if model_type in MOE_ADAPTERS:
        return MOE_ADAPTERS[model_type], True
    raise ConfigError(f"model_type={model_type!r} is not supported: dropup reads {supported()} (dense -> MoE)")


__all__ = ["ADAPTERS", "Family", "family", "of_model_type", "supported"]
