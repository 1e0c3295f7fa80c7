"""dropup-upcycle: turn Hugging Face Llama checkpoints into a Hugging Face Mixtral checkpoint (DESIGN contract 4).

    dropup-upcycle --dense llama-3.7b --out mixtral-8x3.7b --init drop --ratio 0.5

The weights come from the same code `run.py` uses (`dropup.init.moe_tensors`, one generator per tensor), so the
same seed and options give the same tensors through both. The conversion streams: source tensors are read one at
a time from the safetensors files, each MoE layer is built and handed to a writer thread that appends it to the
output shard being filled, and memory holds about two layers' experts, never the model.

The output directory becomes a usable checkpoint only at the very end: shards are written under temporary names,
each finished shard is recorded with its checksums in a progress file, and the manifest, the index and, last,
`config.json` are written once every shard is in place. Killed at any point and re-run with the same arguments,
the converter checks the finished shards, writes the rest, and produces byte-identical files.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import queue
import re
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if "torch" not in sys.modules:
    # Building a layer allocates and frees gigabytes of temporaries, and the kernel faults in and zeroes every
    # fresh page (a quarter of the converter's cycles in a perf profile). 2 MiB pages make that cheaper: a 6-layer
    # 3.7B-shape conversion here took 44-54 s with them vs 52-59 s without, peak RSS 2.8 vs 3.1 GB. torch reads
    # the setting at its first allocation, so it only applies when the converter starts the process (the CLI).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch

from dropup.config import ConfigError, ModelConfig, MoEConfig, check_pair
from dropup.flops import param_counts
from dropup.hf import LAYOUTS, configs_from_hf, hf_config, hf_tensors, renamed_from_hf
from dropup.init import STRATEGIES, InitStrategy, moe_tensors
from dropup.init.base import ExpertKey, check_sources, dense_shapes, expert_source, moe_shapes, reinit_count
from dropup.shards import (
    PARTIAL_SUFFIX,
    CheckpointReader,
    PlanError,
    PlannedTensor,
    ShardWriter,
    atomic_write,
    file_digests,
    fsync_dir,
    scan,
)

FORMAT = "dropup-upcycle/1"
PROGRESS = ".dropup-upcycle-progress.json"
MANIFEST = "dropup_manifest.json"
INDEX = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Files carried over from the (first) dense directory: the tokenizer and generation defaults.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
# Fields of the dense config.json that describe the tokenizer or the context rather than the architecture.
KEPT_CONFIG_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_LABELS = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16",
                torch.float64: "float64"}
# Experts built at a time: 2 measured 1.2-1.5x faster than 1 on this 2-core machine (bit-identical), for one more
# expert's temporaries (about 0.4 GB at the 3.7B shape).
BUILD_THREADS = 2
# --verify runs both models in transformers only below this size (fp32 copies of dense + MoE must fit in RAM).
VERIFY_MAX_PARAMS = 1_000_000_000


class UpcycleError(RuntimeError):
    """The conversion itself went wrong (not the user's input): the message says what and how to recover."""


# --------------------------------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        self.exit(2, f"error: {message} (see dropup-upcycle --help)\n")


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units as transformers' max_shard_size; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    if number * scale < 1:
        raise argparse.ArgumentTypeError(f"shard size {text!r} must be at least one byte")
    return int(number * scale)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dropup-upcycle",
        description="Upcycle dense Hugging Face Llama checkpoints (safetensors) into a Mixtral checkpoint.",
    )
    p.add_argument("--dense", action="append", required=True, type=Path, metavar="DIR",
                   help="HF Llama directory (config.json + safetensors) or dropup run directory; repeat for btx")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (HF Mixtral)")
    p.add_argument("--init", required=True, choices=sorted(STRATEGIES), help="how experts are initialized")
    p.add_argument("--ratio", type=float, help="re-initialized share of d_ff per expert (drop, noise; default 0.5)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--index-mode", choices=("shared", "per-matrix"),
                   help="drop/noise: one neuron set for gate/up/down (shared, the paper; default) or one each")
    p.add_argument("--granularity", type=int, default=1,
                   help="split each dense FFN into G narrower experts (fine-grained; default 1)")
    p.add_argument("--router-init",
                   help="uniform:A = U(-A, A), uniform01 = U(0, 1), normal:S = N(0, S^2) (default uniform:0.0346; "
                        "normal:0.02 for --init scratch, like every other weight matrix)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", choices=("keep", *DTYPES), default="keep",
                   help="output dtype; keep = that of the dense weights (fp32 for scratch) (default keep)")
    p.add_argument("--layout", choices=LAYOUTS, default="per-expert",
                   help="per-expert (save_pretrained's w1/w2/w3 names; default) or fused (gate_up_proj/down_proj)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="largest output shard, e.g. 5GB (default), 500MB")
    p.add_argument("--force", action="store_true", help="replace an existing or unfinished output in --out")
    p.add_argument("--verify", action="store_true",
                   help="check the written model against the dense one(s) (logits at r=0, re-initialized shares)")
    return p


def make_strategy(args: argparse.Namespace) -> InitStrategy:
    """The init strategy the options describe; options that do not apply to it are errors, not ignored."""
    kwargs: dict = {"router": args.router_init} if args.router_init else {}
    if args.init in ("drop", "noise"):
        kwargs["ratio"] = 0.5 if args.ratio is None else args.ratio
        kwargs["index_mode"] = args.index_mode or "shared"
    else:
        for flag, value in (("--ratio", args.ratio), ("--index-mode", args.index_mode)):
            if value is not None:
                raise ConfigError(f"{flag} applies to --init drop and noise only, not --init {args.init}: drop it")
    return STRATEGIES[args.init](**kwargs)


# ----------------------------------------------------------------------------------------------------- inputs


@dataclass
class Dense:
    """One --dense input: its architecture, its tensors under our names, and what the output carries over."""

    path: Path
    kind: str  # "hf" or "run"
    model: ModelConfig
    tensors: dict  # our name -> shards.Stored
    config_fields: dict = field(default_factory=dict)
    carried: list[Path] = field(default_factory=list)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.tensors)

    def identity(self) -> dict:
        """What the progress file compares to tell whether a re-run converts the same input."""
        files = sorted({s.path for s in self.tensors.values()})
        return {"path": str(self.path), "kind": self.kind,
                "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def open_dense(path: Path) -> Dense:
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"--dense {path} is not a directory: name a Hugging Face Llama directory "
                          "(config.json + *.safetensors) or a dropup run directory")
    if (path / "config.json").is_file():
        return _open_hf(path)
    if (path / "model.safetensors").is_file() and (_run_config(path) is not None):
        return _open_run(path)
    raise ConfigError(f"--dense {path} has no config.json (Hugging Face) and no model.safetensors + config.yaml "
                      "(dropup run): it is not a model directory")


