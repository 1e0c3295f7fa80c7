"""What preparation's worker processes run (scan and tokenize one chunk), how chunks are fanned out to them in order,
and the progress meter of each step. The records the workers return are defined here: `SCAN_RECORD` is one
document's (128-bit content hash, characters, domain, split)."""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import numpy as np

from dropup.data.corpus import EOT, MIN_DOC_CHARS, clean, content_hash, is_val

TRAIN, VAL = 1, 2  # a document's fate in fate.u8; 0: dropped
TOO_SHORT = 255  # scan record's split for documents under MIN_DOC_CHARS after cleaning
SCAN_RECORD = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("chars", "<u4"), ("domain", "<u2"), ("split", "u1"),
                        ("pad", "u1")])
ENCODE_CHARS = 1_000_000

_TOKENIZER = None
_SINGLE_THREAD = False


def _init_worker(tokenizer_json: str | None, single_thread: bool):
    global _TOKENIZER, _SINGLE_THREAD
    _SINGLE_THREAD = single_thread
    if single_thread:  # one process per core already: a thread pool per process would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    if tokenizer_json is not None:
        from tokenizers import Tokenizer

        _TOKENIZER = Tokenizer.from_str(tokenizer_json)


def scan_chunk(docs: list[tuple[int, str]], val_fraction: float) -> np.ndarray:
    """One scan record per document."""
    out = np.zeros(len(docs), dtype=SCAN_RECORD)
    keys, splits, chars = bytearray(16 * len(docs)), [], []
    for i, (_, text) in enumerate(docs):
        doc = clean(text)
        chars.append(len(doc))
        if len(doc) < MIN_DOC_CHARS:
            splits.append(TOO_SHORT)
            continue
        keys[16 * i:16 * i + 16] = content_hash(doc)
        splits.append(VAL - 1 if is_val(doc, val_fraction) else TRAIN - 1)
    hashes = np.frombuffer(bytes(keys), dtype="<u8").reshape(-1, 2)  # the 16-byte key as two little-endian halves
    out["h0"], out["h1"] = hashes[:, 0], hashes[:, 1]
    out["domain"], out["chars"], out["split"] = [d for d, _ in docs], chars, splits
    return out


def tokenize_chunk(docs: list[tuple[int, str]], n_streams: int) -> list[np.ndarray | None]:
    """Token ids per stream (domain * 2 + side) of a chunk's kept documents, each followed by EOT. A worker encodes
    ~1 M characters at a time (an Encoding costs ~100 bytes per token until it becomes ids); this process, whose
    tokenizer runs on all cores, encodes the chunk at once, as smaller batches leave threads waiting on the longest
    document of each."""
    tokenizer = _TOKENIZER
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
    eot = np.array([tokenizer.token_to_id(EOT)], dtype=dtype)
    limit = ENCODE_CHARS if _SINGLE_THREAD else float("inf")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # ids only: no offsets (0.21+)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_streams)]
    start = 0
    while start < len(docs):
        end, chars = start, 0
        while end < len(docs) and (end == start or chars < limit):
            chars += len(docs[end][1])
            end += 1
        batch = docs[start:end]
        for (stream, _), enc in zip(batch, encode([clean(text) for _, text in batch])):
            parts[stream] += [np.array(enc.ids, dtype=dtype), eot]  # arrays, not ints: no giant lists for the GC
        start = end
    return [np.concatenate(p) if p else None for p in parts]


def ordered_map(fn: Callable, items: Iterable[tuple], processes: int, tokenizer_json: str | None = None) -> Iterator:
    """fn(*item) for each item, in order: on `processes` worker processes with two items in flight per worker, or in
    this process when there is one worker or one item (no start-up cost for small corpora)."""
    items = iter(items)
    head = list(itertools.islice(items, 2))
    if processes <= 1 or len(head) < 2:
        _init_worker(tokenizer_json, single_thread=False)
        for item in itertools.chain(head, items):
            yield fn(*item)
        return
    import multiprocessing

    # fork where there is one (Linux), as torch's DataLoader and datasets.map do: workers start at once and do not
    # re-import the caller's main module; they never touch torch or the parent's threads, which is what makes forking
    # a threaded parent unsafe. Elsewhere spawn (the caller needs the usual `if __name__ == "__main__":` guard).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # "false": the children's setting, and it silences tokenizers' warning about forking after its threads ran
    with tokenizers_parallelism("false"), ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
            initargs=(tokenizer_json, True)) as pool:
        pending: deque = deque()
        for item in itertools.chain(head, items):
            pending.append(pool.submit(fn, *item))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def tokenizers_parallelism(value: str | None):
    """TOKENIZERS_PARALLELISM set to `value` (None: unset) for the block, then restored."""
    def put(setting):
        if setting is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = setting

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    put(value)
    try:
        yield
    finally:
        put(before)


def chunked(documents: Iterable[tuple[str, str]], domains: list[str], chunk_chars: int):
    """The document stream cut into chunks of about chunk_chars characters: lists of (domain index, text)."""
    index = {d: i for i, d in enumerate(domains)}
    chunk, chars = [], 0
    for domain, text in documents:
        chunk.append((index[domain], text))
        chars += len(text)
        if chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class Meter:
    """A progress bar of documents, tokens and throughput (rich; drawn on terminals only) plus a log line at the end."""

    def __init__(self, label: str, total: int | None, log):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.label, self.log, self.start = label, log, time.perf_counter()
        self.docs = self.tokens = self.chars = 0
        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("docs"),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task(label, total=total, detail="")

    def __enter__(self):
        self.progress.start()
        return self

    def advance(self, docs: int, chars: int = 0, tokens: int = 0):
        self.docs += docs
        self.chars += chars
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        if self.tokens:
            detail = f"{self.tokens:,} tokens, {self.tokens / elapsed / 1e3:,.0f} k tokens/s"
        else:
            detail = f"{self.chars / 1e6:,.1f} M characters, {self.chars / elapsed / 1e6:,.1f} M/s"
        self.progress.update(self.task, advance=docs, detail=detail)

    def __exit__(self, *exc):
        self.progress.stop()
        if exc[0] is None:
            elapsed = time.perf_counter() - self.start
            tokens = f", {self.tokens:,} tokens ({self.tokens / max(elapsed, 1e-9):,.0f}/s)" if self.tokens else ""
            self.log(f"{self.label}: {self.docs:,} documents, {self.chars / 1e6:,.1f} M characters{tokens} in "
                     f"{elapsed:.1f} s")


