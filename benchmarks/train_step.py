"""Training-step throughput and model FLOPs utilisation, ours and transformers', on the CPU or a GPU.

A step is forward, backward, gradient clipping and AdamW over fp32 master weights, under bf16 autocast (or in
fp32). Model FLOPs per step are the paper's Table 3 formula x3; utilisation is achieved model FLOP/s over a
matrix product measured in the same process (2048^2 on a CPU, 8192^3 bf16 on a GPU, with synchronisation),
and on a GPU also over the datasheet's dense bf16 peak. Every measurement is interleaved with the others after
warm-up and reported as a median. The last line printed is one JSON object.

    python benchmarks/train_step.py --model small --moe mixtral --compare-dense     # CPU: MoE vs dense step
    python benchmarks/train_step.py --suite gpu --device cuda                        # GPU: presets vs transformers

`--compare-dense` times the MoE preset and its dense counterpart alternately and prints `moe_vs_dense`, the ratio
of their model-FLOP rates. `--suite gpu` runs the 152m preset and the 1.5b widths at 6 layers (so that the MoE,
its AdamW state and its activations fit one 80 GB GPU), dense and 8x top-2 MoE, sequence length 4096, 4
sequences per step, each beside the same step of transformers' LlamaForCausalLM / MixtralForCausalLM (its
default experts implementation, `grouped_mm`, which casts the tokens to the weights' dtype and so runs the experts
in fp32 under autocast over fp32 weights; for the MoEs its `eager` per-expert loop, which autocasts, is timed too),
one model in memory at a time; one JSON line per configuration.
`--precision auto` is bf16 autocast on a GPU and on a CPU with native bf16, and fp32 on a CPU that emulates bf16
(there a bf16 step is two orders of magnitude slower and says nothing about the code).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from dropup.config import architecture
from dropup.flops import forward_flops_per_sequence, param_counts
from dropup.schema import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"
# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s; SXM parts)
DATASHEET_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
# (label, model preset, moe preset, extra overrides) of `--suite gpu`
GPU_SUITE = [
    ("152m-dense", "152m", "none", []),
    ("8x152m-moe", "152m", "mixtral", []),
    ("1.5b-6L-dense", "1.5b", "none", ["model.n_layers=6"]),
    ("8x1.5b-6L-moe", "1.5b", "mixtral", ["model.n_layers=6"]),
]


def presets(model: str, moe: str, overrides=()):
    """The typed model/MoE configs of `run.py model=... moe=... <overrides>` (the same composition)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", f"moe={moe}", *overrides])
        return architecture(cfg)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    return 2 * n**3 / (time.perf_counter() - start)


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


class Stepper:
    """One model, its AdamW and a fixed batch; `step()` runs one training step and returns its seconds."""

    def __init__(self, kind: str, model_cfg, moe_cfg, args, device: torch.device, autocast: bool):
        self.kind, self.device, self.autocast = kind, device, autocast
        self.model_flops = 3 * forward_flops_per_sequence(model_cfg, moe_cfg, args.seq_len) * args.batch_size
        self.tokens = args.batch_size * args.seq_len
        with torch.device(device):
            self.model = build_model(kind, model_cfg, moe_cfg)
        # transformers' config names the experts implementation it runs (None for ours and for dense models)
        self.experts_implementation = getattr(getattr(self.model, "config", None), "_experts_implementation", None)
        self.params = list(self.model.parameters())
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, model_cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)

    def loss(self) -> torch.Tensor:
        if self.kind == "ours":
            return self.model.losses(self.model(self.x), self.x)["loss"]
        return self.model(input_ids=self.x, labels=self.x).loss  # with the balance loss where the config asks

    def step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start

    def close(self) -> None:
        del self.model, self.optimizer, self.params, self.x
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def build_model(kind: str, model_cfg, moe_cfg):
    """Ours, or transformers' class of the same architecture (`hf`: its default experts implementation; `hf_eager`:
    its per-expert loop of `F.linear`s)."""
    if kind == "ours":
        from dropup.model import Transformer

        return Transformer(model_cfg, moe_cfg)
    import transformers

    from dropup.hf import causal_lm_class, hf_config

    config = hf_config(model_cfg, moe_cfg)
    config._attn_implementation = "sdpa"  # ours runs scaled_dot_product_attention too
    if kind == "hf_eager":
        config._experts_implementation = "eager"
    return getattr(transformers, causal_lm_class(config.model_type))(config)