def _weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of an HF directory and its index's weight map (None when unsharded)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{index} is not a safetensors index ({err}): re-save the model") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"{path}: shard {missing[0]} listed in {INDEX} is missing: copy the complete "
                              "checkpoint (all shards)")
        return [path / f for f in files], weight_map
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    if any(next(path.glob(pattern), None) for pattern in PICKLED):
        raise ConfigError(f"{path} holds only pickled weights (.bin/.pt), which dropup never unpickles: re-save "
                          "the model with safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)")
    raise ConfigError(f"{path} has no *.safetensors weights")


def _open_hf(path: Path) -> Dense:
    try:
        config = json.loads((path / "config.json").read_text())
        model, moe = configs_from_hf(config)
    except ValueError as err:  # invalid JSON
        raise ConfigError(f"{path / 'config.json'} is not a readable config ({err})") from None
    except KeyError as err:
        raise ConfigError(f"{path / 'config.json'} lacks the field {err}: it is not a complete Llama config") from None
    if moe.enabled:
        raise ConfigError(f"--dense {path} is a Mixtral (MoE) model: upcycling starts from a dense Llama model")
    files, weight_map = _weight_files(path)
    stored = scan(files)
    if weight_map is not None:
        for name, entry in stored.items():
            if weight_map.get(name) != entry.path.name:
                raise ConfigError(f"{path}: tensor {name} is in {entry.path.name} but {INDEX} says "
                                  f"{weight_map.get(name)}: the checkpoint is inconsistent; re-save it")
        absent = sorted(set(weight_map) - set(stored))
        if absent:
            raise ConfigError(f"{path}: tensor {absent[0]} listed in {INDEX} is in none of the shards")
    return Dense(path, "hf", model, _as_dense_names(model, stored, rename=renamed_from_hf),
                 config_fields={k: config[k] for k in KEPT_CONFIG_FIELDS if config.get(k) is not None},
                 carried=[path / f for f in CARRIED_FILES if (path / f).is_file()])


