"""Training batches that depend only on (stream, seed, step), and per-domain validation windows, read from the
memory-mapped token shards of a prepared dataset (format 2), or from one file per split (format 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dropup.data.streams import DATA_STREAM_VERSION
from dropup.data.corpus import DataError
from dropup.rng import generator


class TokenStream:
    """The shards of one split as one sequence of token ids (nothing is read until a window is asked for)."""

    def __init__(self, files: list[Path], dtype: np.dtype):
        self.parts = [np.memmap(f, dtype=dtype, mode="r") for f in files if f.stat().st_size]
        self.offsets = np.cumsum([0, *(p.size for p in self.parts)])
        self.size = int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """ids[start:start + length] as int64, across shard boundaries where it has to."""
        out, end = [], start + length
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.parts)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if lo >= end:
                break
            out.append(self.parts[i][max(start, lo) - lo:min(end, hi) - lo])
        return np.concatenate(out).astype(np.int64) if len(out) != 1 else np.asarray(out[0], dtype=np.int64)


def split_files(path: Path, manifest: dict, domain: str, side: str) -> list[Path]:
    if "shards" in manifest:
        return [path / entry["file"] for entry in manifest["shards"].get(f"{domain}.{side}", [])]
    return [path / f"{domain}.{side}.bin"]


class TokenData:
    """Token streams of a prepared dataset. Training windows are drawn from a generator seeded by (stream, seed,
    step), so a batch depends only on the step: resuming, or any number of data-parallel ranks, sees the same data;
    the dense seed, each BTX branch and the MoE runs of one seed each read a stream of their own. The windows do not
    depend on how a split is cut into shards."""

    def __init__(self, path: Path, domains: list[str], seq_len: int, weights: dict | None = None):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.domains, self.seq_len = list(domains), seq_len
        dtype = np.dtype(self.manifest["dtype"])
        self.train, self.val = {}, {}
        for domain in self.domains:
            for side, store in (("train", self.train), ("val", self.val)):
                files = split_files(self.path, self.manifest, domain, side)
                missing = [f for f in files if not f.is_file()]
                if missing or not files:
                    raise DataError(f"{missing[0] if missing else self.path}: the prepared data has no {side} split "
                                    f"for domain {domain!r} (rebuild it, or check data.domains)")
                store[domain] = TokenStream(files, dtype)
                if store[domain].size < seq_len + 1:
                    raise DataError(
                        f"domain {domain!r} has {store[domain].size} {side} tokens, fewer than one sequence of "
                        f"data.seq_len={seq_len} + 1: add text to that domain or lower data.seq_len"
                    )
        sizes = np.array([self.train[d].size for d in self.domains], dtype=np.float64)
        if weights:
            if not hasattr(weights, "items") or not all(isinstance(v, (int, float)) and v >= 0 for v in weights.values()) \
                    or not sum(weights.values()) > 0:
                raise DataError(f"data.weights={weights!r} is not a mixture: give each domain a non-negative weight, "
                                "e.g. data.weights='{ja: 0.49, en: 0.46, code: 0.055}'")
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
            tokens = self.train[self.domains[int(domain_idx[i])]]
            start = int(starts[i] * (tokens.size - self.seq_len - 1))
            windows.append(tokens.window(start, self.seq_len + 1))
        batch = torch.from_numpy(np.stack(windows))
        return batch[:, :-1], batch[:, 1:]

    def val_batches(self, domain: str, batch_size: int, max_tokens: int):
        """Consecutive non-overlapping windows from the start of the domain's validation split."""
        tokens = self.val[domain]
        n_windows = max(1, min((tokens.size - 1) // self.seq_len, max_tokens // self.seq_len))
        for first in range(0, n_windows, batch_size):
            batch = torch.from_numpy(np.stack([tokens.window(i * self.seq_len, self.seq_len + 1)
                                               for i in range(first, min(first + batch_size, n_windows))]))
            yield batch[:, :-1], batch[:, 1:]
