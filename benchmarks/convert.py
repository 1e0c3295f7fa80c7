"""dropup-upcycle at the paper's 3.7B shape: peak memory and throughput against the disk's own write speed.

Writes a synthetic dense Llama of the 3.7B preset's shape (28 layers, d_model 3072, d_ff 8192, 24 heads,
vocabulary 99574; bf16, 2 GB safetensors shards) into a scratch directory outside the repository, measures the
disk's sequential write speed there (os.write of 64 MiB blocks, then fsync; through the page cache and with
O_DIRECT, which the converter uses where it can), then converts the model to 8 experts
with --init drop --ratio 0.5 in a child process (output about 37 GB in bf16). Peak resident memory is the child's
high-water mark (getrusage of children: anonymous and file-backed pages together, like VmHWM). Throughput is bytes
written over the child's whole wall time, imports included. The last line printed is one JSON object.

    python benchmarks/convert.py                 # full size; needs about 50 GB free under --scratch
    python benchmarks/convert.py --layers 4      # a shallower model of the same width, for a quick look
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dropup.config import ModelConfig
from dropup.hf import hf_config, to_hf
from dropup.init.shapes import dense_shapes
from dropup.shards import PlannedTensor, ShardWriter

PAPER_3_7B = {"vocab_size": 99574, "d_model": 3072, "d_ff": 8192, "n_heads": 24, "n_kv_heads": 24}


def write_dense(model: ModelConfig, where: Path, shard_bytes: int) -> int:
    """A random bf16 dense Llama as HF sharded safetensors, written tensor by tensor (bounded memory)."""
    where.mkdir(parents=True)
    shapes = {name: shape for name, shape in dense_shapes(model).items()}
    hf_names = {name: next(iter(to_hf({name: torch.empty(shape, device="meta")}))) for name, shape in shapes.items()}
    groups, size = [[]], 0
    for name, shape in shapes.items():
        planned = PlannedTensor(hf_names[name], tuple(shape), torch.bfloat16)
        if groups[-1] and size + planned.nbytes > shard_bytes:
            groups, size = [*groups, []], 0
        groups[-1].append((name, planned))
        size += planned.nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(where / file, [p for _, p in group])
        for name, planned in group:
            if name.endswith("norm.weight"):
                tensor = torch.ones(planned.shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(planned.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            writer.write(planned.name, tensor)
            weight_map[planned.name] = file
        writer.finish()
    total = sum(p.nbytes for g in groups for _, p in g)
    (where / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = hf_config(model, bos_token_id=1, eos_token_id=2)
    config.dtype = "bfloat16"
    (where / "config.json").write_text(config.to_json_string())
    return total


def disk_write_speed(where: Path, direct: bool, nbytes: int = 4 << 30, block: int = 64 << 20) -> float:
    """Sequential write bytes/s into `where`: os.write of one reused block, then fsync. Buffered (through the page
    cache, what most tools do) or O_DIRECT (the disk itself; the converter writes this way where it can)."""
    path = where / "disk-speed.tmp"
    data = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    data.write(os.urandom(block))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0))
    try:
        for _ in range(nbytes // block):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return nbytes / seconds


def drop_page_cache() -> bool:
    """Start the conversion with cold inputs, as a user's would be (needs root; skipped otherwise)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "dropup-bench",
                   help="scratch directory, outside the repository (default: $TMPDIR/dropup-bench)")
    p.add_argument("--layers", type=int, default=28, help="layers (28 = the 3.7B preset)")
    p.add_argument("--ratio", default="0.5")
    p.add_argument("--shard-size", default="5GB")
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = p.parse_args()

    model = ModelConfig(name="3.7b-shape", n_layers=args.layers, **PAPER_3_7B)
    root = args.scratch / "convert-bench"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        dense_bytes = write_dense(model, root / "dense", 2 * 10**9)
        disk = disk_write_speed(root, direct=False)
        disk_direct = disk_write_speed(root, direct=True)
        cold = drop_page_cache()
        command = [sys.executable, "-m", "dropup.upcycle", "--dense", str(root / "dense"), "--out", str(root / "moe"),
                   "--init", "drop", "--ratio", args.ratio, "--shard-size", args.shard_size]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = usage.ru_maxrss * 1024
        written = sum(f.stat().st_size for f in (root / "moe").glob("model-*.safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    throughput = written / seconds
    print(json.dumps({
        "layers": args.layers, "dense_bytes": dense_bytes, "output_bytes": written, "seconds": round(seconds, 1),
        "throughput_GBps": round(throughput / 1e9, 3), "disk_write_GBps": round(disk / 1e9, 3),
        "throughput_vs_disk": round(throughput / disk, 3), "disk_direct_write_GBps": round(disk_direct / 1e9, 3),
        "throughput_vs_disk_direct": round(throughput / disk_direct, 3), "peak_rss_GB": round(peak / 1e9, 3),
        "cpu_user_s": round(usage.ru_utime, 1), "cpu_sys_s": round(usage.ru_stime, 1), "cold_inputs": cold,
        "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "goals": {"peak_rss_le_4GB": peak <= 4e9, "throughput_ge_half_disk": throughput >= 0.5 * disk},
    }))


if __name__ == "__main__":
    main()