def _run_config(path: Path) -> Path | None:
    for candidate in (path / ".hydra" / "config.yaml", path / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _open_run(path: Path) -> Dense:
    """A dropup run directory: model.safetensors in our naming; the model config from its Hydra config."""
    from omegaconf import OmegaConf

    results = path / "results.json"
    status = json.loads(results.read_text()).get("status") if results.is_file() else None
    if status != "completed":
        raise ConfigError(f"--dense {path} is a dropup run whose results.json says status={status!r}: only a "
                          "completed run's weights are final; wait for it or pick another run")
    try:
        cfg = OmegaConf.load(_run_config(path))
        model = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
        moe_enabled = bool(cfg.get("moe", {}).get("enabled", False))
    except Exception as err:  # any unreadable config is the same problem to the user
        raise ConfigError(f"{_run_config(path)}: cannot read its model config ({err})") from None
    if moe_enabled:
        raise ConfigError(f"--dense {path} is an MoE run: upcycling starts from a dense model")
    stored = scan([path / "model.safetensors"])
    return Dense(path, "run", model, _as_dense_names(model, stored, rename=lambda name: name))


def _as_dense_names(model: ModelConfig, stored: dict, rename) -> dict:
    """Stored tensors under our names; a tensor with no place in a dense model of `model` is an error."""
    expected = dense_shapes(model)
    tensors = {}
    for name, entry in stored.items():
        ours = rename(name)
        if ours not in expected:
            raise ConfigError(f"{entry.path}: tensor {name} is not part of a dense Llama model: dropup-upcycle "
                              "converts plain Llama checkpoints only")
        tensors[ours] = entry
    return tensors


def _same_architecture(inputs: list[Dense]) -> ModelConfig:
    """BTX averages and mixes several dense models: they must share one architecture exactly."""
    first = inputs[0]
    for other in inputs[1:]:
        diff = [f"{k}={v} (vs {getattr(first.model, k)})" for k, v in asdict(other.model).items()
                if k != "name" and v != getattr(first.model, k)]
        if diff:
            raise ConfigError(f"--dense {other.path} differs from --dense {first.path} in {', '.join(diff)}: "
                              "all dense models must have the same architecture (BTX mixes their tensors)")
    return first.model


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class Shard:
    """One output file: the tensors it holds, in order, and our names of the tensors they come from."""

    file: str
    tensors: list[PlannedTensor]
    sources: set[str]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(model: ModelConfig, moe: MoEConfig, layout: str, dtype: torch.dtype, max_bytes: int) -> list[Shard]:
    """Every output tensor (our state-dict order, as HF names), cut into shards of at most `max_bytes`.

    Shapes come from the model built on the meta device, mapped by the same `hf_tensors` the writer uses, so the
    plan is exact before any weight exists; a tensor larger than `max_bytes` gets a shard of its own."""
    groups: list[list[tuple[PlannedTensor, str]]] = [[]]
    size = 0
    for ours, shape in moe_shapes(model, moe).items():
        for name, meta in hf_tensors(ours, torch.empty(shape, dtype=dtype, device="meta"), layout).items():
            planned = PlannedTensor(name, tuple(meta.shape), dtype)
            if groups[-1] and size + planned.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append((planned, ours))
            size += planned.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", [t for t, _ in g], {o for _, o in g})
            for i, g in enumerate(groups)]


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
            return cls(out, data["options"], data["consumed"], data["shards"])
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
    """Drop/noise: the neuron sets S of every (layer, expert[, matrix]), from the strategy's own `indices`."""
    if not hasattr(strategy, "indices"):
        return None
    d_f = moe.expert_d_ff(model)
    shared = strategy.index_mode == "shared"
    layers = []
    for layer in range(model.n_layers):
        experts = []
        for e in range(moe.num_experts):
            idx = strategy.indices(d_f, ExpertKey(seed, layer, e))
            experts.append({"gate_up_down": _bitmask(idx["gate"], d_f)} if shared
                           else {m: _bitmask(idx[m], d_f) for m in ("gate", "up", "down")})
        layers.append(experts)
    return {
        "rule": "per (layer, expert): |S| = floor(ratio * d_f) expert neurons; gate/up rows and down columns in S "
                "were " + ("redrawn from N(mean, std^2) of the dense sub-block" if strategy.name == "drop"
                           else f"given added N(0, {strategy.std}^2) noise"),
        "count": reinit_count(strategy.ratio, d_f),
        "d_f": d_f,
        "index_mode": strategy.index_mode,
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
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = DTYPE_LABELS[job.dtype]
    atomic_write(out / "config.json", config.to_json_string(use_diff=False))
    progress.path.unlink()
    fsync_dir(out)
    return manifest


# ------------------------------------------------------------------------------------------------- verifying


def _output_reader(out: Path) -> CheckpointReader:
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    return CheckpointReader(scan(sorted({out / f for f in weight_map.values()})))


def _output_experts(output: CheckpointReader, layer: int, layout: str, d_f: int, n: int) -> list[tuple]:
    """(W_gate (F, D), W_up (F, D), W_down (D, F)) of every expert of one layer, as written."""
    if layout == "fused":
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up, down = output[prefix + "gate_up_proj"], output[prefix + "down_proj"]
        return [(gate_up[e, :d_f], gate_up[e, d_f:], down[e]) for e in range(n)]
    prefix = f"model.layers.{layer}.block_sparse_moe.experts."
    return [tuple(output[f"{prefix}{e}.{w}.weight"] for w in ("w1", "w3", "w2")) for e in range(n)]


def changed_neurons(new_FD: torch.Tensor, old_FD: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the neurons (rows in the (F, D) layout) where an expert differs from its source."""
    return (new_FD != old_FD).any(dim=1).nonzero().flatten()


def verify(job: Job) -> list[str]:
    """Check the written files against the dense model(s); lines starting with FAIL mark a failed check.

    1. Streaming, any size (not scratch): in every expert and matrix, exactly the neurons of the strategy's index
       set differ from the source FFN slice (none for naive and BTX); prints the re-initialized share per expert
       and matrix.
    2. When small enough to load twice in fp32: logits of the MoE (transformers) vs the dense model -- equal up
       to rounding at r = 0, finite otherwise."""
    lines = [] if job.strategy.name == "scratch" else _verify_index_sets(job)
    total = param_counts(job.model, job.moe)["total_params"]
    if total > VERIFY_MAX_PARAMS:
        return [*lines, f"logits: not compared ({_count(total)} parameters; transformers runs both models only "
                        f"below {_count(VERIFY_MAX_PARAMS)})"]
    return lines + _verify_logits(job)


def _verify_index_sets(job: Job) -> list[str]:
    model, moe, strategy, seed = job.model, job.moe, job.strategy, job.options["seed"]
    d_f, n_e, n_l = moe.expert_d_ff(model), moe.num_experts, model.n_layers
    output = _output_reader(job.out)
    readers = [d.reader() for d in job.inputs]
    none = torch.empty(0, dtype=torch.long)
    share = np.zeros((n_e, 3))  # changed neurons / d_f, mean over layers, per (expert, gate/up/down)
    mismatches = []
    for layer in range(n_l):
        ffn = {}
        for e, written in enumerate(_output_experts(output, layer, job.options["layout"], d_f, n_e)):
            m, part = expert_source(e, n_e, moe.granularity, len(readers))
            if m not in ffn:
                ffn[m] = [readers[m][f"layers.{layer}.ffn.{w}.weight"].to(job.dtype)
                          for w in ("w_gate", "w_up", "w_down")]
            cols = slice(part * d_f, (part + 1) * d_f)
            source = (ffn[m][0][cols], ffn[m][1][cols], ffn[m][2][:, cols].t())
            expected = (strategy.indices(d_f, ExpertKey(seed, layer, e)) if hasattr(strategy, "indices")
                        else {"gate": none, "up": none, "down": none})
            for j, (matrix, new, old) in enumerate(zip(("gate", "up", "down"),
                                                       (written[0], written[1], written[2].t()), source)):
                changed = changed_neurons(new, old)
                share[e, j] += changed.numel() / d_f / n_l
                if not torch.equal(changed, expected[matrix]):
                    mismatches.append(f"layer {layer} expert {e} {matrix}")
    count = reinit_count(strategy.ratio, d_f) if hasattr(strategy, "indices") else 0
    lines = [f"re-initialized share of each expert's d_ff={d_f} neurons, mean over {n_l} layers "
             f"(the init sets floor(r * d_f) / d_f = {count / d_f:.4f}):",
             "  expert   gate     up       down"]
    lines += [f"  {e:<6}   {share[e, 0]:.4f}   {share[e, 1]:.4f}   {share[e, 2]:.4f}" for e in range(n_e)]
    if mismatches:
        return [*lines, f"FAIL: changed neurons differ from the init's index sets in {len(mismatches)} "
                        f"place(s), first {mismatches[0]}"]
    return [*lines, "OK: in every layer, expert and matrix exactly the init's neuron set differs from the dense "
                    "source (the sets in the manifest)"]


def _dense_transformers(dense: Dense, model: ModelConfig):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from dropup.hf import to_hf

    if dense.kind == "hf":
        return AutoModelForCausalLM.from_pretrained(dense.path, dtype=torch.float32)
    llama = LlamaForCausalLM(hf_config(model))
    llama.load_state_dict({k: v.float() for k, v in to_hf(load_file(dense.path / "model.safetensors")).items()})
    return llama


def _verify_logits(job: Job) -> list[str]:
    """Both models in fp32; the dense weights are first rounded to the output dtype, as the MoE's were."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out, dense, model, moe, strategy = job.out, job.inputs[0], job.model, job.moe, job.strategy
    seed, d_f = job.options["seed"], moe.expert_d_ff(job.model)
    tokens = torch.randint(0, model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        moe_logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
        if not torch.isfinite(moe_logits).all():
            return ["FAIL: the MoE's logits are not finite"]
        if strategy.name == "scratch":
            return ["logits: the MoE loads with transformers and its logits are finite"]
        reference = _dense_transformers(dense, model).eval()
        for param in reference.parameters():
            param.copy_(param.to(job.dtype))
        dense_logits = reference(tokens).logits
    diff = (moe_logits - dense_logits).abs().max().item()
    dense_function = moe.granularity == 1 and (
        strategy.name == "naive" or (hasattr(strategy, "indices") and reinit_count(strategy.ratio, d_f) == 0))
    if not dense_function:
        return [f"logits: max |MoE - dense ({dense.path.name})| = {diff:.3g} (not expected to be 0 for this init)"]
    scale = dense_logits.abs().max().item()
    verdict = "OK" if diff <= 1e-4 * (1 + scale) else "FAIL"
    return [(f"{verdict}: logits of the MoE equal the dense model's (r = 0): max |difference| = {diff:.3g} "
             f"(max |logit| {scale:.3g})")]


# ------------------------------------------------------------------------------------------------ converting


@dataclass
class Result:
    out: Path
    manifest: dict
    bytes_written: int
    shards_resumed: int
    seconds: float
    verify_lines: list[str] = field(default_factory=list)


def _progress_bar(console):
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    return Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tensors]}"),
               DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=console,
               disable=not console.is_terminal)


