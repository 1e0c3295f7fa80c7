"""Qwen2 / Qwen2.5 (model_type `qwen2`) -> Qwen2-MoE (`qwen2_moe`).

Config: q/k/v always carry biases (o does not); the window slides only with `use_sliding_window`, and then on
layers from `max_window_layers` on (`layer_types` in transformers 5); small models tie their embeddings.
Qwen2-MoE routes like the paper only with `norm_topk_prob: true` (its default, false, would not renormalize the
top-k weights), and always has a shared-expert module, `mlp.shared_expert` (a SwiGLU of
`shared_expert_intermediate_size`) behind a sigmoid gate `mlp.shared_expert_gate` (1, hidden): an MoE without a
shared expert is written with `shared_expert_intermediate_size: 0` (its output is then zero, and the size-0
tensors are dropped on reading). Saved per expert: `mlp.experts.{e}.gate_proj/up_proj/down_proj`, router
`mlp.gate`.
"""

from __future__ import annotations

import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.families.base import ATTENTION, SHARED_EXPERT, STACKED, Family, per_expert


class Qwen2(Family):
    dense_type = "qwen2"
    moe_type = "qwen2_moe"
    moe_layer = ATTENTION + SHARED_EXPERT
    expert_layouts = {"stacked": STACKED,
                      "per-expert": per_expert("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight",
                                               "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")}
    holds_shared_expert = True

    dense_window_rule = "layer_types"  # the window on the layers layer_types names (derived from max_window_layers)
    moe_window_rule = "layer_types"  # Qwen2-MoE derives its layer_types another way (its config class)

    def read_fields(self, hf) -> dict:
        # Qwen2Attention always has q/k/v biases; Qwen2-MoE's follow its qkv_bias field
        bias = True if hf.model_type == "qwen2" else bool(getattr(hf, "qkv_bias", False))
        return {**super().read_fields(hf), "attn_bias": bias}

    def moe_d_ff(self, hf) -> int:
        return hf.moe_intermediate_size

    def read_moe(self, hf) -> MoEConfig:
        if hf.decoder_sparse_step != 1 or hf.mlp_only_layers:
            raise ConfigError(f"this {hf.model_type} keeps dense FFNs on some layers (decoder_sparse_step / "
                              "mlp_only_layers): dropup models an MoE on every layer")
        if not hf.norm_topk_prob:
            raise ConfigError(f"config field norm_topk_prob=false: this {hf.model_type} does not renormalize "
                              "its top-k weights, and dropup's router does (paper eq. 3)")
        shared = int(hf.shared_expert_intermediate_size) if self.holds_shared_expert else 0
        return MoEConfig(enabled=True, num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         lb_coef=hf.router_aux_loss_coef, shared_expert_d_ff=shared)

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
        """What only this family's config has: Qwen2-MoE's q/k/v bias switch and its shared expert's width."""
        return {} if moe is None else {"qkv_bias": model.attn_bias,
                                       "shared_expert_intermediate_size": moe.shared_expert_d_ff}

    def extra_moe_tensors(self, layer: int, model: ModelConfig, moe: MoEConfig, dtype) -> dict[str, torch.Tensor]:
        """Without a shared expert of ours: the size-0 one Qwen2-MoE always has, and its (then irrelevant) gate."""
        if moe.shared_expert_d_ff:
            return {}
        prefix = f"model.layers.{layer}.mlp."
        d = model.d_model
        return {prefix + "shared_expert.gate_proj.weight": torch.zeros(0, d, dtype=dtype),
                prefix + "shared_expert.up_proj.weight": torch.zeros(0, d, dtype=dtype),
                prefix + "shared_expert.down_proj.weight": torch.zeros(d, 0, dtype=dtype),
                prefix + "shared_expert_gate.weight": torch.zeros(1, d, dtype=dtype)}

    def unused_on_read(self, shapes: dict[str, tuple[int, ...]]) -> set[str]:
        """The size-0 shared expert of a Qwen2-MoE without one, and its gate (`extra_moe_tensors` writes them)."""
        empty = {name.split(".ffn.", 1)[0] for name, shape in shapes.items()
                 if ".ffn.shared_expert." in name and 0 in shape}
        return {name for name in shapes if ".ffn.shared_expert" in name and name.split(".ffn.", 1)[0] in empty}


FAMILY = Qwen2()
