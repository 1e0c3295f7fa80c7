"""Host memory of a sharded run's start: upcycling into FSDP shards, from the imports to the first training step.

Writes a synthetic dense Hugging Face Llama (config.json, bf16 safetensors shards with an index; by default 16
layers, d_model 512, d_ff 2048, whose 8-expert MoE is 1.58 GiB in fp32), or takes `--dense DIR`, and upcycles it
with `init=drop ratio=0.5` through `run.py`, as a user would: once on a single process without FSDP (the
reference), then with `trainer=fsdp` on each rank count of `--ranks` (`ranks=1`: FSDP with one process; CPU gloo
processes on this machine by default, GPUs with `--device cuda`). Every run stops when its first training step
would begin. Per rank count one JSON line:

- `moe_state_gib`: the whole fp32 MoE state (parameters x 4 bytes);
- `peak_init_gib`: the largest rank's peak resident set (Linux VmHWM: anonymous and file-backed pages, so
  memory-mapped weights count) less its resident set after the imports, before the model was built;
- `peak_init_over_state` and `goal` (<= 0.35 x the state at 4 ranks, <= 1.3 x at 1: the sharded init's design
  bound, a rank's shards plus one full tensor plus one dense tensor) and `meets_goal`;
- `matches_single_process`: the step-0 weights, written as a sharded checkpoint and consolidated by
  `python -m dropup.fsdp`, equal the reference's bit for bit;
- `per_rank_gib` (each rank's growth), `mapped_gib_at_end` (file pages, the seed's memory maps, still resident at
  the first step beyond the baseline's: a reader that keeps its maps shows here) and `seconds`.
A first line describes the reference (`"reference"`, its `peak_init_gib`).

    .venv/bin/python benchmarks/init_memory.py --ranks 1,2,4                # 1.58 GiB state; ~2.5 min, 2 cores
    .venv/bin/python benchmarks/init_memory.py --ranks 1,2,4 --d-model 256 --d-ff 1024   # make bench's size
    .venv/bin/python benchmarks/init_memory.py --dense /path/to/hf-llama --ranks 8 --device cuda

How it is measured without changing the trainer: each run's processes start with a `sitecustomize` (on
PYTHONPATH, written into the scratch directory) that calls `install_probe` below. The probe takes the baseline
when the run's `TokenData` is constructed (every rank: after all imports and the corpus preparation, before any
weight is read or built) and resets the high-water mark there (`/proc/self/clear_refs`); a Lightning callback put
first in the trainer's list reads VmHWM at `on_train_start` (after `configure_model`, the strategy's set-up and
any checkpoint restore; before the step-0 validation and the first step), writes the step-0 weights (a
sharded checkpoint under FSDP, else the model's state dict), waits for every rank and ends the process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
PROBE_DIR = "DROPUP_INIT_PROBE_DIR"  # where a probed run writes rank<r>.json and its step-0 weights
PROBE_SAVE = "DROPUP_INIT_PROBE_SAVE"  # dcp: a sharded checkpoint (trainer=fsdp) | state: the state dict
GOALS = {1: 1.3, 4: 0.35}  # peak_init_gib / moe_state_gib at these rank counts (issue 27)


# --- the probe, run inside the measured processes (keep its imports light: it loads before anything else) --------

def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def install_probe() -> None:
    """Called by the run's `sitecustomize`: patch `TokenData.__init__` (the baseline) and `Trainer.__init__` (a
    first callback) as their modules finish loading."""
    import importlib.abc
    import importlib.machinery

    patches = {"dropup.data.loader": _patch_token_data, "lightning.pytorch.trainer.trainer": _patch_trainer}

    class AfterLoad(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in patches:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run_module, patch = spec.loader.exec_module, patches.pop(name)

            def exec_module(module):
                run_module(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AfterLoad())


_baseline: dict = {}


def _patch_token_data(module) -> None:
    cls = module.TokenData
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not _baseline:  # the first one: the run's training data
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
            _baseline.update(rss=_status_bytes("VmRSS"), rss_file=_status_bytes("RssFile"), at=time.time())

    cls.__init__ = __init__


def _patch_trainer(module) -> None:
    from lightning.pytorch.callbacks import Callback

    class InitProbe(Callback):
        def on_train_start(self, trainer, pl_module):
            peak = _status_bytes("VmHWM")
            out = Path(os.environ[PROBE_DIR])
            record = {"rank": trainer.global_rank, "world": trainer.world_size, "baseline_bytes": _baseline.get("rss"),
                      "hwm_bytes": peak, "rss_bytes": _status_bytes("VmRSS"),
                      # mapped file pages (the seed's, memory-mapped) resident now beyond those at the baseline
                      "rss_file_growth_bytes": _status_bytes("RssFile") - _baseline.get("rss_file", 0),
                      # the whole fp32 state: every parameter's global size (a DTensor's numel is the whole)
                      "state_bytes": 4 * sum(p.numel() for p in pl_module.model.parameters()),
                      "init_s": time.time() - _baseline["at"] if _baseline else None}
            import torch

            if pl_module.device.type == "cuda":
                record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(pl_module.device)
            if os.environ.get(PROBE_SAVE) == "dcp":
                trainer.save_checkpoint(out / "step0.ckpt")  # collective: every rank writes its shards
            elif trainer.global_rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in pl_module.model.state_dict().items()},
                          str(out / "step0.safetensors"))
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
            trainer.strategy.barrier()
            os._exit(0)  # the measurement is done: no validation, training or final save

    cls = module.Trainer
    init = cls.__init__

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) \
            else [callbacks]
        init(self, *args, callbacks=[InitProbe(), *callbacks], **kwargs)  # first: before RunRecorder resets VmHWM

    cls.__init__ = __init__


# --- the benchmark ---------------------------------------------------------------------------------------------

def write_dense(where: Path, layers: int, d_model: int, d_ff: int, vocab: int, shard_bytes: int = 256 << 20) -> None:
    """A random bf16 dense Llama as an HF directory (sharded safetensors and their index), tensor by tensor."""
    import torch

    from dropup.config import ModelConfig
    from dropup.hf import hf_config_dict, to_hf
    from dropup.init.shapes import dense_shapes
    from dropup.shards import PlannedTensor, ShardWriter

    heads = max(1, d_model // 64)
    model = ModelConfig(name="synthetic", vocab_size=vocab, n_layers=layers, d_model=d_model, d_ff=d_ff,
                        n_heads=heads, n_kv_heads=heads)
    where.mkdir(parents=True)
    groups, size = [[]], 0
    for name, shape in dense_shapes(model).items():
        planned = PlannedTensor(next(iter(to_hf({name: torch.empty(shape, device="meta")}))), tuple(shape),
                                torch.bfloat16)
        if groups[-1] and size + planned.nbytes > shard_bytes:
            groups, size = [*groups, []], 0
        groups[-1].append((name, planned))
        size += planned.nbytes
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(where / file, [p for _, p in group])
        for name, planned in group:
            tensor = torch.ones(planned.shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else \
                torch.empty(planned.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            writer.write(planned.name, tensor)
            weight_map[planned.name] = file
        writer.finish()
    total = sum(p.nbytes for g in groups for _, p in g)
    (where / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    config = {**hf_config_dict(model), "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
              "dtype": "bfloat16"}
    (where / "config.json").write_text(json.dumps(config, indent=2))


def start_run(dense: Path, overrides: list[str], ranks: int | None, device: str, scratch: Path) -> dict:
    """Launch run.py, to stop at its first step; ranks None: the single-process reference (no FSDP)."""
    name = "single" if ranks is None else f"fsdp{ranks}"
    out = scratch / name
    out.mkdir()
    hook = scratch / "probe-site"
    if not hook.exists():
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(
            "import importlib.util\n"
            f"_spec = importlib.util.spec_from_file_location('_dropup_init_probe', {str(Path(__file__).resolve())!r})\n"
            "_probe = importlib.util.module_from_spec(_spec)\n_spec.loader.exec_module(_probe)\n"
            "_probe.install_probe()\n")
    accelerator, precision = ("gpu", "bf16-mixed") if device == "cuda" else ("cpu", "32-true")
    batch = 4 * (ranks or 1)
    trainer = ["trainer=cpu" if device == "cpu" else "trainer=gpu", "trainer.devices=1"] if ranks is None else \
        ["trainer=fsdp", f"trainer.devices={ranks}"]
    args = ["model=hf", f"seed_model={dense}", "init=drop", "ratio=0.5", *trainer,
            f"trainer.accelerator={accelerator}", f"trainer.precision={precision}",
            "trainer.enable_progress_bar=false", f"train.batch_size={batch}", "train.tokens=100000000",
            "train.val_tokens=1024", "train.val_batch_size=4", *overrides, f"hydra.run.dir={out / 'run'}"]
    env = {**os.environ, PROBE_DIR: str(out), PROBE_SAVE: "state" if ranks is None else "dcp",
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]),
           # glibc's own malloc returns big freed blocks at once, so the high-water mark is the live peak
           "DROPUP_CPU_MALLOC": "system"}
    with open(out / "stderr.txt", "w") as stderr:  # a file: the run's ranks share it, and nothing blocks on it
        proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=env)
    return {"proc": proc, "args": args, "out": out, "ranks": ranks, "started": time.perf_counter()}


def finish_run(run: dict) -> dict:
    """Wait for a launch: the ranks' records, the seconds it took and where its step-0 weights are."""
    proc, args, out, ranks = run["proc"], run["args"], run["out"], run["ranks"]
    proc.wait()
    stderr = (out / "stderr.txt").read_text()
    seconds = time.perf_counter() - run["started"]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if proc.returncode != 0 or len(records) != (ranks or 1):
        raise SystemExit(f"run.py {' '.join(args)} exited with {proc.returncode} and {len(records)} rank "
                         f"records:\n{stderr[-4000:]}")
    if any(r["baseline_bytes"] is None for r in records):
        raise SystemExit(f"{out.name}: a rank built no TokenData before training, so no baseline was taken")
    return {"records": records, "seconds": seconds, "weights": out / ("step0.safetensors" if ranks is None
                                                                     else "step0.ckpt")}