@dataclass
class Job:
    """A conversion, fully validated before anything is written."""

    strategy: InitStrategy
    inputs: list[Dense]
    readers: list[CheckpointReader]  # empty for scratch, which reads only the config
    model: ModelConfig
    moe: MoEConfig
    dtype: torch.dtype
    shards: list[Shard]
    options: dict  # everything that determines the output bytes (compared on resume)
    out: Path


def plan_job(args: argparse.Namespace) -> Job:
    """Check every input and option, and plan every output tensor; reads headers only, writes nothing."""
    strategy = make_strategy(args)
    if args.init == "scratch" and len(args.dense) != 1:
        raise ConfigError("--init scratch reads only the architecture (config.json) of one --dense directory")
    inputs = [open_dense(p) for p in args.dense]
    model = _same_architecture(inputs)
    try:
        moe = MoEConfig(enabled=True, num_experts=args.experts, top_k=args.top_k, granularity=args.granularity)
        check_pair(model, moe)
    except ConfigError as err:  # say it in the CLI's words
        message = str(err)
        for field_name, flag in (("moe.num_experts", "--experts"), ("moe.top_k", "--top-k"),
                                 ("moe.granularity", "--granularity")):
            message = message.replace(field_name, flag)
        raise ConfigError(message) from None
    readers = [] if args.init == "scratch" else [d.reader() for d in inputs]
    try:
        strategy.validate(len(readers), moe)
    except ConfigError as err:
        raise ConfigError(f"{err} (one --dense per model)") from None
    check_sources(readers, model)
    dtype = DTYPES.get(args.dtype) or (readers[0].meta("tok_emb.weight")[1] if readers else torch.float32)
    out = args.out.resolve()
    for d in inputs:
        if out == d.path or out.is_relative_to(d.path) or d.path.is_relative_to(out):
            raise ConfigError(f"--out {out} overlaps --dense {d.path}: write the MoE to a directory of its own")
    options = {
        "init": args.init, "ratio": strategy.ratio_value if args.init in ("drop", "noise") else None,
        "index_mode": getattr(strategy, "index_mode", None), "noise_std": getattr(strategy, "std", None),
        "experts": moe.num_experts, "top_k": moe.top_k, "granularity": moe.granularity,
        "router_init": strategy.router, "seed": args.seed, "dtype": DTYPE_LABELS[dtype], "layout": args.layout,
        "shard_size": args.shard_size, "dense": [d.identity() for d in inputs],
    }
    return Job(strategy, inputs, readers, model, moe, dtype,
               plan_shards(model, moe, args.layout, dtype, args.shard_size), options, out)


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
                console.print(f"wrote {shard.file} ({_bytes(shard.nbytes)}, {count[0]}/{total} tensors)")

        writer = BackgroundWriter(job.out, todo, _layer_bytes(job.model, job.moe, job.dtype), on_tensor, on_shard)
        try:
            for ours, tensor in moe_tensors(job.strategy, job.readers, job.model, job.moe, job.options["seed"],
                                            job.dtype, names=wanted, threads=BUILD_THREADS):
                for name, part in hf_tensors(ours, tensor, job.options["layout"]).items():
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
        raise ConfigError(f"--out {job.out} needs {_bytes(needed)} more but its disk has {_bytes(free)} free: "
                          "free space or choose another --out")
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
    result = Result(job.out, manifest, needed, len(job.shards) - len(todo), time.perf_counter() - started)
    if args.verify:
        result.verify_lines = verify(job)
    return result


