"""The output directory: the progress file of an unfinished conversion, the writer thread, and the files that complete
it.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dropup import families
from dropup.config import ConfigError, ModelConfig, MoEConfig
from dropup.flops import param_counts
from dropup.hf import causal_lm_class, hf_config
from dropup.init.base import ExpertKey
from dropup.shards import INDEX, PARTIAL_SUFFIX, ShardWriter, atomic_write, file_digests, fsync_dir
from dropup.upcycle.common import (CARRIED_FILES, DTYPE_LABELS, FORMAT, MANIFEST, PROGRESS, SHARD_NAME,
                                   UpcycleError)
from dropup.upcycle.plan import Job, Shard, normalize_recorded


# --------------------------------------------------------------------------------------------- output state


class Progress:
    """An unfinished conversion, recorded in its output directory from before the first byte is written until
    the output is complete: the arguments (to refuse mixing two conversions), each finished shard with its
    checksums, and which source tensors were read (strict accounting survives a resume)."""

    def __init__(self, out: Path, options: dict, consumed: list, shards: dict | None = None):
        self.path = out / PROGRESS
        self.options = options
        self.consumed: list[set[str]] = [set(names) for names in consumed]  # per --dense
        self.shards: dict[str, dict] = shards or {}

    @classmethod
    def load(cls, out: Path) -> Progress | None:
        path = out / PROGRESS
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(out, normalize_recorded(data["options"]), data["consumed"], data["shards"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({err}): pass --force to start the conversion over") from None

    def record(self, shard: Shard, digest: str, tensor_digests: list[str], consumed: list[frozenset]) -> None:
        """A shard is in place: its checksums, and the source tensors read so far, become part of the record."""
        self.shards[shard.file] = {"digest": digest, "bytes": (self.path.parent / shard.file).stat().st_size,
                                   "tensors": dict(zip((t.name for t in shard.tensors), tensor_digests))}
        for mine, new in zip(self.consumed, consumed):
            mine |= new
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps({"options": self.options, "shards": self.shards,
                                            "consumed": [sorted(c) for c in self.consumed]}, indent=1))


def _ours(path: Path) -> bool:
    """A file this tool writes into its output directory (the only files --force removes)."""
    name = path.name.removesuffix(PARTIAL_SUFFIX)
    return name in (PROGRESS, MANIFEST, INDEX, "config.json", *CARRIED_FILES) or bool(SHARD_NAME.match(name))


def _clear(out: Path) -> None:
    for path in out.iterdir():
        if path.is_file() and _ours(path):
            path.unlink()


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join("the --dense inputs (paths, file sizes or times)" if k == "dense" else
                     f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def prepare_output(out: Path, options: dict, force: bool, log) -> Progress | None:
    """What is already in `out`: None for a fresh start, or the Progress of the same conversion to resume.

    Refuses a finished output (unless --force), an unfinished one made with other arguments (unless --force),
    and a directory holding anything this tool did not write (never deleted, even with --force)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory: choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p))
    if foreign:
        raise ConfigError(f"--out {out} holds files dropup-upcycle did not write ({', '.join(foreign[:3])}): "
                          "choose a new or empty directory")
    progress = Progress.load(out)
    if progress is None:
        if not any(out.iterdir()):
            return None
        if not (out / MANIFEST).is_file():
            raise ConfigError(f"--out {out} holds a model that dropup-upcycle did not write (no {MANIFEST}): "
                              "choose a new or empty directory")
        if not force:
            raise ConfigError(f"--out {out} already holds a converted model: pass --force to overwrite it, or "
                              "choose another --out")
        _clear(out)
        return None
    if force:
        _clear(out)
        return None
    if progress.options != options:
        raise ConfigError(f"--out {out} holds an unfinished conversion with other arguments "
                          f"({_differences(progress.options, options)}): re-run with its arguments to resume it, "
                          "or pass --force to start over")
    for stale in out.glob(f"*{PARTIAL_SUFFIX}"):
        stale.unlink()
    for file, record in list(progress.shards.items()):
        path = out / file
        try:
            intact = path.is_file() and file_digests(path)[0] == record["digest"]
        except (OSError, ValueError):
            intact = False
        if not intact:
            log(f"[yellow]shard {file} does not match its recorded checksum: writing it again[/]")
            del progress.shards[file]
            path.unlink(missing_ok=True)
    return progress


# ------------------------------------------------------------------------------------------------- writing