def measure(steppers: dict[str, Stepper], args, device, gemm_dtype, gemm_n) -> tuple[dict, float]:
    """Median seconds per step of each stepper, interleaved, and the median GEMM FLOP/s measured before and after
    them (not between steps: the GEMM's buffers would change what the allocator holds for the steps)."""
    gemm = [gemm_flops_per_s(device, gemm_dtype, gemm_n) for _ in range(3)]
    times = {name: [] for name in steppers}
    for rep in range(args.warmup + args.reps):
        for name, stepper in steppers.items():
            seconds = stepper.step()
            if rep >= args.warmup:
                times[name].append(seconds)
    gemm += [gemm_flops_per_s(device, gemm_dtype, gemm_n) for _ in range(3)]
    return {name: statistics.median(t) for name, t in times.items()}, statistics.median(gemm)


def peak_memory_gib(stepper: Stepper) -> float | None:
    if stepper.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(stepper.device)
    stepper.step()
    return round(torch.cuda.max_memory_allocated(stepper.device) / 2**30, 2)


def rates(stepper: Stepper, seconds: float, gemm: float, peak: float | None) -> dict:
    out = {"step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(stepper.tokens / seconds),
           "model_tflops_per_s": round(stepper.model_flops / seconds / 1e12, 3),
           "mfu": round(stepper.model_flops / seconds / gemm, 4)}
    if peak:
        out["mfu_datasheet"] = round(stepper.model_flops / seconds / peak, 4)
    return out


