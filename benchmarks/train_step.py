"""Training-step throughput and model FLOPs utilisation against this machine's bf16 GEMM speed.

One process measures (1) a bf16 2048x2048 matrix product and (2) full training steps (forward, backward, AdamW)
of a preset under bf16 autocast, interleaved after warm-up. Model FLOPs per step are the paper's Table 3 formula
x3; the utilisation is achieved model FLOP/s over the measured GEMM FLOP/s. Last line: one JSON object.

    python benchmarks/train_step.py --model small --moe mixtral
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dropup.config import architecture
from dropup.flops import forward_flops_per_sequence, param_counts
from dropup.model import Transformer
from dropup.stages import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"


def presets(model: str, moe: str):
    """The typed model/MoE configs of `run.py model=... moe=...` (the same composition, presets derived alike)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return architecture(compose(config_name="config", overrides=[f"model={model}", f"moe={moe}"]))


def gemm_seconds(n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--moe", default="mixtral")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_cfg, moe_cfg = presets(args.model, args.moe)
    model = Transformer(model_cfg, moe_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.seq_len))

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model.losses(model(x), x)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step_s, gemm_s = [], []
    for rep in range(args.warmup + args.reps):
        s, g = step(), gemm_seconds()
        if rep >= args.warmup:
            step_s.append(s)
            gemm_s.append(g)
    step_med, gemm_med = statistics.median(step_s), statistics.median(gemm_s)
    tokens = args.batch_size * args.seq_len
    model_flops = 3 * forward_flops_per_sequence(model_cfg, moe_cfg, args.seq_len) * args.batch_size
    gemm_flops_per_s = 2 * 2048**3 / gemm_med
    result = {
        "model": args.model, "moe": args.moe, **param_counts(model_cfg, moe_cfg),
        "step_ms": round(step_med * 1e3, 2), "tokens_per_s": round(tokens / step_med),
        "model_gflops_per_s": round(model_flops / step_med / 1e9, 1),
        "gemm_bf16_gflops_per_s": round(gemm_flops_per_s / 1e9, 1),
        "model_flops_vs_gemm": round(model_flops / step_med / gemm_flops_per_s, 3),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": torch.get_num_threads(),
    }
    print(f"{args.model}/{args.moe}: {result['tokens_per_s']} tokens/s, {result['model_gflops_per_s']} model "
          f"GFLOP/s = {result['model_flops_vs_gemm']:.1%} of a bf16 2048^2 GEMM ({result['gemm_bf16_gflops_per_s']} GFLOP/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