class BackgroundWriter:
    """Writes the planned shards, in order, on a second thread: hashing and disk writes overlap the init math.

    What waits for the writer is bounded in bytes of distinct tensor memory, not in items: an MoE layer arrives
    as two stacked tensors that the per-expert layout cuts into 3E views of the same memory, so a bound in items
    would stall the builder until nearly all of a layer were on disk. With `budget` = one layer's experts, the
    writer holds layer L while the builder makes layer L+1 (double buffering), and memory stays about two
    layers. An error on the writer thread is re-raised by the next `put` or by `close`; `stop` abandons the
    shard being written (its .partial file stays, for a re-run to replace)."""

    def __init__(self, out: Path, shards: list[Shard], budget: int, on_tensor, on_shard):
        self._out = out
        self._shards = shards
        self._budget = budget
        self._on_tensor = on_tensor
        self._on_shard = on_shard
        self._items: queue.Queue = queue.Queue()
        self._held = threading.Condition()
        self._storages: dict[int, list[int]] = {}  # address -> [bytes, queued views]
        self._held_bytes = 0
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dropup-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        with self._held:
            while key not in self._storages and self._held_bytes and self._held_bytes + size > self._budget:
                self._raise_if_failed()
                self._held.wait(timeout=0.2)
            self._raise_if_failed()
            if key not in self._storages:
                self._storages[key] = [size, 0]
                self._held_bytes += size
            self._storages[key][1] += 1
        self._items.put((name, tensor, key))

    def close(self) -> None:
        """Wait until everything is written; a planned tensor that never came is an error."""
        self._items.put((None, None, None))
        self._thread.join()
        self._raise_if_failed()

    def stop(self) -> None:
        self._stopping.set()
        self._items.put((None, None, None))
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _release(self, key: int) -> None:
        """Called while the writer still references the tensor, so its address cannot have been reused yet."""
        with self._held:
            entry = self._storages[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._storages[key]
                self._held_bytes -= entry[0]
                self._held.notify_all()

    def _run(self) -> None:
        shards = iter(self._shards)
        shard, writer = None, None
        try:
            while True:
                name, tensor, key = self._items.get()
                if name is None or self._stopping.is_set():
                    break
                if writer is None:
                    shard = next(shards, None)
                    if shard is None:
                        raise UpcycleError(f"tensor {name} is not in the output plan")
                    writer = ShardWriter(self._out / shard.file, shard.tensors)
                writer.write(name, tensor)
                self._release(key)
                del tensor
                self._on_tensor(writer.tensors[len(writer.digests) - 1])
                if writer.done:
                    self._on_shard(shard, writer.finish(), writer.digests)
                    writer = None
            if not self._stopping.is_set():
                missing = writer.tensors[len(writer.digests)] if writer else next(
                    (t for s in shards for t in s.tensors), None)
                if missing is not None:
                    raise UpcycleError(f"output tensor {missing.name} was never produced: the conversion is "
                                       "incomplete (a bug); nothing was marked complete")
        except BaseException as err:  # handed to the main thread, which re-raises it
            self._error = err
            with self._held:
                self._held.notify_all()
        finally:
            if writer is not None and not writer.done:
                writer.abandon()


# ---------------------------------------------------------------------------------------------- manifest


def _bitmask(indices: torch.Tensor, size: int) -> str:
    mask = np.zeros(size, dtype=bool)
    mask[indices.numpy()] = True
    return base64.b64encode(np.packbits(mask, bitorder="little").tobytes()).decode()


def reinitialized_sets(strategy, model: ModelConfig, moe: MoEConfig, seed: int) -> dict | None:
    """The neuron sets S of every (layer, expert[, matrix]) of a strategy that draws them (drop, noise), from its
    own `redrawn_neurons`; None for the others."""
    if not strategy.records_neuron_sets:
        return None
    d_f = moe.expert_d_ff(model)
    layers = []
    for layer in range(model.n_layers):
        experts = []
        for e in range(moe.num_experts):
            idx = strategy.redrawn_neurons(d_f, ExpertKey(seed, layer, e))
            experts.append({"gate_up_down": _bitmask(idx["gate"], d_f)} if strategy.one_neuron_set
                           else {m: _bitmask(idx[m], d_f) for m in ("gate", "up", "down")})
        layers.append(experts)
    return {
        "rule": "per (layer, expert): |S| = floor(ratio * d_f) expert neurons; gate/up rows and down columns in S "
                f"were {strategy.neuron_rule}",
        "count": strategy.redrawn_count(d_f),
        "d_f": d_f,
        "index_mode": strategy.option_values().get("index_mode"),
        "encoding": "layers[layer][expert][matrix] = base64 of a little-endian bitmask over the d_f neurons "
                    "(bit i of byte i // 8 set = neuron i in S); gate_up_down = one set for all three",
        "layers": layers,
    }


def write_outputs(job: Job, progress: Progress) -> dict:
    """Carried files, manifest, index, and last config.json: only now does the directory look complete."""
    out, inputs, model, moe, shards = job.out, job.inputs, job.model, job.moe, job.shards
    for src in inputs[0].carried:
        tmp = out / (src.name + PARTIAL_SUFFIX)
        shutil.copyfile(src, tmp)
        os.replace(tmp, out / src.name)
    tensors = [{"name": t.name, "file": s.file, "shape": list(t.shape), "dtype": DTYPE_LABELS[t.dtype],
                "sha256": progress.shards[s.file]["tensors"][t.name]} for s in shards for t in s.tensors]
    manifest = {
        "format": FORMAT,
        "options": {k: v for k, v in job.options.items() if k != "dense"},
        "dense": job.options["dense"],
        "model": asdict(model),
        "moe_type": families.family(model.family).moe_type,
        "moe": {"num_experts": moe.num_experts, "top_k": moe.top_k, "granularity": moe.granularity,
                "expert_d_ff": moe.expert_d_ff(model)},
        "params": param_counts(model, moe),
        "files": {s.file: {"digest": progress.shards[s.file]["digest"], "bytes": progress.shards[s.file]["bytes"]}
                  for s in shards},
        "file_digest": "sha256 over the file's header bytes followed by its tensors' sha256 digests in file order",
        "tensors": tensors,
        "carried": [src.name for src in inputs[0].carried],
        "reinitialized": reinitialized_sets(job.strategy, model, moe, job.options["seed"]),
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
             "weight_map": {t.name: s.file for s in shards for t in s.tensors}}
    atomic_write(out / INDEX, json.dumps(index, indent=2))
    extra = dict(inputs[0].config_fields)
    config = hf_config(model, moe, **extra)
    config.architectures = [causal_lm_class(config.model_type)]
    config.dtype = DTYPE_LABELS[job.dtype]
    atomic_write(out / "config.json", config.to_json_string(use_diff=False))
    progress.path.unlink()
    fsync_dir(out)
    return manifest
