"""The Mixtral MoE layer: top-k router, dropless token-choice dispatch, experts as stacked tensors.

Shapes are named in variables: T tokens, D d_model, F expert d_ff, E experts, K top-k, A = T*K assignments.
Expert weights use transformers 5's fused layout, so the Hugging Face mapping is a rename:
`w_gate_up` (E, 2F, D) holds W_gate in [:, :F] and W_up in [:, F:]; `w_down` is (E, D, F).

Routing (paper eq. 3): softmax over the top-k logits, which equals softmax over all E logits, keeping the top k
and renormalizing them -- the form transformers and moe-recipes compute, done here in fp32.

A shared expert (`moe.shared_expert_d_ff` > 0, Qwen2-MoE's layout) is a plain SwiGLU every token passes
through, added to the routed output behind an optional sigmoid gate: y = sum_k w_k E_k(x) + sigmoid(w_g . x) S(x).
It is not routed, so it has no load and takes no part in the balance losses.

Backends compute the same function:
- `grouped` sorts assignments by expert and runs two `torch._grouped_mm` calls (CPU and CUDA), where a probe on the
  actual device and dtype finds that they work, and falls back to `sliced` elsewhere (a log line says which runs);
- `sliced` is the same sorted dispatch with one matmul pair per expert slice, `padded` pads every expert to the
  busiest one's count for two batched GEMMs (the candidates where no grouped kernel runs; `sliced` was faster);
- `loop` is the readable per-expert reference;
- `megablocks` uses megablocks' grouped GEMM where that optional package imports.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dropup.config import ConfigError, MoEConfig

log = logging.getLogger(__name__)


def route(x_TD: torch.Tensor, w_router_ED: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None):
    """Return router logits (T, E), the renormalized top-k weights (T, K, fp32) and expert ids (T, K).

    `bias_E` (auxiliary-loss-free balancing) is added to the probabilities to choose the top k only: the weights
    are the chosen experts' unbiased probabilities, renormalized."""
    logits_TE, _, weights_TK, experts_TK = _route(x_TD, w_router_ED, top_k, bias_E)
    return logits_TE, weights_TK, experts_TK


def _route(x_TD, w_router_ED, top_k, bias_E=None):
    """`route`, also returning the fp32 probabilities (T, E) the balance loss needs."""
    logits_TE = F.linear(x_TD, w_router_ED)
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if bias_E is None:
        weights_TK, experts_TK = torch.topk(probs_TE, top_k, dim=-1)
    else:
        experts_TK = torch.topk(probs_TE + bias_E, top_k, dim=-1).indices
        weights_TK = probs_TE.gather(-1, experts_TK)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return logits_TE, probs_TE, weights_TK, experts_TK


class SwiGLU(nn.Module):
    """One SwiGLU FFN (paper eq. 1), weights in torch's (out, in) layout: W_gate, W_up (F, D), W_down (D, F). The
    dense model's FFN, and an MoE's shared expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class _SwiGLUFused(torch.autograd.Function):
    """silu(gate) * up of a fused (A, 2F) projection, lean on memory traffic, which is what the elementwise part
    of the experts costs on a CPU. Only the input is saved (silu(gate) is recomputed in the backward, so the
    layer keeps one (A, F) activation less), the forward multiplies in place, and the backward writes both
    halves' gradients straight into one (A, 2F) tensor where autograd would concatenate two. Value and gradient
    equal autograd's of `F.silu(gate) * up` bit for bit for a contiguous incoming gradient (what training passes:
    the same kernels on the same inputs); a transposed one may differ in the last bit."""

    @staticmethod
    def forward(ctx, h_A2F: torch.Tensor) -> torch.Tensor:
        gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
        ctx.save_for_backward(h_A2F)
        return F.silu(gate_AF).mul_(up_AF)

    @staticmethod
    def backward(ctx, grad_AF: torch.Tensor) -> torch.Tensor:
        (h_A2F,) = ctx.saved_tensors
        gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
        grad_A2F = torch.empty_like(h_A2F)
        grad_gate_AF, grad_up_AF = grad_A2F.chunk(2, dim=-1)
        torch.mul(grad_AF, F.silu(gate_AF), out=grad_up_AF)
        torch.mul(grad_AF, up_AF, out=grad_gate_AF)
        torch.ops.aten.silu_backward.grad_input(grad_gate_AF, gate_AF, grad_input=grad_gate_AF)
        return grad_A2F


def swiglu(h_A2F: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where h = [gate | up] along the last dimension."""
    if torch.is_grad_enabled() and h_A2F.requires_grad:
        return _SwiGLUFused.apply(h_A2F)
    gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
    return F.silu(gate_AF) * up_AF


