"""Parameter and FLOPs accounting from the config alone (no weights are allocated).

FLOPs follow the paper's Table 3 (forward pass, matrix products only, 2mkn per (m x k) @ (k x n)); training costs
3x the forward pass (backward ~ 2x forward). Symbols: s sequence length, d_h hidden, v vocabulary, d_f FFN width,
n_l layers, n_h heads, n_q query groups (KV heads), d_k head dim, n_e experts selected per token. A shared expert
of width d_s (Table 3 has none) is one more SwiGLU that every token passes through, 6 s d_h d_s, plus its gate's
(d_h x 1) product, 2 s d_h.

The family features of `ModelConfig` change only the parameter count: q/k norms add their gains (2 d_k per layer
per head, (n_h + n_q) d_k over the whole projection); post-norm blocks hold the same two norms per layer as
pre-norm ones; Granite's multipliers are scalars of the config, not parameters, and their products (like the
norms') are not matrix products, so FLOPs are those of Table 3 whatever the features.
"""

from __future__ import annotations

from dropup.config import ModelConfig, MoEConfig, check_pair


def _active(moe: MoEConfig | None) -> MoEConfig | None:
    return moe if moe is not None and moe.enabled else None


def param_counts(model: ModelConfig, moe: MoEConfig | None = None) -> dict[str, int]:
    """Total and active (used per token) parameter counts, embeddings and LM head included (once when tied)."""
    check_pair(model, moe)
    moe = _active(moe)
    d, h = model.d_model, model.d_head
    embeddings = (1 if model.tie_embeddings else 2) * model.vocab_size * d
    qkv_width = h * (model.n_heads + 2 * model.n_kv_heads)
    attention = d * qkv_width + model.n_heads * h * d
    attention += qkv_width if model.attn_bias else 0
    if model.qk_norm:  # one gain vector per head width (shared by the heads), or over the whole projection
        attention += (model.n_heads + model.n_kv_heads) * h if model.qk_norm_width == "full" else 2 * h
    norms = 2 * d  # before each branch, or after it (post_norm): two per layer either way
    if moe is None:
        ffn_total = ffn_active = 3 * d * model.d_ff
    else:
        expert = 3 * d * moe.expert_d_ff(model)
        router = moe.num_experts * d
        shared = 3 * d * moe.shared_expert_d_ff + (d if moe.shared_expert_d_ff and moe.shared_expert_gate else 0)
        ffn_total = moe.num_experts * expert + router + shared
        ffn_active = moe.top_k * expert + router + shared
    per_layer = attention + norms
    total = embeddings + model.n_layers * (per_layer + ffn_total) + d
    active = embeddings + model.n_layers * (per_layer + ffn_active) + d
    return {"total_params": total, "active_params": active}


def forward_flops_per_sequence(model: ModelConfig, moe: MoEConfig | None, seq_len: int) -> float:
    """Table 3, one forward pass over one sequence of `seq_len` tokens."""
    check_pair(model, moe)
    moe = _active(moe)
    s, d_h, v = seq_len, model.d_model, model.vocab_size
    n_h, n_q, d_k = model.n_heads, model.n_kv_heads, model.d_head
    embeddings = 2 * s * v * d_h

    def attention(keys: int) -> int:  # keys per query: s (Table 3), or the sliding window where it is shorter
        return (
            4 * s * d_h * d_k * n_q  # key and value projections
            + 2 * s * d_h * d_k * n_h  # query projection
            + 2 * s * keys * d_k * n_h  # key @ query logits
            + 2 * s * keys * d_k * n_h  # attention matrix @ values
            + 2 * s * d_k * n_h * d_h  # output projection
        )

    windows = [model.window_of(layer) for layer in range(model.n_layers)]
    attention_all = sum(attention(min(s, w) if w else s) for w in windows)
    if moe is None:
        ffn = 4 * s * d_h * model.d_ff + 2 * s * model.d_ff * d_h
    else:
        d_f = moe.expert_d_ff(model)
        ffn = moe.top_k * (4 * s * d_h * d_f + 2 * s * d_f * d_h)
        if moe.shared_expert_d_ff:
            ffn += 6 * s * d_h * moe.shared_expert_d_ff + (2 * s * d_h if moe.shared_expert_gate else 0)
    logits = 2 * s * d_h * v
    return float(embeddings + attention_all + model.n_layers * ffn + logits)


def train_flops(model: ModelConfig, moe: MoEConfig | None, tokens: int, seq_len: int) -> float:
    """Forward + backward FLOPs (3x forward) for `tokens` training tokens in sequences of `seq_len`."""
    return 3.0 * forward_flops_per_sequence(model, moe, seq_len) * (tokens / seq_len)


def human_count(n: int) -> str:
    """A parameter count as people write it: 1.27B, 417.0M, 32.4K."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"
