"""Data: prepared token files per domain, batches that depend only on (stream, seed, step), per-domain validation.

`ensure_prepared(data_cfg, ...)` builds (once, under a lock) or finds the prepared dataset a config names;
`TokenData` serves training batches and fixed validation windows from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from dropup.data.corpus import DataError, hf_disk_documents, jsonl_documents, package_documents, prepare
from dropup.init.rng import generator

SOURCES = ("packages", "jsonl", "hf_disk", "tokens")
# Version of the map (stream, seed, step) -> training windows. Runs and dense seeds of another version read other
# data: the seed store keys on it and the sweep reruns such runs instead of mixing them in.
# 1: keyed on (seed, step) only, so a seed-0 MoE replayed its dense seed's batches. 2: keyed on the stream too.
DATA_STREAM_VERSION = 2
# Each kind of run reads its own stream; MoE runs of one seed share theirs, so paired comparisons see equal data.
STREAMS = ("moe", "dense", "seed", "branch-<domain>")

# The data settings that determine the prepared token files (and so key their cache folder).
PREPARATION_FIELDS = ("source", "path", "domains", "vocab_size", "val_fraction", "max_chars_per_domain")


def _key(data_cfg: dict, tokenizer_hash: str | None) -> str:
    fields = {k: data_cfg.get(k) for k in PREPARATION_FIELDS}
    fields["tokenizer"] = tokenizer_hash
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_prepared(data_cfg: dict, data_root: Path, tokenizer_path: Path | None = None, log=print) -> Path:
    """The prepared dataset folder for `data_cfg`, built on first use (cached by a hash of its settings)."""
    source = data_cfg["source"]
    if source not in SOURCES:
        raise DataError(f"data.source={source!r} is unknown; choose one of {SOURCES}")
    if source == "tokens":
        path = Path(data_cfg["path"] or "")
        if not (path / "manifest.json").is_file():
            raise DataError(f"data.path={path} has no manifest.json: point it at a prepared token folder "
                            "(<domain>.train.bin, <domain>.val.bin, manifest.json with dtype and vocab_size)")
        return path
    tok_hash = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() if tokenizer_path else None
    out = Path(data_root) / f"{data_cfg['name']}-{_key(data_cfg, tok_hash)}"
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "manifest.json").is_file():
            return out
        domains = list(data_cfg["domains"])
        provenance = []
        if source == "packages":
            documents, provenance = package_documents(Path(data_root) / "sources", domains,
                                                      progress=lambda m: log(f"[data] {m}"))
        elif source == "jsonl":
            documents = jsonl_documents(Path(data_cfg["path"]), domains)
        else:
            documents = hf_disk_documents(Path(data_cfg["path"]), domains)
        prepare(out, documents, vocab_size=data_cfg["vocab_size"], val_fraction=data_cfg["val_fraction"],
                max_chars_per_domain=data_cfg.get("max_chars_per_domain"), tokenizer_path=tokenizer_path,
                sources=provenance, progress=lambda m: log(f"[data] {m}"))
        log(f"[data] prepared {out}")
    return out


class TokenData:
    """Token streams of a prepared dataset. Training windows are drawn from a generator seeded by (stream, seed,
    step), so a batch depends only on the step: resuming, or any number of data-parallel ranks, sees the same data;
    the dense seed, each BTX branch and the MoE runs of one seed each read a stream of their own."""

    def __init__(self, path: Path, domains: list[str], seq_len: int, weights: dict | None = None):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.domains, self.seq_len = list(domains), seq_len
        dtype = np.dtype(self.manifest["dtype"])
        self.train, self.val = {}, {}
        for domain in self.domains:
            for side, store in (("train", self.train), ("val", self.val)):
                file = self.path / f"{domain}.{side}.bin"
                if not file.is_file():
                    raise DataError(f"{file} is missing: the prepared data has no {side} split for domain {domain!r}")
                store[domain] = np.memmap(file, dtype=dtype, mode="r")
                if store[domain].size < seq_len + 1:
                    raise DataError(
                        f"domain {domain!r} has {store[domain].size} {side} tokens, fewer than one sequence of "
                        f"data.seq_len={seq_len} + 1: add text to that domain or lower data.seq_len"
                    )
        sizes = np.array([self.train[d].size for d in self.domains], dtype=np.float64)
        if weights:
            unknown = set(weights) - set(self.domains)
            if unknown:
                raise DataError(f"data.weights names unknown domain(s) {sorted(unknown)}; domains: {self.domains}")
            sizes = np.array([float(weights.get(d, 0.0)) for d in self.domains])
        self.weights = torch.tensor(sizes / sizes.sum(), dtype=torch.float64)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def train_batch(self, step: int, batch_size: int, seed: int, stream: str, rows: slice | None = None):
        """(inputs, targets), each (rows of batch_size, seq_len) int64, for optimizer step `step` of `stream`."""
        g = generator("train-batch", f"v{DATA_STREAM_VERSION}", stream, seed, step)
        domain_idx = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        starts = torch.rand(batch_size, generator=g, dtype=torch.float64)
        windows = []
        for i in range(batch_size)[rows or slice(None)]:
            stream = self.train[self.domains[int(domain_idx[i])]]
            start = int(starts[i] * (stream.size - self.seq_len - 1))
            windows.append(np.asarray(stream[start:start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(windows))
        return batch[:, :-1], batch[:, 1:]

    def val_batches(self, domain: str, batch_size: int, max_tokens: int):
        """Consecutive non-overlapping windows from the start of the domain's validation split."""
        stream = self.val[domain]
        n_windows = max(1, min((stream.size - 1) // self.seq_len, max_tokens // self.seq_len))
        for first in range(0, n_windows, batch_size):
            idx = range(first, min(first + batch_size, n_windows))
            batch = torch.from_numpy(np.stack([
                np.asarray(stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1], dtype=np.int64)
                for i in idx
            ]))
            yield batch[:, :-1], batch[:, 1:]
