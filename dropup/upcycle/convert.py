"""The conversion: stream the missing shards, account for every source tensor, finish the directory."""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dropup.config import ConfigError
from dropup.hf import hf_output_tensors
from dropup.init.base import InitStrategy
from dropup.init.streaming import moe_tensors, step0_ffn_error
from dropup.shards import PlannedTensor
from dropup.upcycle.common import BUILD_THREADS, UpcycleError, _existing_parent, human_bytes
from dropup.upcycle.output import BackgroundWriter, Progress, prepare_output, write_outputs
from dropup.upcycle.plan import Job, Shard, _layer_bytes, plan_job
from dropup.upcycle.verify import verify


@dataclass
class Result:
    out: Path
    manifest: dict
    bytes_written: int
    shards_resumed: int
    seconds: float
    verify_lines: list[str] = field(default_factory=list)
    step0_error: float | None = None  # fine-grained: layer 0's step-0 MoE output vs the dense FFN (relative)
    strategy: InitStrategy | None = None  # the init that built it


def _progress_bar(console):
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    return Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tensors]}"),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=console,
               disable=not console.is_terminal)


def stream(job: Job, todo: list[Shard], progress: Progress, console) -> None:
    """Build the tensors of the `todo` shards with `moe_tensors` and write them (see BackgroundWriter)."""
    done = {t.name for s in job.shards if s.file in progress.shards for t in s.tensors}
    wanted = set().union(*(s.sources for s in todo))
    total = sum(len(s.tensors) for s in todo)
    with _progress_bar(console) as bar:
        task = bar.add_task("upcycling", total=sum(s.nbytes for s in todo), tensors=f"0/{total} tensors")
        count = [0]

        def on_tensor(planned: PlannedTensor) -> None:
            count[0] += 1
            bar.update(task, advance=planned.nbytes, tensors=f"{count[0]}/{total} tensors")

        def on_shard(shard: Shard, digest: str, digests: list[str]) -> None:
            progress.record(shard, digest, digests, [r.consumed_names() for r in job.readers])
            if not console.is_terminal:  # no progress bar (a log file): one line per shard instead
                console.print(f"wrote {shard.file} ({human_bytes(shard.nbytes)}, {count[0]}/{total} tensors)")

        writer = BackgroundWriter(job.out, todo, _layer_bytes(job.model, job.moe, job.dtype), on_tensor, on_shard)
        try:
            for ours, tensor in moe_tensors(job.strategy, job.readers, job.model, job.moe, job.options["seed"],
                                            job.dtype, names=wanted, threads=BUILD_THREADS):
                for name, part in hf_output_tensors(ours, tensor, job.options["layout"], job.model, job.moe).items():
                    if name not in done:
                        writer.put(name, part)
                # Drop our references: only the writer may keep this layer alive while the next one is built.
                del tensor, part
            writer.close()
        except BaseException:
            writer.stop()
            raise


def upcycle(args: argparse.Namespace, console) -> Result:
    """Plan and check, take stock of --out, stream the missing shards, account, and finish the directory."""
    started = time.perf_counter()
    job = plan_job(args)
    progress = prepare_output(job.out, job.options, args.force, console.print)
    todo = [s for s in job.shards if progress is None or s.file not in progress.shards]
    needed = sum(s.nbytes for s in todo)
    free = shutil.disk_usage(_existing_parent(job.out)).free
    if needed > free:
        raise ConfigError(f"--out {job.out} needs {human_bytes(needed)} more but its disk has {human_bytes(free)} "
                          "free: free space or choose another --out")
    job.out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = Progress(job.out, job.options, consumed=[[] for _ in job.readers])
        progress.save()
    elif len(todo) < len(job.shards):
        console.print(f"resuming: {len(job.shards) - len(todo)} of {len(job.shards)} shards already written "
                      "and verified")
    if todo:
        stream(job, todo, progress, console)
    _check_consumed(job, progress)
    manifest = write_outputs(job, progress)
    result = Result(job.out, manifest, needed, len(job.shards) - len(todo), time.perf_counter() - started,
                    strategy=job.strategy)
    if job.moe.granularity > 1 and len(job.readers) == 1:
        result.step0_error = step0_ffn_error(job.strategy, job.readers, job.model, job.moe, job.options["seed"])
    if args.verify:
        result.verify_lines = verify(job)
    return result


def _check_consumed(job: Job, progress: Progress) -> None:
    """Strict accounting: every source tensor fed the output (scratch reads none: it uses only the config)."""
    for dense, reader, before in zip(job.inputs, job.readers, progress.consumed):
        unused = sorted(set(reader) - reader.consumed_names() - before)
        if unused:
            raise UpcycleError(f"--dense {dense.path}: tensor {unused[0]} (and {len(unused) - 1} more) was never "
                               "used; the output would silently lack it, so it is not marked complete")
