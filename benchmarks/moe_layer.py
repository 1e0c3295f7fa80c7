"""Forward+backward time of one MoE layer: ours vs transformers' MixtralSparseMoeBlock vs the ideal.

The ideal is one dense SwiGLU over tokens x top-k rows -- the same FLOPs as the experts, as one big GEMM per
matrix, with no routing, sorting or scattering. All three run in this process on the same inputs, interleaved
repetition by repetition after warm-up; medians are reported. The last line printed is one JSON object.

    python benchmarks/moe_layer.py --tokens 4096 --d-model 512 --d-ff 2048 --experts 8 --top-k 2 --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dropup.config import ModelConfig, MoEConfig
from dropup.hf import hf_config
from dropup.moe.backends import SORTED_GEMMS, swiglu
from dropup.moe.layer import MoELayer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class IdealSwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.w_gate_up = nn.Parameter(torch.randn(2 * d_ff, d_model) * 0.02)
        self.w_down = nn.Parameter(torch.randn(d_model, d_ff) * 0.02)

    def forward(self, x_TD):
        x_AD = x_TD.repeat(self.top_k, 1)
        # the same activation code as the MoE layer, so the comparison isolates routing and dispatch
        return F.linear(swiglu(F.linear(x_AD, self.w_gate_up)), self.w_down)


def transformers_block(args, dtype):
    from transformers import MixtralForCausalLM

    model_cfg = ModelConfig(vocab_size=16, n_layers=1, d_model=args.d_model, d_ff=args.d_ff, n_heads=8, n_kv_heads=8)
    moe = MoEConfig(enabled=True, num_experts=args.experts, top_k=args.top_k)
    # Built inside a model so the block gets transformers' default experts implementation.
    model = MixtralForCausalLM(hf_config(model_cfg, moe))
    return model.model.layers[0].mlp.to(dtype), model.config._experts_implementation


def backend_variant(layer: MoELayer, backend: str) -> MoELayer:
    """The same layer (shared weights) on another of our backends."""
    variant = copy.copy(layer)
    variant.backend = backend
    return variant


def backend_list(text: str) -> list[str]:
    backends = [b for b in text.split(",") if b]
    unknown = [b for b in backends if b not in (*SORTED_GEMMS, "loop")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown}: choose from {[*SORTED_GEMMS, 'loop']}")
    return backends


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(fn, x, params):
    x = x.detach().requires_grad_(True)
    synchronize(x.device)
    start = time.perf_counter()
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))
    synchronize(x.device)
    elapsed = time.perf_counter() - start
    for p in params:
        p.grad = None
    return elapsed * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--also", type=backend_list, default=[], help="more of our backends to time beside "
                        "grouped, comma-separated (sliced,padded,loop: the candidates where no grouped GEMM runs)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: glibc's default allocator, not the tuning CPU training runs apply (dropup.cpu)")
    parser.add_argument("--skew", type=float, default=0.0,
                        help="router logits get +skew*e for expert e: uneven loads (0: the random router's)")
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    malloc = "system"
    if device.type == "cpu":
        from dropup.cpu import BF16_EMULATED_ABOVE, bf16_slowdown, keep_freed_memory

        if not args.system_malloc and keep_freed_memory():  # as a CPU training run does
            malloc = "kept"
        if dtype == torch.bfloat16 and bf16_slowdown() > BF16_EMULATED_ABOVE:
            reason = f"this CPU emulates bf16 (matrix products {bf16_slowdown():.0f}x slower than fp32)"
            print(f"bf16 skipped: {reason}; the fp32 line measures the code")
            print(json.dumps({"dtype": args.dtype, "skipped": reason}))
            return
    torch.manual_seed(0)

    ours = MoELayer(args.d_model, args.d_ff, MoEConfig(enabled=True, num_experts=args.experts, top_k=args.top_k))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    ours = ours.to(device, dtype)
    theirs, implementation = transformers_block(args, dtype)
    theirs = theirs.to(device)
    with torch.no_grad():
        ours.router.weight.add_(args.skew * torch.arange(args.experts, dtype=dtype, device=device)[:, None]
                                / math.sqrt(args.d_model))  # x ~ N(0, 1): +skew*e/sqrt(D) * sum(x) adds ~skew*e
    theirs.gate.weight.data.copy_(ours.router.weight.data)
    theirs.experts.gate_up_proj.data.copy_(ours.w_gate_up.data)
    theirs.experts.down_proj.data.copy_(ours.w_down.data)
    ideal = IdealSwiGLU(args.d_model, args.d_ff, args.top_k).to(device, dtype)
    x_TD = torch.randn(args.tokens, args.d_model, dtype=dtype, device=device)

    with torch.no_grad():  # same weights: same function
        y_ours = ours(x_TD)[0].float()
        loads = ours.tokens_per_expert.clone()
        diff = (y_ours - theirs(x_TD[None]).float()[0]).abs().max().item()
        backend_diffs = {f"ours_{b}_max_abs_diff": (backend_variant(ours, b)(x_TD)[0].float() - y_ours).abs().max().item()
                         for b in args.also}

    candidates = {
        "ours": (ours, list(ours.parameters())),
        **{f"ours_{backend}": (backend_variant(ours, backend), list(ours.parameters()))
           for backend in args.also},
        "transformers": (lambda x: theirs(x[None]), list(theirs.parameters())),
        "ideal": (ideal, list(ideal.parameters())),
    }
    times = {name: [] for name in candidates}
    for rep in range(args.warmup + args.reps):
        for name, (fn, params) in candidates.items():
            ms = step_time(fn, x_TD, params)
            if rep >= args.warmup:
                times[name].append(ms)
    medians = {f"{name}_ms": round(statistics.median(t), 3) for name, t in times.items()}
    flops = 3 * 2 * args.tokens * args.top_k * 3 * args.d_model * args.d_ff  # fwd+bwd of the expert GEMMs
    result = {
        **medians,
        "ours_vs_ideal_speed": round(medians["ideal_ms"] / medians["ours_ms"], 3),
        "ours_vs_transformers_speed": round(medians["transformers_ms"] / medians["ours_ms"], 3),
        "ours_gflops": round(flops / medians["ours_ms"] / 1e6, 1),
        **{f"ours_{b}_vs_grouped_speed": round(medians["ours_ms"] / medians[f"ours_{b}_ms"], 3)
           for b in args.also},
        "tokens_per_expert_max_over_mean": round(float(loads.max() / loads.float().mean()), 3),
        "max_abs_diff_vs_transformers": diff, **backend_diffs,
        "transformers_experts_implementation": implementation,
        "dtype": args.dtype,
        "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
        "top_k": args.top_k, "skew": args.skew, "device": str(device), "malloc": malloc, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    for name, t in times.items():
        print(f"{name:>13}: median {statistics.median(t):8.2f} ms  (min {min(t):.2f}, max {max(t):.2f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
