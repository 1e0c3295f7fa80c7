"""Hugging Face model families: one adapter per dense family, each naming the MoE family it becomes.

`ADAPTERS` below is the one list of supported families (`python -m dropup.families` prints it as the table in
docs/converter.md; a test keeps the two equal). Adding a family is one adapter file here (a `Family` subclass
and its `FAMILY`: config fields, tensor tables, the MoE family), its module in `_MODULES`, and its cases in
`tests/test_families.py` (CASES) and `tests/test_hf_seeds.py` (FAMILY_CASES).
"""

from __future__ import annotations

from dropup.config import ConfigError
from dropup.families import granite, llama, mistral, olmo2, phi3, qwen2, qwen3
from dropup.families.base import Family

# in the order of docs/converter.md's table
_MODULES = (llama, mistral, qwen2, qwen3, olmo2, granite, phi3)
ADAPTERS: dict[str, Family] = {m.FAMILY.dense_type: m.FAMILY for m in _MODULES}
# an MoE checkpoint is read by the first adapter that becomes it (Mixtral: the Llama adapter)
MOE_ADAPTERS: dict[str, Family] = {}
for _adapter in ADAPTERS.values():
    MOE_ADAPTERS.setdefault(_adapter.moe_type, _adapter)
# families that cannot be upcycled, and why (one line each)
REFUSED = {
    "gemma": "Gemma's FFN is a GeGLU (gelu, not silu), its RMSNorm gains are (1 + w) and its embeddings are scaled "
             "by sqrt(hidden), and transformers has no MoE class that replaces Gemma's FFN",
}


def supported() -> str:
    return ", ".join(f"{d} -> {f.moe_type}" for d, f in ADAPTERS.items())


def adapter_file(adapter: Family) -> str:
    """The file an adapter is declared in (dropup/families/<name>.py)."""
    return type(adapter).__module__.rsplit(".", 1)[-1] + ".py"


def table() -> str:
    """The supported families as a markdown table (docs/converter.md holds it between its families markers)."""
    rows = [f"| {d} | {f.moe_type} | {adapter_file(f)} |" for d, f in ADAPTERS.items()]
    return "\n".join(["| dense (model_type) | MoE it becomes | adapter |", "|---|---|---|", *rows])


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
    why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    raise ConfigError(f"model_type={model_type!r} is not supported{why}: dropup reads {supported()} (dense -> MoE)")


__all__ = ["ADAPTERS", "Family", "adapter_file", "family", "of_model_type", "supported", "table"]
