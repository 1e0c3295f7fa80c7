"""Qwen2 / Qwen2.5 (model_type `qwen2`) -> Qwen2-MoE (`qwen2_moe`).

Config: q/k/v always carry biases (o does not); the window slides only with `use_sliding_window`, and then on
layers from `max_window_layers` on (`layer_types` in transformers 5); small models tie their embeddings.
Qwen2-MoE routes like the paper only with `norm_topk_prob: true` (its default, false, would not renormalize the
top-k weights), and always has a shared-expert module: until dropup models shared experts it is written with
`shared_expert_intermediate_size: 0` (its output is then zero), and a checkpoint with a real one is refused.
Saved per expert: `mlp.experts.{e}.gate_proj/up_proj/down_proj`, router `mlp.gate`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import Family


class Qwen2(Family):
    dense_type = "qwen2"
    moe_type = "qwen2_moe"
    expert_names = ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                    "mlp.experts.{e}.down_proj.weight")
    expert_router = "mlp.gate.weight"

    def read_fields(self, config: Mapping) -> dict:
        return {**super().read_fields(config), "attn_bias": bool(config.get("qkv_bias", True))}

    def moe_d_ff(self, config: Mapping) -> int:
        return config["moe_intermediate_size"]

    def read_moe(self, config: Mapping) -> MoEConfig:
        if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
            raise ConfigError(f"this {config['model_type']} keeps dense FFNs on some layers (decoder_sparse_step / "
                              "mlp_only_layers): dropup models an MoE on every layer")
        if not config.get("norm_topk_prob", False):
            raise ConfigError(f"config field norm_topk_prob=false: this {config['model_type']} does not renormalize "
                              "its top-k weights, and dropup's router does (paper eq. 3)")
        if config.get("shared_expert_intermediate_size", 0):
            raise ConfigError(f"this {config['model_type']} has a shared expert (shared_expert_intermediate_size="
                              f"{config['shared_expert_intermediate_size']}), which dropup does not model yet")
        experts = config.get("num_experts", config.get("num_local_experts"))  # Qwen3-MoE saves the latter
        return MoEConfig(enabled=True, num_experts=experts, top_k=config["num_experts_per_tok"],
                         lb_coef=config.get("router_aux_loss_coef", 0.02))

    def check(self, model: ModelConfig) -> None:
        if model.qk_norm:
            raise ConfigError("model family qwen2 has no q/k norms: use qwen3")

    def window(self, model: ModelConfig) -> dict:
        # layer_types spelled out: Qwen2 derives it from max_window_layers one way, Qwen2-MoE another
        types = ["sliding_attention" if model.window_of(i) else "full_attention" for i in range(model.n_layers)]
        return {"use_sliding_window": model.sliding_window is not None, "sliding_window": model.sliding_window,
                "max_window_layers": model.sliding_window_from_layer if model.sliding_window is not None
                else model.n_layers, "layer_types": types}

    def write_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        fields = {**super().write_fields(model, moe), **self.window(model), **self.own_fields(model, moe)}
        if moe is None:
            return fields
        return {**fields, "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
                "moe_intermediate_size": moe.expert_d_ff(model), "norm_topk_prob": True, "decoder_sparse_step": 1,
                "mlp_only_layers": []}

    def own_fields(self, model: ModelConfig, moe: MoEConfig | None) -> dict:
        """What only this family's config has: Qwen2-MoE's q/k/v bias switch and its (empty) shared expert."""
        return {} if moe is None else {"qkv_bias": model.attn_bias, "shared_expert_intermediate_size": 0}

    def extra_moe_tensors(self, layer: int, model: ModelConfig, dtype) -> dict[str, torch.Tensor]:
        """The size-0 shared expert Qwen2-MoE always has, and its (then irrelevant) gate."""
        prefix = f"model.layers.{layer}.mlp."
        d = model.d_model
        return {prefix + "shared_expert.gate_proj.weight": torch.zeros(0, d, dtype=dtype),
                prefix + "shared_expert.up_proj.weight": torch.zeros(0, d, dtype=dtype),
                prefix + "shared_expert.down_proj.weight": torch.zeros(d, 0, dtype=dtype),
                prefix + "shared_expert_gate.weight": torch.zeros(1, d, dtype=dtype)}


FAMILY = Qwen2()
