"""Exact de-duplication of the scanned documents with bounded memory (preparation's step 2, `plan`).

Each record of scan.bin is (content hash, domain); a document repeats when an earlier one of the same domain has the
same 128-bit hash. Records are partitioned by hash into buckets on disk, about `bucket_records` each (1 M records:
32 MB), and each bucket is sorted in memory on its own, so memory is bounded by one bucket, not the corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dropup.data.workers import SCAN_RECORD, TOO_SHORT

BUCKET_RECORD = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("domain", "<u8"), ("index", "<u8")])


def mark_duplicates(scratch: Path, n: int, bucket_records: int) -> int:
    """dup.u8: 1 for every document whose (domain, content hash) occurred earlier. Bounded memory: records are
    partitioned by hash into buckets on disk, and each bucket is sorted on its own."""
    dup = np.memmap(scratch / "dup.u8", dtype=np.uint8, mode="w+", shape=(max(n, 1),))
    n_buckets = max(1, min(512, -(-n // bucket_records)))
    bucket_dir = scratch / "buckets"
    shutil.rmtree(bucket_dir, ignore_errors=True)
    bucket_dir.mkdir()
    files = [open(bucket_dir / f"{b:04d}.bin", "wb") for b in range(n_buckets)]
    block = 1 << 20
    try:
        for first in range(0, n, block):
            rec = np.fromfile(scratch / "scan.bin", dtype=SCAN_RECORD, count=min(block, n - first),
                              offset=first * SCAN_RECORD.itemsize)
            eligible = np.flatnonzero(rec["split"] != TOO_SHORT)
            rows = np.empty(eligible.size, dtype=BUCKET_RECORD)
            rows["h0"], rows["h1"] = rec["h0"][eligible], rec["h1"][eligible]
            rows["domain"], rows["index"] = rec["domain"][eligible], eligible + first
            bucket = rows["h1"] % n_buckets
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
            for b in range(n_buckets):
                if bounds[b + 1] > bounds[b]:
                    files[b].write(rows[order[bounds[b]:bounds[b + 1]]].tobytes())
    finally:
        for f in files:
            f.close()
    duplicates = 0
    for b in range(n_buckets):
        rows = np.fromfile(bucket_dir / f"{b:04d}.bin", dtype=BUCKET_RECORD)
        if rows.size < 2:
            continue
        rows = rows[np.lexsort((rows["index"], rows["h1"], rows["h0"], rows["domain"]))]
        same = ((rows["h0"][1:] == rows["h0"][:-1]) & (rows["h1"][1:] == rows["h1"][:-1])
                & (rows["domain"][1:] == rows["domain"][:-1]))
        repeats = rows["index"][1:][same]
        dup[repeats] = 1
        duplicates += int(repeats.size)
    dup.flush()
    del dup
    shutil.rmtree(bucket_dir)
    return duplicates