def consolidated(run: dict, scratch: Path) -> Path:
    """`python -m dropup.fsdp <step-0 checkpoint> <out>` (its main, in this process)."""
    from dropup.fsdp import main as consolidate_main

    out = run["weights"].with_name("step0-consolidated.safetensors")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the path written
        code = consolidate_main([str(run["weights"]), str(out)])
    if code != 0:
        raise SystemExit(f"python -m dropup.fsdp {run['weights']} {out} failed")
    shutil.rmtree(run["weights"])
    return out


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor of the two files equal bit for bit (read one tensor at a time), the same names in both."""
    import torch
    from safetensors import safe_open

    def bits(tensor):
        return tensor.contiguous().reshape(-1).view(torch.uint8)

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        for name in fa.keys():
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(bits(x), bits(y)):
                return False
    return True


def growth(run: dict) -> list[float]:
    return [(r["hwm_bytes"] - r["baseline_bytes"]) / GIB for r in sorted(run["records"], key=lambda r: r["rank"])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="FSDP rank counts to measure (1: FSDP on one process)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo processes, fp32; cuda: one GPU per rank, bf16-mixed")
    parser.add_argument("--dense", type=Path, help="a dense HF directory to upcycle instead of the synthetic one")
    parser.add_argument("--layers", type=int, default=16, help="synthetic model: layers")
    parser.add_argument("--d-model", type=int, default=512, help="synthetic model: width (heads of 64)")
    parser.add_argument("--d-ff", type=int, default=2048, help="synthetic model: FFN width")
    parser.add_argument("--vocab", type=int, default=4096, help="synthetic model: vocabulary (>= the corpus's)")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override of every run (repeat)")
    parser.add_argument("--scratch", type=Path, help="scratch directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    ranks_list = [int(r) for r in args.ranks.split(",")]
    overrides = ["data=fixture", *args.override]

    if args.scratch is not None:
        args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="init-memory-", dir=args.scratch))
    try:
        dense = args.dense
        if dense is None:
            dense = scratch / "dense"
            write_dense(dense, args.layers, args.d_model, args.d_ff, args.vocab)
        # one run at a time: the machine's cores and memory are the measured processes' alone
        reference = finish_run(start_run(dense, overrides, None, args.device, scratch))
        state = reference["records"][0]["state_bytes"] / GIB
        single = growth(reference)[0]
        print(json.dumps({"reference": "single process, no FSDP", "moe_state_gib": round(state, 3),
                          "peak_init_gib": round(single, 3), "peak_init_over_state": round(single / state, 3),
                          "seconds": round(reference["seconds"], 1)}), flush=True)
        for ranks in ranks_list:
            run = finish_run(start_run(dense, overrides, ranks, args.device, scratch))
            per_rank = growth(run)
            peak = max(per_rank)
            weights = consolidated(run, scratch)
            line = {"ranks": ranks, "device": args.device, "moe_state_gib": round(state, 3),
                    "peak_init_gib": round(peak, 3), "peak_init_over_state": round(peak / state, 3),
                    "per_rank_gib": [round(g, 3) for g in per_rank],
                    "mapped_gib_at_end": round(max(r["rss_file_growth_bytes"] for r in run["records"]) / GIB, 3),
                    "matches_single_process": same_weights(weights, reference["weights"]),
                    "seconds": round(run["seconds"], 1)}
            if "cuda_peak_bytes" in run["records"][0]:
                line["cuda_peak_gib"] = round(max(r["cuda_peak_bytes"] for r in run["records"]) / GIB, 3)
            if ranks in GOALS:
                line["goal"] = GOALS[ranks]
                line["meets_goal"] = peak <= GOALS[ranks] * state
            weights.unlink()
            print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
