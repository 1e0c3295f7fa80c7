"""The experts' computation over routed tokens: one function per `moe.backend`, all computing the same function.

Shapes: T tokens, D d_model, F expert d_ff, E experts, K top-k, A = T*K assignments. Expert weights are stacked
in transformers 5's fused layout: `w_gate_up` (E, 2F, D) holds W_gate in [:, :F] and W_up in [:, F:]; `w_down`
is (E, D, F). Each backend returns sum_k w_k E_{e_k}(x) per token:
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

import torch
import torch.nn.functional as F

from dropup.config import ConfigError

# the name the backend choice has always been logged under (a run's log filters on it)
log = logging.getLogger("dropup.moe")


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


def run_experts(backend: str, x_TD, w_gate_up_E2FD, w_down_EDF, weights_TK, experts_TK, counts_E):
    """The routed experts' weighted sum (T, D) computed by `backend` (an `effective_backend`)."""
    if backend == "loop":
        return experts_loop(x_TD, w_gate_up_E2FD, w_down_EDF, weights_TK, experts_TK)
    return experts_sorted(x_TD, w_gate_up_E2FD, w_down_EDF, weights_TK, experts_TK, counts_E, SORTED_GEMMS[backend])