def _layer_bytes(model: ModelConfig, moe: MoEConfig, dtype: torch.dtype) -> int:
    """Bytes of one layer's experts (or of the largest tensor, if bigger): the writer's memory budget."""
    shapes = moe_shapes(model, moe)
    numel = [math.prod(shape) for shape in shapes.values()]
    experts = math.prod(shapes["layers.0.ffn.w_gate_up"]) + math.prod(shapes["layers.0.ffn.w_down"])
    return max(experts, *numel) * torch.empty((), dtype=dtype).element_size()


def _check_consumed(job: Job, progress: Progress) -> None:
    """Strict accounting: every source tensor fed the output (scratch reads none: it uses only the config)."""
    for dense, reader, before in zip(job.inputs, job.readers, progress.consumed):
        unused = sorted(set(reader) - reader.consumed_names() - before)
        if unused:
            raise UpcycleError(f"--dense {dense.path}: tensor {unused[0]} (and {len(unused) - 1} more) was never "
                               "used; the output would silently lack it, so it is not marked complete")


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def summary(result: Result) -> str:
    m = result.manifest
    o, params = m["options"], m["params"]
    how = {"drop": f"drop r={o['ratio']} ({o['index_mode']} index sets)", "noise": f"noise r={o['ratio']} "
           f"(std {o['noise_std']}, {o['index_mode']} index sets)"}.get(o["init"], o["init"])
    sources = ", ".join(d["path"] for d in m["dense"])
    resumed = f", resuming {result.shards_resumed} shard(s) already written" if result.shards_resumed else ""
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    carried = (f" Carried over from the dense directory: {', '.join(m['carried'])}." if m["carried"] else
               " The dense directory had no tokenizer files to carry over.")
    return (
        f"Upcycled {sources} into a Mixtral with {o['experts']} experts (top-{o['top_k']}) at {result.out}, "
        f"init {how}, "
        f"router {o['router_init']}, seed {o['seed']}: {_count(params['total_params'])} parameters in total, "
        f"{_count(params['active_params'])} active per token, {len(m['tensors'])} {o['dtype']} tensors "
        f"({o['layout']} layout) in {len(m['files'])} shard(s). Wrote {_bytes(result.bytes_written)} in "
        f"{result.seconds:.1f} s ({_bytes(rate)}/s){resumed}. Every tensor's sha256"
        f"{' and the re-initialized neuron sets' if m['reinitialized'] else ''} are in {MANIFEST}; load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained('{result.out}').{carried}"
    )


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        result = upcycle(args, console)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (UpcycleError, PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}: fix the cause (disk space, permissions) and re-run the same command to resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted: re-run the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    for line in result.verify_lines:
        print(line)
    print(summary(result))
    return 1 if any(line.startswith("FAIL") for line in result.verify_lines) else 0


if __name__ == "__main__":
    sys.exit(main())