def experts_loop(x_TD, w_gate_up_E2FD, w_down_EDF, weights_TK, experts_TK):
    """Reference: one pair of matmuls per expert over the tokens routed to it."""
    y_TD = torch.zeros_like(x_TD)
    for e in range(w_gate_up_E2FD.shape[0]):
        token_idx, k_idx = torch.where(experts_TK == e)
        if token_idx.numel() == 0:
            continue
        h_AF = swiglu(F.linear(x_TD[token_idx], w_gate_up_E2FD[e]))
        out_AD = F.linear(h_AF, w_down_EDF[e]) * weights_TK[token_idx, k_idx, None]
        y_TD.index_add_(0, token_idx, out_AD.to(y_TD.dtype))
    return y_TD


def experts_sorted(x_TD, w_gate_up_E2FD, w_down_EDF, weights_TK, experts_TK, counts_E, gemms):
    """Sort assignments by expert, run the experts as `gemms(x_sorted_AD, counts_E, w_gate_up, w_down)` (one of
    `SORTED_GEMMS`), then combine each token's k outputs.

    Gather and un-sort are `index_select`s (their backward is a plain index_add, cheaper than indexing's
    accumulate-put), and the weighted sum of a token's k outputs is one batched matmul: no scatter-add, so the
    result is deterministic on every device.
    """
    T, K = experts_TK.shape
    order_A = torch.argsort(experts_TK.reshape(-1), stable=True)
    out_AD = gemms(x_TD.index_select(0, order_A // K), counts_E, w_gate_up_E2FD, w_down_EDF)
    inverse_A = torch.empty_like(order_A)
    inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    out_TKD = out_AD.index_select(0, inverse_A).view(T, K, out_AD.shape[-1])
    return combine(weights_TK, out_TKD, x_TD.dtype)


def combine(weights_TK: torch.Tensor, out_TKD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each token's weighted sum of its k expert outputs, in fp32 (the router weights' precision) even under
    autocast, which would otherwise run the bmm in bf16 and round the weights; rounded once to `dtype`."""
    with torch.autocast(out_TKD.device.type, enabled=False):
        return torch.bmm(weights_TK.float().unsqueeze(1), out_TKD.float()).squeeze(1).to(dtype)


# The experts over expert-sorted tokens x_AD (counts_E rows per expert, in expert order), one function per backend.

def grouped_gemms(x_AD, counts_E, w_gate_up_E2FD, w_down_EDF):
    """Native grouped GEMMs (`torch._grouped_mm`)."""
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    h_AF = swiglu(torch._grouped_mm(x_AD, w_gate_up_E2FD.transpose(-2, -1), offs=offs_E))
    return torch._grouped_mm(h_AF, w_down_EDF.transpose(-2, -1), offs=offs_E)


def sliced_gemms(x_AD, counts_E, w_gate_up_E2FD, w_down_EDF):
    """One plain matmul pair per expert on its contiguous slice: the grouped GEMM written out, for devices and
    dtypes without that kernel (one host sync for the counts)."""
    # unbind, not w[e]: indexing a stacked parameter E times costs E full-size zero gradients in the backward
    pairs = zip(x_AD.split(counts_E.tolist()), w_gate_up_E2FD.unbind(0), w_down_EDF.unbind(0))
    return torch.cat([F.linear(swiglu(F.linear(x_nD, w_gate_up_2FD)), w_down_DF)
                      for x_nD, w_gate_up_2FD, w_down_DF in pairs])


def padded_gemms(x_AD, counts_E, w_gate_up_E2FD, w_down_EDF):
    """Every expert padded to the busiest one's count C, as two batched GEMMs over (E, C, D): the fewest kernel
    launches, at the cost of E * C - A rows of zeros (more when routing is uneven)."""
    (E,), (A, D) = counts_E.shape, x_AD.shape
    capacity = int(counts_E.max())
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_A = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts_E, output_size=A)
    row_A = expert_A * capacity + torch.arange(A, device=x_AD.device) - starts_E[expert_A]
    x_ECD = x_AD.new_zeros(E * capacity, D).index_copy(0, row_A, x_AD).view(E, capacity, D)
    h_EC2F = torch.bmm(x_ECD, w_gate_up_E2FD.transpose(-2, -1))
    out_ECD = torch.bmm(swiglu(h_EC2F), w_down_EDF.transpose(-2, -1))
    return out_ECD.reshape(E * capacity, D).index_select(0, row_A)


def megablocks_gemms(x_AD, counts_E, w_gate_up_E2FD, w_down_EDF):
    """megablocks' grouped GEMM kernel (optional dependency; CUDA only)."""
    try:
        from megablocks import grouped_gemm_util as gg
    except ImportError as err:  # pragma: no cover - exercised only where megablocks is absent
        raise ConfigError(
            "moe.backend=megablocks needs the optional megablocks package (CUDA only); "
            "install it or use moe.backend=grouped"
        ) from err
    batch_sizes = counts_E.cpu()
    h_AF = swiglu(gg.ops.gmm(x_AD, w_gate_up_E2FD, batch_sizes, trans_b=True))
    return gg.ops.gmm(h_AF, w_down_EDF, batch_sizes, trans_b=True)


SORTED_GEMMS = {"grouped": grouped_gemms, "sliced": sliced_gemms, "padded": padded_gemms,
                "megablocks": megablocks_gemms}


@functools.cache
def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs, and gives each group's plain product, on this device and dtype: probed
    once per process (kernels come and go with the device's generation and the torch build, so no table of
    versions is trusted), on a small problem with an empty group in it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g)
    w = torch.randn(3, 16, 16, generator=g)
    with torch.autocast("cpu", enabled=False):  # called from a forward pass, maybe under CPU autocast
        want = torch.cat([x[:8] @ w[0].T, x[8:] @ w[2].T])  # group 1 is empty
    try:
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        got = torch._grouped_mm(x.to(device, dtype), w.to(device, dtype).transpose(-2, -1), offs=offs)
        return bool(torch.allclose(got.float().cpu(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


_announced: set[tuple] = set()


def announce_backends_again() -> None:
    """Log the backend choice again at the next forward pass (a new run in the same process has a log of its own)."""
    _announced.clear()


# Where the grouped GEMM does not run, `sliced` was the fastest of the alternatives measured (`make bench`'s
# fallback line, fp32 on 2 CPU cores, uneven loads at 1.94x the mean): 0.95x grouped's speed, `padded` 0.48x (it
# computes the padding), `loop` 0.49x (its per-expert weight indexing costs full-size gradients).
FALLBACK = "sliced"


def effective_backend(configured: str, x: torch.Tensor) -> str:
    """The backend that actually runs for `x`: `grouped` falls back to `FALLBACK` where the grouped GEMM does not
    work (the probe above); one log line per process names the choice for each device and dtype."""
    backend = configured
    if configured == "grouped" and not grouped_mm_works(x.device, x.dtype):
        backend = FALLBACK
    key = (configured, backend, x.device, x.dtype)
    if key not in _announced:
        _announced.add(key)
        why = "" if backend == configured else f" (torch._grouped_mm does not run here: {backend} instead)"
        log.info("MoE experts on %s in %s: backend %s%s", x.device, str(x.dtype).removeprefix("torch."), backend, why)
    return backend


class MoELayer(nn.Module):
    """Router + E SwiGLU experts (+ an optional shared expert). `forward` returns the output and the router
    logits (for the aux losses)."""

    def __init__(self, d_model: int, expert_d_ff: int, moe: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k, self.backend = moe.num_experts, moe.top_k, moe.backend
        self.router = nn.Linear(d_model, moe.num_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(moe.num_experts, 2 * expert_d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(moe.num_experts, d_model, expert_d_ff))
        # Assignments per expert in the last forward pass, for routing analysis (no autograd, no sync).
        self.register_buffer("tokens_per_expert", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False)
        self.shared_expert = SwiGLU(d_model, moe.shared_expert_d_ff) if moe.shared_expert_d_ff else None
        self.shared_expert_gate = (nn.Linear(d_model, 1, bias=False)
                                   if self.shared_expert is not None and moe.shared_expert_gate else None)
        # aux_free balancing's per-expert routing bias: state (checkpointed, resumed), not a parameter
        if moe.lb_mode == "aux_free":
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's step: lower the bias of every expert above the mean load by `rate`, raise it for those
        below (`load_E`: the step's assignments, summed over ranks so every rank takes the same step)."""
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))

    def forward(self, x_TD: torch.Tensor, choices: list | None = None, balance: list | None = None):
        """The layer's output and router logits. If given, the chosen experts (T, K) are appended to `choices`
        and the balance-loss statistics (`BalanceStats`) to `balance`."""
        y_TD, logits_TE = self.routed(x_TD, choices, balance)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD.to(y_TD.dtype)
        return y_TD, logits_TE

    def routed(self, x_TD: torch.Tensor, choices: list | None = None, balance: list | None = None):
        """The routed experts' weighted sum, and the router logits."""
        logits_TE, probs_TE, weights_TK, experts_TK = _route(x_TD, self.router.weight, self.top_k, self.expert_bias)
        # one count serves the dispatch, the routing analysis and the balance loss
        counts_E = torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)
        if choices is not None:
            choices.append(experts_TK)
        if balance is not None:
            balance.append(BalanceStats(counts_E.float(), probs_TE.sum(dim=0), probs_TE.shape[0]))
        w_gate_up, w_down = self.w_gate_up, self.w_down
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):
            # Grouped GEMMs are not autocast ops: cast explicitly, as autocast does for F.linear.
            dtype = torch.get_autocast_dtype(device_type)
            x_TD, w_gate_up, w_down = x_TD.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        backend = effective_backend(self.backend, x_TD)
        if backend == "loop":
            y_TD = experts_loop(x_TD, w_gate_up, w_down, weights_TK, experts_TK)
        else:
            y_TD = experts_sorted(x_TD, w_gate_up, w_down, weights_TK, experts_TK, counts_E, SORTED_GEMMS[backend])
        with torch.no_grad():
            self.tokens_per_expert.copy_(counts_E)
        return y_TD, logits_TE


class BalanceStats(NamedTuple):
    """One layer's input to the balance loss: top-k assignments per expert (fp32), the router probabilities
    summed over tokens per expert (fp32, differentiable) and the number of tokens."""

    counts_E: torch.Tensor
    prob_sums_E: torch.Tensor
    rows: int


def _assignment_stats(logits_TE: torch.Tensor, top_k: int, experts_TK: torch.Tensor | None = None) -> BalanceStats:
    """`BalanceStats` recomputed from a layer's logits. `experts_TK`: the choices the layer made (aux_free's bias
    changes them); by default the top k of the logits."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if experts_TK is None:
        experts_TK = torch.topk(probs_TE, top_k, dim=-1).indices
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=logits_TE.shape[-1]).float()
    return BalanceStats(counts_E, probs_TE.sum(dim=0), logits_TE.shape[0])


class StepLoads:
    """global_batch's running selection counts over the micro-batches of one optimizer step, every rank's
    included: `reset` at a step's first micro-batch, `add` at each (Megatron-Core keeps the same sums over its
    gradient-accumulation steps). Nothing to checkpoint: checkpoints fall between steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.counts_E: torch.Tensor | None = None
        self.rows: torch.Tensor | int = 0

    def add(self, counts_E: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor | int]:
        """Add one micro-batch's (all-rank) counts; return the sums over the step so far."""
        counts_E = counts_E.detach()
        self.counts_E = counts_E if self.counts_E is None else self.counts_E + counts_E
        self.rows = self.rows + rows
        return self.counts_E, self.rows


def _sum_over_ranks(counts_E: torch.Tensor, probs_E: torch.Tensor, rows: int):
    """global_batch: the loads, summed probabilities and token counts of every data-parallel rank. The probability
    sum is all-reduced differentiably, so each rank's gradient reaches every rank's router; after DDP averages
    the ranks' gradients, a step of one micro-batch per rank equals pooled on the concatenated batch in one
    process (with several, the probabilities are each micro-batch's: `load_balancing_loss`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts_E, probs_E, rows
    from torch.distributed.nn.functional import all_reduce

    counts_E = counts_E.detach().clone()
    dist.all_reduce(counts_E)
    rows_t = torch.tensor([float(rows)], device=counts_E.device)
    dist.all_reduce(rows_t)
    return counts_E, all_reduce(probs_E), rows_t[0]


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mode: str = "pooled",
                        experts: list[torch.Tensor] | None = None,
                        stats: list[BalanceStats] | None = None,
                        step_loads: StepLoads | None = None) -> torch.Tensor:
    """Switch-Transformer balance loss, E * sum_e f_e * P_e, unweighted (equals top_k at perfect balance).

    f_e is the share of top-k assignments that go to expert e (summed over the k slots, so sum_e f_e = k) and P_e
    the mean router probability of e; `experts` are the layers' actual choices (default: the logits' top k).
    - `pooled` computes it once over all layers' tokens concatenated (transformers' `load_balancing_loss_func`,
      what the paper's runs used), per forward pass: each rank pools its own micro-batch's tokens;
    - `per_layer` computes it per layer and averages, so the coefficient means the same in both modes;
    - `global_batch` balances the whole optimizer step (Qiu et al. 2025; Megatron-Core's global aux loss). At
      micro-batch k of a step, f_e counts the assignments of micro-batches 0..k on every data-parallel rank
      (`step_loads`, reset each step; counts all-reduced), and P_e is the mean probability over micro-batch k on
      every rank (the probability sums all-reduced differentiably). So the last micro-batch's f_e is the whole
      step's, and with one micro-batch per step (or without `step_loads`) this is `pooled` over all ranks' tokens:
      on one process, `pooled`;
    - `aux_free` is computed like `pooled`, for the log: that mode does not train on it.
    """
    num_experts = router_logits[0].shape[-1]
    if not stats:  # what the layers recorded while routing, or else recomputed from their logits
        experts = experts if experts else [None] * len(router_logits)
        stats = [_assignment_stats(logits, top_k, chosen) for logits, chosen in zip(router_logits, experts)]
    if mode in ("pooled", "global_batch", "aux_free"):
        rows = sum(n for _, _, n in stats)
        counts_E, probs_E = sum(c for c, _, _ in stats), sum(p for _, p, _ in stats)
        freq_counts_E, freq_rows = counts_E, rows
        if mode == "global_batch":
            counts_E, probs_E, rows = _sum_over_ranks(counts_E, probs_E, rows)
            freq_counts_E, freq_rows = step_loads.add(counts_E, rows) if step_loads is not None else (counts_E, rows)
        return num_experts * torch.sum((freq_counts_E / freq_rows) * (probs_E / rows))
    if mode == "per_layer":
        losses = [num_experts * torch.sum((c / n) * (p / n)) for c, p, n in stats]
        return torch.stack(losses).mean()
    raise ConfigError(f"unknown load-balancing mode {mode!r}; use one of pooled, per_layer, global_batch, aux_free")


def expert_similarity(w_gate_up_E2FD: torch.Tensor, w_down_EDF: torch.Tensor, granularity: int = 1) -> float:
    """Mean pairwise cosine similarity of experts' weights (W_gate, W_up and W_down flattened and concatenated),
    over the pairs of experts built from the same FFN part (e mod G equal; for G = 1 all pairs): 1 when they are
    copies (naive Upcycling), about (1 - r)^2 after Drop-Upcycling of zero-mean weights, about 0 from scratch.
    Computed from the experts' Gram matrix, without copying the weights. Not invariant to permuting neurons, so
    meaningless after `init.shuffle: true`. NaN with fewer than two experts per part."""
    with torch.no_grad(), torch.autocast(w_down_EDF.device.type, enabled=False):
        gram_EE = sum(w.flatten(1).float() @ w.flatten(1).float().T for w in (w_gate_up_E2FD, w_down_EDF))
        norms_E = gram_EE.diagonal().clamp_min(1e-30).sqrt()
        cos_EE = gram_EE / (norms_E[:, None] * norms_E[None, :])
        means = []
        for part in range(granularity):
            block = cos_EE[part::granularity, part::granularity]
            n = block.shape[0]
            if n > 1:
                means.append((block.sum() - block.diagonal().sum()) / (n * (n - 1)))
        return float(torch.stack(means).mean()) if means else float("nan")


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    return torch.stack([torch.logsumexp(l.float(), dim=-1).square().mean() for l in router_logits]).mean()
