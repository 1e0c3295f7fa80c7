"""Memory per GPU under FSDP2, the largest micro-batch that fits, and the communication each step costs (the model
is the package docstring's; `parameter_split` and the initialization's host memory are `dropup.memory`'s)."""

from __future__ import annotations

from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.flops import forward_flops_per_sequence
from dropup.memory import parameter_split
from dropup.tools.scaling.activations import CE_CHUNK_ROWS, ActivationProfile, compute_kind, compute_bytes, \
    measure_activations


def predict_memory(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, *, gpus: int, micro_batch: int, seq_len: int,
                   checkpointing: bool, precision: str = "bf16-mixed", optimizer: str = "adamw",
                   profile: ActivationProfile | None = None) -> dict:
    """Bytes per GPU of one FSDP2 training step (see the module docstring): the components, each moment's total,
    and the peak with its breakdown into params / grads / optimizer / activations (which sum to it)."""
    if optimizer != "adamw":
        raise ConfigError(f"optimizer={optimizer!r} is not modelled; only adamw (what the runs use)")
    if gpus < 1 or micro_batch < 0 or seq_len < 1:
        raise ConfigError(f"gpus={gpus}, micro_batch={micro_batch}, seq_len={seq_len}: need gpus >= 1, "
                          "micro_batch >= 0, seq_len >= 1")
    kind = compute_kind(precision)
    profile = profile or measure_activations(model_cfg, moe_cfg, kind)
    split = parameter_split(model_cfg, moe_cfg)
    P, N = split["total"], gpus
    w = compute_bytes(kind)
    grad_copy = 4 if kind == "bf16" else 0  # the fp32 copy of unsharded bf16 gradients for the reduce-scatter
    tokens = micro_batch * seq_len
    c = {
        "params_sharded": 4 * P / N,  # fp32 master (or fp32 parameter) shards
        "grads_sharded": 4 * P / N,
        "optimizer_states": 8 * P / N,  # AdamW exp_avg, exp_avg_sq
        "params_unsharded": w * (split["root"] + 2 * split["block"]),
        "activations": profile.kept(micro_batch, seq_len, checkpointing),
        "logits_grad": tokens * model_cfg.vocab_size * w,
        "loss_workspace": min(CE_CHUNK_ROWS, tokens) * model_cfg.vocab_size * (4 + w),
    }
    layer_full = int(profile.layer(micro_batch, seq_len))
    c["block_recompute"] = layer_full if checkpointing else 0
    c["block_grad_workspace"] = layer_full
    c["block_grads_unsharded"] = (w + grad_copy) * split["block"]
    c["lm_head_grad"] = w * split["lm_head"]
    c["root_grads_unsharded"] = (w + grad_copy) * split["root"]
    c["optimizer_step_temp"] = 4 * P / N
    logits_saved = tokens * model_cfg.vocab_size * w
    static = {"params": c["params_sharded"], "grads": c["grads_sharded"], "optimizer": c["optimizer_states"]}
    moments = {
        "loss_backward": {**static, "params": static["params"] + c["params_unsharded"],
                          "activations": c["activations"] + c["logits_grad"] + c["loss_workspace"]},
        "block_backward": {**static, "params": static["params"] + c["params_unsharded"],
                           "grads": static["grads"] + c["block_grads_unsharded"] + c["lm_head_grad"],
                           "activations": c["activations"] - logits_saved + c["block_recompute"]
                           + c["block_grad_workspace"]},
        "root_reduce_scatter": {**static, "params": static["params"] + w * split["root"],
                                "grads": static["grads"] + c["root_grads_unsharded"], "activations": 0},
        "optimizer_step": {**static, "optimizer": static["optimizer"] + c["optimizer_step_temp"],
                           "activations": 0},
    }
    totals = {name: sum(parts.values()) for name, parts in moments.items()}
    peak_moment = max(totals, key=totals.get)
    return {"components": c, "moments": totals, "peak": totals[peak_moment], "peak_moment": peak_moment,
            "breakdown": moments[peak_moment], "precision": kind}


def max_micro_batch(model_cfg, moe_cfg, *, capacity: float, limit: int = 1 << 16, **kwargs) -> int:
    """The largest micro-batch (sequences) whose peak fits in `capacity` bytes (0: not even one)."""
    def fits(m):
        return predict_memory(model_cfg, moe_cfg, micro_batch=m, **kwargs)["peak"] <= capacity

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --- communication and time -----------------------------------------------------------------------------------------

def comm_bytes_per_micro_batch(split: dict, gpus: int, precision: str) -> float:
    """Bytes each GPU sends per micro-batch: blocks gathered twice, the root once, gradients reduce-scattered."""
    if gpus == 1:
        return 0.0
    w = compute_bytes(precision)
    blocks = split["total"] - split["root"]
    return (gpus - 1) / gpus * (w * (split["root"] + 2 * blocks) + 4 * split["total"])


def comm_seconds(volume: float, gpus: int, knobs: dict) -> float:
    inter = 0.0 if gpus <= knobs["gpus_per_node"] else 1.0 / knobs["gpus_per_node"]
    return max((1 - inter) * volume / (knobs["nvlink_gbps"] * 1e9), inter * volume / (knobs["internode_gbps"] * 1e9))


def recompute_flops_per_sequence(model_cfg: ModelConfig, moe_cfg: MoEConfig | None, seq_len: int) -> float:
    """The blocks' forward (what per-block checkpointing runs again): the forward less embeddings and logits."""
    return forward_flops_per_sequence(model_cfg, moe_cfg, seq_len) - 4.0 * seq_len * model_cfg.vocab_size \
        * model_cfg.d_model


def ep_bytes(model_cfg, moe_cfg, *, gpus, micro_batch, seq_len, n_micro, checkpointing, precision) -> dict:
    """Per GPU per step: bytes expert parallelism's all-to-alls would move vs FSDP's expert-weight traffic."""
    w = compute_bytes(precision)
    E, k = moe_cfg.num_experts, moe_cfg.top_k
    e = min(gpus, E)
    a = 6 if checkpointing else 4
    p_exp = parameter_split(model_cfg, moe_cfg)["experts"]
    a2a = n_micro * a * model_cfg.n_layers * micro_batch * seq_len * k * model_cfg.d_model * w * (e - 1) / e
    fsdp = n_micro * p_exp * (2 * w + 4) * (gpus - 1) / gpus
    if gpus > 1 and e > 1:
        threshold = 3 * E * moe_cfg.expert_d_ff(model_cfg) * (2 * w + 4) / (a * k * w) * ((gpus - 1) / gpus) \
            / ((e - 1) / e)
    else:  # one GPU (or one expert): nothing to place elsewhere, nothing to gather
        threshold = None
    return {"a2a_bytes_per_step": a2a, "fsdp_expert_bytes_per_step": fsdp, "pays": threshold is not None and a2a < fsdp,
            "breakeven_tokens_per_micro_batch": threshold, "tokens_per_micro_batch": micro_batch * seq_len}


