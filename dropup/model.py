"""One decoder for both architectures of the paper: Llama (dense FFN) and Mixtral (MoE FFN).

Pre-norm blocks with RMSNorm, rotary position embeddings (rotate-half convention, as transformers' Llama),
grouped-query attention through `scaled_dot_product_attention`, SwiGLU FFNs, untied input/output embeddings.
What the HF families add is switched by `ModelConfig` fields (tied embeddings, RoPE scaling, q/k/v biases, q/k
RMSNorm per head or over the whole projection, a free head width, a sliding window, post-norm blocks, Granite's
embedding/residual/attention/logit multipliers); with all of them off this is the paper's model.
Shapes: B batch, S sequence, D d_model, H query heads, G KV heads, K head dim, V vocabulary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dropup import balancing
from dropup.config import ModelConfig, MoEConfig, check_pair
from dropup.moe import (BalanceStats, MoELayer, StepLoads, SwiGLU, expert_similarity, load_balancing_loss,
                        router_z_loss)
from dropup.tensors import full


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 and scale in the input dtype, the rounding transformers' Llama uses.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """RoPE's K/2 inverse frequencies theta^(-2i/K), rescaled as `cfg.rope_scaling` says.

    `linear` divides every frequency by `factor` (position interpolation). `llama3` (Llama 3.1) divides only the
    low frequencies: wavelengths longer than original_max_position_embeddings / low_freq_factor are stretched by
    `factor`, those shorter than original_max_position_embeddings / high_freq_factor are kept, and in between the
    two are blended linearly in context / wavelength.
    """
    K = cfg.d_head
    inv_freq_K2 = 1.0 / (cfg.rope_theta ** (torch.arange(0, K, 2, device=device, dtype=torch.float32) / K))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq_K2 / float(scaling["factor"])
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        context = float(scaling["original_max_position_embeddings"])
        wavelength_K2 = 2 * math.pi / inv_freq_K2
        keep_K2 = ((context / wavelength_K2 - low) / (high - low)).clamp(0.0, 1.0)  # 0: stretch, 1: keep
        return (1 - keep_K2) * inv_freq_K2 / factor + keep_K2 * inv_freq_K2
    return inv_freq_K2


def rope_cos_sin(seq_len: int, cfg: ModelConfig, device=None):
    inv_freq_K2 = rope_inv_freq(cfg, device)
    angles_SK2 = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_K2)
    angles_SK = torch.cat([angles_SK2, angles_SK2], dim=-1)
    return angles_SK.cos(), angles_SK.sin()


def apply_rope(x_BHSK: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> torch.Tensor:
    first, second = x_BHSK.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x_BHSK * cos_SK.to(x_BHSK.dtype) + rotated * sin_SK.to(x_BHSK.dtype)


class Attention(nn.Module):
    """Grouped-query attention, softmax(q k^T * scale) v with scale = `attention_multiplier` (Granite) or
    1/sqrt(K). With `qk_norm`, q and k are RMS-normalized before RoPE: per head (Qwen3, one gain vector of K shared
    by the heads) or, with `qk_norm_width: full`, over the whole projection (OLMo-2: H*K and G*K gains, the
    statistic taken over all heads together)."""

    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, window
        self.scale = cfg.attention_multiplier  # None: SDPA's own 1/sqrt(K)
        K = cfg.d_head
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * K, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * K, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * K, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * K, cfg.d_model, bias=False)
        self.qk_norm_full = cfg.qk_norm and cfg.qk_norm_width == "full"
        q_width, k_width = (cfg.n_heads * K, cfg.n_kv_heads * K) if self.qk_norm_full else (K, K)
        self.q_norm = RMSNorm(q_width, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSX, k_BSY = self.wq(x_BSD), self.wk(x_BSD)  # X = H*K, Y = G*K
        if self.qk_norm_full:
            q_BSX, k_BSY = self.q_norm(q_BSX), self.k_norm(k_BSY)
        q_BSHK = q_BSX.view(B, S, self.n_heads, self.head_dim)
        k_BSGK = k_BSY.view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q_BSHK, k_BSGK = self.q_norm(q_BSHK), self.k_norm(k_BSGK)
        q_BHSK, k_BGSK = q_BSHK.transpose(1, 2), k_BSGK.transpose(1, 2)
        v_BGSK = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSK, k_BGSK = apply_rope(q_BHSK, cos_SK, sin_SK), apply_rope(k_BGSK, cos_SK, sin_SK)
        mask_SS = None
        if self.window is not None and S > self.window:
            # a query attends to itself and the window - 1 keys before it
            pos_S = torch.arange(S, device=x_BSD.device)
            offset_SS = pos_S[:, None] - pos_S[None, :]
            mask_SS = (offset_SS >= 0) & (offset_SS < self.window)
        out_BHSK = F.scaled_dot_product_attention(
            q_BHSK, k_BGSK, v_BGSK, attn_mask=mask_SS, is_causal=mask_SS is None, scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out_BHSK.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    """One transformer block, h = x + m * b_attn(x), out = h + m * b_ffn(h), where a branch is b(x) = f(norm(x))
    (pre-norm, the paper's) or, with `post_norm` (OLMo-2), b(x) = norm(f(x)), and m is `residual_multiplier`
    (Granite; 1 elsewhere). Returns the block's output and, for an MoE block, what its router chose (`Routing`),
    so that nothing outside the call is mutated: with activation checkpointing the block runs twice."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, cfg.window_of(layer))
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_norm, self.residual_multiplier = cfg.post_norm, cfg.residual_multiplier
        self.is_moe = moe is not None and moe.enabled
        self.ffn = MoELayer(cfg.d_model, moe.expert_d_ff(cfg), moe) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)
        # Per-block activation checkpointing: keep only the block's input, recompute the rest in the backward.
        # Applied inside forward, so that hooks on the block's call (FSDP's all-gathers) stay outside the region.
        self.checkpointing = False

    def forward(self, x_BSD, cos_SK, sin_SK):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BSD, cos_SK, sin_SK, use_reentrant=False)
        return self._forward(x_BSD, cos_SK, sin_SK)

    def _branch_input(self, norm: RMSNorm, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD if self.post_norm else norm(x_BSD)

    def _branch_output(self, norm: RMSNorm, y_BSD: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            y_BSD = norm(y_BSD)
        # skipped at 1 so that a model without the multiplier runs exactly the paper's operations
        return y_BSD * self.residual_multiplier if self.residual_multiplier != 1.0 else y_BSD

    def _forward(self, x_BSD, cos_SK, sin_SK):
        attn_BSD = self.attn(self._branch_input(self.attn_norm, x_BSD), cos_SK, sin_SK)
        h_BSD = x_BSD + self._branch_output(self.attn_norm, attn_BSD)
        ffn_in_BSD = self._branch_input(self.ffn_norm, h_BSD)
        if not self.is_moe:
            return h_BSD + self._branch_output(self.ffn_norm, self.ffn(ffn_in_BSD)), None
        experts, balance = [], []
        y_TD, logits_TE = self.ffn(ffn_in_BSD.reshape(-1, ffn_in_BSD.shape[-1]), experts, balance)
        out_BSD = h_BSD + self._branch_output(self.ffn_norm, y_TD.view_as(h_BSD))
        return out_BSD, Routing(logits_TE, experts[0], balance[0])


class Routing(NamedTuple):
    """One MoE layer's routing in a forward pass: router logits (T, E), chosen experts (T, K), balance inputs."""

    logits_TE: torch.Tensor
    experts_TK: torch.Tensor
    balance: BalanceStats


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean next-token cross-entropy without an fp32 copy of the (tokens x vocab) logits.

    Rows are processed in chunks, each through one fused fp32 (log-)softmax kernel: the forward keeps nothing
    but the logits, and the backward writes (softmax - one_hot) / N straight into a gradient of the logits' own
    dtype. Same value
    and gradient as `F.cross_entropy(logits.float(), targets)`, with a fraction of the memory traffic.
    """

    CHUNK_ROWS = 512

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        nll_N = torch.empty(logits_NV.shape[0], dtype=torch.float32, device=logits_NV.device)
        for start in range(0, logits_NV.shape[0], ChunkedCrossEntropy.CHUNK_ROWS):
            rows = slice(start, start + ChunkedCrossEntropy.CHUNK_ROWS)
            logp = torch.log_softmax(logits_NV[rows], dim=-1, dtype=torch.float32)
            nll_N[rows] = -logp.gather(1, targets_N[rows, None]).squeeze(1)
        ctx.save_for_backward(logits_NV, targets_N)
        return nll_N.mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits_NV, targets_N = ctx.saved_tensors
        n = logits_NV.shape[0]
        grad_NV = torch.empty_like(logits_NV)
        scale = grad_output.float() / n
        for start in range(0, n, ChunkedCrossEntropy.CHUNK_ROWS):
            rows = slice(start, start + ChunkedCrossEntropy.CHUNK_ROWS)
            probs = torch.softmax(logits_NV[rows], dim=-1, dtype=torch.float32)
            probs[torch.arange(probs.shape[0], device=probs.device), targets_N[rows]] -= 1.0
            grad_NV[rows] = probs.mul_(scale).to(grad_NV.dtype)
        return grad_NV, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ChunkedCrossEntropy.apply(logits.flatten(0, -2), targets.flatten())


@dataclass
class ModelOutput:
    logits: torch.Tensor
    router_logits: list[torch.Tensor] = field(default_factory=list)
    router_experts: list[torch.Tensor] = field(default_factory=list)  # each MoE layer's chosen experts (T, K)
    router_balance: list[BalanceStats] = field(default_factory=list)  # the balance loss's inputs, from routing


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None):
        super().__init__()
        check_pair(cfg, moe)
        self.cfg, self.moe = cfg, (moe if moe is not None and moe.enabled else None)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, self.moe, layer) for layer in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # tied: the output projection is tok_emb.weight itself (one tensor in the state dict, no `lm_head.weight`)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper section 4: every weight matrix N(0, 0.02), RMSNorm gains 1 (global RNG; the seeded,
        order-independent version is `dropup.init.scratch`)."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, self.cfg.init_std)

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        cos_SK, sin_SK = rope_cos_sin(tokens_BS.shape[1], self.cfg, tokens_BS.device)
        x_BSD = self.tok_emb(tokens_BS)
        if self.cfg.embedding_multiplier != 1.0:  # Granite
            x_BSD = x_BSD * self.cfg.embedding_multiplier
        routings: list[Routing] = []
        for block in self.layers:
            x_BSD, routing = block(x_BSD, cos_SK, sin_SK)
            if routing is not None:
                routings.append(routing)
        router_logits = [r.logits_TE for r in routings]
        router_experts = [r.experts_TK for r in routings]
        router_balance = [r.balance for r in routings]
        normed_BSD = self.norm(x_BSD)
        logits_BSV = self.lm_head(normed_BSD) if self.lm_head is not None else F.linear(normed_BSD, self.tok_emb.weight)
        if self.cfg.logits_scaling != 1.0:  # Granite
            logits_BSV = logits_BSV / self.cfg.logits_scaling
        return ModelOutput(logits_BSV, router_logits, router_experts, router_balance)

    def losses(self, out: ModelOutput, targets_BS: torch.Tensor, step_loads: StepLoads | None = None
               ) -> dict[str, torch.Tensor]:
        """Next-token loss plus the weighted MoE auxiliary losses. `lb_loss` is reported unweighted, and in
        `aux_free` mode only reported (its bias balances the load instead). `step_loads`: global_batch's counts
        over the optimizer step's micro-batches so far (`dropup.moe.load_balancing_loss`)."""
        lm_loss = cross_entropy(out.logits, targets_BS)
        result = {"lm_loss": lm_loss, "loss": lm_loss}
        if self.moe is not None:
            lb = load_balancing_loss(out.router_logits, self.moe.top_k, self.moe.lb_mode, out.router_experts,
                                     out.router_balance, step_loads)
            result["lb_loss"] = lb
            if balancing.mode(self.moe.lb_mode).trains_loss:
                result["loss"] = lm_loss + self.moe.lb_coef * lb
            if self.moe.z_coef > 0:
                z = router_z_loss(out.router_logits)
                result["z_loss"] = z
                result["loss"] = result["loss"] + self.moe.z_coef * z
        return result

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Per block: keep each block's input only and recompute its activations in the backward (same numbers,
        about a third more compute)."""
        for block in self.layers:
            block.checkpointing = enabled

    def update_expert_bias(self, load_LE: torch.Tensor) -> None:
        """aux_free: every layer's bias step from the (layers, experts) loads of one optimizer step."""
        for block, load_E in zip(self.layers, load_LE):
            block.ffn.update_expert_bias(load_E, self.moe.bias_update_rate)

    def complete_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` made to fit this model's routing-bias buffers: a zero bias where the state has none (a model
        upcycled or trained without aux_free), and a bias this model does not route with dropped (with a warning
        if it was not zero: the model then routes differently)."""
        want = {k for k in self.state_dict() if k.endswith("ffn.expert_bias")}
        out = {k: v for k, v in state.items() if not k.endswith("ffn.expert_bias") or k in want}
        dropped = [k for k in state if k.endswith("ffn.expert_bias") and k not in want and bool(state[k].any())]
        if dropped:
            logging.getLogger(__name__).warning(
                "the starting weights carry aux_free routing biases (%s, ...) that this model (moe.lb_mode=%s) "
                "does not use: it routes without them", dropped[0], self.moe.lb_mode if self.moe else "dense")
        for name in want - set(out):
            out[name] = torch.zeros(self.moe.num_experts)
        return out

    def expert_similarity(self) -> list[float]:
        """Per layer, the experts' mean pairwise cosine similarity (`dropup.moe.expert_similarity`)."""
        # sharded under trainer=fsdp: gathered layer by layer (a collective: every rank calls this)
        return [expert_similarity(full(b.ffn.w_gate_up), full(b.ffn.w_down), self.moe.granularity)
                for b in self.layers]

    def tokens_per_expert(self) -> torch.Tensor:
        """(layers, experts) assignment counts of the last forward pass."""
        return torch.stack([b.ffn.tokens_per_expert for b in self.layers])
