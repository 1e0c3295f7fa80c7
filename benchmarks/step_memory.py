"""Peak memory of training steps on this machine against `dropup.scaling.predict_memory`.

Trains a few fp32 steps through `run.py` (the real path: Lightning, `trainer=fsdp`) with 1 and 2 CPU processes,
with and without activation checkpointing, and compares the run's `peak_mem_gib` with the prediction of the same
quantity. On a CPU that column is how far the largest rank's resident set grew once training started (Linux
VmHWM): gradients, optimizer states, gathered parameters, activations and the loss's buffers. The fp32
parameter shards were resident before, so the prediction compared is the predicted peak less those shards.

    .venv/bin/python benchmarks/step_memory.py               # ~7 min on 2 cores; one JSON line per config
    .venv/bin/python benchmarks/step_memory.py --override model=small --override model.n_layers=2 --micro-batch 4
    .venv/bin/python benchmarks/step_memory.py --device cuda --ranks 1 --override model=152m \
        --batch 8 --micro-batch 2        # on a GPU: bf16-mixed, the allocator's peak against the whole prediction

The process's allocator and Python objects are included in what is measured and not in the prediction, so the
measurement should come out somewhat above it; the ratio is the figure of merit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A model large enough that its state (0.45 GB of fp32 parameters) dwarfs the process's own noise.
MODEL = ["model=small", "model.d_model=512", "model.d_ff=2048", "model.n_heads=8", "model.n_kv_heads=8",
         "model.n_layers=4"]


def run(overrides: list[str], ranks: int, checkpointing: bool, micro: int, steps: int, batch: int, seq_len: int,
        run_dir: Path, device: str) -> float:
    accelerator, precision = ("gpu", "bf16-mixed") if device == "cuda" else ("cpu", "32-true")
    args = [*overrides, "init=scratch", "trainer=fsdp", f"trainer.accelerator={accelerator}",
            f"trainer.devices={ranks}", f"trainer.precision={precision}", "trainer.enable_progress_bar=false",
            f"train.batch_size={batch}",
            f"train.micro_batch_size={micro}", f"train.activation_checkpointing={str(checkpointing).lower()}",
            f"train.tokens={steps * batch * seq_len}", "train.log_every=1", "train.val_every=100000",
            "train.ckpt_every=100000", "train.val_tokens=4096", "train.val_batch_size=4",
            f"hydra.run.dir={run_dir}"]
    # glibc's own malloc returns big freed blocks at once, so the high-water mark is the live peak
    env = {**os.environ, "DROPUP_CPU_MALLOC": "system"}
    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run.py failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    with open(run_dir / "metrics.csv", newline="") as f:
        peaks = [float(r["peak_mem_gib"]) for r in csv.DictReader(f) if r.get("peak_mem_gib")]
    return max(peaks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--override", action="append", default=[], help="a Hydra override (repeat); any replace the default model (MODEL)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward on each rank")
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step, over all ranks")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", default="1,2", help="process counts to measure")
    parser.add_argument("--checkpointing", default="off,on", help="activation checkpointing settings to measure")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: fp32, resident-set growth vs the prediction less the parameter shards; cuda: "
                             "bf16-mixed, the allocator's peak vs the whole prediction")
    args = parser.parse_args(argv)

    from dropup.config import architecture
    from dropup.tools.scaling import predict_memory
    from dropup.schema import compose

    overrides = args.override or MODEL  # your overrides replace the default model
    cfg = compose(overrides)
    model_cfg, moe_cfg = architecture(cfg)
    seq_len = int(cfg.data.seq_len)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(r) for r in args.ranks.split(",")]:
            for checkpointing in [c.strip() == "on" for c in args.checkpointing.split(",")]:
                micro = min(args.micro_batch, args.batch // ranks)
                measured = run(overrides, ranks, checkpointing, micro, args.steps, args.batch, seq_len,
                               Path(tmp) / f"r{ranks}-ckpt{int(checkpointing)}", args.device)
                predicted = predict_memory(model_cfg, moe_cfg, gpus=ranks, micro_batch=micro, seq_len=seq_len,
                                           checkpointing=checkpointing,
                                           precision="bf16-mixed" if args.device == "cuda" else "32-true")
                # on a CPU the parameter shards were resident before training started, so they are not measured
                resident = predicted["components"]["params_sharded"] if args.device == "cpu" else 0
                growth = (predicted["peak"] - resident) / 2**30
                row = {"device": args.device, "ranks": ranks, "checkpointing": checkpointing, "micro_batch": micro, "seq_len": seq_len,
                       "measured_gib": round(measured, 3), "predicted_gib": round(growth, 3),
                       "measured_over_predicted": round(measured / growth, 3),
                       "predicted_peak_moment": predicted["peak_moment"],
                       "predicted_total_gib": round(predicted["peak"] / 2**30, 3)}
                results.append(row)
                print(json.dumps(row), flush=True)
    print("\n| ranks | checkpointing | micro-batch | measured (GiB) | predicted (GiB) | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['ranks']} | {'yes' if r['checkpointing'] else 'no'} | {r['micro_batch']} x {r['seq_len']} | "
              f"{r['measured_gib']:.3f} | {r['predicted_gib']:.3f} | {r['measured_over_predicted']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