def run_suite(args, device, autocast, gemm_dtype, gemm_n, peak) -> list[dict]:
    lines = []
    for label, model, moe, overrides in GPU_SUITE:
        model_cfg, moe_cfg = presets(model, moe, overrides + args.override)
        results = {}
        # transformers' default (grouped_mm) casts the tokens to the weights' dtype: under autocast over fp32
        # weights its experts run in fp32. Its eager loop's F.linear autocasts to bf16, so it is timed too.
        kinds = ("ours", "hf", "hf_eager") if moe_cfg is not None else ("ours", "hf")
        for kind in kinds:  # one model in memory at a time
            stepper = Stepper(kind, model_cfg, moe_cfg, args, device, autocast)
            medians, gemm = measure({kind: stepper}, args, device, gemm_dtype, gemm_n)
            results[kind] = {**rates(stepper, medians[kind], gemm, peak), "peak_mem_gib": peak_memory_gib(stepper)}
            if stepper.experts_implementation:
                results[kind]["experts_implementation"] = stepper.experts_implementation
            stepper.close()
        ours, hf = results["ours"], results["hf"]
        line = {"config": label, **ours, "hf_tokens_per_s": hf["tokens_per_s"], "hf_mfu": hf["mfu"],
                "hf_peak_mem_gib": hf["peak_mem_gib"], "speedup_vs_hf": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
                **({"hf_experts_implementation": hf["experts_implementation"], "hf_eager_tokens_per_s":
                    results["hf_eager"]["tokens_per_s"], "hf_eager_peak_mem_gib": results["hf_eager"]["peak_mem_gib"],
                    "speedup_vs_hf_eager": round(ours["tokens_per_s"] / results["hf_eager"]["tokens_per_s"], 3)}
                   if "hf_eager" in results else {}),
                **param_counts(model_cfg, moe_cfg), "layers": model_cfg.n_layers, "seq_len": args.seq_len,
                "micro_batch": args.batch_size, "gemm_tflops_per_s": round(gemm / 1e12, 1)}
        print(json.dumps(line), flush=True)
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--moe", default="mixtral")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--compare-dense", action="store_true", help="also time the preset's dense model, interleaved")
    parser.add_argument("--suite", choices=("gpu",), help="the GPU suite (every preset of it, ours vs transformers)")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override for every model built")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--gemm-n", type=int, help="the reference GEMM's size n (n x n x n; default 8192 on a GPU, "
                        "2048 on a CPU); smaller only to smoke-test the script")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: glibc's default allocator, not the tuning CPU training runs apply (dropup.cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (4 if args.suite else 16)
    args.seq_len = args.seq_len or (4096 if args.suite else 256)
    malloc, bf16_emulated = "system", False
    if device.type == "cpu":
        try:
            from dropup import cpu

            if not args.system_malloc and cpu.keep_freed_memory():  # as a CPU training run does
                malloc = "kept"
            bf16_emulated = args.precision == "auto" and cpu.bf16_slowdown() > cpu.BF16_EMULATED_ABOVE
        except ImportError:  # an older dropup on PYTHONPATH, for a before/after comparison
            pass
    precision = args.precision
    if precision == "auto":  # bf16 unless this is a CPU that emulates it
        precision = "fp32" if bf16_emulated else "bf16"
    autocast = precision == "bf16"
    gemm_dtype = torch.bfloat16 if autocast else torch.float32
    gemm_n = args.gemm_n or (8192 if gpu else 2048)
    peak = datasheet_peak(device)
    torch.manual_seed(0)
    common = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "precision": precision,
              "malloc": malloc,
              "threads": torch.get_num_threads(), "torch": torch.__version__}

    if args.suite:
        lines = run_suite(args, device, autocast, gemm_dtype, gemm_n, peak)
        by_label = {line["config"]: line for line in lines}
        summary = {"suite": args.suite, **common, "datasheet_bf16_tflops": peak and peak / 1e12,
                   "moe_mfu_vs_dense": {
                       "152m": round(by_label["8x152m-moe"]["mfu"] / by_label["152m-dense"]["mfu"], 3),
                       "1.5b-6L": round(by_label["8x1.5b-6L-moe"]["mfu"] / by_label["1.5b-6L-dense"]["mfu"], 3)},
                   "moe_speedup_vs_hf": {label: by_label[label]["speedup_vs_hf"]
                                         for label in ("8x152m-moe", "8x1.5b-6L-moe")}}
        print(json.dumps(summary))
        return

    model_cfg, moe_cfg = presets(args.model, args.moe, args.override)
    steppers = {"moe" if moe_cfg is not None else "dense": Stepper("ours", model_cfg, moe_cfg, args, device, autocast)}
    if args.compare_dense and moe_cfg is not None:
        dense_cfg, _ = presets(args.model, "none", args.override)
        steppers["dense"] = Stepper("ours", dense_cfg, None, args, device, autocast)
    medians, gemm = measure(steppers, args, device, gemm_dtype, gemm_n)
    result = {"model": args.model, "moe_preset": args.moe, **param_counts(model_cfg, moe_cfg)}
    for name, stepper in steppers.items():
        r = rates(stepper, medians[name], gemm, peak)
        result[name] = r
        print(f"{args.model}/{name} ({precision}): {r['tokens_per_s']} tokens/s, "
              f"{r['model_tflops_per_s'] * 1e3:.1f} model GFLOP/s = {r['mfu']:.1%} of a {precision} {gemm_n}^2 GEMM "
              f"({gemm / 1e9:.1f} GFLOP/s)")
    if set(steppers) == {"moe", "dense"}:
        result["moe_vs_dense"] = round(result["moe"]["mfu"] / result["dense"]["mfu"], 3)
        print(f"MoE step's model-FLOP rate / dense step's: {result['moe_vs_dense']}")
    result.update(**common, gemm_gflops_per_s=round(gemm / 1e9, 1), batch_size=args.batch_size, seq_len=args.seq_len)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
